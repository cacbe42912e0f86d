"""Out-of-distribution prompts (SPEC.md section 8.3): train on some categories, test on the rest.

``ood_split`` re-splits a table by category: the in-distribution group keeps its train / val /
probe / test rows; every row of the held-out group becomes a test row (none of them was ever
trained on, so all of them measure generalisation); rows in neither group are dropped. Probe
rows come from the in-distribution group only, so probe-outcome descriptors see no held-out
prompt either. The result records two evaluation sets: ``id_rows`` (the in-distribution test
rows, the reference) and ``ood_rows`` (the held-out group).

Groupings:
  * RouteLLM MMLU: ``stem_vs_rest`` (the 18 STEM subjects of MMLU's own category map against the
    other 39; GSM8K rows are not MMLU and are left out);
  * LLMRouter: ``leave_one_group_out`` over ``LLMROUTER_TASK_GROUPS`` (math, code, open QA,
    multiple choice, generation): train on four groups, test on the fifth.

``run_ood`` trains CSCR heads on the in-distribution rows, fits the named baselines on the same
rows and evaluates every router on both sets (``cscr.eval.evaluate_routers``). With ``guard``
it also evaluates ``cscr+guard``: the same cscr head with the out-of-distribution guard
(cscr/guard.py) searched by nested leave-one-group-out inside the in-distribution rows, so the
held-out group never informs it. Pure: nothing is written; the CLI and the report layer write files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cscr.config import EvalConfig, TrainConfig
from cscr.data.table import RoutingTable, TableError
from cscr.eval import EvalResult, evaluate_routers
from cscr.experiments.common import (
    CSCR_VARIANTS,
    Log,
    TrainResult,
    costs_of,
    cscr_router,
    default_descriptors,
    experiment_prior,
    fit_routers,
    train_cscr,
)
from cscr.guard import (
    FAR_SHARE,
    MAX_GROUPS,
    Guard,
    GuardError,
    GuardSearch,
    category_groups,
    far_share_of,
    grid_audc,
)
from cscr.routers.base import RouterContext
from cscr.routers.cscr import CSCRRouter

# MMLU's own category map (hendrycks/test categories.py): subjects whose subcategory is physics,
# chemistry, biology, computer science, math or engineering
STEM_SUBJECTS = frozenset({
    "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
    "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_mathematics", "high_school_physics",
    "high_school_statistics", "machine_learning",
})

# LLMRouter's 14 task names in five groups by the kind of skill they test
LLMROUTER_TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "math": ("math", "gsm8k", "agentverse-mgsm", "agentverse-logicgrid"),
    "code": ("mbpp", "human_eval"),
    "open-qa": ("natural_qa", "trivia_qa"),
    "multiple-choice": ("mmlu", "gpqa", "arc_challenge", "commonsense_qa", "openbook_qa"),
    "generation": ("commongen",),
}


@dataclass
class OODSplit:
    table: RoutingTable  # the re-split table (rows of both groups only)
    emb_rows: np.ndarray  # (n',) rows of the original table (to slice its embeddings)
    id_rows: np.ndarray  # rows of ``table``: in-distribution test prompts
    ood_rows: np.ndarray  # rows of ``table``: every prompt of the held-out group
    train_group: str
    test_group: str
    counts: dict[str, int] = field(default_factory=dict)


def mmlu_subject(category: str) -> str:
    """Subject of a RouteLLM MMLU category ("abstract_algebra", "mmlu/abstract_algebra", "mmlu_x")."""
    c = category.strip().lower()
    for prefix in ("mmlu/", "mmlu_", "mmlu-"):
        if c.startswith(prefix):
            return c[len(prefix):]
    return c


def category_mask(table: RoutingTable, categories: Iterable[str]) -> np.ndarray:
    """(n,) bool: rows whose category is one of ``categories``."""
    return np.isin(table.categories, list(categories))


def ood_split(table: RoutingTable, in_group: np.ndarray, out_group: np.ndarray,
              train_group: str = "in", test_group: str = "out") -> OODSplit:
    """Re-split ``table``: ``in_group`` rows keep their splits, ``out_group`` rows all become test."""
    in_group, out_group = np.asarray(in_group, dtype=bool), np.asarray(out_group, dtype=bool)
    if in_group.shape != (table.n,) or out_group.shape != (table.n,):
        raise TableError(f"group masks must have shape ({table.n},)")
    if (in_group & out_group).any():
        raise TableError(f"{int((in_group & out_group).sum())} rows are in both the train and the test group")
    splits = table.splits
    for s in ("train", "probe"):
        if not (in_group & (splits == s)).any():
            raise TableError(f"the train group {train_group!r} has no {s} rows")
    if not out_group.any():
        raise TableError(f"the test group {test_group!r} has no rows")
    keep = np.flatnonzero(in_group | out_group)
    sub = table.subset(keep)
    new_splits = sub.splits.copy()
    held = out_group[keep]
    new_splits[held] = "test"
    sub.splits = new_splits.astype(str)
    sub.meta = {**sub.meta, "ood": {"train_group": train_group, "test_group": test_group}}
    id_rows = np.flatnonzero(~held & (new_splits == "test"))
    ood_rows = np.flatnonzero(held)
    counts = {f"{train_group}:{s}": int((~held & (new_splits == s)).sum()) for s in ("train", "val", "probe", "test")}
    counts[f"{test_group}:test"] = int(held.sum())
    counts["dropped"] = int(table.n - len(keep))
    return OODSplit(sub, keep, id_rows, ood_rows, train_group, test_group, counts)


def stem_vs_rest(table: RoutingTable) -> OODSplit:
    """RouteLLM MMLU: train on the STEM subjects, test on the other subjects (GSM8K left out)."""
    subj = np.array([mmlu_subject(c) for c in table.categories])
    is_gsm = np.char.find(subj.astype(str), "gsm8k") >= 0
    stem = np.isin(subj, list(STEM_SUBJECTS)) & ~is_gsm
    if not stem.any():
        raise TableError("no MMLU STEM subject among the table's categories (is this the RouteLLM MMLU table?)")
    return ood_split(table, stem, ~stem & ~is_gsm, "stem", "non-stem")


def leave_one_group_out(table: RoutingTable, groups: Mapping[str, Sequence[str]] | None = None) -> list[OODSplit]:
    """One split per group: train on the other groups' categories, test on this group's."""
    groups = dict(LLMROUTER_TASK_GROUPS if groups is None else groups)
    known = {c for cats in groups.values() for c in cats}
    unknown = sorted(set(table.categories) - known - {""})
    if unknown:
        raise TableError(f"categories in no group: {unknown}; groups: {sorted(groups)}")
    out = []
    for name, cats in groups.items():
        test = category_mask(table, cats)
        if not test.any():
            continue  # a group this table does not have
        out.append(ood_split(table, category_mask(table, known - set(cats)), test, f"not-{name}", name))
    if not out:
        raise TableError("no group has rows in this table")
    return out


@dataclass
class OODResult:
    split: OODSplit
    in_distribution: EvalResult  # every router on the in-group test rows
    out_of_distribution: EvalResult  # every router on the held-out group
    routers: list[str]


def run_ood(split: OODSplit, emb: np.ndarray, routers: Sequence[str], train_cfg: TrainConfig | None = None,
            eval_cfg: EvalConfig | None = None, descriptors: Mapping[str, np.ndarray] | None = None,
            seed: int = 0, log: Log | None = None, guard: bool = False, far_share: float = FAR_SHARE) -> OODResult:
    """Train on the split's in-distribution rows, evaluate on both sets.

    ``emb``: embeddings of the *original* table (sliced with ``split.emb_rows``). ``descriptors``:
    default probe-outcome descriptors from the in-distribution probe rows. ``guard``: add
    ``cscr+guard`` (needs ``cscr`` among the routers; its search holds out the in-distribution
    groups ``search_guard`` forms: LLMRouter task groups, else categories; ``far_share`` weighs them
    against its in-distribution validation rows, as ``cscr guard --far-share``).
    """
    table = split.table
    e = np.asarray(emb)[split.emb_rows]
    desc = dict(descriptors) if descriptors is not None else default_descriptors(table)
    heads = {v: train_cscr(table, e, desc, v, train_cfg, log) for v in CSCR_VARIANTS if v in routers}
    ctx = RouterContext.from_table(table, e, seed=seed)
    fitted = fit_routers(routers, ctx, heads, desc, log)
    if guard:
        fitted[GUARDED] = _guarded(table, e, heads, desc, descriptors, train_cfg, log, far_share)
    cfg = eval_cfg or EvalConfig()
    return OODResult(split, evaluate_routers(fitted, table, e, split.id_rows, cfg),
                     evaluate_routers(fitted, table, e, split.ood_rows, cfg), list(fitted))


GUARDED = "cscr+guard"


def _guarded(table: RoutingTable, e: np.ndarray, heads: Mapping[str, TrainResult], desc: Mapping[str, np.ndarray],
             store: Mapping[str, np.ndarray] | None, train_cfg: TrainConfig | None, log: Log | None,
             far_share: float = FAR_SHARE) -> CSCRRouter:
    """The cscr head's router (over ``desc``) with a guard searched and fitted on the in-distribution
    rows only; ``store``: descriptors from the store for the search's heads (None: each inner
    split's probe-outcome descriptors)."""
    if "cscr" not in heads:
        raise ValueError(f"{GUARDED!r} needs 'cscr' among the routers")
    search = search_guard(table, e, train_cfg, "cscr", store, log=log, far_share=far_share)
    router = cscr_router("cscr", heads["cscr"], {n: desc[n] for n in table.expert_names},
                         costs_of(table, table.split_index("train")))
    router.set_prior(experiment_prior(heads["cscr"], router, table, e))  # as the cscr router has it
    if log is not None:
        log(f"{GUARDED}: w = {search.w}, gate = {search.gate} (chosen without the held-out group)")
    router.set_guard(Guard.fit(table, e, search.w, search.gate, search=search.record()))
    return router


