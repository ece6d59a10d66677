# Source this on a bare GPU machine: installs the carried wheels in .whl/ (scripts/fetch_gpu_wheels.sh)
# into /tmp/site without touching the image's packages, and points Python and the repo at them.
#   source scripts/gpu_env.sh
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -d "$_repo/.whl" ] && ! python3 -c "import megatron.core, fla" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$_repo"/.whl/*.whl || return 1
fi
export PYTHONPATH="/tmp/site:$_repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
