"""The category prior (beyond the write-up, labelled so).

On LLMRouter the task a prompt comes from predicts the experts' quality better than the head does:
the per-category table (best train quality per category, handed the label) leads the head, and a
softmax regression recovers the task from the prompt embedding for ~86 % of held-out prompts
(docs/routing-quality.md). The prior mixes that table into the head's expected qualities, reading
the category from the prompt only:

    u'(x, m) = (1 - w) * u(x, m) + w * sum_c p(c | x) * Qbar[c, m]

* ``p(c | x)``: a softmax regression (L2, full-batch L-BFGS) from the prompt embedding to the train
  split's categories;
* ``Qbar[c, m]``: expert m's mean train quality over category c (its overall train mean where it has
  no answer there). An expert that joins later by its descriptor (no labels) gets the head's own
  mean expected quality per category over a sample of training prompts, so a new expert still
  needs nothing but its descriptor;
* ``w``: chosen on the **validation** split from ``GRID`` (best AUDC; ties: the smaller w), so a
  prior that does not help there gets w = 0 and changes nothing. The search is recorded.

``cscr train`` fits it after saving each head (``TrainConfig.category_prior``; a table with fewer
than two train categories gets none) into ``RUN/models/<variant>/prior/`` (``prior.json``,
``arrays.npz``), written atomically as one folder; ``cscr.runs.loader.load_router`` attaches it, so
evaluation, ``cscr route`` and serving all route through it. The experiments (unseen experts, OOD)
fit it on their own train and validation rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import atomic_dir
from cscr.data.table import RoutingTable, category_means

GRID = (0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)  # w
L2 = 1e-4  # the softmax regression's L2 weight (scripts/category_probe.py's; 1e-3 was worse in nested CV)
STEPS = 300  # L-BFGS iterations
N_REFERENCE = 2048  # training prompts kept for a new expert's per-category means
FOLDER = "prior"


class PriorError(ValueError):
    """A prior that cannot be fitted or read (one clear line)."""


def lbfgs_minimise(params: Any, loss_fn: Callable[[], Any], max_iter: int) -> None:
    """Minimise ``loss_fn()`` (a scalar tensor) over ``params`` with full-batch L-BFGS (strong Wolfe line search)."""
    import torch

    opt = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


def softmax_regression(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = L2,
                       steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """(weight (d, C), bias (C,)) of a softmax regression (L2 on the weight, L-BFGS) from rows ``x``
    (n, d) to classes ``y`` (n,) in 0..n_classes-1; deterministic (seeded, the global RNG untouched)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
        lin = torch.nn.Linear(xt.shape[1], n_classes)
        lbfgs_minimise(lin.parameters(),
                       lambda: torch.nn.functional.cross_entropy(lin(xt), yt) + l2 * lin.weight.pow(2).sum(), steps)
    return (lin.weight.detach().numpy().T.astype(np.float32).copy(),
            lin.bias.detach().numpy().astype(np.float32).copy())


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


