"""The project report: one markdown file with PNG figures over every run folder (``cscr report``).

Reads what the other stages wrote, computes nothing new:

    runs/<name>/eval/metrics.json + deferral.png           main table (cscr evaluate)
    runs/<name>/experiments/<exp>/metrics.json + *.png     generalisation (cscr experiment)
    runs/<name>/sweeps/<grid>/summary.json + <grid>.png    ablations (cscr sweep)

and writes ``<out>/report.md`` with the figures copied under ``<out>/figures/<run>/`` and linked
relatively. The output folder is built beside ``<out>`` and swapped into place, so a reader sees
the previous report or the new one, never a mix. A missing piece is listed as "not run" (with the
command that produces it), and an unreadable one as "unreadable" with the reason: neither stops
the report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cscr.atomic import atomic_dir, atomic_write_text
from cscr.errors import InputError
from cscr.experiments.report import significance_lines, tables_markdown
from cscr.markdown import NOT_REACHED, markdown_table, num
from cscr.sweep import GRIDS, Grid
from cscr.sweep import markdown_table as sweep_table

NOT_RUN = "not run"
# the main table's metric columns: record key, column head, number format
MAIN_METRICS = [("audc", "AUDC", ".4f"), ("audc_paper", "AUDC (write-up)", ".4f"), ("qnc", "QNC ({unit})", ".4g"),
                ("qnc_ratio", "QNC / best", ".3f"), ("peak", "peak", ".4f"), ("cost_at_peak", "cost at peak ({unit})", ".4g")]
EXPERIMENTS = ("unseen-experts", "ood")


@dataclass
class Piece:
    """One stage's output in a run folder: its JSON record and the folder it came from."""
    folder: Path
    data: dict[str, Any] | None = None  # None: unreadable
    error: str | None = None


@dataclass
class RunInfo:
    name: str
    root: Path
    source: str | None  # from the table manifest (None: no table)
    eval: Piece | None = None
    experiments: dict[str, Piece] = field(default_factory=dict)  # folder name -> piece
    sweeps: dict[str, Piece] = field(default_factory=dict)  # grid -> piece


