"""The options and configs of the data jobs (embed, fingerprint, label), defined once: ``python
jobs/X.py`` and ``cscr X`` build their parsers and frozen configs here.

    add_embed_options(parser)        ->  args  ->  embed_config(args)        ->  EmbedJob
    add_fingerprint_options(parser)  ->  args  ->  fingerprint_config(args)  ->  FingerprintJob
    add_label_options(parser)        ->  args  ->  label_config(args)        ->  LabelJob

``run(cfg)`` in jobs/embed.py, jobs/fingerprint.py and jobs/label.py takes these configs (bad
values raise ConfigError when the config is built); :func:`data_job_parser` and :func:`data_job_main`
are each job's parser and ``main``. Nothing here imports numpy, torch or ray:
the CLI registers its subcommands from this module. (jobs/train_options.py: the train and sweep jobs.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cscr.config import ENCODER_BACKENDS, ConfigError, EncoderConfig, FingerprintConfig
from cscr.llm import SCORER_CONTEXTS

BACKENDS = ("transformers", "vllm")
LONG_PROMPT_MODES = ("head", "tail", "head+tail", "windows")  # cscr.encoder.LONG_PROMPT_MODES (a test checks)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ---------------------------------------------------------------- shared groups


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (default: $RAY_ADDRESS, else a new embedded local cluster)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs of a new local cluster (default: all cores; fractions round up)")


def add_worker_options(p: argparse.ArgumentParser, *, workers: int, what: str,
                       gpus: float | None) -> None:
    p.add_argument("--workers", type=int, default=workers, help=f"Ray actors {what} (default: {workers})")
    p.add_argument("--cpus-per-worker", type=float, default=0.5,
                   help="CPUs per actor (default: 0.5, so two actors share a core)")
    gpu_help = "default: 1 on clusters with GPUs, else 0" if gpus is None else f"default: {gpus:g}"
    p.add_argument("--gpus-per-worker", type=float, default=gpus, help=f"GPUs per actor ({gpu_help})")


def _workers_ok(workers: int, cpus: float, gpus: float | None) -> None:
    _check(workers >= 1, f"--workers must be >= 1, got {workers}")
    _check(cpus > 0, f"--cpus-per-worker must be > 0, got {cpus}")
    _check(gpus is None or gpus >= 0, f"--gpus-per-worker must be >= 0, got {gpus}")


def _cluster_ok(num_cpus: float | None) -> None:
    _check(num_cpus is None or num_cpus > 0, f"--num-cpus must be > 0, got {num_cpus}")


# ---------------------------------------------------------------- embed


@dataclass(frozen=True)
class EmbedJob:
    """Prompt embeddings of a run's table on Ray Data (jobs/embed.py)."""

    run: str | None = None  # run folder with a routing table
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    workers: int = 2
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    threads: int = 1  # torch threads per actor
    address: str | None = None
    num_cpus: float | None = None
    smoke_test: bool = False

    def __post_init__(self) -> None:
        _workers_ok(self.workers, self.cpus_per_worker, self.gpus_per_worker)
        _check(self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        _cluster_ok(self.num_cpus)


def add_encoder_options(p: argparse.ArgumentParser) -> None:
    """The prompt encoder's options (also ``cscr prepare``'s)."""
    d = EncoderConfig()
    p.add_argument("--encoder", default=None,
                   help="sentence-transformers path or Hub id (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"encoder batch size (default: {d.batch_size})")
    p.add_argument("--max-seq-length", type=int, default=d.max_seq_length,
                   help=f"encoder window in tokens (default: {d.max_seq_length})")
    p.add_argument("--long-prompt", default=d.long_prompt, choices=LONG_PROMPT_MODES,
                   help=f"how a prompt longer than the encoder's window is embedded (default: {d.long_prompt}; "
                        "recorded in the run)")
    p.add_argument("--encoder-backend", default=d.backend, choices=ENCODER_BACKENDS,
                   help=f"what runs the encoder (default: {d.backend}; onnx, onnx-int8: ONNX Runtime on a local "
                        "export of the same weights, faster on CPUs, needs `pip install 'cscr[onnx]'`; "
                        "recorded in the run, so serving embeds with it too)")


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig(model=args.encoder, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                         long_prompt=args.long_prompt, backend=args.encoder_backend)


def add_embed_ray_options(p: argparse.ArgumentParser) -> None:
    """How the embedding job spreads over Ray (also ``cscr prepare --ray``'s)."""
    d = EmbedJob(smoke_test=True)
    add_worker_options(p, workers=d.workers, what="encoding prompts", gpus=d.gpus_per_worker)
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads per actor (default: {d.threads})")
    add_cluster_options(p)


def add_embed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run folder with a routing table (cscr prepare --no-embed)")
    add_encoder_options(p)
    add_embed_ray_options(p)
    p.add_argument("--smoke-test", action="store_true", help="a tiny table in a temp folder, seconds")


def embed_config(args: argparse.Namespace, run: str | None = None) -> EmbedJob:
    """The EmbedJob of ``add_embed_options`` (or of ``cscr prepare``'s options, with ``run``)."""
    run = run or getattr(args, "run", None)
    _check(bool(run) or bool(getattr(args, "smoke_test", False)), "--run is required (or --smoke-test)")
    return EmbedJob(run=run, encoder=encoder_config(args), workers=args.workers,
                    cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                    threads=args.threads, address=args.address, num_cpus=args.num_cpus,
                    smoke_test=bool(getattr(args, "smoke_test", False)))


# ---------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class FingerprintJob:
    """Expert descriptors of a pool, written to RUN/descriptors.parquet (jobs/fingerprint.py)."""

    pool: str | None = None  # pool YAML
    run: str | None = None  # run folder
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    workers: int = 1  # actors per open-weights expert and for the scorer
    cpus_per_worker: float = 0.5
    gpus_per_worker: float | None = None  # None: 1 on clusters with GPUs, else 0
    batch_size: int = 8  # probes per actor call
    force: bool = False  # recompute experts already in the store
    address: str | None = None
    num_cpus: float | None = None
    smoke_test: bool = False  # tiny sizes on two tiny random models (or on --pool)

    def __post_init__(self) -> None:
        _workers_ok(self.workers, self.cpus_per_worker, self.gpus_per_worker)
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _cluster_ok(self.num_cpus)


def add_fingerprint_options(p: argparse.ArgumentParser) -> None:
    d, j = FingerprintConfig(), FingerprintJob(smoke_test=True)
    p.add_argument("--pool", help="pool YAML (examples/pools/*.yaml)")
    p.add_argument("--run", help="run folder (descriptors.parquet is written there)")
    p.add_argument("--kind", choices=["auto", "logit", "perplexity"], default=d.kind,
                   help="descriptor kind; auto: logit for open-weights experts, perplexity for the others")
    p.add_argument("--n-probes", type=int, default=d.n_probes, help=f"N: probe prompts (default: {d.n_probes})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"T: greedy steps per probe, logit (default: {d.steps})")
    p.add_argument("--basis-size", type=int, default=d.basis_size,
                   help=f"K: token-basis size, logit (default: {d.basis_size})")
    p.add_argument("--scorer", default=d.scorer,
                   help="scorer LM for perplexity: path or Hub id (default: the packaged SmolLM2)")
    p.add_argument("--scorer-context", choices=list(SCORER_CONTEXTS), default=d.scorer_context,
                   help="score answers on their own (none: SPEC.md) or given their prompt (slower)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"answer length of live perplexity experts (default: {d.max_new_tokens})")
    p.add_argument("--max-answer-tokens", type=int, default=d.max_answer_tokens,
                   help=f"answer tokens scored (default: {d.max_answer_tokens})")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help=f"prompt tokens kept, the end of the prompt (default: {d.max_prompt_tokens})")
    p.add_argument("--backend", choices=list(BACKENDS), default=None, help="override the pool's backends")
    add_worker_options(p, workers=j.workers, what="per open-weights expert and for the scorer", gpus=None)
    p.add_argument("--batch-size", type=int, default=j.batch_size,
                   help=f"probes per actor call (default: {j.batch_size})")
    p.add_argument("--force", action="store_true", help="recompute experts already in the store")
    add_cluster_options(p)
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny sizes on two tiny random models (or on --pool) in a temp folder, seconds")


def fingerprint_config(args: argparse.Namespace) -> FingerprintJob:
    _check(args.smoke_test or bool(args.pool and args.run), "--pool and --run are required (or --smoke-test)")
    fp = FingerprintConfig(kind=args.kind, n_probes=args.n_probes, steps=args.steps, basis_size=args.basis_size,
                           scorer=args.scorer, scorer_context=args.scorer_context,
                           max_new_tokens=args.max_new_tokens, max_answer_tokens=args.max_answer_tokens,
                           max_prompt_tokens=args.max_prompt_tokens, backend=args.backend)
    return FingerprintJob(pool=args.pool, run=args.run, fingerprint=fp, workers=args.workers,
                          cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                          batch_size=args.batch_size, force=args.force, address=args.address,
                          num_cpus=args.num_cpus, smoke_test=args.smoke_test)


# ---------------------------------------------------------------- label


@dataclass(frozen=True)
class LabelJob:
    """Routing data from a live pool: answers, grades, cost, latency -> OUT/table (jobs/label.py)."""

    pool: str | None = None  # pool YAML
    out: str | None = None  # run folder
    prompts: str | None = None  # JSONL: prompt, answer, grader, id, category, split
    tasks: str | None = None  # "builtin": the generated built-in task set
    n: int = 300  # built-in tasks to generate
    seed: int = 0  # task generation and split seed
    probe_size: int = 192  # probe prompts carved out of train
    max_new_tokens: int | None = None  # None: cscr.label.DEFAULT_MAX_NEW_TOKENS
    max_prompt_tokens: int = 512
    backend: str | None = None  # override the pool's backends
    workers: int = 1  # actors per open-weights expert
    cpus_per_worker: float = 0.5
    gpus_per_worker: float | None = None
    batch_size: int = 16
    encoder: str | None = None  # prompt encoder for the embeddings written afterwards
    no_embed: bool = False
    address: str | None = None
    num_cpus: float | None = None
    smoke_test: bool = False  # two tiny models (or --pool), 12 built-in tasks

    def __post_init__(self) -> None:
        _workers_ok(self.workers, self.cpus_per_worker, self.gpus_per_worker)
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.n >= 1, f"--n must be >= 1, got {self.n}")
        _check(self.probe_size >= 0, f"--probe-size must be >= 0, got {self.probe_size}")
        _check(self.max_new_tokens is None or self.max_new_tokens > 0, "--max-new-tokens must be > 0")
        _check(self.max_prompt_tokens > 0, "--max-prompt-tokens must be > 0")
        _check(self.backend in (None, *BACKENDS), f"unknown backend {self.backend!r}")
        _cluster_ok(self.num_cpus)
        _check(not (self.prompts and self.tasks), "give --prompts FILE or --tasks builtin, not both")


def add_label_options(p: argparse.ArgumentParser) -> None:
    d = LabelJob(smoke_test=True)
    p.add_argument("--pool", help="pool YAML")
    p.add_argument("--prompts", default=None,
                   help="JSONL: prompt, answer, grader (exact|mc|numeric), id, category, split")
    p.add_argument("--tasks", choices=["builtin"], default=None, help="the generated built-in task set")
    p.add_argument("--n", type=int, default=d.n, help=f"built-in tasks to generate (default: {d.n})")
    p.add_argument("--out", help="run folder (the table goes to OUT/table)")
    p.add_argument("--seed", type=int, default=d.seed, help="task generation and split seed")
    p.add_argument("--probe-size", type=int, default=d.probe_size,
                   help=f"probe prompts carved out of train (default: {d.probe_size})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length (default: cscr.label's, 10: a number, a word or a letter)")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help=f"prompt tokens kept (default: {d.max_prompt_tokens})")
    p.add_argument("--backend", choices=list(BACKENDS), default=None, help="override the pool's backends")
    add_worker_options(p, workers=d.workers, what="per open-weights expert", gpus=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"prompts per actor call (default: {d.batch_size})")
    p.add_argument("--encoder", default=None, help="prompt encoder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--no-embed", action="store_true", help="write the table only (no prompt embeddings)")
    add_cluster_options(p)
    p.add_argument("--smoke-test", action="store_true",
                   help="two tiny models (or --pool), 12 built-in tasks, in a temp folder, seconds")


def label_config(args: argparse.Namespace) -> LabelJob:
    if not args.smoke_test:
        _check(bool(args.pool and args.out), "--pool and --out are required (or --smoke-test)")
        _check(bool(args.prompts or args.tasks),
               "give --prompts FILE (JSONL with prompt, answer, grader) or --tasks builtin")
    return LabelJob(pool=args.pool, out=args.out, prompts=args.prompts, tasks=args.tasks, n=args.n, seed=args.seed,
                    probe_size=args.probe_size, max_new_tokens=args.max_new_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, backend=args.backend, workers=args.workers,
                    cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                    batch_size=args.batch_size, encoder=args.encoder, no_embed=args.no_embed,
                    address=args.address, num_cpus=args.num_cpus, smoke_test=args.smoke_test)


# ---------------------------------------------------------------- the jobs' main


def data_job_parser(add_options: Callable[[argparse.ArgumentParser], None], doc: str | None) -> argparse.ArgumentParser:
    """A data job's parser: its options (those of its ``cscr`` command) and the logging ones."""
    from cscr.jobs.cluster import add_logging_options

    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    add_options(p)
    add_logging_options(p)
    return p


def data_job_main(name: str, parser: argparse.ArgumentParser, make_config: Callable[[argparse.Namespace], Any],
                  run: Callable[[Any], Any], describe: Callable[[Any], str],
                  argv: Sequence[str] | None = None) -> int:
    """``python jobs/<name>.py``: the hub offline unless the environment says otherwise, then
    ``describe(run(make_config(args)))`` printed. A user's mistake (a bad option value, a malformed
    or missing file) is one line on stderr and exit 2."""
    from cscr.jobs.cluster import set_log_level

    from cscr.errors import USER_ERRORS

    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        set_log_level(args.log_level, args.verbose)
        result = run(make_config(args))
    except USER_ERRORS as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    print(describe(result))
    return 0
