"""What the generalisation experiments share: train CSCR heads in memory, fit routers by name.

An experiment re-splits a table (by category for OOD, by expert for unseen experts), so the heads
saved in the run folder (trained on the full split) do not apply: ``train_cscr`` trains fresh
heads on the experiment's table with the plain loop of ``cscr.training`` and ``cscr_router``
builds the router from the in-memory head, descriptors and costs (``CSCRRouter.from_trained``,
the builder ``cscr.runs.loader.load_router`` uses for heads saved in a run folder).
The CSCR routers carry the category prior (cscr/prior.py) when the head's TrainConfig asks for
one, fitted on the experiment table's train rows with its weight chosen on its validation rows
(``experiment_prior``), as ``cscr train`` fits it for a run.
Descriptors default to probe-outcome descriptors computed from the experiment table's probe
split (``cscr.fingerprints.probe_outcome``); a caller with fingerprints from the store passes
them instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cscr.config import TrainConfig
from cscr.data.table import RoutingTable
from cscr.prior import CategoryPrior, fit_prior, wants_prior
from cscr.routers.base import Router, RouterContext, get_router, router_class
from cscr.routers.cscr import CSCRRouter
from cscr.training import Log, TrainResult, fit_head, prepare_arrays

CSCR_VARIANTS = ("cscr", "vanilla")


def default_descriptors(table: RoutingTable) -> dict[str, np.ndarray]:
    """Probe-outcome descriptors of every expert of ``table`` from its probe split."""
    from cscr.fingerprints.probe_outcome import probe_outcome_descriptors

    return probe_outcome_descriptors(table)


def train_cscr(table: RoutingTable, emb: np.ndarray, descriptors: Mapping[str, np.ndarray],
               variant: str = "cscr", cfg: TrainConfig | None = None, log: Log | None = None) -> TrainResult:
    """Train a head for ``variant`` on ``table``'s train split (its experts, its descriptors)."""
    cfg = cfg or TrainConfig()
    arrays = prepare_arrays(table, emb, {n: descriptors[n] for n in table.expert_names}, cfg.loss.tolerance)
    return fit_head(arrays, cfg, variant, log=log)


def cscr_router(variant: str, result: TrainResult, descriptors: Mapping[str, np.ndarray],
                costs: Mapping[str, float], top_k: int | None = None) -> CSCRRouter:
    """The ``variant`` router (cscr, vanilla) of a trained head over the experts named in ``descriptors``
    (``set_prior`` attaches an ``experiment_prior``)."""
    cls = router_class(variant)
    if not issubclass(cls, CSCRRouter):
        raise ValueError(f"{variant!r} is not a CSCR variant; expected one of {CSCR_VARIANTS}")
    return cls.from_trained(result, dict(descriptors), dict(costs), top_k=top_k, use_gpu=False)


def experiment_prior(result: TrainResult, router: CSCRRouter, table: RoutingTable,
                     emb: np.ndarray, log: Log | None = None) -> CategoryPrior | None:
    """The category prior of a head trained on ``table`` (``router``: its router over ``table``'s
    experts): fitted on the train rows, w chosen on the val rows; None when the head's TrainConfig
    asks for none, its utilities are not qualities, or the train rows have fewer than two categories."""
    if not wants_prior(result.config):
        return None
    prior = fit_prior(router, table, emb)
    if log is not None and prior is not None:
        log(f"{result.variant}: category prior w = {prior.w:g} (chosen on the validation rows)")
    return prior


def costs_of(table: RoutingTable, rows: np.ndarray | None = None) -> dict[str, float]:
    """{expert: c_m} of ``table`` (mean train cost / the largest)."""
    return dict(zip(table.expert_names, table.expert_costs(rows).tolist(), strict=True))


def fit_routers(names: Sequence[str], ctx: RouterContext, heads: Mapping[str, TrainResult] | None = None,
                descriptors: Mapping[str, np.ndarray] | None = None, log: Log | None = None) -> dict[str, Router]:
    """Fit each named router on ``ctx``; ``cscr`` / ``vanilla`` come from ``heads`` (TrainResults)
    with ``descriptors`` of ``ctx.table``'s experts."""
    out: dict[str, Router] = {}
    for name in names:
        if name in CSCR_VARIANTS:
            if heads is None or name not in heads or descriptors is None:
                raise ValueError(f"router {name!r} needs a trained head and descriptors")
            desc = {n: descriptors[n] for n in ctx.table.expert_names}
            router = cscr_router(name, heads[name], desc, costs_of(ctx.table, ctx.train_rows))
            router.set_prior(experiment_prior(heads[name], router, ctx.table, ctx.embeddings, log))
            out[name] = router
        else:
            out[name] = get_router(name).fit(ctx)
    return out
