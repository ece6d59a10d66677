"""``sbtrain`` command: train, plan, preprocess."""

from __future__ import annotations

import argparse
import json
import sys

from sbtrain.config import ConfigError, load_config

USAGE = """usage: sbtrain <command> [args]

commands:
  train CONFIG [--set k=v]        train (use torchrun for several ranks)
  plan CONFIG [--json] [--world-size N] [--device-gib G ...]
                                  parameters, FLOPs per token and memory per rank, no device
  preprocess --input X.jsonl --output-prefix P --tokenizer T
                                  jsonl text -> Megatron .bin/.idx
"""


def plan_main(argv: list[str]) -> int:
    from sbtrain.profiler.plan import format_plan, make_plan
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
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg, world_size=args.world_size,
                         device_memory_gib=args.device_gib or [64.0, 80.0])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from sbtrain.train import main as train_main

        return train_main(rest)
    if command == "plan":
        return plan_main(rest)
    if command == "preprocess":
        from sbtrain.data.preprocess import main as preprocess_main

        return preprocess_main(rest)
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
