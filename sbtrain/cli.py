"""``sbtrain`` command: train, plan, config, stages, world-size, preprocess, convert."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from sbtrain.config import ConfigError, load_config
from sbtrain.config.load import to_dict
from sbtrain.console import setup_console

USAGE = """usage: sbtrain <command> [args]

commands:
  train CONFIG [--set k=v]        train (use torchrun for several ranks)
  plan CONFIG [--json] [--world-size N] [--device-gib G ...]
                                  parameters, FLOPs per token and memory per rank, no device
                                  (checks the config as train does)
  config CONFIG [--stage S] [--set k=v]
                                  the resolved config as YAML (every default filled in)
  preprocess --input X.jsonl --output-prefix P --tokenizer T
                                  jsonl text -> Megatron .bin/.idx
  stages CONFIG                   the names of the config's training stages, one per line
  world-size CONFIG [--stage S]   ranks the parallel section implies (dp*pp*tp*sp; exit 3 if dp: 0)
  convert hf-to-sbtrain --hf DIR --config YAML --out CKPT
  convert sbtrain-to-hf --config YAML --checkpoint CKPT --out DIR
  convert upcycle --dense CKPT --config MOE_YAML --out CKPT
                                  HF Qwen2 / SpikingBrain <-> sbtrain checkpoints (the HF
                                  directory loads with trust_remote_code=True)
  generate --checkpoint CKPT --config YAML --prompt TEXT   (or --hf DIR)
                                  print a greedy continuation, a quick look at a run
  spikestats --config YAML --checkpoint CKPT [--data valid:N] [--coding C] [--window T]
             [--w8aspike] [--out DIR]
                                  spike sparsity, firing, |s| histogram and energy per layer
                                  (JSON + PNG); --w8aspike adds INT8 group-128 weights
  plot RUN_DIR [RUN_DIR ...] [--out PNG]
                                  loss, eval loss, lr, grad norm, tokens/s, MFU of the runs'
                                  metrics.jsonl in one PNG (default RUN_DIR/metrics.png)
"""


def plan_main(argv: list[str]) -> int:
    # deferred: each subcommand imports only what it runs, so `sbtrain --help` and
    # `sbtrain plan` start without torch/megatron
    from sbtrain.config.validate import validate
    from sbtrain.profiler.plan import default_world_size, format_plan, make_plan
    from sbtrain.train import add_config_args

    parser = argparse.ArgumentParser(prog="sbtrain plan")
    add_config_args(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to plan for (default: implied by the parallel section)")
    parser.add_argument("--device-gib", type=float, action="append", default=None,
                        help="device memory to check the fit against (repeatable), e.g. 64 80")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, stage=args.stage)
        # the same checks as a launch of that many ranks
        validate(cfg, args.world_size or default_world_size(cfg), args.config)
        plan = make_plan(cfg, world_size=args.world_size,
                         device_memory_gib=args.device_gib or [64.0, 80.0])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def config_main(argv: list[str]) -> int:
    from sbtrain.train import add_config_args

    parser = argparse.ArgumentParser(prog="sbtrain config",
                                     description="print the resolved config as YAML")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, stage=args.stage)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def stages_main(argv: list[str]) -> int:
    # deferred: see the first deferred import of this module (subcommands import lazily)
    from sbtrain.config import stage_names

    if len(argv) != 1:
        print("usage: sbtrain stages CONFIG", file=sys.stderr)
        return 2
    try:
        names = stage_names(argv[0])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(names))
    return 0


def world_size_main(argv: list[str]) -> int:
    from sbtrain.train import add_config_args

    parser = argparse.ArgumentParser(prog="sbtrain world-size")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        p = load_config(args.config, args.overrides, stage=args.stage).parallel
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if p.dp == 0:
        print(f"{args.config}: parallel.dp is 0 (taken from the launch), so the YAML implies "
              "no world size", file=sys.stderr)
        return 3
    print(p.dp * p.pp * p.tp * p.sp)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "train":  # sbtrain train sets the console up itself (it has --verbose)
        setup_console()
    try:
        code = _run(argv[0], argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # e.g. `sbtrain stages X | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


def _run(command: str, rest: list[str]) -> int:
    if command == "train":
        from sbtrain.train import main as train_main

        return train_main(rest)
    if command == "plan":
        return plan_main(rest)
    if command == "preprocess":
        from sbtrain.data.preprocess import main as preprocess_main

        return preprocess_main(rest)
    if command == "config":
        return config_main(rest)
    if command == "stages":
        return stages_main(rest)
    if command == "world-size":
        return world_size_main(rest)
    if command == "convert":
        from sbtrain.convert import main as convert_main

        return convert_main(rest)
    if command == "generate":
        from sbtrain.generate import main as generate_main

        return generate_main(rest)
    if command == "spikestats":
        from sbtrain.tools.spikestats import main as spikestats_main

        return spikestats_main(rest)
    if command == "plot":
        from sbtrain.tools.plot import main as plot_main

        return plot_main(rest)
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
