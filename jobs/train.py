"""Train the CSCR head on Ray Train: data-parallel TorchTrainer workers, per-epoch metrics and
checkpoints, resume after being killed.

    python jobs/train.py --run runs/routerbench [--variant cscr,vanilla] [--workers 2]
    ray job submit --working-dir . -- python jobs/train.py --run /abs/path/runs/routerbench
    python jobs/train.py --smoke-test          # a generated run folder, 2 workers, 2 epochs

The steps are cscr/train.py's (``init_training``, ``epoch_batches``, ``train_epoch``,
``validation_audc``, ``record_epoch``): this file only wires them to Ray. The driver loads the
run's table, embeddings and descriptors once and ships them to the workers through the object
store (no shared file system needed for the inputs). Each worker trains on its shard of every
epoch's permutation, DDP averages the gradients (gloo on CPU, NCCL on GPUs), rank 0 computes the
validation AUDC and reports a checkpoint (the full TrainState) every epoch.

Resuming: Ray Train keeps the run under ``<run>/ray_train/<variant>`` (RunConfig storage_path and
name); started again after a kill, the same name picks up the latest reported checkpoint and the
workers continue from the epoch after it. A finished run's folder is removed once the best head
is saved to ``<run>/models/<variant>``, so the next ``cscr train`` starts afresh; ``--fresh``
discards an interrupted run instead of resuming it (a changed config refuses to resume).

Connecting: ``--address`` if given, else ``RAY_ADDRESS`` (set by ``ray job submit``), else an
embedded local Ray started here and shut down at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cscr.config import TrainConfig, asdict
from cscr.run import RunPaths
from cscr.train import (
    VARIANTS,
    Tensors,
    TrainResult,
    TrainState,
    epoch_batches,
    epoch_line,
    init_training,
    record_epoch,
    result_from_state,
    train_epoch,
    validation_audc,
    variant_config,
)

STATE_FILE = "state.pt"
MARKER = "cscr_train.json"  # the config a Ray Train folder was started with


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    t = Tensors.of(arrays, cfg, device)
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter()
        batches = epoch_batches(arrays.n, cfg.batch_size, cfg.seed, epoch, rank, world)
        m: dict[str, Any] = train_epoch(model, opt, t, batches, cfg.loss)
        m["prompts"] = m["prompts"] * world  # every worker trains an equal shard
        m["val_audc"] = validation_audc(head, arrays, cfg.index.top_k) if rank == 0 else None
        m["epoch_seconds"] = time.perf_counter() - t0
        m.update(workers=world, nodes=len(nodes), attempt=config.get("attempt", ""))
        state = record_epoch(state, head, opt, m)
        metrics = {k: v for k, v in state.history[-1].items() if v is not None}
        if rank == 0:
            _say(epoch_line(variant, state.history[-1], cfg.epochs))
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(state.to_dict(), Path(tmp) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


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


def check_resumable(folder: Path, marker: dict[str, Any], fresh: bool, log: Any = _log) -> None:
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
                 log: Any = _log) -> dict[str, TrainResult]:
    """Train each variant with a TorchTrainer on the connected Ray cluster; save the best heads."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cscr.trained import load_training_arrays, save_trained

    cfg = cfg or TrainConfig()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected one of {VARIANTS}")
    paths = RunPaths.of(run_dir)
    arrays = load_training_arrays(paths.root, cfg.loss.tolerance, descriptor_kind, log=log)
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
                                 failure_config=FailureConfig(max_failures=2)),
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
        results[variant] = res
    return results


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` / RAY_ADDRESS, or start an embedded local Ray. True if started here."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False,
             configure_logging=False)
    return True


def disconnect() -> None:
    import ray

    ray.shutdown()


def smoke_run(folder: str | os.PathLike[str]) -> Path:
    """A small generated run folder (600 prompts, 5 experts) for --smoke-test."""
    from cscr.synthetic import synthetic_table, write_synthetic_run

    table, emb, _ = synthetic_table(n=600, n_experts=5, seed=0)
    return write_synthetic_run(folder, table, emb)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run folder prepared by `cscr prepare` (optional with --smoke-test)")
    p.add_argument("--variant", default="cscr", help="comma-separated: cscr, vanilla (default: cscr)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker (default: fits the cluster)")
    p.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto", help="one GPU per worker (auto: if present)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--descriptor-kind", default=None, help="descriptor kind from the run's store (default: probe-outcome)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default 512)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--config", default=None, help="JSON file or string with a nested TrainConfig (head/loss/index)")
    p.add_argument("--fresh", action="store_true", help="discard an interrupted run instead of resuming it")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes: 2 epochs (a generated run if --run is absent)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    nested: dict[str, Any] = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        nested = json.loads(text)
    cfg = TrainConfig.from_nested(nested)
    over = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    if args.smoke_test and args.epochs is None:
        over["epochs"] = 2
    return dataclasses.replace(cfg, **over) if over else cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    use_gpu = {"auto": None, "yes": True, "no": False}[args.use_gpu]
    tmp = None
    run = args.run
    if run is None:
        if not args.smoke_test:
            print("jobs/train.py: error: --run is required (or --smoke-test)", file=sys.stderr)
            return 2
        tmp = tempfile.mkdtemp(prefix="cscr-train-smoke-")
        run = str(smoke_run(Path(tmp) / "run"))
    started = connect(args.address, num_cpus=None)
    try:
        results = run_training(run, variants, cfg, workers=args.workers, descriptor_kind=args.descriptor_kind,
                               use_gpu=use_gpu, cpus_per_worker=args.cpus_per_worker, fresh=args.fresh)
        for v, r in results.items():
            print(f"{v}: best epoch {r.best_epoch}, val AUDC {r.best_val_audc}, "
                  f"{len(r.history)} epochs, {r.meta.get('seconds', 0):.1f}s")
    finally:
        if started:
            disconnect()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
