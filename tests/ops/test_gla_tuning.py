"""Stored fla autotuning (ops.gla.tuning): collect, seed into a Triton cache dir, fall back, stay idempotent."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ops.gla import tuning

HASH_A = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRST"
HASH_B = "ZYXWVUTSRQPONMLKJIHGFEDCBA765432ZYXWVUTSRQPONMLKJIHG"
VERSIONS = {"triton": "3.6.0", "fla-core": "0.6.0"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_FLA_SEED", "TRITON_CACHE_MANAGER", "TRITON_REMOTE_CACHE_BACKEND", "FLA_CACHE_RESULTS"):
        monkeypatch.delenv(var, raising=False)


def autotune_json(kernel: str, best_warps: int) -> str:
    """A file in Triton 3.6's format (``Autotuner.check_disk_cache``)."""
    timings = [[{"kwargs": {"BK": 64}, "num_warps": w, "num_stages": 2}, [t, t, t]]
               for w, t in ((best_warps, 0.1), (8 if best_warps == 4 else 4, 0.2))]
    return json.dumps({"key": [64, "torch.bfloat16"], "configs_timings": timings})


def fake_cache(root: Path) -> Path:
    """A Triton cache dir after a tuning run: two hash dirs with autotune files, plus compiled kernels."""
    for hash_dir, kernel, warps in ((HASH_A, "chunk_gla_fwd_kernel_o", 4), (HASH_B, "chunk_fwd_kernel_h", 8)):
        (root / hash_dir).mkdir(parents=True)
        (root / hash_dir / f"{kernel}.autotune.json").write_text(autotune_json(kernel, warps))
        (root / hash_dir / f"{kernel}.cubin").write_bytes(b"\0binary")
    return root


def stored(tmp_path: Path, kind: str = "sm90") -> Path:
    """Stored results for ``kind`` made by collect_autotune_files from a fake cache."""
    tuned_root = tmp_path / "tuned"
    tuning.collect_autotune_files([fake_cache(tmp_path / "tuning_cache")], kind, "NVIDIA H200",
                                  tuned_root=tuned_root, versions=VERSIONS, extra={"shapes": [{"heads": 28}]})
    return tuned_root


def test_collect_keeps_only_autotune_files_and_writes_the_manifest(tmp_path: Path):
    tuned_root = stored(tmp_path)
    manifest = json.loads((tuned_root / "sm90" / "manifest.json").read_text())
    assert manifest["files"] == [f"{HASH_A}/chunk_gla_fwd_kernel_o.autotune.json",
                                 f"{HASH_B}/chunk_fwd_kernel_h.autotune.json"]
    assert manifest["versions"] == VERSIONS and manifest["device"] == "NVIDIA H200"
    assert manifest["shapes"] == [{"heads": 28}]
    assert not list((tuned_root / "sm90").glob("*/*.cubin"))


def test_seed_copies_every_listed_file_byte_for_byte_and_is_idempotent(tmp_path: Path, caplog):
    tuned_root, cache = stored(tmp_path), tmp_path / "fresh_cache"
    with caplog.at_level(logging.INFO, logger="sbtrain.ops"):
        copied = tuning.seed_autotune_cache("sm90", "NVIDIA H200", tuned_root=tuned_root, cache_dir=cache,
                                            versions=VERSIONS)
    assert copied == 2
    for rel in (f"{HASH_A}/chunk_gla_fwd_kernel_o.autotune.json", f"{HASH_B}/chunk_fwd_kernel_h.autotune.json"):
        assert (cache / rel).read_bytes() == (tmp_path / "tuning_cache" / rel).read_bytes()
    assert [r.getMessage() for r in caplog.records if "seeded" in r.getMessage()] == [
        f"fla autotune: seeded 2 of 2 stored configs for sm90 (tuned on NVIDIA H200) into {cache}"]
    assert not list(cache.glob("*/.*.tmp"))
    again = tuning.seed_autotune_cache("sm90", "NVIDIA H200", tuned_root=tuned_root, cache_dir=cache,
                                       versions=VERSIONS)
    assert again == 0


def test_seed_never_overwrites_a_result_triton_already_has(tmp_path: Path):
    tuned_root, cache = stored(tmp_path), tmp_path / "cache"
    own = cache / HASH_A / "chunk_gla_fwd_kernel_o.autotune.json"
    own.parent.mkdir(parents=True)
    own.write_text("this machine's own tuning")
    assert tuning.seed_autotune_cache("sm90", tuned_root=tuned_root, cache_dir=cache, versions=VERSIONS) == 1
    assert own.read_text() == "this machine's own tuning"


