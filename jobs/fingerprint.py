"""Expert fingerprints on Ray Data: probes x experts fanned out over actor pools.

Each open-weights expert gets its own actor pool (``LogitFootprintUDF`` or ``GenerateUDF``:
the model loads once per actor in ``__init__``), with ``num_gpus=1`` per actor on clusters with
GPUs and fractional CPUs otherwise. Black-box experts are called from one actor each with a
bounded number of requests in flight, timeouts and retries (``OpenAIBackend``). Answers of
every perplexity expert (recorded, generated or fetched) then go through one pool of scorer
actors (``ScoreUDF``). Rows stream back to the driver; as soon as an expert's N probes are
in, its descriptor is written to the run's descriptor store (atomically), so a killed job
resumes where it stopped: experts already in the store under the same basis are skipped
unless ``--force``.

    python jobs/fingerprint.py --pool examples/pools/local-small.yaml --run runs/local
    ray job submit --working-dir . -- python jobs/fingerprint.py --pool examples/pools/local-small.yaml --run runs/local
    cscr fingerprint --pool examples/pools/routerbench.yaml --run runs/routerbench
    python jobs/fingerprint.py --smoke-test

In Python: ``run(FingerprintJob(pool=..., run=..., fingerprint=FingerprintConfig(...)))``; the
options (shared with ``cscr fingerprint``) and the config live in cscr.jobs.data_options.

Probes: the run table's probe split (first N in table order); with no table in the run, N
generated built-in tasks (cscr.tasks, seed 7). Kind ``auto``: logit footprints for
open-weights experts, perplexity fingerprints for the others; when both occur, K is set to N
(SPEC.md section 2: both kinds then share R^N).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from cscr.jobs.cluster import connect, disconnect
from cscr.jobs.data_options import (
    FingerprintJob,
    add_fingerprint_options,
    data_job_main,
    data_job_parser,
    fingerprint_config,
)

from cscr.data.table import RoutingTable
from cscr.errors import InputError
from cscr.fingerprints.basis import TokenBasis, pre_tokenize
from cscr.fingerprints.logit import LogitFootprintUDF, footprint_from_rows
from cscr.fingerprints.perplexity import (
    DEFAULT_SCORER,
    GenerateUDF,
    ScoreUDF,
    perplexity_basis_id,
    perplexity_descriptor,
)
from cscr.fingerprints.store import DescriptorStore, FingerprintSettings
from cscr.label import udf_args
from cscr.pool import ExpertSpec, Pool, load_pool, pool_from_dict
from cscr.runs.paths import RunPaths
from cscr.tasks import builtin_tasks


def log(msg: str) -> None:
    print(f"fingerprint: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class FingerprintResult:
    probes: int  # N
    done: list[str] = field(default_factory=list)  # experts computed now
    skipped: list[str] = field(default_factory=list)  # experts already in the store
    seconds: float = 0.0
    basis: dict[str, str] = field(default_factory=dict)  # kind -> basis id
    descriptors: str = ""  # the store's path


def load_probes(run: RunPaths, n: int, seed: int = 7) -> tuple[list[str], list[str], str]:
    """(probe ids, texts, where from): the run table's probe split, else generated tasks."""
    if (run.table / "manifest.json").exists():
        table = RoutingTable.load(run.table)
        rows = table.split_index("probe")
        if len(rows) < 2:
            raise InputError(f"{run.table} has {len(rows)} probe prompts; fingerprints need at least 2")
        rows = rows[:n]
        return list(table.prompt_ids[rows]), [str(t) for t in table.texts[rows]], f"probe split of {run.table}"
    tasks = builtin_tasks(n, seed=seed)
    return [t.id for t in tasks], [t.prompt for t in tasks], f"{n} generated built-in tasks (no table in {run.root})"


def expert_kind(spec: ExpertSpec, kind: str) -> str:
    if kind == "auto":
        return "logit" if spec.kind == "open-weights" else "perplexity"
    if kind == "logit" and spec.kind != "open-weights":
        raise InputError(f"expert {spec.name!r} is {spec.kind}: no logits; use --kind perplexity or auto")
    return kind