# ---------------------------------------------------------------- the guard's search (cscr/guard.py)

def task_groups(table: RoutingTable) -> dict[str, list[str]] | None:
    """LLMRouter's task groups (as the ood experiment holds them out) when every category of the
    table is an LLMRouter task name, else None (the categories themselves)."""
    cats = {str(c) for c in table.categories if str(c).strip()}
    tasks = {c for v in LLMROUTER_TASK_GROUPS.values() for c in v}
    return {k: list(v) for k, v in LLMROUTER_TASK_GROUPS.items()} if cats and cats <= tasks else None


def search_guard(table: RoutingTable, emb: np.ndarray, cfg: TrainConfig | None = None, variant: str = "cscr",
                 descriptors: Mapping[str, np.ndarray] | None = None,
                 groups: Mapping[str, Sequence[str]] | None = None, max_groups: int = MAX_GROUPS,
                 log: Callable[[str], None] | None = None, far_share: float = FAR_SHARE) -> GuardSearch:
    """Choose (w, gate) by nested leave-one-group-out on ``table``'s non-test rows (see cscr/guard.py).

    ``descriptors``: the experts' descriptors (None: probe-outcome descriptors from each inner
    split's probe rows); ``groups``: name -> categories (None: ``task_groups`` for LLMRouter task
    names, else ``category_groups``; groups with no non-test rows are left out); ``far_share``: the
    held-out groups' weight against the in-distribution validation rows in the choice, in [0, 1].
    """
    far_share = far_share_of(far_share)
    keep = np.flatnonzero(table.splits != "test")
    t0, e0 = table.subset(keep), np.asarray(emb)[keep]
    cats = [str(c) for c in t0.categories if str(c).strip()]
    groups = groups if groups is not None else (task_groups(t0) or category_groups(cats, max_groups))
    chosen: dict[str, list[str]] = {k: list(v) for k, v in groups.items()}
    present = {k: v for k, v in chosen.items() if set(v) & set(cats)}
    if len(present) < 2:
        raise GuardError(f"the guard's search holds out prompt categories in turn and needs at least 2 groups of "
                         f"them; this table has {len(present)} ({sorted(set(cats))[:8]})")
    try:
        splits = leave_one_group_out(t0, present)
    except TableError as exc:
        raise GuardError(f"the guard's search cannot hold out these groups: {exc}") from exc
    per_group: dict[str, list[list[float]]] = {}
    prior_w: dict[str, float | None] = {}  # the category prior's w per held-out group (None: no prior)
    per_group_in: dict[str, list[list[float]]] = {}  # the grid on each split's in-distribution val rows
    for i, s in enumerate(splits, 1):
        es = e0[s.emb_rows]
        desc = dict(descriptors) if descriptors is not None else default_descriptors(s.table)
        try:
            res = train_cscr(s.table, es, desc, variant, cfg, log=None)
        except (TableError, ValueError) as exc:
            raise GuardError(f"the guard's search could not train without group {s.test_group!r}: {exc}") from exc
        train = s.table.split_index("train")
        router = cscr_router(variant, res, {n: desc[n] for n in s.table.expert_names}, costs_of(s.table, train))
        rows = s.ood_rows[~np.isnan(s.table.quality[s.ood_rows]).any(axis=1)]
        if len(rows) == 0:
            continue
        # the guard shrinks what the served router routes by: the head with its category prior when the
        # run's config asks for one (fitted on this split's train rows, its w chosen on its val rows)
        prior = experiment_prior(res, router, s.table, es)
        router.set_prior(prior)
        out = grid_audc(router, s.table, es, train, rows)
        per_group[s.test_group] = out.tolist()
        prior_w[s.test_group] = None if prior is None else prior.w
        val = s.table.split_index("val")  # the other groups' held-back prompts: in distribution for this head
        val = val[~np.isnan(s.table.quality[val]).any(axis=1)]
        if len(val):
            per_group_in[s.test_group] = grid_audc(router, s.table, es, train, val).tolist()
        if log is not None:
            blend = "" if prior is None else f" (category prior w = {prior.w:g})"
            inside = (f"; in distribution ({len(val)} validation prompts) no shrink "
                      f"{per_group_in[s.test_group][0][0]:.4f}" if len(val) else "")
            log(f"guard search {i}/{len(splits)}: held out {s.test_group} ({len(rows)} prompts){blend}: no shrink "
                f"{out[0, 0]:.4f}, best {out.max():.4f}{inside}")
    if not per_group:
        raise GuardError("the guard's search found no held-out prompt with every quality cell")
    mean = np.mean([np.asarray(v) for v in per_group.values()], axis=0)
    mean_in = np.mean([np.asarray(v) for v in per_group_in.values()], axis=0) if per_group_in else None
    w, gate = GuardSearch.choose(mean, mean_in, far_share)
    return GuardSearch(w, gate, mean, per_group, present, prior_w, mean_in, per_group_in, far_share)
