"""CSCR ablation sweeps on Ray Tune (SPEC.md section 8.4).

Each grid varies one hyperparameter around the defaults (cscr/sweep.py). A trial trains a head
with the plain loop of cscr/train.py, reports validation AUDC (and a checkpoint) after every
epoch, then reports test AUDC of its best epoch. The summary chooses on validation and reports
on test: runs/<name>/sweeps/<grid>/summary.{md,csv,json} and <grid>.png.

Trials run in parallel within the cluster's resources (fractional CPUs here, a GPU each where
present). An interrupted sweep resumes: finished trials are kept, unfinished ones restart from
their last epoch checkpoint (Tuner.restore).

    python jobs/sweep.py --run runs/routerbench --grid bands
    ray job submit --working-dir . -- python jobs/sweep.py --run runs/routerbench --grid all
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cscr.config import EvalConfig, TrainConfig, asdict
from cscr.sweep import (
    Grid,
    available_descriptor_values,
    get_grid,
    grid_names,
    mixed_descriptors,
    mixed_pair,
)

# ---------------------------------------------------------------- one trial (runs on a Ray worker)

def trial_inputs(run_dir: str, kind: str, tolerance: float) -> tuple[Any, Any, np.ndarray]:
    """(TrainArrays, table, embeddings) for one descriptor kind ("mixed": two kinds alternating)."""
    from cscr.data.table import RoutingTable
    from cscr.encoder import load_run_embeddings
    from cscr.fingerprints.store import DescriptorStore
    from cscr.run import RunPaths
    from cscr.train import prepare_arrays
    from cscr.trained import ensure_descriptors

    paths = RunPaths.of(run_dir)
    table = RoutingTable.load(paths.require_table())
    emb = load_run_embeddings(paths.root)
    if kind == "mixed":
        store = DescriptorStore(paths.descriptors)
        kinds = store.kinds()
        pair = mixed_pair(kinds, {k: int(store.info(k)["dimension"]) for k in kinds})  # type: ignore[call-overload]
        if pair is None:
            raise ValueError(f"no two descriptor kinds of one dimension to mix in {paths.descriptors}")
        by_kind = {k: store.read(k) for k in pair}
        desc = mixed_descriptors(by_kind, pair, table.expert_names)
        basis = f"mixed:{pair[0]}+{pair[1]}"
    else:
        desc, kind, basis = ensure_descriptors(paths.root, table, kind)
    return prepare_arrays(table, emb, desc, tolerance, kind, basis), table, emb


def test_metrics(head: Any, arrays: Any, table: Any, emb: np.ndarray, top_k: int) -> dict[str, Any]:
    """AUDC, peak and QNC ratio of the CSCR router with this head on the test split."""
    from cscr.eval.evaluate import evaluate_routers
    from cscr.routers.cscr import CSCRRouter

    router = CSCRRouter.from_parts(head, dict(zip(arrays.expert_names, arrays.descriptors, strict=True)),
                                   dict(zip(arrays.expert_names, arrays.costs, strict=True)), top_k=top_k,
                                   use_gpu=False)
    res = evaluate_routers({"cscr": router}, table, emb, table.split_index("test"), EvalConfig(n_lambdas=100))
    ev = res.routers["cscr"]
    return {"test_audc": ev.audc, "test_peak": ev.peak, "test_qnc_ratio": ev.qnc_ratio}


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one grid value."""
    import torch
    from ray import tune

    from cscr.train import TrainState, fit_head

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    grid = get_grid(config["grid"])
    value = config["value"]
    cfg = TrainConfig.from_nested(config["train"])
    from cscr.sweep import apply_value

    cfg = apply_value(cfg, grid, value)
    kind = value if grid.param == "descriptor" else config.get("descriptor_kind")
    arrays, table, emb = trial_inputs(config["run"], kind or "probe-outcome", cfg.loss.tolerance)

    state = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = TrainState.from_dict(torch.load(Path(d) / "state.pt", weights_only=False))

    def on_epoch(st: TrainState) -> None:
        last = st.history[-1]
        with tempfile.TemporaryDirectory() as d:
            torch.save(st.to_dict(), Path(d) / "state.pt")
            tune.report({"epoch": st.epoch, "val_audc": last.get("val_audc"), "train_loss": last["train_loss"],
                         "done": False}, checkpoint=tune.Checkpoint.from_directory(d))

    if state is not None and state.epoch >= cfg.epochs:  # finished training before the interruption
        from cscr.train import result_from_state

        result = result_from_state(state, arrays, cfg, "cscr")
    else:
        result = fit_head(arrays, cfg, "cscr", log=None, state=state, on_epoch=on_epoch)
    final = {"epoch": cfg.epochs, "val_audc": result.best_val_audc, "best_epoch": result.best_epoch,
             "train_loss": result.history[-1]["train_loss"], "done": True,
             "seconds": time.perf_counter() - t0}
    final.update(test_metrics(result.head, arrays, table, emb, cfg.index.top_k))
    tune.report(final)