def recorded_answers(spec: ExpertSpec, run: RunPaths, probe_ids: list[str]) -> list[str | None]:
    folder = Path(spec.source.table) if spec.source.table else run.table
    if (folder / "table" / "manifest.json").exists():
        folder = folder / "table"  # a run folder was named
    table = RoutingTable.load(folder)
    if table.responses is None:
        raise InputError(f"{folder}: the routing table recorded no responses, needed by expert {spec.name!r}")
    j = table.expert_index(spec.source.column or spec.name)
    pos = {p: i for i, p in enumerate(table.prompt_ids)}
    missing = [p for p in probe_ids if p not in pos]
    if missing:
        raise InputError(f"{folder}: probe prompt(s) {missing[:3]} not in the table of expert {spec.name!r}")
    return [table.responses[pos[p], j] for p in probe_ids]


def _pool(size: int) -> Any:
    """A fixed-size actor pool (one model load per actor)."""
    import ray

    return ray.data.ActorPoolStrategy(size=max(1, int(size)))


def _resources(cpus_per_worker: float, gpus_per_worker: float | None) -> dict[str, Any]:
    """Ray resources of one actor; GPUs default to 1 on clusters that have them."""
    import ray

    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"num_cpus": cpus_per_worker, "num_gpus": gpus or None}


