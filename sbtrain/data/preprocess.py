"""jsonl -> Megatron indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

One sequence per document, ``eod`` appended by default, token dtype chosen by Megatron's
``DType.optimal_dtype(vocab_size)`` (uint16 for vocabularies under 65500, else int32), the
same convention as Megatron's ``tools/preprocess_data.py``. Outputs are written to temporary
files and renamed at the end, so a failed run never leaves a half-written dataset behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sbtrain.data.tokenizer import Tokenizer, load_tokenizer
from sbtrain.errors import DataError

_BATCH_DOCS = 256
"""Documents tokenized per ``encode_batch`` call (``tokenizers`` parallelises inside it)."""


@dataclass
class PreprocessStats:
    """What one ``preprocess`` call wrote."""

    documents: int
    tokens: int
    skipped_empty: int
    """Documents whose text encodes to no tokens; they are left out."""
    seconds: float
    bin_path: str
    idx_path: str


def preprocess(input_jsonl: str, output_prefix: str, tokenizer_path: str,
               json_key: str = "text", append_eod: bool = True,
               log_every: int = 10_000) -> PreprocessStats:
    """Tokenize every line of ``input_jsonl`` into ``output_prefix.{bin,idx}``.

    Args:
        input_jsonl: one JSON object per line; blank lines are ignored.
        output_prefix: output path without extension; missing directories are created.
        tokenizer_path: see ``load_tokenizer``.
        json_key: field holding the document text (a string).
        append_eod: append the tokenizer's end-of-document id to every document.
        log_every: print progress (documents, tokens, docs/s) every this many documents;
            0 disables.

    Raises:
        FileNotFoundError: the input file or the tokenizer is missing.
        ValueError: a line is not valid JSON, not an object, lacks ``json_key`` or its value
            is not a string (the message names the file and the line number); or the file
            holds no non-empty document.
    """
    # deferred: this module is torch-free until it writes; megatron-core costs seconds to import
    from megatron.core.datasets.indexed_dataset import DType

    if not os.path.isfile(input_jsonl):
        raise FileNotFoundError(f"input file not found: {input_jsonl}")
    tokenizer = load_tokenizer(tokenizer_path)
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_bin, tmp_idx = bin_path + ".tmp", idx_path + ".tmp"
    try:
        stats = _write(input_jsonl, tmp_bin, tmp_idx, tokenizer, dtype, json_key, append_eod,
                       log_every)
        if not stats.documents:
            # an empty dataset would only fail later, at training, as a "corrupt" index
            raise DataError(f"{input_jsonl}: no documents to write ({stats.skipped_empty} "
                            f"empty texts skipped); nothing was written to {output_prefix}")
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    stats.bin_path, stats.idx_path = bin_path, idx_path
    return stats


def _write(input_jsonl: str, bin_path: str, idx_path: str, tokenizer: Tokenizer, dtype: type,
           json_key: str, append_eod: bool, log_every: int) -> PreprocessStats:
    # deferred: as above, the argument and input checks run without torch
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    stats = PreprocessStats(0, 0, 0, 0.0, bin_path, idx_path)
    start = time.perf_counter()
    next_log = log_every
    try:
        for texts in _batches(_read_texts(input_jsonl, json_key), _BATCH_DOCS):
            for ids in tokenizer.encode_batch(texts):
                if not ids:
                    stats.skipped_empty += 1
                    continue
                if append_eod:
                    ids.append(tokenizer.eod)
                builder.add_item(torch.tensor(ids, dtype=torch.int64))
                builder.end_document()
                stats.documents += 1
                stats.tokens += len(ids)
            if log_every and stats.documents >= next_log:
                _log_progress(stats, time.perf_counter() - start)
                next_log = (stats.documents // log_every + 1) * log_every
    finally:
        # finalize closes the .bin; on an error the caller deletes both temporary files.
        builder.finalize(idx_path)
    stats.seconds = time.perf_counter() - start
    return stats


def _read_texts(path: str, json_key: str) -> Iterator[str]:
    """Yield the ``json_key`` string of each non-blank line, naming ``path:line`` on errors."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column "
                                 f"{exc.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            if json_key not in record:
                raise ValueError(f"{path}:{lineno}: missing key {json_key!r} "
                                 f"(keys: {sorted(record)[:10]})")
            text = record[json_key]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: key {json_key!r} holds "
                                 f"{type(text).__name__}, expected a string")
            yield text


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _log_progress(stats: PreprocessStats, elapsed: float) -> None:
    rate = stats.documents / max(elapsed, 1e-9)
    print(f"preprocess: {stats.documents} docs, {stats.tokens} tokens, {rate:.0f} docs/s, "
          f"{stats.tokens / max(elapsed, 1e-9):.0f} tokens/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (wired as ``sbtrain preprocess``)."""
    parser = argparse.ArgumentParser(
        prog="sbtrain preprocess",
        description="Tokenize a jsonl file into a Megatron indexed dataset (.bin/.idx).")
    parser.add_argument("--input", required=True, help="jsonl file, one document per line")
    parser.add_argument("--output-prefix", required=True, help="output path without extension")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or tokenizer directory")
    parser.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    parser.add_argument("--no-eod", action="store_true", help="do not append end-of-document ids")
    parser.add_argument("--log-every", type=int, default=10_000,
                        help="print progress every N documents (0: never)")
    args = parser.parse_args(argv)
    try:
        stats = preprocess(args.input, args.output_prefix, args.tokenizer, json_key=args.json_key,
                           append_eod=not args.no_eod, log_every=args.log_every)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {stats.documents} documents, {stats.tokens} tokens "
          f"({stats.skipped_empty} empty skipped) in {stats.seconds:.1f}s: "
          f"{stats.bin_path}, {stats.idx_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
