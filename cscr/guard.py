"""The out-of-distribution guard (beyond the write-up, labelled so).

On prompts unlike any it was trained on, the head's per-expert estimates of expected quality are
overconfident (docs/routing-quality.md, "Out of distribution"). The guard shrinks them towards
each expert's mean quality, but only for such prompts:

    u'(x, m) = (1 - w) * u(x, m) + w * Qbar_m    when near(x) < tau,   else u(x, m)

* ``near(x)``: the mean cosine similarity of x's prompt embedding to its ``k`` (10) most similar
  training prompts (a FAISS flat inner-product index over the unit train embeddings);
* ``tau``: the ``gate``-quantile of the same figure over the training prompts themselves (each
  without itself), so about a fraction ``gate`` of in-distribution prompts is shrunk; gate 1 shrinks
  every prompt (a constant shrink);
* ``Qbar_m``: expert m's mean quality on the train split. An expert that joins later by its
  descriptor (no labels) gets the head's own mean expected quality over the training prompts, so a
  new expert still needs nothing but its descriptor.

``search_guard`` (cscr/experiments/ood.py: it is a nested out-of-distribution experiment) chooses
``(w, gate)`` without looking at any held-out prompt of the run: nested
leave-one-group-out over the prompt categories of the train, val and probe rows (the test split is
never read). For each group a head is trained on the other groups (the run's training
configuration, with its category prior when that configuration fits one, as ``cscr train`` does),
scored for every pair of the grid on the group's prompts (out of distribution) and on the
split's validation rows (the other groups' prompts: in distribution, where a shrink can only cost),
and the pair with the best ``far_share * held-out AUDC + (1 - far_share) * in-distribution AUDC``
(means over groups) wins. ``far_share`` is the operator's expected share of far-off traffic
(``FAR_SHARE``, 0.5, unless ``cscr guard --far-share`` says otherwise; 1 weighs the held-out groups
alone). w = 0 (no shrink) is in the grid, so a guard that costs more than it gains is not chosen.
More than ``MAX_GROUPS`` categories are dealt into that many groups (largest first, round robin).

On disk (``cscr guard --run RUN``): ``RUN/models/<variant>/guard/`` holds ``guard.json`` (w, gate,
tau, k, Qbar, the search) and ``reference.npy`` (the training prompt embeddings), written
atomically as one folder; ``cscr.runs.loader.load_router`` attaches it to the router, so
evaluation, ``cscr route`` and serving all route through it. Retraining the head replaces the
model folder, and with it the guard.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cscr.atomic import atomic_dir
from cscr.data.table import RoutingTable

GRID = (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)  # w
GATES = (0.02, 0.05, 0.1, 0.25, 1.0)  # gate quantiles; 1.0: every prompt
K_NEAR = 10
MAX_GROUPS = 8
FOLDER = "guard"


class GuardError(ValueError):
    """A guard that cannot be searched, fitted or read (one clear line)."""


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Nearness:
    """Mean cosine similarity of prompts to their k most similar reference prompts (FAISS, flat)."""

    def __init__(self, reference: np.ndarray, k: int = K_NEAR) -> None:
        reference = unit_rows(reference)
        if reference.ndim != 2 or len(reference) < 2:
            raise GuardError(f"the guard needs at least 2 training prompts, got {len(reference)}")
        self.k = max(1, min(int(k), len(reference) - 1))
        self.index = faiss.IndexFlatIP(reference.shape[1])
        self.index.add(np.ascontiguousarray(reference))
        self.reference = reference

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        """(n,) for prompt embeddings (n, d)."""
        sims, _ = self.index.search(np.ascontiguousarray(unit_rows(emb)), self.k)
        return sims.mean(axis=1).astype(np.float64)

    def own(self) -> np.ndarray:
        """(N,) for the reference prompts themselves, each without itself."""
        sims, _ = self.index.search(self.reference, self.k + 1)
        return sims[:, 1:].mean(axis=1).astype(np.float64)


@dataclass
class Guard:
    w: float  # shrink weight
    gate: float  # quantile of the training prompts' nearness; 1.0: shrink every prompt
    threshold: float  # tau: prompts with nearness below it are shrunk (inf when gate >= 1)
    qbar: dict[str, float]  # expert -> mean train quality
    reference: np.ndarray  # (N, d) float32: the training prompts' embeddings
    k: int = K_NEAR
    search: dict[str, Any] = field(default_factory=dict)
    _near: Nearness | None = field(default=None, repr=False, compare=False)

    @classmethod
    def fit(cls, table: RoutingTable, emb: np.ndarray, w: float, gate: float, rows: np.ndarray | None = None,
            k: int = K_NEAR, search: Mapping[str, Any] | None = None) -> Guard:
        """The guard of the prompts ``rows`` (default: train) of ``table`` with weight w and gate."""
        if not 0.0 <= float(w) <= 1.0 or not 0.0 < float(gate) <= 1.0:
            raise GuardError(f"guard: w must be in [0, 1] and gate in (0, 1], got w={w}, gate={gate}")
        rows = table.split_index("train") if rows is None else np.asarray(rows)
        reference = np.asarray(emb, dtype=np.float32)[rows]
        near = Nearness(reference, k)
        threshold = float("inf") if gate >= 1.0 else float(np.quantile(near.own(), gate))
        means = np.nanmean(table.quality[rows], axis=0)
        qbar = {n: float(v) for n, v in zip(table.expert_names, means, strict=True) if np.isfinite(v)}
        return cls(float(w), float(gate), threshold, qbar, reference, int(k), dict(search or {}), near)

    @property
    def nearness(self) -> Nearness:
        if self._near is None:
            self._near = Nearness(self.reference, self.k)
        return self._near

    @property
    def active(self) -> bool:
        return self.w > 0.0

    def far(self, emb: np.ndarray) -> np.ndarray:
        """(n,) bool: the prompts the guard shrinks."""
        if self.gate >= 1.0:
            return np.ones(len(emb), dtype=bool)
        return self.nearness(emb) < self.threshold

    def apply(self, u: np.ndarray, names: Sequence[str], emb: np.ndarray) -> np.ndarray:
        """Utilities (n, M) over experts ``names`` with the far prompts' finite entries shrunk."""
        if not self.active or len(u) == 0:
            return u
        missing = [n for n in names if n not in self.qbar]
        if missing:
            raise GuardError(f"guard: no mean quality for expert(s) {missing}")
        far = self.far(emb)
        if not far.any():
            return u
        qbar = np.array([self.qbar[n] for n in names], dtype=np.float64)
        out = np.array(u, dtype=np.float64, copy=True)
        sub = out[far]
        ok = np.isfinite(sub)
        sub[ok] = ((1.0 - self.w) * sub + self.w * qbar[None, :])[ok]
        out[far] = sub
        return out

    def with_means(self, extra: Mapping[str, float]) -> Guard:
        """A copy with more experts' means (the index is shared: it does not change)."""
        g = dataclasses.replace(self, qbar={**self.qbar, **{k: float(v) for k, v in extra.items()}})
        g._near = self._near
        return g

    def sample(self, n: int = 2048) -> np.ndarray:
        """Up to n training prompt embeddings, evenly spaced (for a new expert's mean)."""
        idx = np.unique(np.linspace(0, len(self.reference) - 1, min(n, len(self.reference))).astype(int))
        return self.reference[idx]

    def __getstate__(self) -> dict[str, Any]:  # the FAISS index is rebuilt on use
        state = dict(self.__dict__)
        state["_near"] = None
        return state

    def record(self) -> dict[str, Any]:
        return {"w": self.w, "gate": self.gate,
                "threshold": None if not np.isfinite(self.threshold) else self.threshold,
                "k": self.k, "qbar": self.qbar, "n_reference": int(len(self.reference)), "search": self.search}


