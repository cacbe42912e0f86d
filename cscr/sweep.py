"""Ablation grids (SPEC.md section 8.4) and the summary of a sweep: pure functions, no Ray.

A grid varies one hyperparameter of CSCR around the defaults. Each trial trains a head and
reports its validation AUDC after every epoch; the summary picks the value with the best
validation AUDC and reports test AUDC for every value (choose on validation, report on test).
jobs/sweep.py runs the trials on Ray Tune.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cscr.atomic import atomic_write, atomic_write_json, atomic_write_text
from cscr.config import ConfigError, TrainConfig
from cscr.markdown import markdown_table as md_table
from cscr.markdown import num

if TYPE_CHECKING:  # numpy loads on use: `cscr sweep --help` lists the grids without it
    import numpy as np


@dataclass(frozen=True)
class Grid:
    name: str  # grid name on the command line
    param: str  # what it varies, as "section.field" of TrainConfig ("descriptor" is special)
    values: tuple[Any, ...]  # the values tried
    default: Any  # the default value, marked on the plot
    label: str  # axis label


GRIDS: dict[str, Grid] = {
    g.name: g
    for g in (
        Grid("bands", "loss.bands", (1, 2, 5, 11, 15, 20), 5, "cost bands B"),
        # 0 = every expert (k = M), IndexConfig's default (SPEC section 5); the others are the ablation
        Grid("k", "index.top_k", (1, 2, 4, 8, 16, 0), 0, "top-k experts retrieved (0 = every expert)"),
        Grid("gamma", "loss.gamma", (0.0, 0.1, 0.2, 0.3, 0.5), 0.2, "cost penalty gamma"),
        Grid("alpha", "loss.alpha", (0.0, 0.1, 0.25, 0.4, 0.5), 0.25, "temperature slope alpha"),
        Grid("tau_min", "loss.tau_min", (0.0, 0.02, 0.05, 0.08), 0.05, "base temperature tau_min"),
        Grid("width", "head.hidden", (384, 1536), 384, "head hidden width (x1, x4)"),
        Grid("descriptor", "descriptor", ("probe-outcome", "perplexity", "logit", "mixed"), "probe-outcome",
             "descriptor kind"),
    )
}


def get_grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ConfigError(f"unknown grid {name!r}; available: {sorted(GRIDS)} (or 'all')")
    return GRIDS[name]


def grid_names(spec: str) -> list[str]:
    """'all' or a comma-separated list of grid names, validated."""
    names = sorted(GRIDS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        get_grid(n)
    if not names:
        raise ConfigError("no grid named")
    return names


def apply_value(cfg: TrainConfig, grid: Grid, value: Any) -> TrainConfig:
    """The TrainConfig of one trial: ``cfg`` with the grid's parameter set to ``value``.

    ``descriptor`` does not change the TrainConfig (the trial loads other descriptors).
    A temperature that would be 0 for the cheapest band (tau_min = 0 and alpha = 0) is refused
    by LossConfig; tau_min = 0 alone is allowed (tau_b = alpha * band mean cost).
    """
    if grid.param == "descriptor":
        return cfg
    section, field = grid.param.split(".")
    sub = getattr(cfg, section)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{field: value})})


def available_descriptor_values(kinds: Sequence[str], dims: Mapping[str, int]) -> list[str]:
    """Descriptor-grid values that a run's store supports: each kind present, plus ``mixed`` when
    two kinds of the same dimension exist (logit and perplexity preferred, SPEC section 2)."""
    values = [k for k in GRIDS["descriptor"].values if k in kinds]
    if mixed_pair(kinds, dims) is not None:
        values.append("mixed")
    return values


def mixed_pair(kinds: Sequence[str], dims: Mapping[str, int]) -> tuple[str, str] | None:
    """The two kinds mixed in one pool: (logit, perplexity) when both exist with N = K, else any
    two kinds of equal dimension, else None."""
    if "logit" in kinds and "perplexity" in kinds and dims["logit"] == dims["perplexity"]:
        return "logit", "perplexity"
    ks = sorted(kinds)
    for i, a in enumerate(ks):
        for b in ks[i + 1:]:
            if dims[a] == dims[b]:
                return a, b
    return None


def mixed_descriptors(by_kind: Mapping[str, Mapping[str, np.ndarray]], pair: tuple[str, str],
                      names: Sequence[str]) -> dict[str, np.ndarray]:
    """A mixed pool: experts alternate between the two kinds (even positions the first)."""
    import numpy as np

    out = {}
    for i, name in enumerate(names):
        kind = pair[i % 2]
        if name not in by_kind[kind]:
            kind = pair[1 - i % 2]
        out[name] = np.asarray(by_kind[kind][name], dtype=np.float32)
    return out


# ---------------------------------------------------------------- summary and report

def summarize(grid: Grid, trials: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per value (in grid order): best validation AUDC, test AUDC, peak, QNC ratio,
    seconds, status (``ok`` / ``failed``) and, for a failed trial, ``error`` (why).

    ``chosen`` marks the value with the best validation AUDC, and only in a complete grid: when
    any trial failed no value is chosen (the best of a partial grid is not a choice)."""
    rows = []
    for t in trials:
        rows.append({
            "grid": grid.name, "value": t["value"], "default": t["value"] == grid.default,
            "val_audc": t.get("val_audc"), "test_audc": t.get("test_audc"), "test_peak": t.get("test_peak"),
            "test_qnc_ratio": t.get("test_qnc_ratio"), "best_epoch": t.get("best_epoch"),
            "seconds": t.get("seconds"), "status": t.get("status", "ok"), "error": t.get("error"),
        })
    order = {v: i for i, v in enumerate(grid.values)}
    rows.sort(key=lambda r: order.get(r["value"], len(order)))
    complete = all(r["status"] == "ok" for r in rows)
    scored = [r for r in rows if isinstance(r["val_audc"], float) and math.isfinite(r["val_audc"])]
    best = max(scored, key=lambda r: r["val_audc"]) if scored and complete else None
    for r in rows:
        r["chosen"] = r is best
    return rows


