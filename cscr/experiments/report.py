"""Files of the generalisation experiments: markdown tables, metrics.json, CSV, deferral PNGs.

Each evaluation goes through the evaluation report layer (cscr/eval/report.py: ``to_json``,
``metrics_rows``, ``metrics_csv``, ``plot_deferral``); this module adds the experiment's own
record (who was held out, which routers could not take part and why, significance) and the
summary tables that ``cscr report`` copies into the project report.

    runs/<name>/experiments/unseen-experts/  report.md  metrics.json  metrics.csv  deferral.png
    runs/<name>/experiments/ood-<split>/     report.md  metrics.json  metrics.csv
                                             deferral-<group>.png (held-out group)
                                             deferral-<group>-id.png (in-distribution test rows)

metrics.json: ``experiment``, ``run``, ``source``, ``cost_unit``, ``created``, ``settings``,
``tables`` (a list of {title, columns, rows}: the markdown tables, values formatted),
``excluded`` ({router: reason}), ``significance`` (a list of {set, a, b, delta_audc, ...}),
``evaluations`` ({label: cscr.eval.report.to_json(...)}), ``figures`` ({label: file name}), and
per experiment ``seen`` / ``unseen`` / ``how`` or ``split`` / ``groups``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cscr.atomic import atomic_write_json, atomic_write_text
from cscr.eval.evaluate import EvalResult
from cscr.eval.report import COLUMNS, format_header, metrics_rows, plot_deferral, to_json
from cscr.markdown import NOT_REACHED, markdown_table, num

if TYPE_CHECKING:  # the experiment modules train heads (torch); the report layer does not need them
    from cscr.experiments.ood import OODResult
    from cscr.experiments.unseen import UnseenResult


def slug(name: str) -> str:
    """A file-name-safe form of a group or split name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "group"


def _f(v: float | None, fmt: str = ".4f") -> str:
    return num(v, fmt, NOT_REACHED)


def tables_markdown(tables: Sequence[Mapping[str, Any]], level: str = "###") -> str:
    """The ``tables`` of an experiment record as markdown (title, table, note)."""
    parts = []
    for t in tables:
        parts += [f"{level} {t['title']}", "", markdown_table(t["columns"], t["rows"], t.get("align")), ""]
        if t.get("note"):
            parts += [t["note"], ""]
    return "\n".join(parts)


