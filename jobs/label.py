"""Routing data from a live pool, on Ray Data: every expert answers every prompt, answers are
graded, cost and latency recorded, and a routing table written to the run folder.

One actor pool per live expert (``LabelUDF``: the model loads once per actor; black-box
experts: one actor with bounded concurrent requests, timeouts and retries). Rows stream back
to the driver with progress; the table (cscr.data.table) is written atomically at the end,
with the per-call records beside it (``label/calls.parquet``: answer, grade, tokens, latency).

    cscr label --pool examples/pools/local-small.yaml --tasks builtin --n 300 --out runs/local
    cscr label --pool my-pool.yaml --prompts prompts.jsonl --out runs/mine
    ray job submit --working-dir . -- python jobs/label.py --pool ... --tasks builtin --out runs/local
    python jobs/label.py --smoke-test

In Python: ``run(LabelJob(pool=..., out=..., tasks="builtin"))``; the options (shared with
``cscr label``) and the config live in cscr.jobs.data_options.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from cscr.jobs.cluster import connect, disconnect
from cscr.jobs.data_options import (
    LabelJob,
    add_label_options,
    data_job_main,
    data_job_parser,
    label_config,
)
from cscr.jobs.fingerprint import _pool, _resources, smoke_pool

from cscr.atomic import atomic_write
from cscr.data.table import RoutingTable
from cscr.errors import InputError
from cscr.label import DEFAULT_MAX_NEW_TOKENS, LabelUDF, build_table, task_rows, udf_args
from cscr.pool import Pool, load_pool
from cscr.runs.paths import RunPaths
from cscr.tasks import Task, builtin_tasks, read_jsonl


def log(msg: str) -> None:
    print(f"label: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LabelResult:
    table: RoutingTable
    seconds: float
    calls: Path  # per-call records (OUT/label/calls.parquet)
    table_path: Path  # OUT/table


def label_ray(pool: Pool, tasks: list[Task], job: LabelJob) -> pd.DataFrame:
    """Per-call records of every live expert on every task (Ray must be initialised)."""
    import ray

    live = [e for e in pool.experts if e.kind != "recorded"]
    if not live:
        raise InputError(f"pool {pool.name!r} has no expert that can answer new prompts (all 'recorded')")
    rows = task_rows(tasks)
    max_new = job.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    res = _resources(job.cpus_per_worker, job.gpus_per_worker)
    dss = []
    for e in live:
        kw = udf_args(e, max_new, {"max_prompt_tokens": job.max_prompt_tokens, "batch_size": job.batch_size}
                      if e.kind == "open-weights" else None)
        if job.backend and e.kind == "open-weights":
            kw["backend"] = job.backend
        dss.append(ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // job.batch_size, 8))).map_batches(
            LabelUDF, batch_size=job.batch_size, batch_format="numpy", fn_constructor_kwargs=kw,
            compute=_pool(job.workers if e.kind == "open-weights" else 1),
            **(res if e.kind == "open-weights" else {"num_cpus": min(0.25, job.cpus_per_worker)})))
    ds = dss[0].union(*dss[1:]) if len(dss) > 1 else dss[0]
    cols = ["expert", "prompt_idx", "answer", "quality", "prompt_tokens", "output_tokens", "latency_s", "error"]
    recs: list[dict[str, Any]] = []
    count: Counter[str] = Counter()
    t0 = time.perf_counter()
    total = len(rows) * len(live)
    # no select_columns: a projection task needs a whole CPU, which the actors may hold (2-core machines)
    for frame in ds.iter_batches(batch_size=None, batch_format="pandas"):
        batch = pd.DataFrame(frame)[cols]
        recs.extend(batch.to_dict("records"))
        count.update(batch["expert"].astype(str))
        el = time.perf_counter() - t0
        log(f"{len(recs)}/{total} answers ({len(recs) / max(el, 1e-9):.2f}/s); "
            + ", ".join(f"{k} {v}/{len(rows)}" for k, v in sorted(count.items())))
    return pd.DataFrame(recs)


def load_tasks(job: LabelJob) -> list[Task]:
    if job.prompts and job.tasks:
        raise InputError("give --prompts FILE or --tasks builtin, not both")
    if job.prompts:
        return read_jsonl(job.prompts)
    if job.tasks == "builtin":
        return builtin_tasks(job.n, seed=job.seed)
    raise InputError("give --prompts FILE (JSONL with prompt, answer, grader) or --tasks builtin")


def run_label(pool: Pool, tasks: list[Task], out: str | os.PathLike[str], job: LabelJob) -> LabelResult:
    """Label, build and save the table (Ray must be initialised; ``run`` does it)."""
    t0 = time.perf_counter()
    run_paths = RunPaths.of(out)
    records = label_ray(pool, tasks, job)
    table = build_table(pool, tasks, records, seed=job.seed, probe_size=job.probe_size,
                        source=f"label:{pool.name}:{job.prompts or 'builtin'}")
    table.meta["label"]["seconds"] = time.perf_counter() - t0
    table.save(run_paths.table)
    calls = run_paths.root / "label" / "calls.parquet"
    frame = records.assign(answer=records["answer"].astype(object).where(records["answer"].notna(), None))
    atomic_write(calls, lambda p: frame.to_parquet(p, index=False))
    if not job.no_embed:  # what `cscr prepare` does: the run is ready to train
        from cscr.config import EncoderConfig
        from cscr.encoder import embed_table, get_encoder

        embed_table(table, get_encoder(EncoderConfig(model=job.encoder)), run_paths.embeddings)
    return LabelResult(table=table, seconds=time.perf_counter() - t0, calls=calls, table_path=run_paths.table)


def run(job: LabelJob, pool: Pool | None = None) -> LabelResult:
    """The job: load the pool (``job.pool`` unless ``pool`` is given) and the tasks, join or
    start Ray (cscr.jobs.cluster), label, write OUT/table, leave Ray as it was."""
    if job.smoke_test:
        return smoke_test(job)
    if pool is None:
        if not job.pool:
            raise InputError("LabelJob.pool is required (a pool YAML) unless a Pool is passed")
        pool = load_pool(job.pool)
    if not job.out:
        raise InputError("LabelJob.out is required")
    tasks = load_tasks(job)
    started = connect(job.address, job.num_cpus)
    try:
        return run_label(pool, tasks, job.out, job)
    finally:
        disconnect(started)


def smoke_test(job: LabelJob) -> LabelResult:
    """Two tiny random models (or ``job.pool``), 12 built-in tasks, in a temp folder removed after."""
    with tempfile.TemporaryDirectory(prefix="cscr-label-smoke-") as tmp:
        pool = load_pool(job.pool) if job.pool else smoke_pool(Path(tmp))
        small = replace(job, smoke_test=False, out=job.out or str(Path(tmp) / "run"), tasks="builtin",
                        prompts=None, n=12, max_new_tokens=4)
        res = run(small, pool)
        if res.table.n != 12 or res.table.quality.shape != (12, len(pool.experts)):
            raise RuntimeError(f"smoke test: table of shape {res.table.quality.shape}")
        log("smoke test ok")
        return res


def build_parser() -> argparse.ArgumentParser:
    return data_job_parser(add_label_options, __doc__)


def main(argv: list[str] | None = None) -> int:
    """``python jobs/label.py``: the options of ``cscr label``."""
    return data_job_main("label", build_parser(), label_config, run, describe, argv)


def describe(res: LabelResult) -> str:
    return summary(res.table, res.seconds) + f"\ntable -> {res.table_path}; per-call records -> {res.calls}"


def summary(table: Any, seconds: float) -> str:
    lines = [f"labelled {table.n} prompts x {len(table.experts)} experts in {seconds:.1f}s "
             f"(cost unit {table.cost_unit}; splits " + ", ".join(f"{s} {int((table.splits == s).sum())}"
                                                                  for s in ("train", "val", "probe", "test")) + ")"]
    for name, m in table.meta.get("label", {}).items():
        if isinstance(m, dict):
            acc = "n/a" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
            lines.append(f"  {name:24s} accuracy {acc}  latency {m['mean_latency_s']:.3f}s/prompt  "
                         f"tokens in {m['mean_prompt_tokens']:.0f} out {m['mean_output_tokens']:.1f}  "
                         f"failed {m['failed_calls']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
