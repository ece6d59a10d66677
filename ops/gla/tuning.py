"""Stored fla autotuning results, seeded into Triton's autotune disk cache before fla first runs.

fla's GLA kernels autotune 24-48 configs each on their first call (3-5 minutes on a fresh H200).
fla passes ``cache_results=True`` to every ``triton.autotune`` (``FLA_CACHE_RESULTS=1`` is its
default), so Triton keeps each result as ``<TRITON_CACHE_DIR>/<dir>/<kernel>.autotune.json``.
The directory name is a hash of Triton's own build, the compile target (ptxas version and
arch: H100 and H200 are both ``sm90`` and share results), the kernel's source, the
cache-invalidating environment, the tuning key (the key arguments plus the dtypes of the tensor
arguments; GLA's keys exclude T, so one result serves every sequence length) and the configs.
Copying the stored files under their hash directories is therefore exact: with the same Triton
and fla they hit, with anything else they are never read (never a wrong config).

Layout: ``ops/gla/tuned/<kind>/manifest.json`` and ``<kind>/<hash dir>/<kernel>.autotune.json``;
``<kind>`` is ``sm<major><minor>`` on NVIDIA and ``maca_<device name>`` on MetaX.
``scripts/tune_fla.py`` produces them on a GPU (or collects them from an existing Triton cache).

Environment: ``SB_FLA_SEED=0`` turns seeding off; ``TRITON_CACHE_DIR`` / ``TRITON_HOME`` choose
the cache as Triton does (``~/.triton/cache`` by default).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import uuid
from importlib import metadata
from pathlib import Path

logger = logging.getLogger("sbtrain.ops")

TUNED_ROOT = Path(__file__).resolve().with_name("tuned")
MANIFEST_NAME = "manifest.json"
AUTOTUNE_SUFFIX = ".autotune.json"
SEED_ENV = "SB_FLA_SEED"
# Packages whose exact version is part of Triton's cache key (Triton's build, fla's kernel sources)
VERSIONED_PACKAGES = ("triton", "fla-core")
# a custom or remote cache manager does not read the local directory layout we write
_FOREIGN_CACHE_ENVS = ("TRITON_CACHE_MANAGER", "TRITON_REMOTE_CACHE_BACKEND")
_HASH_DIR = re.compile(r"^[A-Za-z0-9_-]{8,128}$")


def gpu_kind(device_name: str, capability: tuple[int, int]) -> str:
    """The tuning kind of a device: ``sm90`` (any NVIDIA of compute capability 9.0) or
    ``maca_<name>`` on MetaX (whose capability numbers say nothing about the Triton target)."""
    if "metax" in device_name.lower():
        return "maca_" + (re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown")
    return f"sm{capability[0]}{capability[1]}"


def current_gpu_kind() -> tuple[str, str] | None:
    """``(kind, device name)`` of GPU 0, or None without a GPU."""
    # deferred: the tuning-cache helpers above run torch-free
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return gpu_kind(name, torch.cuda.get_device_capability(0)), name


def triton_cache_dir() -> Path:
    """The directory Triton's ``FileCacheManager`` uses: ``triton.knobs.cache.dir`` when triton is
    already imported (megatron-core imports it), else the same rule from the environment."""
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    configured = getattr(getattr(knobs, "cache", None), "dir", None)
    if isinstance(configured, str) and configured:
        return Path(configured)
    explicit = os.environ.get("TRITON_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit)
    home = os.environ.get("TRITON_HOME", "").strip() or os.path.expanduser("~/")
    return Path(home) / ".triton" / "cache"


def installed_versions() -> dict[str, str | None]:
    """Installed versions of the packages in Triton's cache key (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def seed_autotune_cache(kind: str | None = None, device_name: str = "", *,
                        tuned_root: Path = TUNED_ROOT, cache_dir: Path | None = None,
                        versions: dict[str, str | None] | None = None) -> int:
    """Copy the stored results for ``kind`` into Triton's cache (existing files are kept).

    Call once per process before fla is first imported (``fla_backend.fla_available`` does).
    Logs one line either way and returns how many files it copied. Arguments default to this
    machine's GPU 0, the repo's stored results, Triton's cache dir and the installed versions.
    """
    if os.environ.get(SEED_ENV, "1").strip() == "0":
        logger.info("fla autotune seeding off (%s=0)", SEED_ENV)
        return 0
    if kind is None:
        found = current_gpu_kind()
        if found is None:
            return 0
        kind, device_name = found
    skip = _skip_reason(kind, device_name, tuned_root, versions)
    if skip is not None:
        # a warning: nothing configures INFO logging in training, and this costs minutes
        logger.warning("%s; first step will autotune (scripts/tune_fla.py makes them)", skip)
        return 0
    manifest = read_manifest(tuned_root / kind)
    target = cache_dir if cache_dir is not None else triton_cache_dir()
    try:
        copied = sum(_copy_one(tuned_root / kind / rel, target / rel) for rel in manifest["files"])
    except OSError as exc:  # an unwritable cache costs the autotuning time, not the run
        logger.warning("fla autotune: could not seed %s (%s); first step will autotune", target, exc)
        return 0
    logger.info("fla autotune: seeded %d of %d stored configs for %s (tuned on %s) into %s",
                copied, len(manifest["files"]), kind, manifest.get("device", "?"), target)
    return copied


