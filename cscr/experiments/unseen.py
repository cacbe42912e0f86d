"""Unseen experts (SPEC.md section 8.2): train on two thirds of the pool, route over the rest.

``split_experts`` holds out about a third of the experts, stratified by cost (the experts sorted
by c_m are cut into as many consecutive chunks as experts to hold out, and one expert per chunk
is drawn, seeded), so the held-out pool spans the cost range instead of landing all at one end.

``run_unseen`` trains the CSCR heads on the seen experts only (their answers, their
descriptors) and routes over the held-out experts through their descriptors alone: the head is
not retrained. Where chosen on the seen experts' train and validation answers (cscr/newcomer.py,
``experiment_levels``), each held-out expert is calibrated on its probe outcomes, the answers its
probe-outcome descriptor is made from. Every router is evaluated on the test prompts over the
held-out pool. Baselines take part as far as their method allows without training on the held-out
experts' train answers (``HOW`` says what each uses):

  * umr: clusters of the train prompts; the held-out experts' per-cluster errors from their
    validation answers (UniRoute's recipe for new experts);
  * knn: its neighbour memory is the validation prompts with the held-out experts' answers;
  * pareto-random: its hull from the held-out experts' mean validation quality and cost;
  * thompson: learns on the test stream from a uniform prior; needs no data beforehand;
  * oracle and random: need none (the oracle is the ceiling).

``EXCLUDED`` (parametric, softmax-gate, soft-moe) cannot take part: each has one output unit per
expert trained on that expert's answers, so a new expert means training a new network, which
is exactly what this experiment rules out. The result lists them with that reason. Costs c_m
are the held-out pool's own (price metadata, known for any expert). Pure: nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cscr.config import EvalConfig, TrainConfig
from cscr.data.table import RoutingTable, TableError
from cscr.eval import EvalResult, evaluate_routers
from cscr.experiments.common import (
    CSCR_VARIANTS,
    Log,
    costs_of,
    cscr_router,
    default_descriptors,
    experiment_levels,
    experiment_prior,
    set_levels,
    split_experts,  # noqa: F401  (re-exported: it lived here)
    train_cscr,
)
from cscr.routers.base import Router, RouterContext, get_router
from cscr.routers.cscr import CSCRRouter
from cscr.training import TrainResult

HOW = {  # {probe} / {val}: how many probe / validation prompts each held-out expert answered for it
    "cscr": "head trained on the seen experts; held-out experts enter by their descriptors (calibrated on "
            "their answers to the {probe} probe prompts where chosen)",
    "vanilla": "head trained on the seen experts; held-out experts enter by their descriptors (calibrated on "
               "their answers to the {probe} probe prompts where chosen)",
    "umr": "train-prompt clusters; held-out experts' per-cluster errors from their answers to the {val} "
           "validation prompts",
    "knn": "neighbour memory = the {val} validation prompts with the held-out experts' answers",
    "pareto-random": "hull from the held-out experts' mean quality on the {val} validation prompts",
    "thompson": "learns on the test stream from a uniform prior",
    "oracle": "hindsight ceiling",
    "random": "no data needed",
}
EXCLUDED = {
    name: "one output unit per expert trained on its answers: a new expert needs a new network"
    for name in ("parametric", "softmax-gate", "soft-moe")
}
_VAL_AS_TRAIN = ("knn", "pareto-random")  # fitted with the validation rows in the train role


@dataclass
class UnseenResult:
    seen: list[str]
    unseen: list[str]
    evaluation: EvalResult  # every participating router over the held-out pool, test prompts
    how: dict[str, str]  # router -> what it used for the held-out experts
    excluded: dict[str, str]  # router -> why it could not take part
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)  # CSCR variant -> its newcomer-level choice


def how(name: str, pool: RoutingTable) -> str:
    """What router ``name`` uses for ``pool``'s held-out experts, with how many of their answers."""
    return HOW[name].format(probe=len(pool.split_index("probe")), val=len(pool.split_index("val")))


