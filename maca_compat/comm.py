"""Collective-communication environment tuning, in one place (the backend name per vendor,
``COMM_BACKENDS``, is part of the platform: ``maca_compat/platform.py``).

Environment tuning is computed by :func:`comm_env_for` (pure) and applied by
:func:`apply_comm_env`, which the trainer calls explicitly before creating process
groups. Nothing here runs at import time, and a variable the user already set is
never overwritten: every value below is a default that a site can override.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping

from maca_compat.platform import Platform

logger = logging.getLogger("sbtrain.maca_compat")

# Read by upstream ProcessGroupNCCL when a process group is constructed. Without it,
# async collectives (tensor/sequence-parallel overlap) keep their inputs alive through
# recordStream until the comm stream catches up, which inflates peak memory; torchtitan
# sets it for the same reason. mcPyTorch is assumed (not verified) to keep upstream's
# ProcessGroupNCCL; if it does not read the variable, setting it is inert.
_TORCH_PG_ENV: dict[str, str] = {"TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}

# MetaX's MCCL guide (developer.metax-tech.com, MCCL doc, "环境变量" §4.1) says a
# single C500/C550 x86 node needs no MCCL variables, and recommends these two for
# multi-node runs "to mask differences between network setups":
#   MCCL_NET_GDR_LEVEL=SYS  allow GPUDirect RDMA whatever the GPU-NIC PCIe distance;
#   MCCL_CROSS_NIC=1        let rings/trees use different NICs on different nodes.
# MCCL_IB_HCA (the compute NICs) is site-specific and deliberately left to the launcher.
# The guide's "extreme performance" knobs (MCCL_FAST_WRITE_BACK, FORCE_ACTIVE_WAIT, ...)
# trade compute or CPU for comm speed and are not defaults.
_MCCL_MULTI_NODE_ENV: dict[str, str] = {"MCCL_NET_GDR_LEVEL": "SYS", "MCCL_CROSS_NIC": "1"}

_logged: set[tuple[tuple[str, str], ...]] = set()

# Prefixes of the variables NCCL, MCCL and torch's ProcessGroupNCCL read: the settings a run
# used, logged once at start.
COMM_VARIABLE_PREFIXES = ("NCCL_", "MCCL_", "TORCH_NCCL_")


def is_multi_node(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this job spans more than one node, from its launcher's environment.

    torchrun starts LOCAL_WORLD_SIZE workers per node and one agent per node (GROUP_WORLD_SIZE
    agents), so WORLD_SIZE > LOCAL_WORLD_SIZE or GROUP_WORLD_SIZE > 1 means several nodes;
    a SLURM allocation of several nodes (SLURM_NNODES) too. Nothing set: one node.
    """
    environ = os.environ if environ is None else environ

    def count(name: str) -> int:
        value = environ.get(name, "")
        return int(value) if value.isdigit() else 0

    world, local = count("WORLD_SIZE"), count("LOCAL_WORLD_SIZE")
    return (world > local > 0) or count("GROUP_WORLD_SIZE") > 1 or count("SLURM_NNODES") > 1


def comm_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The NCCL / MCCL / ProcessGroupNCCL variables set in ``environ`` (default os.environ)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in sorted(environ) if k.startswith(COMM_VARIABLE_PREFIXES)}


def comm_env_for(platform: Platform, *, multi_node: bool = False) -> dict[str, str]:
    """Return the default communication environment for ``platform`` (pure; sets nothing).

    Args:
        platform: the detected platform.
        multi_node: the job spans more than one node (adds MetaX's multi-node MCCL defaults).

    Returns:
        Variable name -> value; empty on CPU (gloo needs no tuning).
    """
    if platform.vendor == "cpu":
        return {}
    env = dict(_TORCH_PG_ENV)
    if platform.vendor == "maca" and multi_node:
        env.update(_MCCL_MULTI_NODE_ENV)
    return env


def apply_comm_env(
    platform: Platform,
    environ: MutableMapping[str, str] | None = None,
    *,
    multi_node: bool | None = None,
) -> dict[str, str]:
    """Set the variables from :func:`comm_env_for` that are missing from ``environ``.

    Call before ``init_process_group``: NCCL/MCCL and ProcessGroupNCCL read these when
    the first communicator is created.

    Args:
        platform: the detected platform.
        environ: the mapping to update; ``os.environ`` when None.
        multi_node: forwarded to :func:`comm_env_for`; None: :func:`is_multi_node` of
            ``environ`` (the launcher's variables).

    Returns:
        The variables this call set (user-set ones are kept and not returned).
    """
    environ = os.environ if environ is None else environ
    multi_node = is_multi_node(environ) if multi_node is None else multi_node
    wanted = comm_env_for(platform, multi_node=multi_node)
    applied = {k: v for k, v in wanted.items() if k not in environ}
    environ.update(applied)
    kept = {k: environ[k] for k in wanted if k not in applied}
    if environ.get("RANK", "0") == "0":  # one line per job, not one per rank
        _log_once(platform, applied, kept, multi_node, comm_settings(environ))
    return applied


def _log_once(platform: Platform, applied: dict[str, str], kept: dict[str, str],
              multi_node: bool, settings: dict[str, str]) -> None:
    """Log the comm setup once per distinct outcome (apply may be called per process group):
    what this call set, the user's values it kept, and every NCCL/MCCL variable in effect."""
    key = tuple(sorted({**applied, **{f"{k} (user)": v for k, v in kept.items()},
                        **{f"{k} (in effect)": v for k, v in settings.items()}}.items()))
    if key in _logged:
        return
    _logged.add(key)
    # INFO when there is something to say (GPU runs); the backend itself is on the layout line
    (logger.info if applied or kept or settings else logger.debug)(
        "comm backend %s on %s (%s): set %s; kept user values %s; in effect: %s",
        platform.comm_backend, platform.vendor, "multi-node" if multi_node else "one node",
        applied or "{}", kept or "{}",
        " ".join(f"{k}={v}" for k, v in settings.items()) or "no NCCL/MCCL variables",
    )