def _read(path: Path) -> Piece:
    try:
        return Piece(path.parent, json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        return Piece(path.parent, None, f"{path.name}: {exc}")


def collect_run(root: Path) -> RunInfo:
    """What a run folder holds (each piece read, none required)."""
    source = None
    manifest = root / "table" / "manifest.json"
    if manifest.exists():
        try:
            source = str(json.loads(manifest.read_text()).get("source", "?"))
        except (OSError, ValueError):
            source = "? (unreadable table manifest)"
    info = RunInfo(root.name, root, source)
    if (root / "eval" / "metrics.json").exists():
        info.eval = _read(root / "eval" / "metrics.json")
    for d in sorted((root / "experiments").glob("*/metrics.json")):
        info.experiments[d.parent.name] = _read(d)
    for d in sorted((root / "sweeps").glob("*/summary.json")):
        info.sweeps[d.parent.name] = _read(d)
    return info


def find_runs(runs_dir: str | os.PathLike[str]) -> list[RunInfo]:
    """Every run folder under ``runs_dir`` (a folder with a table, an eval, sweeps or experiments)."""
    base = Path(runs_dir).expanduser()
    if not base.is_dir():
        raise InputError(f"--runs {base}: no such folder (run folders are made by `cscr prepare --out {base}/NAME`)")
    marks = ("table/manifest.json", "eval/metrics.json", "sweeps", "experiments")
    roots = [d for d in sorted(base.iterdir())
             if d.is_dir() and not d.name.startswith(".") and any((d / m).exists() for m in marks)]
    if not roots:
        raise InputError(f"no run folders under {base}: prepare one with `cscr prepare --dataset NAME --out {base}/NAME`")
    return [collect_run(r) for r in roots]


# ---------------------------------------------------------------- figures

class Figures:
    """Copies figures into ``<out>/figures/<run>/`` and hands back the relative link."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.copied: list[Path] = []

    def add(self, run: str, src: Path, name: str) -> str | None:
        if not src.is_file():
            return None
        rel = Path("figures") / run / name
        dst = self.out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        self.copied.append(dst)
        return rel.as_posix()


def _image(link: str | None, alt: str) -> list[str]:
    return [f"![{alt}]({link})", ""] if link else [f"_(figure missing: {alt})_", ""]


# ---------------------------------------------------------------- sections

def _f(v: Any, fmt: str = ".4f") -> str:
    return num(v, fmt, NOT_REACHED)


def expected_routers() -> list[str]:
    """Every registered router but ``single`` (the single experts have their own table)."""
    from cscr.routers import available_routers

    return [n for n in available_routers() if n != "single"]


def main_section(run: RunInfo, figs: Figures, expected: Sequence[str], runs_dir: str) -> list[str]:
    out = [f"### {run.name}", ""]
    if run.eval is None:
        return out + [f"{NOT_RUN}: `cscr evaluate --run {runs_dir}/{run.name} --routers "
                      f"{','.join(expected)},single --compare cscr`", ""]
    if run.eval.data is None:
        return out + [f"unreadable: {run.eval.error}", ""]
    m = run.eval.data
    best = m.get("best_expert", {})
    unit = m.get("cost_unit", "")
    out += [f"source: {m.get('source')}; evaluated prompts: {m.get('n_evaluated')} (dropped for a missing quality "
            f"cell: {m.get('n_dropped_missing_quality')}); cost unit: {unit}  ",
            f"pool cost range: {_f(m['pool_range'][0], '.4g')} .. {_f(m['pool_range'][1], '.4g')}; best single "
            f"expert: {best.get('name')} (quality {_f(best.get('quality'))}, mean cost {_f(best.get('cost'), '.4g')})",
            ""]
    routers = [r for n, r in m["routers"].items() if not n.startswith("single:")]
    routers.sort(key=lambda r: -r["audc"])
    # every metric the records carry (older records lack the later ones), in this order
    cols = [(k, head, fmt) for k, head, fmt in MAIN_METRICS if any(k in r for r in routers)]
    rows = [[r["router"], *[_f(r.get(k), fmt) if k in r else "—" for k, _, fmt in cols]] for r in routers]
    out += [markdown_table(["router", *[head.format(unit=unit) for _, head, _ in cols]], rows), ""]
    missing = [n for n in expected if n not in m["routers"]]
    if missing:
        out += [f"Routers {NOT_RUN} on this data set: {', '.join(missing)}.", ""]
    erows = []
    for name, e in sorted(m.get("experts", {}).items(), key=lambda kv: kv[1]["cost"]):
        erows.append([name + (" (best)" if name == best.get("name") else ""), _f(e["quality"]), _f(e["cost"], ".4g")])
    if erows:
        out += ["Single experts, cheapest first (mean test quality and mean cost; each is one operating point, "
                "drawn as a labelled point in the figure, so it has no curve and no AUDC of its own):", "",
                markdown_table(["expert", "quality", f"cost ({unit})"], erows), ""]
    out += _image(figs.add(run.name, run.eval.folder / "deferral.png", "main-deferral.png"),
                  f"deferral curves, {run.name}")
    return out


def overview_section(runs: Sequence[RunInfo]) -> list[str]:
    """AUDC of every router (rows) on every data set (columns), from the main tables."""
    done = [r for r in runs if r.eval is not None and r.eval.data is not None]
    if not done:
        return [f"No main table has been computed yet ({NOT_RUN}).", ""]
    names: list[str] = []
    for r in done:
        names += [n for n in r.eval.data["routers"] if not n.startswith("single:") and n not in names]  # type: ignore[union-attr,index]

    def audc(r: RunInfo, n: str) -> float | None:
        x = r.eval.data["routers"].get(n)  # type: ignore[union-attr,index]
        return None if x is None else float(x["audc"])

    names.sort(key=lambda n: -max((a for a in (audc(r, n) for r in done) if a is not None), default=-1.0))
    rows = [[n, *[("—" if audc(r, n) is None else f"{audc(r, n):.4f}") for r in done]] for n in names]
    return [markdown_table(["router", *[r.name for r in done]], rows), "",
            "—: not evaluated on that data set. AUDC is normalised by each pool's cost range (higher is better).", ""]


def _strongest_baseline(m: Mapping[str, Any]) -> str | None:
    others = [(r["audc"], n) for n, r in m["routers"].items() if n not in ("cscr", "oracle")]
    return max(others)[1] if others else None


def significance_section(runs: Sequence[RunInfo], runs_dir: str) -> list[str]:
    cols = ["data set", "CSCR vs", "strongest other (AUDC)", "dAUDC", "95% CI", "one-sided p", "McNemar budget",
            "CSCR only", "other only", "McNemar p"]
    rows, notes = [], []
    for run in runs:
        if run.eval is None or run.eval.data is None:
            notes.append(f"{run.name}: {NOT_RUN} (no main table)")
            continue
        m = run.eval.data
        sig = [s for s in m.get("significance", []) if s.get("a") == "cscr"]
        if not sig:
            why = "cscr not evaluated" if "cscr" not in m["routers"] else "no comparison recorded"
            notes.append(f"{run.name}: {NOT_RUN} ({why}): `cscr evaluate --run {runs_dir}/{run.name} "
                         "--routers cscr,... --compare cscr`")
            continue
        strongest = _strongest_baseline(m)
        for s in sig:
            mc = s.get("mcnemar")
            p = s["p_one_sided"]
            rows.append([run.name, s["b"], f"{strongest} ({m['routers'][strongest]['audc']:.4f})" if strongest else "—",
                         f"{s['delta_audc']:+.4f}", f"[{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}]",
                         f"< {1 / s['resamples']:.2g}" if p == 0 else f"{p:.4f}", _f(s["budget"], ".4g"),
                         str(mc["a_only"]) if mc else "n/a", str(mc["b_only"]) if mc else "n/a",
                         _f(mc["p_value"], ".4g") if mc else "n/a"])
    out = []
    if rows:
        out += [markdown_table(cols, rows, "lll" + "r" * (len(cols) - 3)), "",
                "Paired bootstrap over the test prompts (dAUDC = AUDC(cscr) - AUDC(other), 95% interval, one-sided "
                "p = fraction of resamples in which CSCR is not ahead); McNemar's exact test on per-prompt "
                "correctness with each router at its best operating point within the budget (the best single "
                "expert's mean cost unless set). The comparison is against the strongest other router by AUDC "
                "(oracle excluded), as `cscr evaluate --compare cscr` picks it.", ""]
    if notes:
        out += [f"- {n}" for n in notes] + [""]
    return out


def experiment_section(run: RunInfo, folder: str, piece: Piece, figs: Figures) -> list[str]:
    out = [f"#### {run.name}: {folder}", ""]
    if piece.data is None:
        return out + [f"unreadable: {piece.error}", ""]
    rec = piece.data
    s = rec.get("settings", {})
    out += [f"source: {rec.get('source')}; descriptors: {s.get('descriptor_kind')}; seed: {s.get('seed')}; "
            f"epochs: {s.get('train', {}).get('epochs')}", ""]
    out += [tables_markdown(rec.get("tables", []), "#####")]
    if rec.get("excluded"):
        out += ["Could not take part:", ""] + [f"- **{r}**: {why}" for r, why in rec["excluded"].items()] + [""]
    if rec.get("significance"):
        out += ["Significance:", ""] + [f"- {line}" for line in significance_lines(rec["significance"])] + [""]
    for label, fig in rec.get("figures", {}).items():
        if label.endswith("/id"):
            continue  # the in-distribution curves stay in the run folder
        out += _image(figs.add(run.name, piece.folder / fig, f"{folder}-{fig}"), f"{folder}: {label}")
    return out


def generalisation_section(runs: Sequence[RunInfo], figs: Figures, runs_dir: str) -> list[str]:
    out: list[str] = []
    for exp, title, cmd in (("unseen-experts", "Unseen experts", "cscr experiment unseen-experts --run {}"),
                            ("ood", "Out-of-distribution prompts", "cscr experiment ood --run {}")):
        out += [f"### {title}", ""]
        missing = []
        for run in runs:
            found = {k: v for k, v in run.experiments.items() if k == exp or k.startswith(f"{exp}-")}
            if not found:
                missing.append(run.name)
            for folder, piece in found.items():
                out += experiment_section(run, folder, piece, figs)
        if missing:
            out += [f"{NOT_RUN} on: " + ", ".join(f"{n} (`{cmd.format(f'{runs_dir}/{n}')}`)" for n in missing), ""]
    return out


def _grid_of(d: Mapping[str, Any]) -> Grid:
    return Grid(d["name"], d["param"], tuple(d["values"]), d["default"], d["label"])


def ablation_section(runs: Sequence[RunInfo], figs: Figures, runs_dir: str) -> list[str]:
    overview, detail, missing = [], [], []
    for run in runs:
        absent = [g for g in GRIDS if g not in run.sweeps]
        if absent and run.source is not None:
            missing.append(f"{run.name}: {', '.join(absent)} (`cscr sweep --run {runs_dir}/{run.name} "
                           f"--grid {','.join(absent)}`)")
        for name, piece in run.sweeps.items():
            detail += [f"#### {run.name}: {name}", ""]
            if piece.data is None:
                detail += [f"unreadable: {piece.error}", ""]
                continue
            grid, rows = _grid_of(piece.data["grid"]), piece.data["rows"]
            detail += [sweep_table(grid, rows).replace("### Grid", "Grid"), ""]
            skipped = piece.data.get("meta", {}).get("skipped_values")
            if skipped:
                detail += [f"Values not run (no such descriptors in the run's store): {skipped}.", ""]
            detail += _image(figs.add(run.name, piece.folder / f"{name}.png", f"sweep-{name}.png"),
                             f"ablation {name}, {run.name}")
            ok = [r for r in rows if isinstance(r.get("test_audc"), float)]
            d = next((r for r in rows if r.get("default")), None)
            c = next((r for r in rows if r.get("chosen")), None)
            best = max(ok, key=lambda r: r["test_audc"]) if ok else None
            overview.append([run.name, name, f"{d['value']} ({_f(d.get('test_audc'))})" if d else "—",
                             f"{c['value']} ({_f(c.get('test_audc'))})" if c else "—",
                             f"{best['value']} ({_f(best['test_audc'])})" if best else "—",
                             f"{min(r['test_audc'] for r in ok):.4f} .. {max(r['test_audc'] for r in ok):.4f}"
                             if ok else "—", f"{len(ok)}/{len(rows)}"])
    out = []
    if overview:
        out += [markdown_table(["run", "grid", "default (test AUDC)", "chosen on val (test AUDC)",
                                "best on test (test AUDC)", "test AUDC range", "trials ok"], overview,
                               "llllllr"), "",
                "Each grid varies one CSCR hyperparameter around the defaults; the value is chosen on validation "
                "AUDC and reported on test.", ""]
    else:
        out += [f"No ablation sweep has run yet ({NOT_RUN}).", ""]
    if missing:
        out += [f"Grids {NOT_RUN}:", ""] + [f"- {m}" for m in missing] + [""]
    return out + detail


def status_section(runs: Sequence[RunInfo]) -> list[str]:
    rows = []
    for r in runs:
        ev = NOT_RUN if r.eval is None else ("unreadable" if r.eval.data is None else
                                             f"{len([n for n in r.eval.data['routers'] if not n.startswith('single:')])} routers")
        exps = {e: [k for k in r.experiments if k == e or k.startswith(f"{e}-")] for e in EXPERIMENTS}
        rows.append([r.name, r.source or "no table", ev, ", ".join(exps["unseen-experts"]) or NOT_RUN,
                     ", ".join(exps["ood"]) or NOT_RUN,
                     f"{len(r.sweeps)}/{len(GRIDS)}: {', '.join(r.sweeps)}" if r.sweeps else NOT_RUN])
    return [markdown_table(["run", "data set", "main table", "unseen experts", "OOD", "ablation grids"], rows,
                           "llllll"), ""]


def report_markdown(runs: Sequence[RunInfo], figs: Figures, runs_dir: str) -> str:
    expected = expected_routers()
    parts = ["# cscr report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{runs_dir}` "
             f"({len(runs)} runs) by `cscr report --runs {runs_dir}`. Every number is read from the run "
             "folders; nothing here is recomputed.", "",
             "## What has run", "", *status_section(runs),
             "## 1. Main tables", "", "AUDC by router and data set:", "", *overview_section(runs)]
    for run in runs:
        parts += main_section(run, figs, expected, runs_dir)
    parts += ["## 2. Significance of CSCR against the strongest baseline", "",
              *significance_section(runs, runs_dir),
              "## 3. Generalisation", "", *generalisation_section(runs, figs, runs_dir),
              "## 4. Ablations", "", *ablation_section(runs, figs, runs_dir)]
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------- writing



def build_report(runs_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``<out_dir>/report.md`` and its figures for every run under ``runs_dir``; return the path.

    ``out_dir`` is replaced as a whole (it must be new, empty, or an earlier report)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").exists())):
        raise InputError(f"--out {out} exists and is not an earlier cscr report: choose a new or empty folder")
    runs = find_runs(runs_dir)

    def write(tmp: Path) -> None:
        atomic_write_text(tmp / "report.md", report_markdown(runs, Figures(tmp), str(runs_dir).rstrip("/")))

    atomic_dir(out, write)
    return out / "report.md"