@dataclass
class CategoryPrior:
    w: float  # blend weight (0: no effect)
    categories: list[str]  # the train split's categories, in the classifier's order
    weight: np.ndarray  # (d, C) float32
    bias: np.ndarray  # (C,) float32
    table: dict[str, np.ndarray]  # expert -> (C,) mean quality per category
    reference: np.ndarray  # (R, d) float32: a sample of training prompt embeddings
    reference_codes: np.ndarray  # (R,) int: their categories
    search: dict[str, Any] = field(default_factory=dict)
    w_given: float | None = None  # the blend weight when the caller gives the category (None: not chosen)

    @classmethod
    def fit(cls, table: RoutingTable, emb: np.ndarray, rows: np.ndarray | None = None) -> CategoryPrior:
        """The classifier and per-category table of ``table``'s rows ``rows`` (default: train); w 0 until chosen."""
        rows = table.split_index("train") if rows is None else np.asarray(rows)
        cats = np.asarray(table.categories, dtype=str)[rows]
        names = sorted({c for c in cats.tolist() if c.strip()})
        if len(names) < 2:
            raise PriorError(f"the category prior needs at least 2 train categories, got {len(names)}")
        keep = np.array([c.strip() != "" for c in cats])
        rows, cats = rows[keep], cats[keep]
        code = {c: i for i, c in enumerate(names)}
        y = np.array([code[c] for c in cats], dtype=np.int64)
        x = np.asarray(emb, dtype=np.float32)[rows]
        weight, bias = softmax_regression(x, y, len(names))
        means, overall = category_means(table.quality[rows], y, len(names))
        qbar = np.where(np.isnan(means), overall[None, :], means)  # (C, M)
        observed = (~np.isnan(table.quality[rows])).any(axis=0)  # an expert with no train answer: the head's means
        qtable = {n: qbar[:, j].astype(np.float64) for j, n in enumerate(table.expert_names) if observed[j]}
        pick = np.unique(np.linspace(0, len(rows) - 1, min(N_REFERENCE, len(rows))).astype(int))
        return cls(0.0, names, weight, bias, qtable, x[pick].copy(), y[pick].copy())

    def proba(self, emb: np.ndarray) -> np.ndarray:
        """(n, C) p(c | x) for prompt embeddings (n, d)."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.weight.shape[0]:
            raise PriorError(f"category prior: prompt embeddings must be (n, {self.weight.shape[0]}), got {emb.shape}")
        return softmax_rows((emb @ self.weight + self.bias).astype(np.float64))

    def codes(self, categories: Sequence[str] | np.ndarray) -> np.ndarray:
        """(n,) int: each category's index among the prior's, -1 for one it has no train prompt of."""
        code = {c: i for i, c in enumerate(self.categories)}
        return np.array([code.get(str(c), -1) for c in categories], dtype=np.int64)

    def expected(self, names: Sequence[str], emb: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
        """(n, M) sum_c p(c | x) Qbar[c, m] over experts ``names``; ``given`` (n,) category codes
        (``codes``) put all of p on the given category where it is >= 0 (the prompt's category is known)."""
        missing = [n for n in names if n not in self.table]
        if missing:
            raise PriorError(f"category prior: no per-category quality for expert(s) {missing}")
        q = np.stack([self.table[n] for n in names], axis=1)  # (C, M)
        p = self.proba(emb)  # (n, C)
        if given is not None:
            given = np.asarray(given, dtype=np.int64)
            if given.shape != (len(p),) or (given >= len(self.categories)).any():
                raise PriorError(f"category prior: given categories must be ({len(p)},) codes below "
                                 f"{len(self.categories)}, got shape {given.shape}")
            known = given >= 0
            p[known] = np.eye(len(self.categories))[given[known]]
        return p @ q  # type: ignore[no-any-return]

    def apply(self, u: np.ndarray, names: Sequence[str], emb: np.ndarray, w: float | None = None,
              given: np.ndarray | None = None) -> np.ndarray:
        """Utilities (n, M) over ``names`` with their finite entries blended (``w``: this weight
        instead; ``given``: the prompts' known category codes, as in ``expected``)."""
        w = self.w if w is None else float(w)
        if w <= 0.0 or len(u) == 0:
            return u
        return self._blend(u, names, emb, np.full(len(u), w), given)

    def _blend(self, u: np.ndarray, names: Sequence[str], emb: np.ndarray, w: np.ndarray,
               given: np.ndarray | None) -> np.ndarray:
        """``u`` (n, M) with each row's finite entries blended at its own weight ``w`` (n,); rows at
        weight 0 are left as they are (their p(c | x) is not computed)."""
        out = np.array(u, dtype=np.float64, copy=True)
        on = w > 0.0
        if not on.any():
            return out
        sub = out[on]
        rows = self.expected(names, np.asarray(emb)[on], None if given is None else np.asarray(given)[on])
        ok = np.isfinite(sub)  # an excluded expert (-inf) stays excluded
        wr = np.broadcast_to(w[on][:, None], sub.shape)[ok]
        sub[ok] = (1.0 - wr) * sub[ok] + wr * rows[ok]
        out[on] = sub
        return out

    def hint_codes(self, categories: Sequence[str | None]) -> np.ndarray:
        """(n,) codes of the categories callers gave (None: no hint, -1); an unknown category, or a
        hint to a prior whose weight for given categories was never chosen, is a PriorError."""
        hinted = [i for i, c in enumerate(categories) if c is not None]
        if hinted and self.w_given is None:
            raise PriorError("this run's category prior was fitted before category hints: retrain the head "
                             "(`cscr train`) to choose their weight")
        out = np.full(len(categories), -1, dtype=np.int64)
        out[hinted] = self.codes([str(categories[i]) for i in hinted])
        if (out[hinted] < 0).any():
            unknown = sorted({str(categories[i]) for i in hinted if out[i] < 0})
            shown = ", ".join(self.categories[:40]) + (" ..." if len(self.categories) > 40 else "")
            raise PriorError(f"unknown category {unknown[0]!r}; the router knows: {shown}")
        return out

    def apply_hinted(self, u: np.ndarray, names: Sequence[str], emb: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """``apply`` where ``codes`` < 0 (no hint); where a caller gave the category (``hint_codes``),
        the blend with that category's row of the table, at ``w_given``: one pass over the rows."""
        codes = np.asarray(codes, dtype=np.int64)
        hinted = codes >= 0
        if hinted.any() and self.w_given is None:
            raise PriorError("no weight for given categories (fitted before category hints)")
        if len(u) == 0:
            return u
        w = np.where(hinted, self.w_given if self.w_given is not None else 0.0, self.w)
        return self._blend(u, names, emb, w, codes)

    def category_means_of(self, u: np.ndarray) -> np.ndarray:
        """(C,) per-category means of one expert's utilities ``u`` (R,) over the reference prompts (a
        category without a finite one: the overall mean)."""
        u = np.asarray(u, dtype=np.float64)
        means, overall = category_means(np.where(np.isfinite(u), u, np.nan)[:, None], self.reference_codes,
                                        len(self.categories))
        return np.where(np.isnan(means[:, 0]), overall[0], means[:, 0])  # type: ignore[no-any-return]

    def with_means(self, extra: Mapping[str, np.ndarray]) -> CategoryPrior:
        """A copy with more experts' per-category qualities."""
        more = {k: np.asarray(v, dtype=np.float64).reshape(len(self.categories)) for k, v in extra.items()}
        return dataclasses.replace(self, table={**self.table, **more})

    def record(self) -> dict[str, Any]:
        return {"w": self.w, "w_given": self.w_given, "categories": self.categories,
                "table": {k: v.tolist() for k, v in self.table.items()},
                "n_reference": int(len(self.reference)), "search": self.search,
                "how": "u' = (1 - w) u + w * sum_c p(c|x) Qbar[c]; w chosen on the validation split; a category "
                       "the caller gives: p(c|x) one-hot on it, w_given chosen on the validation split with the labels"}


def choose_w(prior: CategoryPrior, utilities: Callable[[np.ndarray], np.ndarray], names: Sequence[str],
             costs: np.ndarray, table: RoutingTable, emb: np.ndarray, rows: np.ndarray | None = None,
             given: bool = False) -> CategoryPrior:
    """``prior`` with the w of ``GRID`` whose blend of ``utilities(emb[rows])`` (the router's, over
    ``names`` with normalised ``costs``) scores the best AUDC on ``rows`` (default: the validation
    prompts with every outcome known); ties go to the smaller w. The scores are recorded. ``given``:
    the blend is handed each prompt's category from the table (``CategoryPrior.expected``'s ``given``)."""
    from cscr.eval.utility import utility_audc

    rows = table.split_index("val") if rows is None else np.asarray(rows)
    cols = [table.expert_names.index(n) for n in names]
    q, c = table.quality[rows][:, cols], table.cost[rows][:, cols]
    full = ~np.isnan(q).any(axis=1)
    rows, q, c = rows[full], q[full], c[full]
    if len(rows) < 2:
        return dataclasses.replace(prior, w=0.0, search={"grid": list(GRID), "val_audc": [], "n_val": int(len(rows)),
                                                         "why": "fewer than 2 validation prompts: no blend"})
    e = np.asarray(emb)[rows]
    u = utilities(e)
    codes = prior.codes(np.asarray(table.categories, dtype=str)[rows]) if given else None
    scores = [utility_audc(list(names), costs, prior.apply(u, names, e, w, codes), e, q, c) for w in GRID]
    best = int(np.argmax(np.round(scores, 10)))  # first maximum: the smaller w
    return dataclasses.replace(prior, w=float(GRID[best]), search={"grid": list(GRID), "val_audc": scores,
                                                                   "n_val": int(len(rows))})


def wants_prior(cfg: Any) -> bool:
    """Whether a head trained with TrainConfig ``cfg`` gets a category prior: asked for, and its
    utilities are expected qualities (a similarity is not on the table's scale)."""
    return bool(cfg.category_prior) and cfg.head.utility == "quality"


def fit_prior(router: Any, table: RoutingTable, emb: np.ndarray, train_rows: np.ndarray | None = None,
              val_rows: np.ndarray | None = None) -> CategoryPrior | None:
    """The prior of ``table``'s train rows for a CSCR ``router`` (over the table's experts, no prior
    attached), its w chosen on the validation rows; None when the train rows have fewer than two categories."""
    try:
        prior = CategoryPrior.fit(table, emb, train_rows)
    except PriorError:
        return None
    args = (router.utilities, router.expert_names, np.asarray(router.costs), table, emb, val_rows)
    read, given = choose_w(prior, *args), choose_w(prior, *args, given=True)
    return dataclasses.replace(read, w_given=given.w, search={**read.search, "val_audc_given": given.search["val_audc"]})


def save_prior(model_dir: str | os.PathLike[str], prior: CategoryPrior) -> Path:
    """Write ``model_dir/prior/`` (prior.json + arrays.npz) atomically."""

    def write(tmp: Path) -> None:
        (tmp / "prior.json").write_text(json.dumps(prior.record(), indent=1))
        with open(tmp / "arrays.npz", "wb") as f:
            np.savez(f, weight=prior.weight, bias=prior.bias, reference=prior.reference,
                     reference_codes=prior.reference_codes)

    return atomic_dir(Path(model_dir) / FOLDER, write)


def load_prior(model_dir: str | os.PathLike[str]) -> CategoryPrior | None:
    """The prior saved in ``model_dir/prior/``, or None when there is none."""
    folder = Path(model_dir) / FOLDER
    if not (folder / "prior.json").exists():
        return None
    try:
        rec = json.loads((folder / "prior.json").read_text())
        with np.load(folder / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in ("weight", "bias", "reference", "reference_codes")}
        cats = [str(c) for c in rec["categories"]]
        table = {str(k): np.asarray(v, dtype=np.float64) for k, v in rec["table"].items()}
        if arrays["weight"].shape[1] != len(cats) or any(v.shape != (len(cats),) for v in table.values()):
            raise ValueError("its arrays do not match its categories")
        w_given = rec.get("w_given")  # absent: fitted before category hints
        return CategoryPrior(float(rec["w"]), cats, arrays["weight"].astype(np.float32),
                             arrays["bias"].astype(np.float32), table, arrays["reference"].astype(np.float32),
                             arrays["reference_codes"].astype(np.int64), dict(rec.get("search", {})),
                             None if w_given is None else float(w_given))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise PriorError(f"unreadable category prior in {folder}: {exc} (retrain the head, or remove the folder)") from exc
