"""CSCR ablation sweeps on Ray Tune (SPEC.md section 8.4).

Each grid varies one hyperparameter around the defaults (cscr/sweep.py). A trial trains a head
with the plain loop of cscr/training (fit_head), reports validation AUDC (and a checkpoint) after every
epoch, then reports test AUDC of its best epoch. The summary chooses on validation and reports
on test: runs/<name>/sweeps/<grid>/summary.{md,csv,json} and <grid>.png.

Trials run in parallel within the cluster's resources (fractional CPUs here, a GPU each where
present). An interrupted sweep resumes: finished trials are kept, unfinished ones restart from
their last epoch checkpoint (Tuner.restore).

``tune_search`` is the search of ``cscr train --tune`` (jobs/train.py): random configurations
from cscr/training/search.py's space, one trial each, scored on the validation split only; the
best validation AUDC is chosen and the whole search is returned as a record.

A sweep tells the truth: when any trial failed its table says which and why, no value is chosen
(the grid is partial) and the exit status is 1, unless ``--allow-failed-trials`` is given.

    python jobs/sweep.py --run runs/routerbench --grid bands
    ray job submit --working-dir . -- python jobs/sweep.py --run runs/routerbench --grid all
    python jobs/sweep.py --smoke-test        # a generated run folder (removed afterwards), grid gamma

``run(cfg)`` is the API (``cscr sweep`` calls it); the options are jobs/train_options.py's, shared with
``cscr sweep``. Connecting: jobs/cluster.py (``--address``, else RAY_ADDRESS, else embedded).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cscr.jobs.cluster import add_logging_options, connect, disconnect, set_log_level, train_verbose
from cscr.jobs.train_options import (
    SweepJobConfig,
    add_sweep_options,
    grids_epilog,
    sweep_job_config,
)

from cscr.config import EvalConfig, TrainConfig, asdict
from cscr.console import say
from cscr.sweep import (
    Grid,
    apply_value,
    available_descriptor_values,
    failed_rows,
    get_grid,
    mixed_descriptors,
    mixed_pair,
    summarize,
    write_sweep_report,
)

# ---------------------------------------------------------------- one trial (runs on a Ray worker)

def trial_inputs(run_dir: str, kind: str, tolerance: float) -> tuple[Any, Any, np.ndarray]:
    """(TrainArrays, table, embeddings) for one descriptor kind ("mixed": two kinds alternating)."""
    from cscr.data.table import RoutingTable
    from cscr.encoder import load_run_embeddings
    from cscr.fingerprints.store import DescriptorStore
    from cscr.runs.descriptors import prepare_descriptors, read_descriptors
    from cscr.runs.paths import RunPaths
    from cscr.training import prepare_arrays

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
        kind = prepare_descriptors(paths, kind, table)  # the descriptor step (probe-outcome: computed)
        desc, kind, basis = read_descriptors(paths, table.expert_names, kind)
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

    from cscr.training import TrainState, fit_head, result_from_state

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    grid = get_grid(config["grid"])
    value = config["value"]
    cfg = TrainConfig.from_nested(config["train"])
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
        result = result_from_state(state, arrays, cfg, "cscr")
    else:
        result = fit_head(arrays, cfg, "cscr", log=None, state=state, on_epoch=on_epoch)
    final = {"epoch": cfg.epochs, "val_audc": result.best_val_audc, "best_epoch": result.best_epoch,
             "train_loss": result.history[-1]["train_loss"], "done": True,
             "seconds": time.perf_counter() - t0}
    final.update(test_metrics(result.head, arrays, table, emb, cfg.index.top_k))
    tune.report(final)


# ---------------------------------------------------------------- the search of `cscr train --tune`

def run_search_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial of the hyperparameter search (cscr/training/search.py).

    Trains with the plain loop and reports the validation AUDC of every epoch and, at the end, of
    the best epoch. Nothing here touches the test split."""
    import torch
    from ray import tune

    from cscr.training import fit_head
    from cscr.training.search import trial_config

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    cfg = trial_config(TrainConfig.from_nested(config["train"]), config["values"])
    arrays, _, _ = trial_inputs(config["run"], config.get("descriptor_kind") or "probe-outcome", cfg.loss.tolerance)

    def on_epoch(st: Any) -> None:
        last = st.history[-1]
        tune.report({"epoch": st.epoch, "val_audc": last.get("val_audc"), "train_loss": last["train_loss"],
                     "done": False})

    result = fit_head(arrays, cfg, "cscr", log=None, on_epoch=on_epoch)
    tune.report({"epoch": cfg.epochs, "val_audc": result.best_val_audc, "best_epoch": result.best_epoch,
                 "train_loss": result.history[-1]["train_loss"], "done": True,
                 "seconds": time.perf_counter() - t0})


