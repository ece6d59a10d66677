"""Produce (or collect) fla's autotuning results for the shapes the shipped configs send to fla.

On a GPU, with the installed Triton and fla-core:

    python3 scripts/tune_fla.py                     # tune in a fresh Triton cache, store, verify
    python3 scripts/tune_fla.py --collect-from DIR [DIR ...]   # store results a run already made
    python3 scripts/tune_fla.py --verify-only       # check the stored results hit

Tuning runs ``ops.gla.gla`` forced onto fla (``SB_OP_BACKEND_GLA=fla_chunk``) and, for grouped
shapes, onto ``gqa_chunk`` (fla's state kernels plus ours, ``ops/gla/gqa.py``), forward and
backward, once per distinct (batch, heads, head dim) of the GLA layers in ``--configs``, with
packed documents (``cu_seqlens``) where the config masks documents (``--all-varlen``: everywhere
too), in the dtypes the model uses (q, k, v bf16, log decay fp32). The model never passes an initial or final state to fla (sinks enter as an
additive term, ``sbtrain/model/gla.py``), so neither is tuned. Triton's autotune keys hold no
sequence length for GLA: ``--seq`` only sets how long the timed runs are.

The results go to ``ops/gla/tuned/<kind>/`` (``kind``: ``sm90`` for H100 and H200) with a
manifest; ``ops.gla.tuning.seed_autotune_cache`` copies them into Triton's cache before fla is
first imported. The verification step reruns the shapes in a child process with a fresh cache
seeded from the stored results and ``TRITON_PRINT_AUTOTUNING=1``, and counts the kernels that
still autotuned (should be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ops.gla.tuning import TUNED_ROOT, VERSIONED_PACKAGES, collect_autotune_files, current_gpu_kind  # noqa: E402
from sbtrain.config.load import load_config  # noqa: E402
from sbtrain.config.schema import parse_pattern  # noqa: E402

GLA_MIXERS = ("L", "H", "F")  # mixers with a linear-attention branch (sbtrain/config/schema.py)
AUTOTUNE_MARK = "Triton autotuning for function"
# bench/bench_model.py's 7B width is spikingbrain_7b.yaml's, so the configs cover it.
DEFAULT_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "examples/configs").glob("*.yaml"))


def gla_shapes(config_paths: list[str], all_varlen: bool = False) -> list[dict]:
    """Distinct (batch, heads, kv heads, head dim, packed documents) of the GLA layers of each
    config, per TP rank; packed documents (cu_seqlens) where ``data.document_mask`` is on, or
    both ways with ``all_varlen``."""
    shapes: dict[tuple, dict] = {}
    for path in config_paths:
        cfg = load_config(REPO / path)
        model, tp = cfg.model, cfg.parallel.tp
        if not any(mixer in GLA_MIXERS for mixer, _ in parse_pattern(model.pattern)):
            continue
        dim = model.head_dim or model.hidden_size // model.num_attention_heads
        for varlen in sorted({cfg.data.document_mask, cfg.data.document_mask or all_varlen}):
            shape = {"batch": cfg.train.micro_batch_size, "heads": model.num_attention_heads // tp,
                     "kv_heads": model.num_query_groups // tp, "dim": dim, "varlen": varlen}
            entry = shapes.setdefault(tuple(shape.values()), {**shape, "configs": []})
            entry["configs"].append(path)
    return list(shapes.values())


def run_shape(shape: dict, seq: int, varlen: bool, device: str = "cuda") -> float:
    """Forward + backward of ops.gla.gla (fla on a GPU) for one shape; returns the seconds it took."""
    import torch
    import torch.nn.functional as F

    from ops.gla import gla

    batch = 1 if varlen else shape["batch"]
    tokens = seq * (shape["batch"] if varlen else 1)
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(batch, tokens, heads, shape["dim"], device=device, generator=gen)

    q = F.relu(rand(shape["heads"])).bfloat16().requires_grad_()
    k = F.relu(rand(shape["kv_heads"])).bfloat16().requires_grad_()
    v = rand(shape["kv_heads"]).bfloat16().requires_grad_()
    # the model's log decay: logsigmoid in fp32 (sbtrain/model/gla.py, parallel_hybrid.py)
    g = (F.logsigmoid(rand(shape["kv_heads"])) / 16).requires_grad_()
    cu_seqlens = None
    if varlen:  # documents of uneven lengths, as packing makes them
        cuts = sorted({0, tokens // 3, tokens // 2 + 17, tokens})
        # int64, as ops.documents.cu_seqlens_from_segments makes them (dtypes are in the key)
        cu_seqlens = torch.tensor(cuts, dtype=torch.int64, device=device)
    sync()
    start = time.perf_counter()
    out, _ = gla(q, k, v, g, scale=shape["dim"] ** -0.5, cu_seqlens=cu_seqlens)
    out.float().square().mean().backward()
    sync()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, g))
    return time.perf_counter() - start


def run_all(shapes: list[dict], seq: int) -> list[dict]:
    timings = []
    for shape in shapes:
        # grouped shapes run gqa_chunk by default (ops/gla/gqa.py; its kernels cache their results
        # like fla's); fla_chunk stays tuned as their fallback. Forced: fail loudly, never tune nothing.
        backends = ["fla_chunk"] + (["gqa_chunk"] if shape["heads"] != shape["kv_heads"] else [])
        for backend in backends:
            os.environ["SB_OP_BACKEND_GLA"] = backend
            seconds = run_shape(shape, seq, shape["varlen"])
            timings.append({"batch": shape["batch"], "heads": shape["heads"], "varlen": shape["varlen"],
                            "backend": backend, "seconds": round(seconds, 2)})
            print(f"  {backend} B={shape['batch']} H={shape['heads']}/{shape['kv_heads']} D={shape['dim']} "
                  f"varlen={shape['varlen']}: {seconds:.1f} s", flush=True)
    return timings


def fresh_cache_env(cache_dir: str, seed: bool) -> None:
    """Point Triton at ``cache_dir`` (before triton is imported) and switch seeding on or off."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["SB_FLA_SEED"] = "1" if seed else "0"
    os.environ.setdefault("FLA_CACHE_RESULTS", "1")


