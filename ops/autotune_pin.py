"""Pinned Triton autotuning for test runs: ``SB_TRITON_PIN=1`` gives every autotuned kernel one config.

fla's GLA kernels (and any other ``triton.autotune`` kernel) benchmark 6-48 configs on their first
call for every new tuning key; the GPU tests use many small odd shapes, so a fresh machine spent
minutes autotuning before a test could finish (issue 23). Correctness does not depend on the
config, so tests pin one: the smallest (fewest stages, then smallest blocks, then fewest warps),
which compiles for every shape and never runs out of shared memory. Training never sets this: its
shapes are tuned once and seeded (``ops/gla/tuning.py``).

The pin wraps ``triton.runtime.autotuner.Autotuner.run`` once per process (the first time a Triton
backend is asked whether it can run, ``ops.backends.triton_available``), so kernels of modules
imported later are pinned too. tests/conftest.py sets the variable for the GPU tests and the
processes they launch.
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger("sbtrain.ops")

PIN_ENV = "SB_TRITON_PIN"
_installed = False


def pin_requested() -> bool:
    return os.environ.get(PIN_ENV, "0").strip() == "1"


def smallest_config(configs: list):
    """The config with the fewest pipeline stages, then the smallest block product, then warps."""

    def cost(config) -> tuple:
        blocks = [v for v in config.kwargs.values() if isinstance(v, int) and not isinstance(v, bool)]
        return (config.num_stages or 0, math.prod(blocks) if blocks else 0, config.num_warps or 0)

    return min(configs, key=cost)


def install_autotune_pin() -> bool:
    """Pin every Triton autotuner of this process to :func:`smallest_config` when ``SB_TRITON_PIN=1``.

    Returns whether the pin is installed. Idempotent."""
    global _installed
    if _installed or not pin_requested():
        return _installed
    # deferred: triton is optional (CPU installs may lack it) and heavy to import
    from triton.runtime.autotuner import Autotuner

    original_run = Autotuner.run

    def pinned_run(self, *args, **kwargs):
        if len(self.configs) > 1:
            self.configs = [smallest_config(self.configs)]
        return original_run(self, *args, **kwargs)

    Autotuner.run = pinned_run
    _installed = True
    logger.info("Triton autotuning pinned to one config per kernel (%s=1)", PIN_ENV)
    return True