def fit_unseen_router(name: str, pool: RoutingTable, emb: np.ndarray, seed: int = 0) -> Router:
    """A baseline for the held-out pool from what its method allows (see ``HOW``)."""
    if name in EXCLUDED:
        raise ValueError(f"{name!r} cannot route over unseen experts: {EXCLUDED[name]}")
    if name not in HOW or name in CSCR_VARIANTS:
        raise ValueError(f"no unseen-experts recipe for router {name!r}; known: {sorted(HOW)}")
    ctx = RouterContext.from_table(pool, emb, seed=seed)
    if name in _VAL_AS_TRAIN:
        val_ctx = RouterContext(pool, emb, ctx.val_rows, np.zeros(0, dtype=np.int64), seed=seed)
        router = get_router(name).fit(val_ctx)
        router.costs = pool.expert_costs(ctx.train_rows)  # the same c_m as every other router
        return router
    # umr: train-prompt clusters, validation-answer errors; thompson (uniform prior), oracle, random
    return get_router(name).fit(ctx)


def held_out_router(result: TrainResult, seen_table: RoutingTable, pool: RoutingTable, emb: np.ndarray,
                    desc: Mapping[str, np.ndarray], levels: bool | None = None,
                    log: Log | None = None) -> tuple[CSCRRouter, dict[str, Any] | None]:
    """The router of ``result`` (a head trained on ``seen_table``'s experts) over ``pool``'s held-out
    experts, with its category prior (w chosen over the seen experts) and, where chosen (``levels``
    None: ``experiment_levels``; True / False: always / never), the held-out experts calibrated on
    their probe outcomes; and the level choice's record (None when none was made)."""
    seen_router = cscr_router(result.variant, result, {n: desc[n] for n in seen_table.expert_names},
                              costs_of(seen_table, seen_table.split_index("train")))
    prior = experiment_prior(result, seen_router, seen_table, emb, log)  # w chosen over the seen experts
    record: dict[str, Any] | None = None
    if levels is None:
        choice = experiment_levels(result, seen_table, emb, desc, log)  # chosen over the seen experts
        record = None if choice is None else choice.record()
        levels = choice is not None and choice.use
    router = cscr_router(result.variant, result, {n: desc[n] for n in pool.expert_names},
                         costs_of(pool, pool.split_index("train")))
    if levels:  # the held-out experts calibrated on their probe outcomes
        calibrated = set_levels(router, pool, emb)
        if record is not None:
            record["calibrated"] = calibrated
    router.set_prior(prior)  # the held-out experts get the (calibrated) head's per-category means
    return router, record


def run_unseen(table: RoutingTable, emb: np.ndarray, routers: Sequence[str], seen: Sequence[str],
               unseen: Sequence[str], train_cfg: TrainConfig | None = None, eval_cfg: EvalConfig | None = None,
               descriptors: Mapping[str, np.ndarray] | None = None, seed: int = 0,
               log: Log | None = None) -> UnseenResult:
    """Train on ``seen`` experts, evaluate every participating router over ``unseen`` on test rows."""
    overlap = sorted(set(seen) & set(unseen))
    if overlap:
        raise TableError(f"experts both seen and unseen: {overlap}")
    if not seen or not unseen:
        raise TableError("need at least one seen and one unseen expert")
    desc = dict(descriptors) if descriptors is not None else default_descriptors(table)
    seen_table, pool = table.subset(experts=list(seen)), table.subset(experts=list(unseen))
    excluded = {n: EXCLUDED[n] for n in routers if n in EXCLUDED}
    fitted: dict[str, Router] = {}
    levels: dict[str, dict[str, Any]] = {}
    for name in routers:
        if name in excluded:
            continue
        if name in CSCR_VARIANTS:
            result = train_cscr(seen_table, emb, desc, name, train_cfg, log)
            fitted[name], choice = held_out_router(result, seen_table, pool, emb, desc, log=log)
            if choice is not None:
                levels[name] = choice
        else:
            fitted[name] = fit_unseen_router(name, pool, emb, seed)
    if not fitted:
        raise ValueError(f"none of {list(routers)} can route over unseen experts")
    evaluation = evaluate_routers(fitted, pool, emb, pool.split_index("test"), eval_cfg or EvalConfig())
    return UnseenResult(list(seen), list(unseen), evaluation, {n: how(n, pool) for n in fitted}, excluded, levels)