def failed_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("status", "ok") != "ok"]


def _fmt(v: Any) -> str:
    return num(v, ".4f") if isinstance(v, float) or v is None else str(v)


def markdown_table(grid: Grid, rows: Sequence[Mapping[str, Any]]) -> str:
    head = f"### Grid `{grid.name}` ({grid.label})\n\n"
    cells = []
    for r in rows:
        mark = (" (default)" if r["default"] else "") + (" **chosen**" if r["chosen"] else "")
        qnc = "not reached" if r.get("test_qnc_ratio") is None and r["status"] == "ok" else _fmt(r.get("test_qnc_ratio"))
        cells.append([f"{r['value']}{mark}", _fmt(r["val_audc"]), _fmt(r["test_audc"]), _fmt(r["test_peak"]), qnc,
                      _fmt(r["best_epoch"]), r["status"]])
    body = md_table(["value", "val AUDC", "test AUDC", "test peak", "test QNC / best", "best epoch", "status"], cells,
                 "lrrrrrl") + "\n"
    chosen = next((r for r in rows if r["chosen"]), None)
    failed = failed_rows(rows)
    if chosen:
        foot = f"\nChosen on validation: **{chosen['value']}** (test AUDC {_fmt(chosen['test_audc'])}).\n"
    elif len(failed) == len(rows):
        foot = "\nNo trial finished: nothing is chosen.\n"
    elif failed:
        foot = (f"\nPartial grid: {len(failed)} of {len(rows)} trials failed, so no value is chosen "
                "(the reasons are listed below).\n")
    else:
        foot = "\nNo trial reported a validation AUDC: nothing is chosen.\n"
    if failed:
        foot += "\nFailed trials:\n\n" + "".join(
            f"- {r['value']}: {r.get('error') or 'no reason recorded'}\n" for r in failed)
    return head + body + foot


def plot_grid(grid: Grid, rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Validation and test AUDC against the grid's value, the default marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, style in (("val_audc", "o-"), ("test_audc", "s--")):
        ys = [math.nan if r[key] is None else r[key] for r in rows]
        ax.plot(xs, ys, style, label=key.replace("_", " "))
    for i, r in enumerate(rows):
        if r["default"]:
            ax.axvline(i, color="grey", alpha=0.4, lw=6, label="default")
    ax.set_xticks(xs, [str(r["value"]) for r in rows])
    ax.set_xlabel(grid.label)
    ax.set_ylabel("AUDC")
    ax.set_title(f"CSCR ablation: {grid.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path


def write_sweep_report(grid: Grid, rows: Sequence[Mapping[str, Any]], out_dir: Path,
                       meta: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """summary.md, summary.csv, summary.json and <grid>.png in ``out_dir``, atomically."""
    import csv
    import io

    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(grid, rows)
    buf = io.StringIO()
    cols = ["grid", "value", "default", "chosen", "val_audc", "test_audc", "test_peak", "test_qnc_ratio",
            "best_epoch", "seconds", "status", "error"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    paths = {
        "md": atomic_write_text(out_dir / "summary.md", md),
        "csv": atomic_write_text(out_dir / "summary.csv", buf.getvalue()),
        "json": atomic_write_json(out_dir / "summary.json", {"grid": dataclasses.asdict(grid), "rows": list(rows),
                                                             "meta": dict(meta or {})}),
        "png": plot_grid(grid, rows, out_dir / f"{grid.name}.png"),
    }
    return paths
