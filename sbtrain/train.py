"""``torchrun --nproc_per_node=N -m sbtrain.train CONFIG [--set a.b=c ...]``."""

from __future__ import annotations

import argparse
import os
import sys

from sbtrain.config import ConfigError, load_config, stage_names
from sbtrain.console import env_rank, setup_console
from sbtrain.errors import KnownCause, MetricsFileExists
from sbtrain.safety import (EXIT_CONFIG, EXIT_DIVERGED, EXIT_ERROR, RunDirectoryLocked,
                            TrainingDiverged)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    parser.add_argument("--stage", default=None,
                        help="run this stage of the config's stages list (see docs/training.md); "
                        "'all' runs every stage in order in this launch")


ALL_STAGES = "all"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbtrain train", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="show the full traceback of errors whose cause is known, DEBUG "
                        "logs and every third-party warning (sbtrain.console)")
    args = parser.parse_args(argv)
    setup_console(args.verbose)
    try:
        names = stage_names(args.config)
        if args.stage == ALL_STAGES:
            run = names or [None]
        elif args.stage is None and names:
            raise ConfigError(f"this config has stages {names}: pass --stage NAME, or --stage "
                              f"{ALL_STAGES} to run them in order", key="stages",
                              source=args.config)
        else:
            run = [args.stage]
        configs = [load_config(args.config, args.overrides, stage=name) for name in run]
    except ConfigError as exc:
        _config_error(exc)
        return EXIT_CONFIG
    # deferred: `sbtrain train --help` and argument errors answer before megatron-core is imported
    from parallel.groups import destroy_parallel_groups

    try:
        for name, cfg in zip(run, configs):
            if len(run) > 1 and int(os.environ.get("RANK", "0")) == 0:
                print(f"== stage {name} of {args.config}", flush=True)
            code = _train(cfg, args.config, args.verbose)
            if code:
                return code
            # the next stage builds its own model-parallel groups on the same ranks
            destroy_parallel_groups(keep_default_group=True)
    finally:
        destroy_parallel_groups()
    return 0


def _config_error(exc: ConfigError) -> None:
    """Every rank reads the same YAML and fails alike: rank 0 says it once."""
    if env_rank()[0] == 0:
        print(f"config error: {exc}", file=sys.stderr, flush=True)


# Errors every rank raises alike, from one agreed decision: reported once, by rank 0.
AGREED_ERRORS = (TrainingDiverged, RunDirectoryLocked, MetricsFileExists)


def _train(cfg, source: str, verbose: bool = False) -> int:
    # deferred: see destroy_parallel_groups above (argument handling stays light)
    from sbtrain.trainer import Trainer

    trainer = Trainer(cfg, source=source)
    try:
        trainer.setup()
        trainer.train()
    except ConfigError as exc:
        _config_error(exc)
        return EXIT_CONFIG
    except KnownCause as exc:
        if verbose:
            raise
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not isinstance(exc, AGREED_ERRORS):
            # a data or checkpoint error may be one rank's own: each rank says it
            print(f"error: {exc}" if rank == 0 else f"error (rank {rank}): {exc}",
                  file=sys.stderr, flush=True)
        return EXIT_DIVERGED if isinstance(exc, TrainingDiverged) else EXIT_ERROR
    except OSError as exc:
        if verbose or not exc.filename:
            raise
        # a file the run needs cannot be read or written: the file and the reason are the cause
        print(f"error: {exc.strerror}: {exc.filename}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