def test_seed_copies_only_what_the_manifest_lists(tmp_path: Path):
    tuned_root, cache = stored(tmp_path), tmp_path / "cache"
    manifest_path = tuned_root / "sm90" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = manifest["files"][:1]
    manifest_path.write_text(json.dumps(manifest))
    assert tuning.seed_autotune_cache("sm90", tuned_root=tuned_root, cache_dir=cache, versions=VERSIONS) == 1
    assert sorted(p.parent.name for p in cache.glob("*/*.autotune.json")) == [HASH_A]


def test_manifest_entries_outside_the_kind_dir_are_rejected(tmp_path: Path):
    tuned_root = stored(tmp_path)
    manifest_path = tuned_root / "sm90" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append("../../etc/x.autotune.json")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not '<hash dir>/<kernel>.autotune.json'"):
        tuning.read_manifest(tuned_root / "sm90")


@pytest.mark.parametrize("case, expected", [
    ("unknown kind", "no stored fla tuning for NVIDIA B200 (sm100); first step will autotune "
                     "(scripts/tune_fla.py makes them)"),
    ("other triton", "stored fla tuning for NVIDIA B200 (sm90) was made with triton 3.6.0 (installed 3.7.0); "
                     "first step will autotune (scripts/tune_fla.py makes them)"),
    ("no fla", "stored fla tuning for NVIDIA B200 (sm90) was made with fla-core 0.6.0 (installed None); "
               "first step will autotune (scripts/tune_fla.py makes them)"),
], ids=["unknown-kind", "other-triton", "no-fla"])
def test_fallback_is_one_log_line_and_no_files(tmp_path: Path, caplog, case: str, expected: str):
    tuned_root, cache = stored(tmp_path), tmp_path / "cache"
    kind = "sm100" if case == "unknown kind" else "sm90"
    versions = {"unknown kind": VERSIONS, "other triton": {**VERSIONS, "triton": "3.7.0"},
                "no fla": {**VERSIONS, "fla-core": None}}[case]
    with caplog.at_level(logging.INFO, logger="sbtrain.ops"):
        copied = tuning.seed_autotune_cache(kind, "NVIDIA B200", tuned_root=tuned_root, cache_dir=cache,
                                            versions=versions)
    assert copied == 0 and not cache.exists()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", expected)]


def test_seeding_can_be_turned_off_and_respects_a_foreign_cache_manager(tmp_path: Path, monkeypatch):
    tuned_root, cache = stored(tmp_path), tmp_path / "cache"
    kwargs = dict(tuned_root=tuned_root, cache_dir=cache, versions=VERSIONS)
    monkeypatch.setenv("SB_FLA_SEED", "0")
    assert tuning.seed_autotune_cache("sm90", **kwargs) == 0
    monkeypatch.delenv("SB_FLA_SEED")
    monkeypatch.setenv("TRITON_CACHE_MANAGER", "my.module:Manager")
    assert tuning.seed_autotune_cache("sm90", **kwargs) == 0
    monkeypatch.delenv("TRITON_CACHE_MANAGER")
    monkeypatch.setenv("FLA_CACHE_RESULTS", "0")
    assert tuning.seed_autotune_cache("sm90", **kwargs) == 0
    assert not cache.exists()


def test_gpu_kind_and_triton_cache_dir(monkeypatch, tmp_path: Path):
    assert tuning.gpu_kind("NVIDIA H200", (9, 0)) == tuning.gpu_kind("NVIDIA H100 80GB HBM3", (9, 0)) == "sm90"
    assert tuning.gpu_kind("MetaX C550", (8, 0)) == "maca_MetaX_C550"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "a"))
    assert tuning.triton_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    assert tuning.triton_cache_dir() == tmp_path / ".triton" / "cache"


def test_without_a_gpu_seeding_does_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tuning, "current_gpu_kind", lambda: None)
    assert tuning.seed_autotune_cache(tuned_root=stored(tmp_path), cache_dir=tmp_path / "cache") == 0
    assert not (tmp_path / "cache").exists()


