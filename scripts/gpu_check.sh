#!/usr/bin/env bash
# The GPU check of cscr (issue 12), from a clean checkout on a Linux x86_64 machine with an NVIDIA
# GPU: refuses up front what pip cannot bring (driver, device, Python, registry or wheels), installs
# the GPU extras at the versions of constraints/gpu.txt into .gpu/venv, then runs in one bounded
# pass (--budget-s, default 480 s; each step has its own timeout): the tests marked gpu/vllm,
# SmolLM2's logit footprints with vLLM-GPU vs transformers, faiss-gpu vs faiss-cpu on 1M x 256
# descriptors, a Serve graph with one vLLM expert answering through the openai client.
# Summary: gpu_check.json + gpu_check.md under $OUT if set, else runs/gpu_check/.
# Exit: 0 all required steps passed, 1 one failed, 2 refused up front.
#
#   bash scripts/gpu_check.sh                       # install from the registry, then check
#   bash scripts/gpu_check.sh --venv .gpu/venv      # reuse a ready venv (nothing installed)
#   bash scripts/gpu_check.sh --wheelhouse .gpu/wheels   # install without the registry
#   bash scripts/gpu_check.sh --preflight-only      # only the up-front checks
#   bash scripts/gpu_check.sh --plan                # resolve the install plan on the registry (no GPU)
#   PYTHON=python3.12 bash scripts/gpu_check.sh     # the Python of the GPU venv (3.11 or 3.12)
#
# A GPU machine that reaches no package registry (e.g. a lent device machine that gets only the
# working tree plus the ignored paths named in its `carry`; ../shared does not travel): where pip
# works, download the wheels for the device's Python into .gpu/ (ignored by .gitignore), carry
# that folder, and install from it there:
#   python3 scripts/gpu_check.py wheelhouse --python 3.12 --out .gpu/wheels
#   device run: carry [".gpu"], command `bash scripts/gpu_check.sh --wheelhouse .gpu/wheels`
# or carry a venv built on an identical machine (same OS image and Python path): --venv .gpu/venv.
# Mind the size: the plan's wheels (CUDA torch, vllm, faiss-gpu, the CUDA libraries) weigh
# several GiB (faiss-gpu alone is 135 MB), so under a 64 MiB carry limit only a machine that
# reaches the registry can run this check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
refuse() {  # before Python can write the summary: write it here
  local dir=${OUT:-runs/gpu_check} msg=${1//\"/\'}
  echo "[gpu_check] refused: $1" >&2
  mkdir -p "$dir"
  printf '{"status": "refused", "required_not_passed": [], "facts": {"refused": "%s"}, "steps": []}\n' "$msg" \
    >"$dir/gpu_check.json"
  printf '# cscr GPU check: refused\n\n- refused: %s\n' "$msg" >"$dir/gpu_check.md"
  exit 2
}
command -v "$PY" >/dev/null 2>&1 || refuse "no Python at '$PY' (set PYTHON=/path/to/python3.11 or 3.12)"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
  refuse "$("$PY" --version 2>&1) is too old: the check needs Python 3.11 or 3.12 (set PYTHON=...)"
if [ "${1:-}" = "--plan" ]; then
  shift
  exec "$PY" scripts/gpu_check.py plan "$@"
fi
exec "$PY" scripts/gpu_check.py all --python "$(command -v "$PY")" "$@"
