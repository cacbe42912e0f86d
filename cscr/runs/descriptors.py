"""Expert descriptors of a run: computing probe-outcome descriptors (an explicit step) and reading
any kind back from the run's store.

``compute_probe_outcome(run)`` writes the probe-outcome descriptors of the table's experts (from
its probe split) into ``descriptors.parquet``; ``prepare_descriptors(run, kind)`` is the step the
training commands take before training (probe-outcome: computed; any other kind: must be in the
store already, from ``cscr fingerprint``). ``read_descriptors`` only reads: missing descriptors
are an error that names the command to run, never a reason to compute them while loading.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from cscr.data.table import RoutingTable
from cscr.fingerprints.probe_outcome import KIND as PROBE_OUTCOME
from cscr.fingerprints.probe_outcome import probe_basis_id, probe_outcome_descriptors
from cscr.fingerprints.store import DescriptorStore
from cscr.runs.paths import RunError, RunPaths

DEFAULT_KIND = PROBE_OUTCOME
Log = Callable[[str], None]
RunLike = str | os.PathLike[str] | RunPaths


def store_of(run: RunLike) -> DescriptorStore:
    return DescriptorStore(RunPaths.of(run).descriptors)


def compute_probe_outcome(run: RunLike, table: RoutingTable | None = None, log: Log | None = None) -> str:
    """Write the probe-outcome descriptors of every table expert to the run's store when some are
    missing or were computed on another probe set (the stale ones are replaced); their basis id."""
    paths = RunPaths.of(run)
    table = table if table is not None else RoutingTable.load(paths.require_table())
    store = store_of(paths)
    basis = probe_basis_id(table)
    have = store.experts(PROBE_OUTCOME)
    stale = bool(have) and store.info(PROBE_OUTCOME)["basis_id"] != basis
    if stale or set(table.expert_names) - set(have):
        if stale:
            store.remove(kind=PROBE_OUTCOME)
        store.write_many(probe_outcome_descriptors(table), PROBE_OUTCOME, basis_id=basis,
                         source=f"probe split of {table.source}")
        if log:
            log(f"descriptors: wrote {len(table.expert_names)} probe-outcome descriptors "
                f"(D' = {len(table.split_index('probe'))}) to {store.path}")
    return basis


def prepare_descriptors(run: RunLike, kind: str | None = None, table: RoutingTable | None = None,
                        log: Log | None = None) -> str:
    """The descriptor step before training on a run; returns the kind. Probe-outcome descriptors
    (the default kind) are computed from the probe split; any other kind must already be in the
    store for every table expert (``cscr fingerprint``)."""
    kind = kind or DEFAULT_KIND
    paths = RunPaths.of(run)
    table = table if table is not None else RoutingTable.load(paths.require_table())
    if kind == PROBE_OUTCOME:
        compute_probe_outcome(paths, table, log)
    else:
        _require(paths, table.expert_names, kind)
    return kind


def how_to_compute(run: RunLike, kind: str) -> str:
    """The command that writes descriptors of ``kind`` into the run's store."""
    root = RunPaths.of(run).root
    if kind == PROBE_OUTCOME:
        return f"`cscr train --run {root}` computes them from the probe split before training"
    return f"compute them with `cscr fingerprint --pool POOL --run {root}`"


def _require(paths: RunPaths, experts: Sequence[str], kind: str) -> DescriptorStore:
    store = store_of(paths)
    have = set(store.experts(kind))
    missing = [n for n in experts if n not in have]
    if missing:
        what = f"no {kind!r} descriptors" if not have else f"no {kind!r} descriptor for expert(s) {missing}"
        raise FileNotFoundError(f"{what} in {store.path} (kinds present: {store.kinds() or 'none'}): "
                                f"{how_to_compute(paths, kind)}")
    return store


def read_descriptors(run: RunLike, experts: Sequence[str], kind: str | None = None,
                     basis_id: str | None = None) -> tuple[dict[str, np.ndarray], str, str]:
    """({expert: vector} in ``experts`` order, kind, basis id) from the run's store; reads only.

    Missing descriptors raise FileNotFoundError naming the command that computes them; with
    ``basis_id`` (the basis a head was trained on) descriptors of another basis raise RunError.
    """
    kind = kind or DEFAULT_KIND
    paths = RunPaths.of(run)
    store = _require(paths, experts, kind)
    basis = str(store.info(kind)["basis_id"])
    if basis_id and basis != basis_id:
        raise RunError(f"the {kind} descriptors in {store.path} (basis {basis}) are not the ones the head was "
                       f"trained with (basis {basis_id}): retrain with `cscr train --run {paths.root}`")
    return store.read(kind, experts=list(experts)), kind, basis