def tune_search(run_dir: str, base: TrainConfig, n_trials: int, seed: int = 0, cpus_per_trial: float = 0.5,
                gpus_per_trial: float = 0.0, descriptor_kind: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the search on the connected Ray cluster; return its record (cscr.training.search.search_record).

    ``n_trials`` configurations (the first is ``base``) drawn from cscr.training.search.SPACE, each
    trained once and scored on the validation split; the best validation AUDC is chosen."""
    from ray import tune

    from cscr.runs.descriptors import prepare_descriptors
    from cscr.runs.paths import RunPaths
    from cscr.training.search import choose, sample_trials, search_record, trials_table

    paths = RunPaths.of(run_dir)
    kind = prepare_descriptors(paths, descriptor_kind)  # once, here: the concurrent trials only read the store
    trials = sample_trials(base, n_trials, seed)
    storage = Path(tempfile.mkdtemp(prefix="tune-", dir=paths.root))
    space = {"run": str(paths.root), "train": asdict(base), "descriptor_kind": kind,
             "values": tune.grid_search(trials)}
    log(f"tune: {len(trials)} trials on the validation split, {cpus_per_trial:g} CPU each")
    try:
        tuner = tune.Tuner(
            tune.with_resources(run_search_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
            param_space=space,
            run_config=tune.RunConfig(name="search", storage_path=str(storage), verbose=train_verbose()),
        )
        # the trials' metrics come back in the results; Tune's analysis also looks for per-trial result
        # files in the storage folder before they are synced and warns once per trial: not an error here
        quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            results = tuner.fit()
        finally:
            quiet.setLevel(level)
        by_values: dict[str, dict[str, Any]] = {}
        for r in (results[i] for i in range(len(results))):
            m = r.metrics or {}
            ok = bool(m.get("done")) and r.error is None
            key = repr(sorted((r.config or {}).get("values", {}).items()))
            by_values[key] = {"val_audc": m.get("val_audc") if ok else None, "best_epoch": m.get("best_epoch"),
                              "seconds": m.get("seconds"), "status": "ok" if ok else "failed",
                              "error": None if ok else failure_reason(r.error)}
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    rows = [{"values": t, **by_values.get(repr(sorted(t.items())), {"status": "failed", "val_audc": None,
                                                                       "error": "no result"})} for t in trials]
    chosen = choose(rows)
    log(trials_table(rows, chosen))
    from cscr.runs.inputs import Run

    n_val = int(Run.of(paths).table.split_index("val").size)
    return search_record(rows, chosen, base, seed, n_val)


# ---------------------------------------------------------------- the driver

def grid_values(grid: Grid, run_dir: str) -> list[Any]:
    """The grid's values; the descriptor grid keeps the kinds the run's store can supply."""
    if grid.param != "descriptor":
        return list(grid.values)
    from cscr.fingerprints.store import DescriptorStore
    from cscr.runs.paths import RunPaths

    store = DescriptorStore(RunPaths.of(run_dir).descriptors)
    kinds = set(store.kinds()) | {"probe-outcome"}  # probe-outcome is computed on demand
    dims = {k: int(store.info(k)["dimension"]) for k in store.kinds()}  # type: ignore[call-overload]
    return available_descriptor_values(sorted(kinds), dims) if dims else ["probe-outcome"]


def failure_reason(error: BaseException | None) -> str:
    """Why a trial failed, in one line: the trial's own exception (not Ray's wrapper) and its message."""
    if error is None:
        return "the trial ended without its final report"
    cause = getattr(error, "cause", None)  # RayTaskError / TuneError wrap the trial's exception
    exc = cause if isinstance(cause, BaseException) else error
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def sweep_grid(run_dir: str, grid_name: str, train: TrainConfig, concurrency: int, cpus_per_trial: float,
               gpus_per_trial: float, resume: bool = True, log: Callable[[str], None] = print,
               descriptor_kind: str | None = None) -> list[dict[str, Any]]:
    """Run (or resume) one grid on the connected Ray cluster; write and return its summary rows
    (``descriptor_kind``: the trials' descriptors, but in the descriptor grid; None: probe-outcome)."""
    from ray import tune

    from cscr.runs.paths import RunPaths

    grid = get_grid(grid_name)
    out = RunPaths.of(run_dir).sweep(grid.name)
    storage = out / "tune"
    storage.mkdir(parents=True, exist_ok=True)
    values = grid_values(grid, run_dir)
    skipped = [v for v in grid.values if v not in values]
    if grid.param != "descriptor" or "probe-outcome" in values:
        from cscr.runs.descriptors import compute_probe_outcome

        compute_probe_outcome(RunPaths.of(run_dir))  # once, here: the concurrent trials only read the store
    space = {"run": str(RunPaths.of(run_dir).root), "grid": grid.name, "value": tune.grid_search(values),
             "train": asdict(train), "descriptor_kind": descriptor_kind}
    trainable = tune.with_resources(run_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    exp = storage / grid.name
    if resume and tune.Tuner.can_restore(exp):
        log(f"sweep[{grid.name}]: resuming {exp}")
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=grid.name, storage_path=str(storage), verbose=train_verbose(),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    log(f"sweep[{grid.name}]: {len(values)} trials ({', '.join(map(str, values))}), "
        f"{concurrency} at a time, {cpus_per_trial} CPU each")
    results = tuner.fit()
    trials = []
    for r in (results[i] for i in range(len(results))):
        m = r.metrics or {}
        value = (r.config or {}).get("value")
        ok = bool(m.get("done")) and r.error is None
        trials.append({**{k: m.get(k) for k in ("val_audc", "test_audc", "test_peak", "test_qnc_ratio",
                                                   "best_epoch", "seconds")},
                       "value": value, "status": "ok" if ok else "failed",
                       "error": None if ok else failure_reason(r.error)})
    rows = summarize(grid, trials)
    paths = write_sweep_report(grid, rows, out, meta={"skipped_values": skipped, "train": asdict(train),
                                                      "descriptor_kind": descriptor_kind or "probe-outcome"})
    log(paths["md"].read_text())
    if skipped:
        log(f"sweep[{grid.name}]: skipped {skipped}: no such descriptors in the run's store")
    return rows


@dataclass(frozen=True)
class SweepResult:
    rows: dict[str, list[dict[str, Any]]]  # grid name -> its summary rows (cscr.sweep.summarize)

    @property
    def failed(self) -> list[tuple[str, Any, str]]:
        """(grid, value, why) of every failed trial."""
        return [(g, r["value"], r.get("error") or "") for g, rows in self.rows.items() for r in failed_rows(rows)]

    @property
    def n_trials(self) -> int:
        return sum(len(rows) for rows in self.rows.values())


def run(cfg: SweepJobConfig, log: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) each grid of ``cfg`` on Ray Tune; the summaries are written per grid."""
    import ray

    from cscr.runs.paths import RunPaths

    with _run_folder(cfg) as run_dir:
        RunPaths.of(run_dir).require_table()
        started = connect(cfg.address)
        try:
            n_gpus = int(ray.cluster_resources().get("GPU", 0))
            gpus = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else (1.0 if n_gpus else 0.0)
            concurrency = cfg.concurrency or (max(n_gpus, 1) if gpus else 4)
            rows = {g: sweep_grid(run_dir, g, cfg.train, concurrency, cfg.cpus_per_trial, gpus,
                                  resume=cfg.resume, log=log, descriptor_kind=cfg.descriptor_kind) for g in cfg.grids}
        finally:
            disconnect(started)
    return SweepResult(rows)


def exit_status(result: SweepResult, cfg: SweepJobConfig, err: Callable[[str], None]) -> int:
    """0 when every trial finished (or failures are allowed), else 1 with a line on why."""
    failed = result.failed
    if not failed:
        return 0
    what = "; ".join(f"{g}={v}: {why}" for g, v, why in failed)
    if cfg.allow_failed_trials:
        err(f"sweep: {len(failed)} of {result.n_trials} trials failed ({what}); "
            "--allow-failed-trials: exiting 0 with a partial grid")
        return 0
    err(f"sweep: error: {len(failed)} of {result.n_trials} trials failed ({what}); the grid is partial and "
        "no value is chosen (pass --allow-failed-trials to exit 0 anyway)")
    return 1


@contextlib.contextmanager
def _run_folder(cfg: SweepJobConfig) -> Iterator[str]:
    """``cfg.run``, or a generated smoke-test run folder removed afterwards."""
    if cfg.run is not None:
        yield cfg.run
        return
    tmp = tempfile.mkdtemp(prefix="cscr-sweep-smoke-")
    try:
        yield _smoke_run(Path(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smoke_run(root: Path) -> str:
    from cscr.synthetic import synthetic_table, write_synthetic_run

    table, emb, _ = synthetic_table(n=600, seed=0)
    return str(write_synthetic_run(root / "smoke", table, emb))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/sweep.py", description=__doc__.split("\n\n")[0],
                                epilog=grids_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_options(p)
    add_logging_options(p)  # (global options of `cscr`)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from cscr.errors import USER_ERRORS

    args = parse_args(argv)
    set_log_level(args.log_level, args.verbose)
    try:
        cfg = sweep_job_config(args)
        result = run(cfg)
    except USER_ERRORS as exc:
        say(f"jobs/sweep.py: error: {exc}")
        return 2
    return exit_status(result, cfg, say)


if __name__ == "__main__":
    sys.exit(main())