def save_guard(model_dir: str | os.PathLike[str], guard: Guard) -> Path:
    """Write ``model_dir/guard/`` (guard.json + reference.npy) atomically."""

    def write(tmp: Path) -> None:
        (tmp / "guard.json").write_text(json.dumps(guard.record(), indent=1))
        np.save(tmp / "reference.npy", np.asarray(guard.reference, dtype=np.float32))

    return atomic_dir(Path(model_dir) / FOLDER, write)


def load_guard(model_dir: str | os.PathLike[str]) -> Guard | None:
    """The guard saved in ``model_dir/guard/``, or None when there is none."""
    folder = Path(model_dir) / FOLDER
    if not (folder / "guard.json").exists():
        return None
    try:
        rec = json.loads((folder / "guard.json").read_text())
        reference = np.load(folder / "reference.npy", allow_pickle=False)
        threshold = float("inf") if rec.get("threshold") is None else float(rec["threshold"])
        return Guard(float(rec["w"]), float(rec["gate"]), threshold, {str(k): float(v) for k, v in rec["qbar"].items()},
                     np.asarray(reference, dtype=np.float32), int(rec.get("k", K_NEAR)), dict(rec.get("search", {})))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GuardError(f"unreadable guard in {folder}: {exc} (rerun `cscr guard`, or remove the folder)") from exc


def remove_guard(model_dir: str | os.PathLike[str]) -> bool:
    """Remove ``model_dir/guard/``; True when there was one."""
    import shutil

    folder = Path(model_dir) / FOLDER
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True


# ---------------------------------------------------------------- the search

def category_groups(categories: Sequence[str], max_groups: int = MAX_GROUPS) -> dict[str, list[str]]:
    """One group per category, or, with more than ``max_groups`` of them, that many groups (largest
    category first, dealt round robin)."""
    counts = Counter(str(c) for c in categories if str(c).strip())
    order = sorted(counts, key=lambda c: (-counts[c], c))
    if len(order) <= max_groups:
        return {c: [c] for c in order}
    groups: dict[str, list[str]] = {f"group-{i + 1}": [] for i in range(max_groups)}
    for i, c in enumerate(order):
        groups[f"group-{i % max_groups + 1}"].append(c)
    return groups


