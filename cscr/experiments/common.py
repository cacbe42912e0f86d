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
from typing import Protocol

import numpy as np

from cscr.config import TrainConfig
from cscr.data.table import RoutingTable, TableError
from cscr.newcomer import LevelChoice, choose_levels
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


def split_experts(table: RoutingTable, frac_unseen: float = 1 / 3, seed: int = 0) -> tuple[list[str], list[str]]:
    """(seen, unseen) expert names, each in table order; unseen stratified by cost."""
    names = table.expert_names
    m = len(names)
    k = int(round(frac_unseen * m))
    if not 0 < k < m:
        raise TableError(f"cannot hold out {frac_unseen:.2f} of {m} experts ({k}): need 1..{m - 1}")
    order = np.argsort(table.expert_costs(), kind="stable")  # cheapest first
    rng = np.random.default_rng(seed)
    held = {int(rng.choice(chunk)) for chunk in np.array_split(order, k)}
    return [n for j, n in enumerate(names) if j not in held], [n for j, n in enumerate(names) if j in held]


def pseudo_newcomers(table: RoutingTable, seed: int = 0, reps: int = TrainConfig.newcomer_draws) -> list[list[str]]:
    """Up to ``reps`` distinct draws of held-out experts among ``table``'s, as ``split_experts`` draws
    them (a third, stratified by cost), seeded; none for a table of fewer than 2 experts."""
    picks: list[list[str]] = []
    for i in range(20 * reps if len(table.expert_names) > 1 else 0):
        held = split_experts(table, seed=seed + 1 + i)[1]
        if held not in picks:
            picks.append(held)
        if len(picks) == reps:
            break
    return picks


class TrainedLike(Protocol):
    """What a level choice reads of a head: a TrainResult, or a run's saved head (TrainedHead)."""

    config: TrainConfig
    variant: str


def experiment_levels(result: TrainedLike, table: RoutingTable, emb: np.ndarray,
                      descriptors: Mapping[str, np.ndarray], log: Log | None = None,
                      joining: bool = False) -> LevelChoice | None:
    """Whether routers of ``result`` (a head trained on ``table``'s experts) calibrate experts that join
    later on their probe outcomes (cscr/newcomer.py): pseudo-newcomers among ``table``'s experts, a head
    trained without them each time, scored on the train and validation rows (the pseudo-newcomers'
    answers there are ones no head of the draw saw) over the pseudo-newcomers alone (what
    the unseen-experts experiment scores) or, ``joining``, over the pool they join (the other experts,
    uncalibrated, and them: what a server whose pool grows routes over; ``cscr train`` chooses so, via
    ``cscr.prior_run.choose_run_levels``). None when the TrainConfig asks for no levels or the head's
    utilities are not qualities."""
    from cscr.eval.utility import utility_audc

    cfg = result.config
    if not cfg.newcomer_levels or cfg.head.utility != "quality":
        return None
    probe = table.split_index("probe")

    def gain_of(held: list[str]) -> float | None:
        newcomers = table.subset(experts=held)
        scored = table if joining else newcomers
        # train + val: the draw's head reads no pseudo-newcomer's answer, and the gain of a few hundred
        # validation prompts alone is noisy (docs/routing-quality.md, "Stop 36")
        rows = np.concatenate([scored.split_index("train"), scored.split_index("val")])
        rows = rows[~np.isnan(scored.quality[rows]).any(axis=1)]
        if len(rows) < 2 or len(probe) < 2:  # nothing to score: no head is trained for it
            return None
        rest = [n for n in table.expert_names if n not in held]
        try:
            head = train_cscr(table.subset(experts=rest), emb, descriptors, result.variant, cfg)
        except ValueError:  # the other experts cannot train a head (e.g. none of them answers a train prompt well)
            return None
        router = cscr_router(result.variant, head, {n: descriptors[n] for n in scored.expert_names},
                             costs_of(scored, scored.split_index("train")))
        cols = [scored.expert_names.index(n) for n in router.expert_names]
        q, c, e = scored.quality[rows][:, cols], scored.cost[rows][:, cols], emb[rows]

        def audc() -> float:
            return utility_audc(list(router.expert_names), router.costs, router.utilities(e), e, q, c)

        before = audc()
        set_levels(router, newcomers, emb)  # the pseudo-newcomers only
        return audc() - before

    choice = choose_levels(gain_of, pseudo_newcomers(table, cfg.seed, cfg.newcomer_draws))
    choice.over = "the pool they join" if joining else "the pseudo-newcomers alone"
    if log is not None:
        gains = " ".join(f"{g:+.4f}" for g in choice.gains)
        log(f"{result.variant}: newcomer levels {'on' if choice.use else 'off'} ({choice.why}; train + val gains "
            f"over {choice.over} {gains})")
    return choice


def set_levels(router: CSCRRouter, table: RoutingTable, emb: np.ndarray) -> list[str]:
    """Calibrate each of ``router``'s experts that ``table`` has probe outcomes for (its probe split)
    on them; the names calibrated."""
    probe = table.split_index("probe")
    done = []
    for name in router.expert_names:
        if name in table.expert_names and router.set_level(name, emb[probe], table.quality[probe, table.expert_index(name)]):
            done.append(name)
    return done


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
