"""Make the encoder ``finetune_device.py --save-encoder`` fine-tuned on a GPU machine a sentence-transformers
folder that ``cscr prepare --encoder`` embeds a run with (issue 10: the encoder-fine-tuning probe, taken to
the test split once).

Reads ``<set>_encoder.part<i>`` and ``ft_log.json`` from ``--from`` (a device call's files): joins the parts,
checks their sha256 against the log, casts the float16 weights to float32 and writes them beside a copy of
the base model's sentence-transformers files (``--base``; default: the packaged all-MiniLM-L6-v2, the
encoder the export was made from). The folder is written atomically (``cscr.atomic.atomic_dir``);
cscr's encoder id hashes a folder's weights, so a later fine-tune imported at the same path gets its own
id and caches.
``--check-run RUN`` then embeds the run's first 64 prompts with the new folder, exactly as the run's
encoder does (its long-prompt mode and window), and compares them with the device's own vectors of the
``full`` variant (``<set>_ft*.npz``): any cosine below 0.999 is an error.

    python scripts/finetune_import.py --from /work/.device/1 --set rllm --out models/minilm-rllm-ft \\
        --check-run runs/rllm
    cscr prepare --dataset routellm --data-dir ../shared/data --out runs/rllm-ft --encoder models/minilm-rllm-ft

Exit 2, with one line on stderr, for a missing or altered part, a log without the set's encoder, an
existing ``--out`` or a failed check.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ImportFailed(Exception):
    """What stops the import (one line for stderr)."""


def join_parts(folder: str, name: str) -> bytes:
    """The set's encoder bytes from its parts, checked against ``ft_log.json``'s sha256."""
    try:
        with open(os.path.join(folder, "ft_log.json")) as f:
            entry = json.load(f)[name]["encoder"]
        parts = [os.path.join(folder, p) for p in entry["parts"]]
        blob = b"".join(Path(p).read_bytes() for p in parts)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImportFailed(f"{folder}: no encoder of {name!r} to import ({type(exc).__name__}: {exc})") from exc
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise ImportFailed(f"{folder}: {name}'s encoder parts do not match the sha256 in ft_log.json")
    return blob


def write_folder(blob: bytes, base: str, out: str) -> None:
    """``base``'s files with ``blob``'s weights (as float32) as ``model.safetensors``, written to ``out``."""
    from safetensors.torch import load, save_file

    from cscr.atomic import atomic_dir

    if os.path.exists(out):
        raise ImportFailed(f"{out} exists: name a new folder")
    if not os.path.isfile(os.path.join(base, "modules.json")):
        raise ImportFailed(f"{base} is not a sentence-transformers folder (no modules.json)")

    def fill(tmp: Path) -> None:
        shutil.copytree(base, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("model.safetensors", "pytorch_model.bin", "*.onnx"))
        state = {k: v.float().contiguous() for k, v in load(blob).items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    atomic_dir(out, fill)


def check(out: str, run_dir: str, folder: str, name: str, n: int = 64) -> float:
    """The lowest cosine between the run's first ``n`` prompts embedded with ``out`` (the run's long-prompt
    mode) and the device's ``full`` vectors of them."""
    from cscr.encoder import Encoder, encoder_config_for_run
    from cscr.runs.inputs import Run

    device = None
    for path in sorted(glob.glob(os.path.join(folder, f"{name}_ft*.npz"))):
        with np.load(path) as z:
            if "full" in z.files:
                device = np.asarray(z["full"][:n], dtype=np.float32)
    if device is None:
        raise ImportFailed(f"{folder}: no {name}_ft*.npz holds the full variant's vectors to check against")
    texts = list(Run.of(run_dir).table.texts[:len(device)])
    got = Encoder(encoder_config_for_run(run_dir, model=os.path.abspath(out))).encode(texts)
    device /= np.maximum(np.linalg.norm(device, axis=1, keepdims=True), 1e-12)
    return float((got * device).sum(axis=1).min())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", required=True, help="the device call's files (parts, ft_log.json, npz)")
    p.add_argument("--set", required=True, help="the set's name, as in finetune_device.py --sets")
    p.add_argument("--out", required=True, help="the sentence-transformers folder to write (must not exist)")
    p.add_argument("--base", default=None, help="the encoder's own sentence-transformers folder "
                                                "(default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--check-run", default=None, help="compare with the device's vectors of this run's prompts")
    a = p.parse_args(argv)
    try:
        if a.base is None:
            from cscr.encoder import default_model_path

            a.base = default_model_path()
        write_folder(join_parts(a.src, a.set), a.base, a.out)
        print(f"{a.set}: fine-tuned encoder -> {a.out}")
        if a.check_run:
            low = check(a.out, a.check_run, a.src, a.set)
            if low < 0.999:
                raise ImportFailed(f"{a.out} does not reproduce the device's vectors of {a.check_run} "
                                   f"(lowest cosine {low:.5f}); it was left for inspection")
            print(f"checked against the device's vectors of {a.check_run}: lowest cosine {low:.5f}")
    except (ImportFailed, FileNotFoundError, ValueError) as exc:
        print(f"finetune_import: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