def verify(args: argparse.Namespace) -> int:
    """Rerun the shapes in a child with a fresh, seeded cache; count kernels that still autotune."""
    cmd = [sys.executable, __file__, "--verify-only", "--child", "--seq", str(args.seq),
           "--configs", *args.configs] + (["--all-varlen"] if args.all_varlen else [])
    with tempfile.TemporaryDirectory(prefix="tune_fla_verify_") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache, "TRITON_PRINT_AUTOTUNING": "1", "SB_FLA_SEED": "1"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    tuned = [line for line in output.splitlines() if AUTOTUNE_MARK in line]
    print(output[-3000:] if proc.returncode else "\n".join(output.splitlines()[-12:]))
    print(f"verify: {len(tuned)} kernel(s) autotuned despite the stored results; "
          f"all shapes in {seconds:.0f} s (exit {proc.returncode})")
    return 1 if proc.returncode or tuned else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None,
                   help="YAMLs whose GLA shapes to tune (default: examples/configs/*.yaml); with "
                        "--collect-from: the configs the collected runs used, recorded in the manifest")
    p.add_argument("--seq", type=int, default=8192, help="tokens per sequence in the tuning runs")
    p.add_argument("--all-varlen", action="store_true",
                   help="also tune packed documents (cu_seqlens) for configs without data.document_mask")
    p.add_argument("--collect-from", nargs="+", metavar="DIR",
                   help="store the *.autotune.json of these Triton cache dirs; tune nothing")
    p.add_argument("--kind", help="with --collect-from: tuning kind (default: this GPU's, e.g. sm90)")
    p.add_argument("--device", default="", help="with --collect-from: device the results came from")
    p.add_argument("--versions", nargs="+", metavar="PKG=VER",
                   help="with --collect-from on another machine: the tuning machine's versions, e.g. "
                        "triton=3.6.0 fla-core=0.6.0 (default: the installed ones)")
    p.add_argument("--verify-only", action="store_true", help="only run the seeded check")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=TUNED_ROOT, help="stored-results root")
    p.add_argument("--replace", action="store_true",
                   help="drop the results already stored for this kind (default: keep them, new ones win)")
    args = p.parse_args(argv)
    explicit_configs = args.configs is not None
    args.configs = args.configs or DEFAULT_CONFIGS
    shapes = gla_shapes(args.configs, args.all_varlen)
    if args.child:  # the verification child: its cache dir and seeding come from the parent
        run_all(shapes, args.seq)
        return 0
    if args.collect_from:
        return collect(args, shapes if explicit_configs else [])
    if args.verify_only:
        return verify(args)
    return tune(args, shapes)


def collect(args: argparse.Namespace, shapes: list[dict]) -> int:
    found = None if args.kind else current_gpu_kind()
    if not args.kind and found is None:
        print("--collect-from without a GPU needs --kind (e.g. sm90) and --device", file=sys.stderr)
        return 2
    kind, device = (args.kind, args.device) if args.kind else found
    versions = None
    if args.versions:
        versions = dict(item.split("=", 1) for item in args.versions)
        missing = [name for name in VERSIONED_PACKAGES if name not in versions]
        if missing:
            print(f"--versions must name {', '.join(VERSIONED_PACKAGES)}; missing {missing}", file=sys.stderr)
            return 2
    manifest = collect_autotune_files([Path(d) for d in args.collect_from], kind, device,
                                      tuned_root=args.out, versions=versions, extra={"shapes": shapes},
                                      replace=args.replace)
    print(f"stored {len(manifest['files'])} results for {kind} in {args.out / kind} "
          f"(versions {manifest['versions']})")
    return 0


def tune(args: argparse.Namespace, shapes: list[dict]) -> int:
    with tempfile.TemporaryDirectory(prefix="tune_fla_") as cache:
        fresh_cache_env(cache, seed=False)
        found = current_gpu_kind()
        if found is None:
            print("tune_fla.py needs a CUDA/MACA GPU (or use --collect-from)", file=sys.stderr)
            return 2
        kind, device = found
        print(f"tuning fla for {device} ({kind}) in {cache}: {len(shapes)} shapes", flush=True)
        start = time.perf_counter()
        timings = run_all(shapes, args.seq)
        print(f"tuned in {time.perf_counter() - start:.0f} s", flush=True)
        manifest = collect_autotune_files([Path(cache)], kind, device, tuned_root=args.out,
                                          extra={"shapes": shapes, "tuning_runs": timings},
                                          replace=args.replace)
    print(f"stored {len(manifest['files'])} results in {args.out / kind}")
    print(json.dumps({"kind": kind, "device": device, "files": len(manifest["files"])}))
    return verify(args)


if __name__ == "__main__":
    sys.exit(main())
