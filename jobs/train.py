"""Train the CSCR head on Ray Train: data-parallel TorchTrainer workers, per-epoch metrics and
checkpoints, resume after being killed.

    python jobs/train.py --run runs/routerbench [--variant cscr,vanilla] [--workers 2]
    ray job submit --working-dir . -- python jobs/train.py --run /abs/path/runs/routerbench
    python jobs/train.py --smoke-test          # a generated run folder, 2 workers, 2 epochs
    python jobs/train.py --run runs/routerbench --tune   # search on validation first, then train

``--tune`` first runs a Ray Tune search (jobs/sweep.py ``tune_search``; the space and the choice
are cscr/training/search.py's) scored on the validation split only, then trains every variant
with the chosen configuration and writes the search (every trial, the choice) to
``<run>/models/<variant>/tune.json``. The test split is left to ``cscr evaluate``.

The epoch loop is cscr/training's ``run_epochs``, the same loop ``fit_head`` runs in one process:
this file only wires it to Ray (sharding by rank, a DDP model, the validator on rank 0 only, and
an ``on_epoch`` hook that reports metrics and a checkpoint). The driver loads the
run's table, embeddings and descriptors once and ships them to the workers through the object
store (no shared file system needed for the inputs). Each worker trains on its shard of every
epoch's permutation, DDP averages the gradients (gloo on CPU, NCCL on GPUs), rank 0 computes the
validation AUDC and reports a checkpoint (the full TrainState) every epoch.

Resuming: Ray Train keeps the run under ``<run>/ray_train/<variant>`` (RunConfig storage_path and
name); started again after a kill, the same name picks up the latest reported checkpoint and the
workers continue from the epoch after it. A finished run's folder is removed once the best head
is saved to ``<run>/models/<variant>``, so the next ``cscr train`` starts afresh; ``--fresh``
discards an interrupted run instead of resuming it (a changed config refuses to resume).

Connecting (jobs/cluster.py): ``--address`` if given, else ``RAY_ADDRESS`` (set by ``ray job
submit``), else an embedded local Ray started here and shut down at the end. ``--plain`` trains
in this process without Ray. ``run(cfg)`` is the API (``cscr train`` calls it); the options are
jobs/train_options.py's, shared with ``cscr train``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from cscr.jobs.cluster import (
    add_logging_options,
    connect,
    disconnect,
    log_level,
    quiet_train_worker,
    set_log_level,
)
from cscr.jobs.train_options import TrainJobConfig, add_train_options, train_job_config

from cscr.config import TrainConfig, asdict
from cscr.console import say
from cscr.runs.paths import RunPaths
from cscr.training import (
    VARIANTS,
    TrainResult,
    TrainState,
    audc_validator,
    init_training,
    result_from_state,
    run_epochs,
    variant_config,
)

STATE_FILE = "state.pt"
MARKER = "cscr_train.json"  # the config a Ray Train folder was started with


# ---------------------------------------------------------------- the worker

def _say(msg: str) -> None:
    """A progress line from a worker (written directly: Ray Train's print patch would repeat it)."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: resume from the latest checkpoint if any, then train epoch by epoch."""
    import ray
    import ray.train
    import ray.train.torch

    quiet_train_worker()
    arrays = ray.get(config["arrays_ref"])
    variant = config["variant"]
    cfg = variant_config(TrainConfig.from_nested(config["train"]), variant)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = TrainState.from_dict(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False))
        if rank == 0:
            _say(f"train[{variant}]: resuming from the checkpoint after epoch {state.epoch}")
    head, opt, state = init_training(arrays, cfg, state, device)
    model = ray.train.torch.prepare_model(head) if world > 1 else head
    nodes = _gather_nodes(world)

    def report(st: TrainState) -> None:
        metrics = {k: v for k, v in st.history[-1].items() if v is not None}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(st.to_dict(), Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    run_epochs(arrays, cfg, head, opt, state, audc_validator(arrays, cfg.index.top_k) if rank == 0 else None,
               variant=variant, model=model, rank=rank, world=world,
               extra={"workers": world, "nodes": len(nodes), "attempt": config.get("attempt", "")},
               on_epoch=report, log=_say if rank == 0 else None)


def _gather_nodes(world: int) -> list[str]:
    """The distinct Ray node ids the workers run on (all-gathered when there are several)."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [me]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, me)
    return sorted(set(out))


# ---------------------------------------------------------------- the driver

def _marker(cfg: TrainConfig, variant: str, workers: int, kind: str) -> dict[str, Any]:
    return {"variant": variant, "train": asdict(cfg), "workers": workers, "descriptor_kind": kind}


def check_resumable(folder: Path, marker: dict[str, Any], fresh: bool, log: Any = say) -> None:
    """Before starting: discard (``fresh``) or accept an interrupted run in ``folder``; one started
    with another configuration is refused (its checkpoints would not fit this run)."""
    if folder.exists() and fresh:
        shutil.rmtree(folder)
    if not folder.exists():
        return
    old = json.loads((folder / MARKER).read_text()) if (folder / MARKER).exists() else None
    if old != json.loads(json.dumps(marker, default=str)):
        raise ValueError(f"{folder} holds an interrupted run with another configuration: "
                         "pass --fresh to discard it, or rerun with the same options to resume it")
    log(f"train[{marker['variant']}]: found an interrupted run in {folder}: resuming it")


def run_training(run_dir: str | os.PathLike[str], variants: Sequence[str] = ("cscr",), cfg: TrainConfig | None = None,
                 workers: int = 2, descriptor_kind: str | None = None, use_gpu: bool | None = None,
                 cpus_per_worker: float | None = None, fresh: bool = False, placement: str = "PACK",
                 log: Any = say) -> dict[str, TrainResult]:
    """Train each variant with a TorchTrainer on the connected Ray cluster; save the best heads."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cscr.runs.descriptors import prepare_descriptors
    from cscr.runs.heads import save_trained
    from cscr.runs.inputs import load_training_arrays

    cfg = cfg or TrainConfig()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected one of {VARIANTS}")
    paths = RunPaths.of(run_dir)
    kind = prepare_descriptors(paths, descriptor_kind, log=log)  # probe-outcome: computed and stored
    arrays = load_training_arrays(paths, cfg.loss.tolerance, kind)
    kind = arrays.meta["descriptor_kind"]
    resources = ray.cluster_resources()
    gpu = (resources.get("GPU", 0) >= workers) if use_gpu is None else use_gpu
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if gpu else max(0.25, min(1.0, float(resources.get("CPU", 1)) / workers))
    log(f"train: {arrays.n} train prompts, {arrays.val_x.shape[0]} val, {len(arrays.expert_names)} experts, "
        f"{kind} descriptors (D' = {arrays.descriptors.shape[1]}); Ray Train: {workers} worker(s), "
        f"{'1 GPU' if gpu else f'{cpus_per_worker:g} CPU'} each")
    arrays_ref = ray.put(arrays)
    results: dict[str, TrainResult] = {}
    for variant in variants:
        storage = paths.root / "ray_train"
        folder = storage / variant
        marker = _marker(cfg, variant, workers, kind)
        check_resumable(folder, marker, fresh, log)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(json.dumps(marker, indent=2, default=str))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"arrays_ref": arrays_ref, "train": asdict(cfg), "variant": variant,
                               "attempt": uuid.uuid4().hex[:8]},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, placement_strategy=placement,
                                         resources_per_worker=None if gpu else {"CPU": cpus_per_worker}),
            run_config=RunConfig(name=variant, storage_path=str(storage),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=2),
                                 # Ray Train's own INFO lines ("Checkpoint successfully created ...",
                                 # "Requesting resources ...") at the job's level: -v shows them
                                 # again, Ray's session log files keep them all
                                 logging_config=LoggingConfig(log_level=log_level())),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"train[{variant}]: Ray Train finished without a checkpoint ({result.error})")
        with result.checkpoint.as_directory() as d:
            state = TrainState.from_dict(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False))
        res = result_from_state(state, arrays, cfg, variant)
        res.meta.update(trainer="ray-train", workers=workers, seconds=time.perf_counter() - t0)
        out = save_trained(paths.root, res)
        shutil.rmtree(folder, ignore_errors=True)  # finished: the next run starts afresh
        log(f"train[{variant}]: best epoch {res.best_epoch} (val AUDC {res.best_val_audc}); saved {out}")
        from cscr.prior_run import after_training

        after_training(paths.root, variant, log)  # its category prior, then its operating points (issue 11)
        results[variant] = res
    return results