def run_fingerprint(pool: Pool, run_dir: str | os.PathLike[str], job: FingerprintJob) -> FingerprintResult:
    """Compute and store the pool's missing descriptors (Ray must be initialised; ``run`` does it)."""
    import ray

    cfg = job.fingerprint
    run = RunPaths.of(run_dir)
    store = DescriptorStore(run.descriptors)
    probe_ids, probes, origin = load_probes(run, cfg.n_probes)
    n = len(probe_ids)
    kinds = {e.name: expert_kind(e, cfg.kind) for e in pool.experts}
    logit_x = [e for e in pool.experts if kinds[e.name] == "logit"]
    ppl_x = [e for e in pool.experts if kinds[e.name] == "perplexity"]
    k = n if (logit_x and ppl_x) else cfg.basis_size
    distinct = len({s for t in probes for s in pre_tokenize(t)})
    if logit_x and distinct < k:
        if logit_x and ppl_x:
            raise InputError(f"mixed pool needs K = N = {n} basis strings, the probes hold {distinct}")
        log(f"the {n} probes hold {distinct} distinct token strings: basis size {k} -> {distinct}")
        k = distinct
    basis = TokenBasis.from_texts(probes, k) if logit_x else None
    scorer = cfg.scorer or DEFAULT_SCORER
    basis_ids = {"logit": basis.basis_id if basis else "", "perplexity": perplexity_basis_id(probe_ids, scorer, cfg.scorer_context)}
    settings = {"logit": FingerprintSettings(steps=cfg.steps, basis_size=k, n_probes=n,
                                             max_prompt_tokens=cfg.max_prompt_tokens),
                "perplexity": FingerprintSettings(n_probes=n, scorer=scorer, scorer_context=cfg.scorer_context,
                                                  max_prompt_tokens=cfg.max_prompt_tokens)}
    log(f"{n} probes ({origin}); {len(logit_x)} logit, {len(ppl_x)} perplexity experts; "
        f"basis {basis_ids['logit'] or '-'} / {basis_ids['perplexity'] if ppl_x else '-'}")

    todo: dict[str, list[ExpertSpec]] = {"logit": [], "perplexity": []}
    for kind, experts in (("logit", logit_x), ("perplexity", ppl_x)):
        if not experts:
            continue
        old = {r: i for r, i in _stored(store, kind).items()}
        stale = sorted(x for x, b in old.items() if b != basis_ids[kind])
        if old and store.settings(kind).conflicts(settings[kind]):
            stale = sorted(old)  # computed with another T, prompt cut or scorer context
        if stale and not job.force:
            raise InputError(f"{run.descriptors} holds {kind} descriptors of {stale} under another basis or "
                             f"settings (probes, basis size, T, prompt cut, scorer): pass --force to recompute them")
        for x in stale:
            store.remove(name=x, kind=kind)
        for e in experts:
            if job.force or old.get(e.name) != basis_ids[kind]:
                todo[kind].append(e)
            else:
                log(f"skip {e.name} ({kind}): already in the store (--force recomputes)")
    res = _resources(job.cpus_per_worker, job.gpus_per_worker)
    rows = [{"probe_idx": i, "probe_id": p, "text": t} for i, (p, t) in enumerate(zip(probe_ids, probes, strict=True))]
    t0 = time.perf_counter()
    done: list[str] = []
    if todo["logit"]:
        dss = []
        for e in todo["logit"]:
            dss.append(ray.data.from_items(rows, override_num_blocks=max(1, min(n, 4 * job.workers))).map_batches(
                LogitFootprintUDF, batch_size=job.batch_size, batch_format="numpy", compute=_pool(job.workers),
                fn_constructor_kwargs={"expert": e.name, "model": e.source.model, "basis": list(basis.strings),  # type: ignore[union-attr]
                                       "steps": cfg.steps, "backend": cfg.backend or e.backend,
                                       "backend_kwargs": {"max_prompt_tokens": cfg.max_prompt_tokens}},
                **res))
        ds = dss[0].union(*dss[1:]) if len(dss) > 1 else dss[0]
        _collect(ds, "logit", n, len(todo["logit"]), store, basis_ids["logit"], done, t0,
                 lambda rows_: footprint_from_rows(np.stack([r["step_mean"] for r in rows_])),
                 lambda name: f"model {pool.get(name).source.model}", settings["logit"])
    if todo["perplexity"]:
        dss = []
        for e in todo["perplexity"]:
            if e.kind == "recorded":
                answers = recorded_answers(e, run, probe_ids)
                items = [{**r, "expert": e.name, "answer": a} for r, a in zip(rows, answers, strict=True)]
                dss.append(ray.data.from_items(items))
            else:
                kw = udf_args(e, cfg.max_new_tokens, {"max_prompt_tokens": cfg.max_prompt_tokens}
                              if e.kind == "open-weights" else None)
                kw["out_columns"] = ["probe_idx", "probe_id", "text", "expert", "answer"]
                if cfg.backend and e.kind == "open-weights":
                    kw["backend"] = cfg.backend
                gen = ray.data.from_items(rows).map_batches(
                    GenerateUDF, batch_size=job.batch_size, batch_format="numpy", fn_constructor_kwargs=kw,
                    compute=_pool(job.workers if e.kind == "open-weights" else 1),
                    **(res if e.kind == "open-weights" else {"num_cpus": min(0.25, job.cpus_per_worker)}))
                dss.append(gen)
        ds = dss[0].union(*dss[1:]) if len(dss) > 1 else dss[0]
        ds = ds.map_batches(ScoreUDF, batch_size=job.batch_size, batch_format="numpy", compute=_pool(job.workers),
                            fn_constructor_kwargs={"scorer": scorer, "max_answer_tokens": cfg.max_answer_tokens,
                                                   "context": cfg.scorer_context,
                                                   "max_prompt_tokens": cfg.max_prompt_tokens,
                                                   "batch_size": job.batch_size}, **res)
        _collect(ds, "perplexity", n, len(todo["perplexity"]),
                 store, basis_ids["perplexity"], done, t0,
                 lambda rows_: perplexity_descriptor(np.array([r["nll"] for r in rows_], dtype=float)),
                 lambda name: f"answers of a {pool.get(name).kind} expert", settings["perplexity"])
    return FingerprintResult(probes=n, done=done, skipped=[e.name for e in pool.experts if e.name not in done],
                             seconds=time.perf_counter() - t0, basis=basis_ids, descriptors=str(run.descriptors))


def _stored(store: DescriptorStore, kind: str) -> dict[str, str]:
    if not store.path.exists():
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(store.path, columns=["expert", "kind", "basis_id"]).to_pylist()
    return {r["expert"]: r["basis_id"] for r in t if r["kind"] == kind}


