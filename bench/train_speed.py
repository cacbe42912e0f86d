"""Training-speed benchmark (issue 3 item 9): Ray Train against the plain loop, in the same run.

A generated run of 36k cached prompt embeddings (384-d, random topics; a speed figure needs no
real texts) x 11 experts with probe-outcome descriptors (D' = 192). The same epochs are run by

* the plain single-process loop (cscr/training ``fit_head``), and
* jobs/train.py's TorchTrainer with ``--workers`` data-parallel workers on a local Ray cluster.

The plain loop runs twice: with torch's default intra-op threads and with one thread (what each
Ray worker gets: Ray sets OMP_NUM_THREADS to a worker's CPUs). Reported per trainer: seconds per
epoch and prompts/s of the training pass alone (measured inside the loop, the same code for
both), seconds per epoch with the validation AUDC, the set-up time (end-to-end wall minus the
epochs: Ray start-up, worker set-up, checkpoints) and the end-to-end wall time. Ratios are
Ray / plain (> 1 for prompts/s: Ray faster; < 1 for seconds: Ray faster).

    python bench/train_speed.py [--prompts 36000] [--epochs 3] [--workers 2] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=36000, help="train prompts (the table gets ~20%% more for val/test)")
    p.add_argument("--experts", type=int, default=11)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from cscr.synthetic import synthetic_table

    n = int(args.prompts / 0.7)  # assign_splits: 20% test, then val 10% of the rest, probe 192
    t0 = time.perf_counter()
    table, emb, _ = synthetic_table(n=n, n_experts=args.experts, dim=384, n_clusters=16, seed=0, probe_size=192)
    tmp = tempfile.mkdtemp(prefix="cscr-bench-train-")
    try:
        _bench(args, Path(tmp), table, emb, t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the generated run (36k embeddings, heads, Ray Train folder)


def _bench(args: argparse.Namespace, tmp: Path, table: Any, emb: np.ndarray, t0: float) -> None:
    import cscr.jobs.train as job
    import torch
    from cscr.jobs.cluster import connect, disconnect

    from cscr.config import TrainConfig
    from cscr.runs.descriptors import prepare_descriptors
    from cscr.runs.inputs import load_training_arrays
    from cscr.synthetic import write_synthetic_run
    from cscr.training import fit_head

    run = write_synthetic_run(tmp / "run", table, emb)
    arrays = load_training_arrays(run, kind=prepare_descriptors(run))
    print(f"data: {table.n} prompts ({arrays.meta['n_train']} train, {arrays.n} with a positive expert), "
          f"{args.experts} experts, D' = {arrays.descriptors.shape[1]}; generated in {time.perf_counter() - t0:.1f}s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # one-time torch._dynamo import, outside the timing

    # ---- plain loop: torch's default intra-op threads, then one thread (what each Ray worker gets)
    plain = {}
    default_threads = torch.get_num_threads()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        plain[threads] = (fit_head(arrays, cfg, "cscr", log=None), time.perf_counter() - t0)
    torch.set_num_threads(default_threads)

    # ---- Ray Train
    t0 = time.perf_counter()
    started = connect(None, num_cpus=args.cpus)
    try:
        ray_res = job.run_training(run, ["cscr"], cfg, workers=args.workers, fresh=True, log=lambda s: None)["cscr"]
    finally:
        disconnect(started)
    ray_wall = time.perf_counter() - t0

    def figures(hist: list[dict], wall: float) -> dict[str, float]:
        train_s = float(np.mean([h["train_seconds"] for h in hist]))
        epoch_s = float(np.mean([h["epoch_seconds"] for h in hist]))
        prompts = float(np.mean([h["prompts"] for h in hist]))
        return {"train_s": train_s, "prompts_per_s": prompts / train_s, "epoch_s": epoch_s, "wall_s": wall,
                "overhead_s": wall - epoch_s * len(hist)}

    rows = [(f"plain loop, {t} thread{'s' if t > 1 else ''}", figures(r.history, w), r) for t, (r, w) in plain.items()]
    rows.append((f"ray train, {args.workers} workers", figures(ray_res.history, ray_wall), ray_res))
    print(f"\n{'trainer':<24}{'train s/epoch':>14}{'prompts/s':>11}{'epoch s':>9}{'set-up s':>10}{'wall s':>8}"
          f"{'val AUDC':>10}")
    for name, f, r in rows:
        print(f"{name:<24}{f['train_s']:>14.3f}{f['prompts_per_s']:>11,.0f}{f['epoch_s']:>9.2f}{f['overhead_s']:>10.1f}"
              f"{f['wall_s']:>8.1f}{r.best_val_audc:>10.4f}")
    print("(train s/epoch: the training pass; epoch s: + validation AUDC; set-up s: wall - epochs, i.e. Ray start-up,"
          " worker set-up, checkpoints)")
    ray_f = rows[-1][1]
    for name, f, _ in rows[:-1]:
        print(f"ratio ray / {name}: prompts/s x{ray_f['prompts_per_s'] / f['prompts_per_s']:.2f}, "
              f"epoch s x{ray_f['epoch_s'] / f['epoch_s']:.2f}, end-to-end wall x{ray_f['wall_s'] / f['wall_s']:.2f}")


if __name__ == "__main__":
    main()
