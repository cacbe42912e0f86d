"""The options of the train and sweep jobs, defined once: ``python jobs/train.py``, ``python
jobs/sweep.py``, ``cscr train`` and ``cscr sweep`` all build their parsers and frozen configs here.

    add_train_options(parser)        ->  args  ->  train_job_config(args)  ->  TrainJobConfig
    add_sweep_options(parser)        ->  args  ->  sweep_job_config(args)  ->  SweepJobConfig

``run(cfg)`` in jobs/train.py and jobs/sweep.py takes these configs. Nothing here imports ray
or torch (the CLI builds its parser from this module on every ``cscr --help``).

Defaults come from the run (cscr.runs.settings): with ``--run``, the descriptor kind and the
TrainConfig the run was last trained with are used for whatever the command line does not name,
and one line says which; a training that would replace ``models/<variant>`` trained with another
descriptor kind says so in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cscr.config import ConfigError, TrainConfig
from cscr.console import say
from cscr.runs.settings import overwrite_line, training_defaults
from cscr.sweep import GRIDS, grid_names

TRAIN_VARIANTS = ("cscr", "vanilla")  # cscr.training.VARIANTS, without importing torch here
SMOKE_EPOCHS = 2  # --smoke-test: epochs unless --epochs is given
SMOKE_GRID = "gamma"  # --smoke-test of a sweep: this grid unless --grid is given


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class TrainJobConfig:
    """One `cscr train` / `jobs/train.py` invocation."""

    run: str | None = None  # run folder prepared by `cscr prepare`; None only with smoke_test
    variants: tuple[str, ...] = ("cscr",)  # heads to train: cscr and/or vanilla
    train: TrainConfig = field(default_factory=TrainConfig)  # the hyperparameters
    descriptor_kind: str | None = None  # descriptor kind from the run's store; None: probe-outcome
    plain: bool = False  # the single-process loop instead of Ray Train
    threads: int | None = None  # torch intra-op threads for the plain loop; None: torch's default
    workers: int = 2  # Ray Train workers
    cpus_per_worker: float | None = None  # None: fits the cluster
    use_gpu: bool | None = None  # one GPU per worker; None: if the cluster has enough
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else an embedded local Ray
    fresh: bool = False  # discard an interrupted Ray Train run instead of resuming it
    smoke_test: bool = False  # a generated run folder when ``run`` is None (removed afterwards)
    tune: bool = False  # first a Ray Tune search on the validation split (cscr/training/search.py)
    tune_trials: int = 12  # --tune: configurations tried (the first is ``train`` itself)
    tune_seed: int = 0  # --tune: seed of the random draws
    tune_cpus_per_trial: float = 0.5  # --tune: CPUs reserved per trial

    def __post_init__(self) -> None:
        _check(self.tune_trials >= 1, f"--tune-trials must be >= 1, got {self.tune_trials}")
        _check(self.tune_cpus_per_trial > 0, f"--tune-cpus-per-trial must be > 0, got {self.tune_cpus_per_trial}")
        bad = [v for v in self.variants if v not in TRAIN_VARIANTS]
        _check(not bad and bool(self.variants),
               f"unknown variant(s) {bad or list(self.variants)}; "
               f"expected a comma-separated subset of {list(TRAIN_VARIANTS)}")
        _check(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        _check(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        _check(self.cpus_per_worker is None or self.cpus_per_worker > 0,
               f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        _check(self.run is not None or self.smoke_test, "--run is required (or --smoke-test)")


@dataclass(frozen=True)
class SweepJobConfig:
    """One `cscr sweep` / `jobs/sweep.py` invocation."""

    run: str | None = None  # prepared run folder; None only with smoke_test
    grids: tuple[str, ...] = tuple(sorted(GRIDS))  # grids to run, each around ``train``
    train: TrainConfig = field(default_factory=TrainConfig)  # the defaults each grid varies
    concurrency: int | None = None  # trials at a time; None: 4, or one per GPU
    cpus_per_trial: float = 0.5  # CPUs reserved per trial
    gpus_per_trial: float | None = None  # None: 1 where the cluster has GPUs, else 0
    descriptor_kind: str | None = None  # descriptors of the trials (not the descriptor grid); None: probe-outcome
    resume: bool = True  # resume an earlier sweep of the same grid in the run folder
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else an embedded local Ray
    allow_failed_trials: bool = False  # exit 0 even when trials failed (the grid is then partial)
    smoke_test: bool = False  # a generated run folder when ``run`` is None (removed afterwards)

    def __post_init__(self) -> None:
        _check(bool(self.grids), "no grid named")
        for g in self.grids:
            grid_names(g)  # a clear error naming the unknown grid
        _check(self.concurrency is None or self.concurrency >= 1, f"--concurrency must be >= 1, got {self.concurrency}")
        _check(self.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        _check(self.gpus_per_trial is None or self.gpus_per_trial >= 0,
               f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        _check(self.run is not None or self.smoke_test, "--run is required (or --smoke-test)")


# ---------------------------------------------------------------- options shared by both jobs

def add_common_options(p: argparse.ArgumentParser, what: str) -> None:
    """--run, --address, --smoke-test and the hyperparameters (the TrainConfig) of ``what``."""
    p.add_argument("--run", default=None, help="run folder prepared by `cscr prepare` (optional with --smoke-test)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--smoke-test", action="store_true",
                   help=f"tiny sizes, {SMOKE_EPOCHS} epochs; a generated run folder (removed afterwards) "
                        "when --run is absent")
    h = p.add_argument_group(f"hyperparameters ({what}; defaults: cscr.config.TrainConfig)")
    d = TrainConfig()
    h.add_argument("--epochs", type=int, default=None, help=f"epochs (default {d.epochs})")
    h.add_argument("--batch-size", type=int, default=None, help=f"global batch size (default {d.batch_size})")
    h.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {d.lr:g})")
    h.add_argument("--top-k", type=int, default=None,
                   help=f"experts retrieved before the cost penalty, 0 = every expert (default {d.index.top_k})")
    h.add_argument("--bands", type=int, default=None, help=f"cost bands B (default {d.loss.bands})")
    h.add_argument("--gamma", type=float, default=None, help=f"negative cost penalty (default {d.loss.gamma:g})")
    h.add_argument("--hidden", type=int, default=None, help=f"head hidden width (default {d.head.hidden})")
    h.add_argument("--seed", type=int, default=None, help=f"seed (default {d.seed})")
    h.add_argument("--config", default=None,
                   help="JSON file or string: a nested TrainConfig (head/loss/index) over the defaults; the "
                        "options above override it. E.g. '{\"loss\": {\"bce_weight\": 0}}': similarity utilities "
                        "(SPEC section 5) instead of the default quality head")


def given_fields(args: argparse.Namespace) -> set[str]:
    """TrainConfig fields (dotted names) the command line sets (--smoke-test sets the epochs)."""
    names = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "seed": "seed", "top_k": "index.top_k",
             "bands": "loss.bands", "gamma": "loss.gamma", "hidden": "head.hidden"}
    out = {dotted for attr, dotted in names.items() if getattr(args, attr, None) is not None}
    if getattr(args, "smoke_test", False):
        out.add("epochs")
    return out


def over_defaults(nested: dict[str, Any]) -> dict[str, Any]:
    """A (partial) nested TrainConfig over TrainConfig()'s defaults. The quality head follows the
    BCE weight where only one of them is named (``{"loss": {"bce_weight": 0}}`` means similarity
    utilities, ``{"head": {"utility": "similarity"}}`` no BCE)."""
    out = dataclasses.asdict(TrainConfig())
    for key, value in nested.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    head, loss = nested.get("head", {}), nested.get("loss", {})
    if isinstance(head, dict) and isinstance(loss, dict):
        if "utility" in head and "bce_weight" not in loss and head["utility"] == "similarity":
            out["loss"]["bce_weight"] = 0.0
        if "bce_weight" in loss and "utility" not in head:
            out["head"]["utility"] = "quality" if float(loss["bce_weight"]) > 0 else "similarity"
    return out


def train_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The TrainConfig of --config (else ``base``, else the defaults) with the hyperparameter
    options over it (--smoke-test: 2 epochs)."""
    nested: dict[str, Any] = {}
    if args.config:
        text = str(args.config)
        if not text.lstrip().startswith("{"):  # a file (an inline object starts with "{")
            path = Path(text)
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigError(f"--config: cannot read {path} ({exc.strerror or exc}); give a JSON "
                                  "file or an inline JSON object") from None
        try:
            nested = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config is neither a JSON file nor a JSON string: {exc}") from exc
        _check(isinstance(nested, dict), "--config must hold a JSON object (a nested TrainConfig)")
    cfg = TrainConfig.from_nested(over_defaults(nested)) if args.config or base is None else base
    epochs = args.epochs if args.epochs is not None else (SMOKE_EPOCHS if args.smoke_test else None)
    top = {k: v for k, v in (("epochs", epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                             ("seed", args.seed)) if v is not None}
    loss = {k: v for k, v in (("bands", args.bands), ("gamma", args.gamma)) if v is not None}
    head = {"hidden": args.hidden} if args.hidden is not None else {}
    index = {"top_k": args.top_k} if args.top_k is not None else {}
    return dataclasses.replace(
        cfg, **top,
        loss=dataclasses.replace(cfg.loss, **loss), head=dataclasses.replace(cfg.head, **head),
        index=dataclasses.replace(cfg.index, **index),
    )


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


# ---------------------------------------------------------------- train

def add_train_options(p: argparse.ArgumentParser, default_variants: str = "cscr") -> None:
    """Every option of the train job (``default_variants``: `cscr train` trains both by default)."""
    add_common_options(p, "the trained heads")
    p.add_argument("--variant", default=default_variants,
                   help=f"comma-separated: {', '.join(TRAIN_VARIANTS)} (default: {default_variants})")
    p.add_argument("--descriptor-kind", default=None,
                   help="descriptor kind from the run's store (default: the kind the run was last trained "
                        "with, else probe-outcome, computed if missing)")
    p.add_argument("--fresh", action="store_true", help="Ray: discard an interrupted run instead of resuming it")
    t = p.add_argument_group("hyperparameter search (--tune)")
    t.add_argument("--tune", action="store_true",
                   help="first search bands, gamma, alpha, tau_min, width, epochs and the quality head's BCE "
                        "weight on Ray Tune, scored on the validation split only; train with the best "
                        "(recorded in RUN/models/<variant>/tune.json)")
    t.add_argument("--tune-trials", type=int, default=12, help="configurations tried, the first the given one (default 12)")
    t.add_argument("--tune-seed", type=int, default=0, help="seed of the search's random draws (default 0)")
    t.add_argument("--tune-cpus-per-trial", type=float, default=0.5, help="CPUs per trial (default 0.5)")
    r = p.add_argument_group("where it runs")
    r.add_argument("--plain", action="store_true", help="the single-process loop, no Ray")
    r.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for --plain (default: torch's; 1 is faster on a busy machine)")
    r.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    r.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker (default: fits the cluster)")
    r.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto",
                   help="one GPU per worker (default auto: if the cluster has one per worker)")


def run_defaults(args: argparse.Namespace, log: Callable[[str], None] = say) -> tuple[str | None, TrainConfig]:
    """(descriptor kind, TrainConfig): the command line's, over what ``--run`` was last trained with
    (one line says which recorded settings are used; cscr.runs.settings)."""
    rec = training_defaults(args.run, kind=args.descriptor_kind, given=given_fields(args),
                            use_train=not args.config, log=log)
    return rec.descriptor_kind, train_config(args, rec.train)


def train_job_config(args: argparse.Namespace, log: Callable[[str], None] = say) -> TrainJobConfig:
    """The job's config; with ``--run``, defaults from the run (``run_defaults``), and one line per
    variant whose trained head this training would replace with another descriptor kind."""
    kind, train = run_defaults(args, log)
    variants = _csv(args.variant)
    if args.run is not None:
        from cscr.runs.descriptors import DEFAULT_KIND, store_of

        new = kind or DEFAULT_KIND
        # said only when the training can take place (a kind missing from the store is an error first)
        can = new == DEFAULT_KIND or (store_of(args.run).path.exists() and new in store_of(args.run).kinds())
        for v in variants if can else ():
            line = overwrite_line(args.run, v, new)
            if line:
                log(line)
    return TrainJobConfig(
        run=args.run, variants=variants, train=train, descriptor_kind=kind,
        plain=args.plain, threads=args.threads, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        use_gpu={"auto": None, "yes": True, "no": False}[args.use_gpu], address=args.address, fresh=args.fresh,
        smoke_test=args.smoke_test, tune=args.tune, tune_trials=args.tune_trials, tune_seed=args.tune_seed,
        tune_cpus_per_trial=args.tune_cpus_per_trial,
    )


# ---------------------------------------------------------------- sweep

def grids_epilog() -> str:
    """The grids, one line each, for --help."""
    lines = ["grids (--grid NAME[,NAME...] or all):"]
    for g in GRIDS.values():
        values = ", ".join(str(v) for v in g.values)
        lines.append(f"  {g.name:<11} {g.label}: {values} (default {g.default})")
    return "\n".join(lines)


def add_sweep_options(p: argparse.ArgumentParser) -> None:
    """Every option of the sweep job."""
    add_common_options(p, "the defaults each grid varies")
    p.add_argument("--grid", default=None,
                   help=f"grid name(s), comma-separated, or 'all' (default: all; {SMOKE_GRID} with --smoke-test)")
    p.add_argument("--concurrency", type=int, default=None, help="trials at a time (default: 4, or 1 per GPU)")
    p.add_argument("--cpus-per-trial", type=float, default=0.5, help="CPUs per trial (default 0.5)")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial (default: 1 where GPUs exist, else 0)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming an earlier sweep")
    p.add_argument("--descriptor-kind", default=None,
                   help="descriptor kind of every grid but 'descriptor' (default: the kind the run was last "
                        "trained with, else probe-outcome)")
    p.add_argument("--allow-failed-trials", action="store_true",
                   help="exit 0 even when trials failed (default: exit 1; the grid is partial and no value is chosen)")


def sweep_job_config(args: argparse.Namespace, log: Callable[[str], None] = say) -> SweepJobConfig:
    """The job's config; with ``--run``, the grids vary around the run's recorded settings (``run_defaults``)."""
    spec = args.grid or (SMOKE_GRID if args.smoke_test else "all")
    grids = tuple(grid_names(spec))
    kind, train = run_defaults(args, log)
    return SweepJobConfig(
        run=args.run, grids=grids, train=train, descriptor_kind=kind, concurrency=args.concurrency,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, resume=not args.no_resume,
        address=args.address, allow_failed_trials=args.allow_failed_trials, smoke_test=args.smoke_test,
    )
