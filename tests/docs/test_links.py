"""Every link and file reference in the repository's Markdown resolves (pure file reading).

Checked: Markdown links ``[text](target)`` with a relative target (the file, and a ``#anchor``
that is a heading of it), and repository paths quoted in backticks (``docs/training.md``,
``examples/configs/tiny.yaml``) that name a file or folder of this repository. URLs and
paths that a run creates (``runs/...``, placeholders in capitals) are left alone."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".baseline", "runs", "build", ".pytest_cache", "sbtrain.egg-info"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a backticked path that starts in one of the repository's top-level folders
TOP = ("docs/", "examples/", "scripts/", "bench/", "tests/", "sbtrain/", "ops/", "parallel/",
       "maca_compat/")
QUOTED = re.compile(r"`((?:%s)[A-Za-z0-9_./-]+)`" % "|".join(re.escape(t) for t in TOP))


def markdown_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        found += [Path(folder) / f for f in files if f.endswith(".md")]
    return sorted(found)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def broken_references(path: Path) -> list[str]:
    text = path.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("mailto"):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part) if file_part else path
        if not resolved.exists():
            broken.append(f"link {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"link {target} (no such heading)")
    for quoted in QUOTED.findall(text):
        candidate = quoted.rstrip(".")
        if "*" in candidate or "{" in candidate or Path(candidate).stem.isupper():
            continue  # globs and placeholders such as examples/configs/CONFIG.yaml
        if not (REPO / candidate).exists() and not (path.parent / candidate).exists():
            broken.append(f"path `{quoted}`")
    return broken


def test_markdown_links_and_paths_resolve():
    problems = {str(p.relative_to(REPO)): broken_references(p) for p in markdown_files()}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, problems


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\nsee [this](missing.md), [ok](page.md#title), [bad](page.md#nope)"
                    " and `docs/no_such_file.md`\n")
    assert broken_references(page) == ["link missing.md", "link page.md#nope (no such heading)",
                                       "path `docs/no_such_file.md`"]
