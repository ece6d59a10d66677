"""``torchrun --nproc_per_node=N -m sbtrain.train CONFIG [--set a.b=c ...]``."""

from __future__ import annotations

import argparse
import sys

from sbtrain.config import ConfigError, load_config, stage_names


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    parser.add_argument("--stage", default=None,
                        help="run this stage of the config's stages list (see docs/training.md)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbtrain train", description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, stage=args.stage)
        stages = stage_names(args.config) if args.stage is None else []
        if stages:
            raise ConfigError(f"this config has stages {stages}: pass --stage "
                              "NAME (the example scripts run them in order)", key="stages",
                              source=args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from parallel.groups import destroy_parallel_groups
    from sbtrain.trainer import Trainer

    trainer = Trainer(cfg, source=args.config)
    try:
        trainer.setup()
        trainer.train()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