def test_stored_results_in_the_repo_have_valid_manifests():
    """Whatever is committed under ops/gla/tuned/ must be seedable as is."""
    for manifest_path in sorted(tuning.TUNED_ROOT.glob(f"*/{tuning.MANIFEST_NAME}")):
        manifest = tuning.read_manifest(manifest_path.parent)
        assert manifest["kind"] == manifest_path.parent.name
        for rel in manifest["files"]:
            data = json.loads((manifest_path.parent / rel).read_text())
            assert data["configs_timings"], rel


def load_tune_fla():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_fla", tuning.TUNED_ROOT.parents[2] / "scripts/tune_fla.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tune_fla_collect_merges_cache_dirs_and_records_the_config_shapes(tmp_path: Path):
    """scripts/tune_fla.py --collect-from (the CPU-runnable half of the script)."""
    tune_fla = load_tune_fla()
    first = fake_cache(tmp_path / "run_7b")
    second = tmp_path / "run_76b" / HASH_B
    second.mkdir(parents=True)
    (second / "chunk_local_cumsum_vector_kernel.autotune.json").write_text(autotune_json("cumsum", 4))
    assert tune_fla.main(["--collect-from", str(first), str(tmp_path / "run_76b"), "--kind", "sm90",
                          "--device", "NVIDIA H200", "--out", str(tmp_path / "tuned"),
                          "--versions", "triton=3.6.0", "fla-core=0.6.0",
                          "--configs", "examples/configs/spikingbrain_7b.yaml",
                          "examples/configs/spikingbrain_76b_1gpu.yaml"]) == 0
    manifest = tuning.read_manifest(tmp_path / "tuned" / "sm90")
    assert len(manifest["files"]) == 3 and manifest["device"] == "NVIDIA H200"
    assert manifest["versions"] == VERSIONS
    assert [(s["batch"], s["heads"], s["kv_heads"], s["dim"], s["varlen"]) for s in manifest["shapes"]] == [
        (1, 28, 4, 128, False), (1, 16, 2, 128, False)]
    shapes = tune_fla.gla_shapes(["examples/configs/spikingbrain_76b_tiny.yaml", "examples/configs/spikingbrain_7b.yaml"])
    assert [(s["heads"], s["varlen"]) for s in shapes] == [(4, True), (28, False)]  # the 76B tiny masks documents
    assert len(tune_fla.gla_shapes(["examples/configs/spikingbrain_7b.yaml"], all_varlen=True)) == 2


def test_tune_fla_runs_each_shape_through_the_gla_op_with_and_without_documents():
    """The tuning call on CPU (torch reference): the model's dtypes, packed documents, gradients."""
    tune_fla = load_tune_fla()
    shape = {"batch": 2, "heads": 4, "kv_heads": 2, "dim": 16}
    for varlen in (False, True):
        assert tune_fla.run_shape(shape, 32, varlen, device="cpu") >= 0


def test_collecting_again_keeps_stored_results_unless_replaced_or_stale(tmp_path: Path):
    tuned_root = stored(tmp_path)  # HASH_A and HASH_B, heads 28
    newer = tmp_path / "run_76b" / "NEWHASHNEWHASHNEWHASH"
    newer.mkdir(parents=True)
    (newer / "chunk_local_cumsum_vector_kernel.autotune.json").write_text(autotune_json("cumsum", 4))
    changed = tmp_path / "run_76b" / HASH_A / "chunk_gla_fwd_kernel_o.autotune.json"
    changed.parent.mkdir()
    changed.write_text(autotune_json("o", 8))

    def collect(**kwargs) -> dict:
        return tuning.collect_autotune_files([tmp_path / "run_76b"], "sm90", "NVIDIA H200", tuned_root=tuned_root,
                                             **{"versions": VERSIONS, **kwargs})

    manifest = collect(extra={"shapes": [{"heads": 16}]})
    assert len(manifest["files"]) == 3 and manifest["shapes"] == [{"heads": 28}, {"heads": 16}]
    assert (tuned_root / "sm90" / HASH_A / "chunk_gla_fwd_kernel_o.autotune.json").read_text() == changed.read_text()
    assert len(collect(replace=True)["files"]) == 2
    assert len(collect()["files"]) == 2  # after the replace, nothing else is stored
    tuning.collect_autotune_files([tmp_path / "tuning_cache"], "sm90", "NVIDIA H200", tuned_root=tuned_root,
                                  versions=VERSIONS)
    assert len(collect()["files"]) == 3
    assert len(collect(versions={**VERSIONS, "triton": "3.7.0"})["files"]) == 2
