"""``cscr train --run RUN``: train the CSCR head (and the vanilla ablation) for a prepared run.

By default on Ray Train (jobs/train.py) on an embedded local Ray cluster; ``--plain`` runs the
single-process loop of cscr/train.py instead. Heads are saved to ``RUN/models/<variant>``, where
``cscr evaluate --routers cscr,vanilla`` finds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from cscr.config import TrainConfig
from cscr.errors import InputError
from cscr.train import VARIANTS


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train the CSCR head (Ray Train, or --plain)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder prepared by `cscr prepare`")
    p.add_argument("--variant", default="cscr,vanilla", help="comma-separated: cscr, vanilla (default: both)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--plain", action="store_true", help="single-process loop, no Ray")
    p.add_argument("--descriptor-kind", default=None,
                   help="descriptor kind from the run's store (default: probe-outcome, computed if missing)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 512)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--top-k", type=int, default=None, help="experts retrieved before the cost penalty (default 4)")
    p.add_argument("--bands", type=int, default=None, help="cost bands B (default 5)")
    p.add_argument("--gamma", type=float, default=None, help="negative cost penalty (default 0.2)")
    p.add_argument("--hidden", type=int, default=None, help="head hidden width (default 384)")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--config", default=None, help="JSON file or string: a nested TrainConfig (head/loss/index)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for --plain (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--fresh", action="store_true", help="Ray: discard an interrupted run instead of resuming it")
    p.add_argument("--address", default=None, help="Ray: connect to this cluster instead of an embedded one")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> TrainConfig:
    nested: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            nested = json.loads(path.read_text() if path.is_file() else args.config)
        except json.JSONDecodeError as exc:
            raise InputError(f"--config is neither a JSON file nor a JSON string: {exc}") from exc
    cfg = TrainConfig.from_nested(nested)
    top = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                             ("seed", args.seed)) if v is not None}
    loss = {k: v for k, v in (("bands", args.bands), ("gamma", args.gamma)) if v is not None}
    head = {"hidden": args.hidden} if args.hidden is not None else {}
    index = {"top_k": args.top_k} if args.top_k is not None else {}
    return dataclasses.replace(
        cfg, **top,
        loss=dataclasses.replace(cfg.loss, **loss), head=dataclasses.replace(cfg.head, **head),
        index=dataclasses.replace(cfg.index, **index),
    )


def run(args: argparse.Namespace) -> int:
    from cscr.run import RunPaths

    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise InputError(f"unknown variant(s) {bad or variants}; expected a comma-separated subset of {list(VARIANTS)}")
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    cfg = build_config(args)
    RunPaths.of(args.run).require_table()
    if args.plain:
        from cscr.train import train_run

        if args.threads is not None:
            if args.threads < 1:
                raise InputError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)

        results = {v: train_run(args.run, v, cfg, args.descriptor_kind) for v in variants}
    else:
        import cscr.jobs.train as job  # Ray lives in jobs/: imported only here

        started = job.connect(args.address)
        try:
            results = job.run_training(args.run, variants, cfg, workers=args.workers,
                                       descriptor_kind=args.descriptor_kind, fresh=args.fresh)
        finally:
            if started:
                job.disconnect()
    print(f"{'variant':<10} {'best epoch':>10} {'val AUDC':>9}  model")
    for v, r in results.items():
        audc = "n/a" if r.best_val_audc is None else f"{r.best_val_audc:.4f}"
        print(f"{v:<10} {r.best_epoch:>10} {audc:>9}  {RunPaths.of(args.run).model(v)}")
    return 0
