"""Encoder models: the packaged MiniLM against another sentence-transformers folder, in one run.

Both encoders embed the same seeded sample of RouterBench test prompts in the default ``windows``
long-prompt mode through ``Encoder.encode`` (tokenising and windows included), chunk by chunk with
their order rotated per chunk (bench/encoder_backends.py's interleaving), so a drifting machine
load falls on both alike; then single-prompt calls (what a served request does). Printed as
ratios to MiniLM, with the load average before and after, and written to ``--out``.

    bash scripts/get_mpnet.sh                      # models/all-mpnet-base-v2 (once)
    python bench/encoder_models.py [--encoder models/all-mpnet-base-v2] [--prompts 192] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encoder_backends import _data_dir, ensure_run, interleaved_latency, interleaved_throughput  # noqa: E402

from cscr.config import EncoderConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="models/all-mpnet-base-v2", help="sentence-transformers folder to compare")
    ap.add_argument("--run", default="runs/encoder-backends", help="prepared RouterBench run (made when missing)")
    ap.add_argument("--data-dir", default=None, help="folder holding routerbench/ (default: ../shared/data)")
    ap.add_argument("--prompts", type=int, default=192, help="test prompts embedded by each encoder")
    ap.add_argument("--chunk", type=int, default=32, help="prompts per interleaved throughput chunk")
    ap.add_argument("--latency-prompts", type=int, default=32, help="single-prompt calls per encoder")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=None, help="table file (default: <run>/encoder_models.md)")
    args = ap.parse_args()
    if not Path(args.encoder).is_dir():
        raise SystemExit(f"encoder_models: no folder {args.encoder} (bash scripts/get_mpnet.sh makes the default)")

    import torch

    from cscr.atomic import atomic_write_text
    from cscr.encoder import Encoder
    from cscr.runs.inputs import Run

    run_dir = Path(args.run)
    ensure_run(run_dir, _data_dir(args.data_dir))
    table = Run.of(run_dir).table
    rows = table.split_index("test")
    pick = np.sort(np.random.default_rng(0).permutation(len(rows))[: args.prompts])
    texts = [str(table.texts[rows[i]]) for i in pick]

    torch.set_num_threads(args.threads)
    ref = "MiniLM (default)"
    encoders = {ref: Encoder(EncoderConfig()), Path(args.encoder).name: Encoder(EncoderConfig(model=args.encoder))}
    for enc in encoders.values():
        enc.encode(texts[:4])  # warm up
    load0 = os.getloadavg()
    _, wall, cpu = interleaved_throughput(encoders, texts, args.chunk)
    lat = interleaved_latency(encoders, texts[: args.latency_prompts])
    load1 = os.getloadavg()

    n = len(texts)
    lines = [
        f"RouterBench test prompts: {n} (seeded sample), long_prompt=windows, max_seq_length "
        f"{EncoderConfig().max_seq_length}, batch {EncoderConfig().batch_size}, {args.threads} torch thread(s)",
        f"machine: {os.cpu_count()} CPUs; load average (1/5/15 min) {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} "
        f"before, {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} after",
        "",
        "| encoder | dim | prompts/s (wall) | x MiniLM | CPU s/prompt | p50 ms/prompt | p90 ms | p50 x MiniLM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, enc in encoders.items():
        p50, p90 = np.median(lat[k]) * 1e3, np.quantile(lat[k], 0.9) * 1e3
        lines.append(f"| {k} | {enc.dim} | {n / wall[k]:.2f} | {wall[ref] / wall[k]:.2f} | {cpu[k] / n:.3f} | "
                     f"{p50:.0f} | {p90:.0f} | {np.median(lat[ref]) * 1e3 / p50:.2f} |")
    lines += ["", f"(p50/p90 over {len(lat[ref])} single-prompt calls; x MiniLM below 1: slower)"]
    text = "\n".join(lines)
    print(text)
    atomic_write_text(Path(args.out) if args.out else run_dir / "encoder_models.md", text + "\n")


if __name__ == "__main__":
    main()