def significance_lines(sig: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per significance entry of a record (paired bootstrap, McNemar)."""
    out = []
    for s in sig:
        p = s["p_one_sided"]
        p_txt = f"< {1 / s['resamples']:.2g}" if p == 0 else f"= {p:.4f}"
        line = (f"{s['set']}: {s['a']} vs {s['b']}: dAUDC = {s['delta_audc']:+.4f} "
                f"(95% CI [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}], one-sided p {p_txt}, B = {s['resamples']})")
        mc = s.get("mcnemar")
        if mc is None:
            line += f"; McNemar at budget {s['budget']:.4g}: n/a (a router has no operating point within it)"
        else:
            line += (f"; McNemar at budget {s['budget']:.4g}: {s['a']} only {mc['a_only']}, {s['b']} only "
                     f"{mc['b_only']}, exact p = {mc['p_value']:.4g}")
        out.append(line)
    return out


def _significance(label: str, result: EvalResult) -> list[dict[str, Any]]:
    return [{"set": label, **s.to_dict()} for s in result.significance]


def _base(experiment: str, result: EvalResult, run: str | os.PathLike[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"experiment": experiment, "run": str(run), "source": result.source, "cost_unit": result.cost_unit,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": dict(settings)}


def _csv(sets: Sequence[tuple[str, str, EvalResult]]) -> str:
    """metrics.csv over several evaluations: group, set, then the evaluation report's columns."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["group", "set", *COLUMNS], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for group, which, res in sets:
        for d in metrics_rows(res):
            w.writerow({"group": group, "set": which, **{k: ("" if d[k] is None else d[k]) for k in COLUMNS}})
    return buf.getvalue()


def _report_md(title: str, intro: Sequence[str], record: Mapping[str, Any],
               headers: Sequence[tuple[str, EvalResult, str]]) -> str:
    parts = [f"# {title}", "", *intro, "", tables_markdown(record["tables"], "##")]
    if record["excluded"]:
        parts += ["## Could not take part", ""]
        parts += [f"- **{r}**: {why}" for r, why in record["excluded"].items()] + [""]
    if record["significance"]:
        parts += ["## Significance", ""] + [f"- {s}" for s in significance_lines(record["significance"])] + [""]
    for label, res, fig in headers:
        parts += [f"## {label}", "", format_header(res).replace("\n", "  \n"), "", f"![{label}]({fig})", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------- unseen experts

def unseen_record(res: UnseenResult, run: str | os.PathLike[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    ev = res.evaluation
    rows = [[d["router"], f"{d['audc']:.4f}", _f(d["qnc_ratio"], ".3f"), f"{d['peak']:.4f}",
             f"{d['cost_at_peak']:.4g}", res.how.get(d["router"], "")] for d in metrics_rows(ev)]
    table = {"title": f"Unseen experts: routing over {len(res.unseen)} held-out experts "
                      f"({len(ev.rows)} test prompts)",
             "columns": ["router", "AUDC", "QNC / best", "peak", f"cost at peak ({ev.cost_unit})",
                         "what it used for the held-out experts"],
             "rows": rows, "align": "lrrrrl",
             "note": (f"Seen (trained on): {', '.join(res.seen)}. Held out: {', '.join(res.unseen)}. "
                      f"Best held-out expert: {ev.best_expert} (quality {ev.best_quality:.4f}, "
                      f"mean cost {ev.best_cost:.4g})." + "".join(
                          f" {v}: held-out experts {'calibrated on their probe outcomes' if c['use'] else 'not calibrated'} "
                          f"(pseudo-newcomer gains, train + val prompts: {', '.join(f'{g:+.4f}' for g in c['gains'])})."
                          for v, c in res.levels.items()))}
    return {**_base("unseen-experts", ev, run, settings), "seen": res.seen, "unseen": res.unseen,
            "how": res.how, "excluded": res.excluded, "newcomer_levels": res.levels, "tables": [table],
            "significance": _significance("held-out pool", ev), "evaluations": {"unseen": to_json(ev)},
            "figures": {"unseen": "deferral.png"}}


def write_unseen(res: UnseenResult, out_dir: str | os.PathLike[str], run: str | os.PathLike[str],
                 settings: Mapping[str, Any]) -> dict[str, Path]:
    """report.md, metrics.json, metrics.csv and deferral.png in ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = unseen_record(res, run, settings)
    intro = [f"Run `{run}`: train on {len(res.seen)} experts, route over {len(res.unseen)} held-out "
             "experts that no router saw in training (SPEC.md section 8.2)."]
    md = _report_md("Unseen experts", intro, record, [("Held-out pool", res.evaluation, "deferral.png")])
    return {
        "deferral.png": plot_deferral(res.evaluation, out / "deferral.png", title=(
            f"Unseen experts ({Path(str(run)).name}): routing over {len(res.unseen)} held-out experts, "
            f"{len(res.evaluation.rows)} test prompts")),
        "metrics.csv": atomic_write_text(out / "metrics.csv", _csv([("unseen", "test", res.evaluation)])),
        "metrics.json": atomic_write_json(out / "metrics.json", record),
        "report.md": atomic_write_text(out / "report.md", md),
    }


# ---------------------------------------------------------------- out-of-distribution prompts

def _audc_by_router(results: Sequence[EvalResult]) -> dict[str, list[float | None]]:
    names = list(dict.fromkeys(n for r in results for n in r.routers))
    return {n: [r.routers[n].audc if n in r.routers else None for r in results] for n in names}


def _group_table(title: str, groups: Sequence[str], results: Sequence[EvalResult], note: str) -> dict[str, Any]:
    by = _audc_by_router(results)
    multi = len(groups) > 1

    def mean(v: list[float | None]) -> float:
        xs = [x for x in v if x is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    order = sorted(by, key=lambda n: -mean(by[n]))
    rows = [[n, *[_f(x) for x in by[n]], *([f"{mean(by[n]):.4f}"] if multi else [])] for n in order]
    return {"title": title, "columns": ["router", *groups, *(["mean"] if multi else [])], "rows": rows,
            "note": note}


def ood_record(results: Sequence[OODResult], split: str, run: str | os.PathLike[str],
               settings: Mapping[str, Any]) -> dict[str, Any]:
    groups = [r.split.test_group for r in results]
    ood = [r.out_of_distribution for r in results]
    idd = [r.in_distribution for r in results]
    cols = [f"{g} (AUDC)" for g in groups]
    tables = [
        _group_table("Out of distribution: AUDC on the held-out group", cols, ood,
                     "Each column: trained on the other groups' prompts, evaluated on every prompt of this group."),
        _group_table("In distribution (reference): AUDC on the training groups' test prompts", cols, idd,
                     "Same routers, evaluated on the test split of the groups they were trained on."),
    ]
    sig, evaluations, figures, meta = [], {}, {}, []
    for r in results:
        g = r.split.test_group
        sig += _significance(f"{g} (OOD)", r.out_of_distribution)
        evaluations[f"{g}/ood"] = to_json(r.out_of_distribution)
        evaluations[f"{g}/id"] = to_json(r.in_distribution)
        figures[f"{g}/ood"] = f"deferral-{slug(g)}.png"
        figures[f"{g}/id"] = f"deferral-{slug(g)}-id.png"
        meta.append({"train_group": r.split.train_group, "test_group": g, "counts": r.split.counts,
                     "n_ood": int(len(r.split.ood_rows)), "n_id": int(len(r.split.id_rows))})
    return {**_base("ood", ood[0], run, settings), "split": split, "groups": meta, "excluded": {},
            "tables": tables, "significance": sig, "evaluations": evaluations, "figures": figures}


def write_ood(results: Sequence[OODResult], out_dir: str | os.PathLike[str], split: str,
              run: str | os.PathLike[str], settings: Mapping[str, Any]) -> dict[str, Path]:
    """report.md, metrics.json, metrics.csv and two deferral PNGs per held-out group (atomically)."""
    if not results:
        raise ValueError("no OOD results to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = ood_record(results, split, run, settings)
    written: dict[str, Path] = {}
    headers = []
    for r in results:
        g = r.split.test_group
        for which, res in (("ood", r.out_of_distribution), ("id", r.in_distribution)):
            fig = record["figures"][f"{g}/{which}"]
            what = (f"held-out group {g}, {len(res.rows)} prompts" if which == "ood" else
                    f"in distribution: test prompts of {r.split.train_group}, {len(res.rows)} prompts")
            written[fig] = plot_deferral(res, out / fig, title=(
                f"OOD experiment ({Path(str(run)).name}, split {split}): {what}; trained on {r.split.train_group}"))
        headers.append((f"Held-out group {g} (trained on {r.split.train_group})", r.out_of_distribution,
                        record["figures"][f"{g}/ood"]))
    groups = ", ".join(f"{m['test_group']} ({m['n_ood']} prompts)" for m in record["groups"])
    intro = [f"Run `{run}`, split `{split}`: train on some prompt categories, test on the held-out "
             f"ones (SPEC.md section 8.3). Held-out groups: {groups}."]
    sets = [(r.split.test_group, w, e) for r in results
            for w, e in (("ood", r.out_of_distribution), ("id", r.in_distribution))]
    written["metrics.csv"] = atomic_write_text(out / "metrics.csv", _csv(sets))
    written["metrics.json"] = atomic_write_json(out / "metrics.json", record)
    written["report.md"] = atomic_write_text(out / "report.md", _report_md("Out-of-distribution prompts", intro,
                                                                           record, headers))
    return written