def smoke_run(folder: str | os.PathLike[str]) -> Path:
    """A small generated run folder (600 prompts, 5 experts) for --smoke-test."""
    from cscr.synthetic import synthetic_table, write_synthetic_run

    table, emb, _ = synthetic_table(n=600, n_experts=5, seed=0)
    return write_synthetic_run(folder, table, emb)


def tuned(cfg: TrainJobConfig, run_dir: str, log: Any = say) -> tuple[TrainJobConfig, dict[str, Any]]:
    """(the job's config with the searched TrainConfig, the search record): the ``--tune`` step."""
    import dataclasses

    from cscr.jobs.sweep import tune_search

    started = connect(cfg.address)
    try:
        record = tune_search(run_dir, cfg.train, cfg.tune_trials, cfg.tune_seed, cfg.tune_cpus_per_trial,
                             descriptor_kind=cfg.descriptor_kind, log=log)
    finally:
        disconnect(started)
    chosen = TrainConfig.from_nested(record["chosen_config"])
    log(f"tune: chosen trial {record['chosen_trial']} (val AUDC "
        f"{record['trials'][record['chosen_trial']]['val_audc']:.4f}): {record['chosen']}")
    return dataclasses.replace(cfg, train=chosen), record


def _write_search(run_dir: str, variants: Sequence[str], record: dict[str, Any]) -> None:
    from cscr.atomic import atomic_write_json

    for v in variants:
        atomic_write_json(RunPaths.of(run_dir).model(v) / "tune.json", {**record, "variant": v,
                                                                        "searched_variant": "cscr"})