def _collect(ds: Any, kind: str, n: int, m: int, store: DescriptorStore, basis_id: str, done: list[str],
             t0: float, make: Any, source: Any, settings: FingerprintSettings) -> None:
    """Stream rows back; write each expert's descriptor as soon as its N probes are in."""
    got: dict[str, list[dict[str, Any]]] = defaultdict(list)
    finished = 0
    for row in ds.iter_rows():
        name = str(row["expert"])
        got[name].append(row)
        if len(got[name]) == n:
            rows_ = sorted(got.pop(name), key=lambda r: int(r["probe_idx"]))
            store.write(name, kind, make(rows_), basis_id=basis_id, source=source(name), settings=settings)
            finished += 1
            done.append(name)
            log(f"{kind} {finished}/{m}: {name} written ({time.perf_counter() - t0:.1f}s)")
    if got:
        raise RuntimeError(f"{kind}: incomplete results for {sorted(got)} ({ {k: len(v) for k, v in got.items()} } of {n})")


def run(job: FingerprintJob, pool: Pool | None = None) -> FingerprintResult:
    """The job: load the pool (``job.pool``, unless ``pool`` is given), join or start Ray
    (cscr.jobs.cluster), compute the missing descriptors, leave Ray as it was."""
    if job.smoke_test:
        return smoke_test(job)
    if pool is None:
        if not job.pool:
            raise InputError("FingerprintJob.pool is required (a pool YAML) unless a Pool is passed")
        pool = load_pool(job.pool)
    if not job.run:
        raise InputError("FingerprintJob.run is required")
    started = connect(job.address, job.num_cpus)
    try:
        return run_fingerprint(pool, job.run, job)
    finally:
        disconnect(started)


def smoke_test(job: FingerprintJob) -> FingerprintResult:
    """Tiny sizes on two tiny random GPT-2s (or ``job.pool``) in a temp folder, removed after."""
    with tempfile.TemporaryDirectory(prefix="cscr-fp-smoke-") as tmp:
        pool = load_pool(job.pool) if job.pool else smoke_pool(Path(tmp))
        fp = job.fingerprint
        fp = replace(fp, n_probes=min(fp.n_probes, 8), steps=min(fp.steps, 2), basis_size=min(fp.basis_size, 8),
                     max_new_tokens=min(fp.max_new_tokens, 8), max_answer_tokens=min(fp.max_answer_tokens, 8),
                     scorer=fp.scorer or (None if job.pool else pool.experts[0].source.model))
        small = replace(job, smoke_test=False, run=job.run or str(Path(tmp) / "run"), fingerprint=fp)
        out = run(small, pool)
        if not job.pool:
            got = DescriptorStore(RunPaths.of(small.run or "").descriptors).read("logit")
            if set(got) != {"tiny-a", "tiny-b"}:
                raise RuntimeError(f"smoke test: descriptors {sorted(got)}")
            if not all(abs(float(np.linalg.norm(v)) - 1) < 1e-4 for v in got.values()):
                raise RuntimeError("smoke test: descriptors are not unit vectors")
            log(f"smoke test ok: {len(got)} logit footprints of dimension {len(next(iter(got.values())))}")
        return out


def describe(out: FingerprintResult) -> str:
    """One line about a finished job."""
    return (f"fingerprinted {len(out.done)} expert(s) ({', '.join(out.done) or 'none'}), skipped "
            f"{len(out.skipped)}, {out.probes} probes, {out.seconds:.1f}s -> {out.descriptors}")


def smoke_pool(folder: Path) -> Pool:
    """Two tiny random GPT-2s (a real causal LM each, built in seconds): logit + perplexity."""
    from cscr.models import tiny_random_lm

    a, b = tiny_random_lm(folder / "tiny-a", seed=0), tiny_random_lm(folder / "tiny-b", seed=1)
    return pool_from_dict({"name": "smoke", "experts": [
        {"name": "tiny-a", "kind": "open-weights", "source": {"model": str(a)}, "cost": {"n_params": 0.0001}},
        {"name": "tiny-b", "kind": "open-weights", "source": {"model": str(b)}, "cost": {"n_params": 0.0002}},
    ]})


def build_parser() -> argparse.ArgumentParser:
    return data_job_parser(add_fingerprint_options, __doc__)


def main(argv: list[str] | None = None) -> int:
    """``python jobs/fingerprint.py``: the options of ``cscr fingerprint``."""
    return data_job_main("fingerprint", build_parser(), fingerprint_config, run, describe, argv)


if __name__ == "__main__":
    sys.exit(main())
