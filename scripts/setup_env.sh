#!/usr/bin/env bash
# Install sbtrain and its dependencies into the current Python, from the package index only.
set -euo pipefail
PY=${PYTHON:-python3}
# Keep an existing torch (GPU images ship a CUDA build); otherwise take 2.13.0, whose CPU wheel
# the CI image caches (an unpinned torch would pull several GB of CUDA packages).
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# megatron-core 0.19.2 declares Requires-Python>=3.12, but its wheel is built for cp311 and works
# on 3.11 (README: Python 3.11 note; maca_compat/patches.py lists the CPU shims); install it without the version gate and its deps by hand.
"$PY" -m pip install -q numpy "packaging>=24.2" psutil
"$PY" -m pip install -q --no-deps --ignore-requires-python "megatron-core==0.19.2"
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import megatron.core, sbtrain; print('sbtrain', sbtrain.__version__, 'ready')" 2>/dev/null
