#!/usr/bin/env bash
# One command for a fresh GPU machine: install the carried wheels, seed fla's autotune cache, run
# the GPU tests (and the multi-GPU ones when there are 2+ GPUs), write a short summary.
#   bash scripts/gpu_check.sh [SUMMARY_FILE]
# SUMMARY_FILE defaults to $OUT/gpu_check.txt when OUT is set, else runs/gpu_check.txt. Extra
# pytest arguments can go in PYTEST_ARGS (e.g. PYTEST_ARGS="-x -k gla"). Exit status: 0 when
# nothing failed. Wheels: run scripts/fetch_gpu_wheels.sh on a machine with index access first.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
summary="${1:-${OUT:+$OUT/gpu_check.txt}}"
summary="${summary:-runs/gpu_check.txt}"
mkdir -p "$(dirname "$summary")"
work="$(mktemp -d /tmp/gpu_check.XXXXXX)"

# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }

gpus=$(python3 -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -lt 1 ]; then
  echo "gpu_check: no CUDA/MACA GPU visible" | tee "$summary"
  exit 1
fi
# the stored fla tuning (ops/gla/tuning.py) goes into Triton's cache before any test imports fla
python3 - <<'EOF' 2>&1 | tee "$work/seed.txt"
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from ops.gla.tuning import seed_autotune_cache
seed_autotune_cache()
EOF

status=0
markers=(gpu)
[ "$gpus" -ge 2 ] && markers+=(multigpu)
for marker in "${markers[@]}"; do
  echo "== pytest -m $marker ($gpus GPUs)"
  # shellcheck disable=SC2086
  python3 -m pytest tests -m "$marker" -q -rfE --durations=0 --junitxml="$work/$marker.xml" \
    ${PYTEST_ARGS:-} 2>&1 | tee "$work/$marker.log"
  rc=${PIPESTATUS[0]}
  # 5: no test carries this marker (not a failure)
  [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && status=1
done

python3 - "$summary" "$work" "$gpus" "${markers[@]}" <<'EOF'
"""Summarise the junit files: totals, time per test file, failures with their first line."""
import collections
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

summary, work, gpus, markers = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]


def test_file(classname: str) -> str:
    """junit's classname is the module path plus any test class: keep the part that is a file."""
    parts = [part for part in classname.split(".") if part]
    for end in range(len(parts), 0, -1):
        path = Path(*parts[:end]).with_suffix(".py")
        if path.is_file():
            return str(path)
    return classname or "(collection)"


commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
lines = [f"gpu_check at {commit or '?'}: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}",
         (work / "seed.txt").read_text().strip()]
for marker in markers:
    xml = work / f"{marker}.xml"
    if not xml.is_file():
        lines.append(f"-m {marker}: no junit file (pytest crashed?), see {work / (marker + '.log')}")
        continue
    counts, per_file, failures = collections.Counter(), collections.defaultdict(float), []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        counts[outcome] += 1
        per_file[test_file(case.get("classname", "?"))] += float(case.get("time", 0))
        if outcome in ("failure", "error"):
            message = next(child for child in case if child.tag == outcome).get("message", "")
            failures.append(f"  {outcome.upper()} {case.get('classname')}::{case.get('name')}: "
                            f"{message.splitlines()[0][:200] if message else ''}")
    lines.append(f"-m {marker}: {counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
                 f"{counts['skipped']} skipped, {sum(per_file.values()):.0f} s")
    lines += [f"  {seconds:8.1f} s  {name}" for name, seconds in sorted(per_file.items(), key=lambda x: -x[1])]
    lines += failures
summary.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"summary: {summary}")
EOF
exit $status
