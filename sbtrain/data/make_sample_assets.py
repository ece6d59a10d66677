"""Regenerate the sample corpus and its byte-level BPE tokenizer under ``examples/data/``.

Usage::

    python -m sbtrain.data.make_sample_assets             # tokenizer only, from the corpus
    python -m sbtrain.data.make_sample_assets --corpus    # corpus too, then the tokenizer

Both outputs are deterministic: the corpus depends only on its seed, and BPE training on a
fixed corpus is deterministic (pairs are merged by count, ties broken by the pair itself).
"""

from __future__ import annotations

import argparse
import json
import os

from sbtrain.data.sample_corpus import generate_documents
from sbtrain.data.tokenizer import EOD_TOKEN


DEFAULT_DIR = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "data")
CORPUS_NAME = "sample_corpus.jsonl"
TOKENIZER_NAME = "tokenizer.json"
VOCAB_SIZE = 512


def write_corpus(path: str, seed: int = 0) -> int:
    """Write the sample corpus as jsonl (``{"id": i, "text": ...}`` per line).

    Returns:
        the number of documents written.
    """
    docs = generate_documents(seed=seed)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    return len(docs)


def read_texts(corpus_path: str, json_key: str = "text") -> list[str]:
    """The ``json_key`` field of every non-blank line of a jsonl file."""
    with open(corpus_path, encoding="utf-8") as f:
        return [json.loads(line)[json_key] for line in f if line.strip()]


def train_tokenizer(corpus_path: str, output_path: str, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a GPT-2-style byte-level BPE tokenizer on a jsonl corpus and save it.

    ``<|endoftext|>`` is the only special token and gets id 0; the 256 byte symbols follow,
    and the remaining ``vocab_size - 257`` ids are merges. Byte-level BPE has no unknown
    token, so any UTF-8 text encodes and decodes back exactly.
    """
    # deferred: tokenizers is optional (only building the sample tokenizer needs it)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_texts(corpus_path), trainer=trainer)
    tok.save(output_path, pretty=True)


def make_sample_assets(out_dir: str = DEFAULT_DIR, regenerate_corpus: bool = False) -> None:
    """Write ``tokenizer.json`` (and, if asked, ``sample_corpus.jsonl``) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, CORPUS_NAME)
    if regenerate_corpus:
        count = write_corpus(corpus)
        print(f"wrote {count} documents to {corpus}")
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"sample corpus not found: {corpus} (pass --corpus to create it)")
    tokenizer = os.path.join(out_dir, TOKENIZER_NAME)
    train_tokenizer(corpus, tokenizer)
    print(f"wrote {tokenizer}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.normpath(DEFAULT_DIR))
    parser.add_argument("--corpus", action="store_true", help="regenerate the corpus as well")
    args = parser.parse_args(argv)
    make_sample_assets(args.out_dir, regenerate_corpus=args.corpus)


if __name__ == "__main__":
    main()
