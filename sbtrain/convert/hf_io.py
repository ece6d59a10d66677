"""Read and write HF model directories: config.json plus (sharded) safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3


class HFTensors(dict):
    """A HF directory's tensors by name; a missing name is an error naming the directory."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    def __missing__(self, key: str) -> torch.Tensor:
        raise ValueError(f"{self.directory}: no tensor {key!r} in its safetensors files "
                         "(an incomplete or differently named checkpoint)")


def read_hf_dir(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor) of a HF directory saved as safetensors."""
    # deferred: safetensors is optional (only HF conversion reads it)
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a HF model directory: no config.json")
    config = json.loads(config_path.read_text())
    if (directory / INDEX).is_file():
        files = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    elif (directory / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"{directory} has no {SINGLE} or {INDEX} (only safetensors "
                                "checkpoints are read; re-save with safe_serialization=True)")
    tensors = HFTensors(directory)
    for name in files:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{directory / INDEX} lists shard {name}, which is missing")
        try:
            tensors.update(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise ValueError(f"{path}: cannot read safetensors ({exc})") from None
    return config, tensors


def write_hf_shards(directory: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Stream (name, tensor) pairs into safetensors shards of at most ``max_shard_bytes``
    (a shard is written and dropped as soon as it is full) plus an index when more than one;
    returns the number of tensors."""
    # deferred: safetensors is optional (only HF conversion writes it)
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # an older export's shards would otherwise stay beside the new ones (and its index)
    for old in [*directory.glob("model*.safetensors"), directory / INDEX]:
        old.unlink(missing_ok=True)
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[str, list[str]]] = []
    size = total = 0

    def flush() -> None:
        name = f"shard-{len(written) + 1:05d}.tmp"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        written.append((name, list(shard)))
        shard.clear()

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[key] = tensor
        size, total = size + nbytes, total + nbytes
    if shard:
        flush()
    count = len(written)
    names = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                         for i in range(count)]
    for (tmp, _), name in zip(written, names):
        (directory / tmp).replace(directory / name)
    if count > 1:
        weight_map = {key: name for (_, keys), name in zip(written, names) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2))
    return sum(len(keys) for _, keys in written)
