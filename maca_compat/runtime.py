"""``setup(platform)``: the one explicit call that prepares a process for a platform."""

from __future__ import annotations

import logging

from maca_compat.comm import apply_comm_env, is_multi_node
from maca_compat.overrides import check_megatron_version
from maca_compat.patches import apply_patches
from maca_compat.platform import Platform

logger = logging.getLogger("sbtrain.maca_compat")


def setup(platform: Platform) -> list[str]:
    """Apply the megatron-core shims ``platform`` needs and its communication environment;
    warn when the installed megatron-core is not the version they were reviewed against.

    Returns the names of the applied shim entries. Safe to call more than once.
    """
    # torch.compile stays as the user set it (TORCH_COMPILE_DISABLE), also on a CPU: of
    # megatron-core's torch.compile'd fusions, sbtrain's config reaches only the router's
    # _apply_expert_bias (the other fusions are off in megatron_config.py), traced in well
    # under a second (tests/maca_compat/test_runtime.py).
    check_megatron_version()  # the patch and override lists name the reviewed version
    applied = apply_patches(vendor=platform.vendor)
    # before any process group: NCCL/MCCL read these when the first communicator is built
    apply_comm_env(platform, multi_node=is_multi_node())
    device = "" if platform.device_name == "none" else f" ({platform.device_name})"
    logger.info("platform %s%s: %d megatron-core shims applied (maca_compat/patches.py)",
                platform.vendor, device, len(applied))
    logger.debug("shims: %s", ", ".join(applied))
    return applied