FAR_SHARE = 0.5  # the default weight of the held-out groups against the in-distribution rows in the choice


def far_share_of(value: float | None, name: str = "far_share") -> float:
    """``value`` (None: ``FAR_SHARE``) as the guard search's far share; outside [0, 1] or NaN is a
    GuardError naming ``name`` (the CLI's flag, or the argument)."""
    share = FAR_SHARE if value is None else float(value)
    if not 0.0 <= share <= 1.0:  # NaN fails too
        raise GuardError(f"{name} must be in [0, 1], got {value}")
    return share


@dataclass
class GuardSearch:
    w: float
    gate: float
    mean: np.ndarray  # (len(GATES), len(GRID)) mean held-out-group AUDC
    per_group: dict[str, list[list[float]]]
    groups: dict[str, list[str]]
    # the category prior's w in each group's router (None: the run's config fits none), so the search
    # scores the utilities the served router shrinks
    prior_w: dict[str, float | None] = field(default_factory=dict)
    # (len(GATES), len(GRID)) mean AUDC on each split's in-distribution validation rows (the other groups'
    # prompts): what the shrink costs the prompts the head was trained for
    mean_in: np.ndarray | None = None
    per_group_in: dict[str, list[list[float]]] = field(default_factory=dict)
    far_share: float = 1.0  # the choice maximises far_share * mean + (1 - far_share) * mean_in

    @staticmethod
    def choose(mean: np.ndarray, mean_in: np.ndarray | None, far_share: float) -> tuple[float, float]:
        """(w, gate) maximising ``far_share * mean + (1 - far_share) * mean_in`` (ties: the first, i.e. the
        smaller gate and w; w = 0 is in the grid, so a shrink that costs more than it gains is not chosen)."""
        score = mean if mean_in is None else far_share * mean + (1.0 - far_share) * mean_in
        a, b = np.unravel_index(int(np.argmax(score)), score.shape)
        return GRID[int(b)], GATES[int(a)]

    def record(self) -> dict[str, Any]:
        return {"w": self.w, "gate": self.gate, "grid": list(GRID), "gates": list(GATES),
                "mean_audc": self.mean.tolist(), "per_group": self.per_group, "groups": self.groups,
                "prior_w": self.prior_w, "far_share": self.far_share,
                "mean_audc_in": None if self.mean_in is None else self.mean_in.tolist(),
                "per_group_in": self.per_group_in,
                "how": "nested leave-one-group-out over the train, val and probe rows' categories; each "
                       "group's head with its category prior when the run's config fits one; (w, gate) "
                       "maximises far_share * held-out AUDC + (1 - far_share) * in-distribution validation AUDC"}

    def table(self) -> str:
        """The mean AUDC grids as text (gates down, w across), the chosen pair marked: the held-out
        groups', then the in-distribution rows' (when scored)."""
        grids = [("held-out groups", self.mean)]
        if self.mean_in is not None:
            grids.append(("in distribution (validation rows)", self.mean_in))
        lines: list[str] = []
        for title, grid in grids:
            lines.append(f"{title}:\ngate \\ w  " + " ".join(f"{w:>7}" for w in GRID))
            for i, g in enumerate(GATES):
                cells = []
                for j, w in enumerate(GRID):
                    mark = "*" if (g, w) == (self.gate, self.w) else " "
                    cells.append(f"{grid[i, j]:.4f}{mark}")
                lines.append(f"{g:>8}  " + " ".join(cells))
        return "\n".join(lines)


def grid_audc(router: Any, table: RoutingTable, emb: np.ndarray, train: np.ndarray, rows: np.ndarray,
              qbar: np.ndarray | None = None) -> np.ndarray:
    """(len(GATES), len(GRID)) AUDC of ``router`` (a CSCR router without a guard) on ``rows`` with the
    guard of every grid pair, its reference the ``train`` rows (``qbar``: (M,) other means to shrink to)."""
    from cscr.eval.utility import utility_audc

    g = Guard.fit(table, emb, 1.0, 1.0, train)
    u = router.utilities(emb[rows])
    if qbar is None:
        qbar = np.array([g.qbar.get(n, np.nan) for n in router.expert_names])
    near, ref = g.nearness(emb[rows]), g.nearness.own()
    out = np.zeros((len(GATES), len(GRID)))
    for a, q in enumerate(GATES):
        far = np.ones(len(rows), bool) if q >= 1.0 else near < np.quantile(ref, q)
        for b, w in enumerate(GRID):
            wx = np.where(far, w, 0.0)[:, None]
            out[a, b] = utility_audc(router.expert_names, router.costs, (1 - wx) * u + wx * qbar[None, :],
                                     emb[rows], table.quality[rows], table.cost[rows])
    return out