def run(cfg: TrainJobConfig, log: Any = say) -> dict[str, TrainResult]:
    """Train ``cfg.variants`` for ``cfg.run`` (Ray Train, or the plain loop) and save the best heads
    (``cfg.tune``: with the configuration a validation search chose, recorded next to each head)."""
    with _run_folder(cfg) as run_dir:
        RunPaths.of(run_dir).require_table()
        if cfg.tune:
            import dataclasses

            cfg, record = tuned(cfg, run_dir, log)
            results = run(dataclasses.replace(cfg, tune=False, run=run_dir), log)
            _write_search(run_dir, list(results), record)
            return results
        if cfg.plain:
            from cscr.training.plain import train_run

            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            results = {v: train_run(run_dir, v, cfg.train, cfg.descriptor_kind, log=log) for v in cfg.variants}
            return _recorded(run_dir, cfg, results)
        # log_to_driver: the rank-0 worker's epoch lines are this job's progress
        started = connect(cfg.address, log_to_driver=True)
        try:
            results = run_training(run_dir, cfg.variants, cfg.train, workers=cfg.workers,
                                   descriptor_kind=cfg.descriptor_kind, use_gpu=cfg.use_gpu,
                                   cpus_per_worker=cfg.cpus_per_worker, fresh=cfg.fresh, log=log)
        finally:
            disconnect(started)
        return _recorded(run_dir, cfg, results)


def _recorded(run_dir: str, cfg: TrainJobConfig, results: dict[str, TrainResult]) -> dict[str, TrainResult]:
    """Record the descriptor kind and TrainConfig in the run's settings (cscr.runs.settings): the
    defaults of the next `cscr train`, `cscr sweep` and `cscr experiment` on this run."""
    from cscr.runs.settings import record_training

    kind = next(iter(results.values())).meta.get("descriptor_kind", "") if results else ""
    record_training(run_dir, kind, cfg.train, list(results), "plain" if cfg.plain else "ray-train")
    return results


@contextlib.contextmanager
def _run_folder(cfg: TrainJobConfig) -> Iterator[str]:
    """``cfg.run``, or a generated smoke-test run folder removed afterwards."""
    if cfg.run is not None:
        yield cfg.run
        return
    tmp = tempfile.mkdtemp(prefix="cscr-train-smoke-")
    try:
        yield str(smoke_run(Path(tmp) / "run"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.split("\n\n")[0])
    add_train_options(p)
    add_logging_options(p)  # (global options of `cscr`)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from cscr.errors import USER_ERRORS

    args = parse_args(argv)
    set_log_level(args.log_level, args.verbose)
    try:
        results = run(train_job_config(args))
    except USER_ERRORS as exc:
        print(f"jobs/train.py: error: {exc}", file=sys.stderr)
        return 2
    for v, r in results.items():
        print(f"{v}: best epoch {r.best_epoch}, val AUDC {r.best_val_audc}, "
              f"{len(r.history)} epochs, {r.meta.get('seconds', 0):.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
