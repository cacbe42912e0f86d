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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from cscr.jobs.fingerprint import _pool, _resources, init_ray, smoke_pool

from cscr.atomic import atomic_write
from cscr.config import ConfigError
from cscr.data.table import TableError
from cscr.errors import InputError
from cscr.label import DEFAULT_MAX_NEW_TOKENS, LabelUDF, build_table, task_rows, udf_args
from cscr.pool import Pool, load_pool
from cscr.run import RunPaths
from cscr.tasks import Task, builtin_tasks, read_jsonl


def log(msg: str) -> None:
    print(f"label: {msg}", file=sys.stderr, flush=True)


def label_ray(pool: Pool, tasks: list[Task], args: argparse.Namespace) -> pd.DataFrame:
    """Per-call records of every live expert on every task (Ray must be initialised)."""
    import ray

    live = [e for e in pool.experts if e.kind != "recorded"]
    if not live:
        raise InputError(f"pool {pool.name!r} has no expert that can answer new prompts (all 'recorded')")
    rows = task_rows(tasks)
    res = _resources(args)
    dss = []
    for e in live:
        kw = udf_args(e, args.max_new_tokens, {"max_prompt_tokens": args.max_prompt_tokens, "batch_size": args.batch_size}
                      if e.kind == "open-weights" else None)
        if args.backend and e.kind == "open-weights":
            kw["backend"] = args.backend
        dss.append(ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // args.batch_size, 8))).map_batches(
            LabelUDF, batch_size=args.batch_size, batch_format="numpy", fn_constructor_kwargs=kw,
            compute=_pool(args.workers if e.kind == "open-weights" else 1),
            **(res if e.kind == "open-weights" else {"num_cpus": min(0.25, args.cpus_per_worker)})))
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


def load_tasks(args: argparse.Namespace) -> list[Task]:
    if args.prompts and args.tasks:
        raise InputError("give --prompts FILE or --tasks builtin, not both")
    if args.prompts:
        return read_jsonl(args.prompts)
    if args.tasks == "builtin":
        return builtin_tasks(args.n, seed=args.seed)
    raise InputError("give --prompts FILE (JSONL with prompt, answer, grader) or --tasks builtin")


def run_label(pool: Pool, tasks: list[Task], out: str | os.PathLike[str], args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = RunPaths.of(out)
    records = label_ray(pool, tasks, args)
    table = build_table(pool, tasks, records, seed=args.seed, probe_size=args.probe_size,
                        source=f"label:{pool.name}:{args.prompts or 'builtin'}")
    table.meta["label"]["seconds"] = time.perf_counter() - t0
    table.save(run.table)
    calls = run.root / "label" / "calls.parquet"
    frame = records.assign(answer=records["answer"].astype(object).where(records["answer"].notna(), None))
    atomic_write(calls, lambda p: frame.to_parquet(p, index=False))
    if not getattr(args, "no_embed", False):  # what `cscr prepare` does: the run is ready to train
        from cscr.config import EncoderConfig
        from cscr.encoder import embed_table, get_encoder

        embed_table(table, get_encoder(EncoderConfig(model=getattr(args, "encoder", None))), run.embeddings)
    return {"table": table, "seconds": time.perf_counter() - t0, "calls": calls}


def label_local(pool: Pool, tasks: list[Task], out: str | os.PathLike[str], args: argparse.Namespace) -> dict[str, Any]:
    """``run_label`` on an embedded local cluster (started and stopped here unless Ray is up)."""
    started = init_ray(None, getattr(args, "num_cpus", None))
    try:
        return run_label(pool, tasks, out, args)
    finally:
        if started:
            import ray

            ray.shutdown()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", help="pool YAML")
    p.add_argument("--prompts", default=None, help="JSONL: prompt, answer, grader (exact|mc|numeric), id, category, split")
    p.add_argument("--tasks", choices=["builtin"], default=None, help="the generated built-in task set")
    p.add_argument("--n", type=int, default=300, help="built-in tasks to generate")
    p.add_argument("--out", help="run folder (the table goes to OUT/table)")
    p.add_argument("--seed", type=int, default=0, help="task generation and split seed")
    p.add_argument("--probe-size", type=int, default=192, help="probe prompts carved out of train")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--backend", choices=["transformers", "vllm"], default=None, help="override the pool's backends")
    p.add_argument("--workers", type=int, default=1, help="actors per open-weights expert")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 on clusters with GPUs, else 0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--encoder", default=None, help="prompt encoder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--no-embed", action="store_true", help="write the table only (no prompt embeddings)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--smoke-test", action="store_true", help="two tiny models, 12 built-in tasks, seconds")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = None
    try:
        if args.smoke_test:
            tmp = tempfile.TemporaryDirectory(prefix="cscr-label-smoke-")
            pool = load_pool(args.pool) if args.pool else smoke_pool(Path(tmp.name))
            args.out = args.out or str(Path(tmp.name) / "run")
            args.tasks, args.prompts, args.n, args.max_new_tokens = "builtin", None, 12, 4
        else:
            if not args.pool or not args.out:
                raise InputError("--pool and --out are required (or --smoke-test)")
            pool = load_pool(args.pool)
        tasks = load_tasks(args)
        started = init_ray(args.address, args.num_cpus)
        try:
            res = run_label(pool, tasks, args.out, args)
        finally:
            if started:
                import ray

                ray.shutdown()
    except (InputError, ConfigError, TableError) as exc:
        print(f"label: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    table = res["table"]
    print(summary(table, res["seconds"]))
    if args.smoke_test:
        assert table.n == 12 and table.quality.shape == (12, len(pool.experts)), "smoke test: bad table shape"
        print("smoke test ok")
    return 0


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
