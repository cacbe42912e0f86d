"""From the project's expert pool (``cscr.pool``, YAML) to what serving runs.

- open-weights experts run in an Expert deployment with their pool backend (transformers or
  vllm) on their ``source.model``;
- black-box experts are called through their OpenAI-compatible ``source.base_url`` (timeout and
  retries from the pool);
- recorded experts have no model to answer with: a pool holding them is refused.

``check_run_matches_pool`` refuses, before anything starts, a run whose expert index (the
experts of its routing table, with their descriptors) differs from the served pool.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cscr.pool import ExpertSpec


def spec_from_pool_entry(entry: ExpertSpec, num_cpus: float = 0.25, num_gpus: float = 0.0) -> ExpertSpec:
    """One pool entry with the replica resources serving gives it, unless the entry sets its own
    (black-box: at most 0.1 CPU and no GPU by default)."""
    if entry.kind == "recorded":
        raise ValueError(f"expert {entry.name!r} is recorded (its answers come from a routing table): "
                         "it cannot answer live prompts; serve open-weights or black-box experts")
    if entry.kind == "black-box":
        num_cpus, num_gpus = min(num_cpus, 0.1), 0.0
    given = entry.model_fields_set  # resources the pool file sets itself are kept
    return entry.model_copy(update={"num_cpus": entry.num_cpus if "num_cpus" in given else num_cpus,
                                    "num_gpus": entry.num_gpus if "num_gpus" in given else num_gpus})


def specs_from_pool(path: str | os.PathLike[str], num_cpus: float = 0.25,
                    num_gpus: float = 0.0) -> list[ExpertSpec]:
    from cscr.pool import load_pool

    pool = load_pool(path)
    recorded = [e.name for e in pool.experts if e.kind == "recorded"]
    if recorded:
        raise ValueError(f"{path}: recorded expert(s) {recorded} cannot answer live prompts; "
                         "serve a pool of open-weights or black-box experts")
    return [spec_from_pool_entry(e, num_cpus, num_gpus) for e in pool.experts]


def check_run_matches_pool(run_dir: str | os.PathLike[str], variant: str, pool: Sequence[str]) -> None:
    """Load the run's router (no encoder) and refuse it when its experts differ from the pool."""
    from cscr.serve.service import ServiceError, pool_mismatch

    from cscr.runs.loader import load_router

    router = load_router(Path(run_dir), variant)
    problem = pool_mismatch(router.expert_names, pool)
    if problem:
        raise ServiceError(f"the expert index of {run_dir} does not match the pool: {problem}")