# ---------------------------------------------------------------- the driver

def grid_values(grid: Grid, run_dir: str) -> list[Any]:
    """The grid's values; the descriptor grid keeps the kinds the run's store can supply."""
    if grid.param != "descriptor":
        return list(grid.values)
    from cscr.fingerprints.store import DescriptorStore
    from cscr.run import RunPaths

    store = DescriptorStore(RunPaths.of(run_dir).descriptors)
    kinds = set(store.kinds()) | {"probe-outcome"}  # probe-outcome is computed on demand
    dims = {k: int(store.info(k)["dimension"]) for k in store.kinds()}  # type: ignore[call-overload]
    return available_descriptor_values(sorted(kinds), dims) if dims else ["probe-outcome"]


def sweep_grid(run_dir: str, grid_name: str, train: TrainConfig, concurrency: int, cpus_per_trial: float,
               gpus_per_trial: float, resume: bool = True, log=print) -> list[dict[str, Any]]:
    """Run (or resume) one grid on the connected Ray cluster; write and return its summary rows."""
    from ray import tune

    from cscr.run import RunPaths
    from cscr.sweep import summarize, write_sweep_report

    grid = get_grid(grid_name)
    out = RunPaths.of(run_dir).sweep(grid.name)
    storage = out / "tune"
    storage.mkdir(parents=True, exist_ok=True)
    values = grid_values(grid, run_dir)
    skipped = [v for v in grid.values if v not in values]
    space = {"run": str(RunPaths.of(run_dir).root), "grid": grid.name, "value": tune.grid_search(values),
             "train": asdict(train)}
    trainable = tune.with_resources(run_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    exp = storage / grid.name
    if resume and tune.Tuner.can_restore(exp):
        log(f"sweep[{grid.name}]: resuming {exp}")
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=grid.name, storage_path=str(storage), verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    log(f"sweep[{grid.name}]: {len(values)} trials ({', '.join(map(str, values))}), "
        f"{concurrency} at a time, {cpus_per_trial} CPU each")
    results = tuner.fit()
    trials = []
    for r in (results[i] for i in range(len(results))):
        m = r.metrics or {}
        value = (r.config or {}).get("value")
        trials.append({**{k: m.get(k) for k in ("val_audc", "test_audc", "test_peak", "test_qnc_ratio",
                                                   "best_epoch", "seconds")},
                       "value": value, "status": "ok" if m.get("done") and r.error is None else "failed"})
    rows = summarize(grid, trials)
    paths = write_sweep_report(grid, rows, out, meta={"skipped_values": skipped, "train": asdict(train)})
    log(paths["md"].read_text())
    if skipped:
        log(f"sweep[{grid.name}]: skipped {skipped}: no such descriptors in the run's store")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=False, help="prepared run folder (cscr prepare)")
    p.add_argument("--grid", default="all", help="grid name(s), comma-separated, or 'all'")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: TrainConfig's 10)")
    p.add_argument("--concurrency", type=int, default=None, help="trials at a time (default: 4, or 1 per GPU)")
    p.add_argument("--cpus-per-trial", type=float, default=0.5)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default: 1 where GPUs exist, else 0")
    p.add_argument("--no-resume", action="store_true", help="start over even if an earlier sweep exists")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or an embedded local Ray)")
    p.add_argument("--smoke-test", action="store_true", help="tiny synthetic run, 2 epochs, grid 'gamma'")
    return p.parse_args(argv)


def _smoke_run(root: Path) -> str:
    from cscr.synthetic import synthetic_table, write_synthetic_run

    table, emb, _ = synthetic_table(n=600, seed=0)
    return str(write_synthetic_run(root / "smoke", table, emb))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    if args.smoke_test:
        args.run = _smoke_run(Path(tempfile.mkdtemp(prefix="cscr-sweep-smoke-")))
        args.grid, args.epochs = "gamma", 2
    if not args.run:
        print("sweep: error: --run is required", file=sys.stderr)
        return 2
    grids = grid_names(args.grid)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if n_gpus else 0.0)
    concurrency = args.concurrency or (max(n_gpus, 1) if gpus else 4)
    train = TrainConfig()
    if args.epochs:
        train = dataclasses.replace(train, epochs=args.epochs)
    for g in grids:
        sweep_grid(args.run, g, train, concurrency, args.cpus_per_trial, gpus, resume=not args.no_resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