def _skip_reason(kind: str, device_name: str, tuned_root: Path,
                 versions: dict[str, str | None] | None) -> str | None:
    """Why nothing can be seeded (None: seed)."""
    where = f"{device_name or kind} ({kind})"
    foreign = [env for env in _FOREIGN_CACHE_ENVS if os.environ.get(env)]
    if foreign:
        return f"fla autotune: not seeding, {foreign[0]} is set"
    if os.environ.get("FLA_CACHE_RESULTS", "1") != "1":
        return "fla autotune: not seeding, FLA_CACHE_RESULTS is not 1 (fla's disk cache is off)"
    manifest_path = tuned_root / kind / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no stored fla tuning for {where}"
    manifest = read_manifest(tuned_root / kind)
    installed = installed_versions() if versions is None else versions
    stale = [f"{name} {manifest['versions'].get(name)} (installed {installed.get(name)})"
             for name in VERSIONED_PACKAGES if manifest["versions"].get(name) != installed.get(name)]
    if stale:
        return f"stored fla tuning for {where} was made with {', '.join(stale)}"
    return None


def read_manifest(kind_dir: Path) -> dict:
    """The manifest of one kind; its file list must name files inside ``kind_dir``."""
    path = kind_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for key in ("kind", "versions", "files"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}")
    for rel in manifest["files"]:
        _check_relative(rel, path)
    return manifest


def _check_relative(rel: str, source: Path) -> None:
    """A stored file is exactly ``<hash dir>/<kernel>.autotune.json``."""
    parts = rel.split("/")
    if len(parts) != 2 or not _HASH_DIR.match(parts[0]) or not parts[1].endswith(AUTOTUNE_SUFFIX) \
            or "/" in parts[1] or parts[1].startswith("."):
        raise ValueError(f"{source}: {rel!r} is not '<hash dir>/<kernel>{AUTOTUNE_SUFFIX}'")


def _copy_one(src: Path, dst: Path) -> bool:
    """Copy unless ``dst`` exists; a temp file + rename keeps concurrent ranks safe."""
    if dst.exists():
        return False
    if not src.is_file():
        logger.warning("fla autotune: stored file %s is missing (listed in the manifest)", src)
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


def collect_autotune_files(cache_dirs: list[Path], kind: str, device_name: str, *,
                           tuned_root: Path = TUNED_ROOT, versions: dict[str, str | None] | None = None,
                           extra: dict | None = None, replace: bool = False) -> dict:
    """Store every ``<hash>/<kernel>.autotune.json`` under ``cache_dirs`` as the results of ``kind``.

    Rewrites ``tuned_root/<kind>`` and its manifest (returned). A file found in several dirs is
    taken from the first. The results already stored for ``kind`` are kept (new files win) unless
    ``replace`` or they were made with other versions. ``extra`` goes into the manifest; its
    ``shapes`` list is merged with the kept manifest's.
    """
    versions = installed_versions() if versions is None else versions
    found: dict[str, bytes] = {}
    for cache_dir in cache_dirs:
        for path in sorted(Path(cache_dir).glob(f"*/*{AUTOTUNE_SUFFIX}")):
            rel = f"{path.parent.name}/{path.name}"
            _check_relative(rel, path)
            found.setdefault(rel, path.read_bytes())
    if not found:
        raise FileNotFoundError(f"no */*{AUTOTUNE_SUFFIX} under {', '.join(map(str, cache_dirs))}")
    kind_dir = tuned_root / kind
    extra = dict(extra or {})
    if not replace and (kind_dir / MANIFEST_NAME).is_file():
        old = read_manifest(kind_dir)
        if old["versions"] == versions:
            for rel in old["files"]:
                found.setdefault(rel, (kind_dir / rel).read_bytes())
            extra["shapes"] = _merged(old.get("shapes", []), extra.get("shapes", []))
    if kind_dir.exists():
        shutil.rmtree(kind_dir)
    files = sorted(found)
    for rel in files:
        (kind_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (kind_dir / rel).write_bytes(found[rel])
    manifest = {"kind": kind, "device": device_name, "versions": versions,
                "made_by": "scripts/tune_fla.py", "files": files, **extra}
    (kind_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _merged(old: list[dict], new: list[dict]) -> list[dict]:
    """Shape records of both lists, each shape once (a new record replaces an old one)."""
    def key(shape: dict) -> str:
        return json.dumps({k: v for k, v in shape.items() if k != "configs"}, sort_keys=True)

    merged = {key(shape): shape for shape in old}
    merged.update({key(shape): shape for shape in new})
    return list(merged.values())
