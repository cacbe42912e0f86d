"""``cscr calibrate``: the operating-point table of a run's router (what each cost knob value
costs and earns on validation prompts), printed, stored and plotted.

    cscr calibrate --run runs/routerbench                       # models/cscr/operating_points.json + .png
    cscr calibrate --run runs/routerbench --budget 0.0005 --quality-target 0.95x --log-cost
    cscr calibrate --run runs/routerbench --variant knn --verify   # promised vs realised on test prompts

The table (cscr.operating) holds, per knob value lambda of a dense grid, the expected mean cost
per request in the run's unit (USD or parameters), the expected quality and each expert's share
of requests; ``cscr route --budget`` / ``--quality-target`` and serving pick lambda from it.
``--budget`` / ``--quality-target`` (repeatable) mark the points they choose on the plot.
``--verify`` routes the test prompts at each chosen lambda for budgets and targets across the
range and prints promised vs realised with their tolerance (also written beside the table as
operating_check.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cscr.operating import OperatingPoint, OperatingTable

HELP = "operating points of a run's router: cost and quality per knob value (table + plot)"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("calibrate", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder made by `cscr prepare` (and `cscr train` for cscr)")
    p.add_argument("--variant", default="cscr", help="router: a trained head (cscr, vanilla, cscr@KIND) or any "
                   "registered router (knn, per-category, ...); default cscr")
    p.add_argument("--split", default="val", choices=["val", "train", "probe", "test"],
                   help="prompts the points are measured on (default val)")
    p.add_argument("--lambdas", type=int, default=400, help="most knob values in the grid (default 400)")
    p.add_argument("--rows", type=int, default=15, help="rows of the printed table (default 15)")
    p.add_argument("--budget", type=float, action="append", default=[], metavar="COST",
                   help="mark the point this budget (mean cost per request, run's unit) chooses; repeatable")
    p.add_argument("--quality-target", action="append", default=[], metavar="Q",
                   help="mark the point this target (0.7, or 0.95x the best expert) chooses; repeatable")
    p.add_argument("--log-cost", action="store_true", help="plot with a logarithmic cost axis")
    p.add_argument("--verify", action="store_true", help="check the promises on the test split")
    p.add_argument("--out", default=None, help="table path (default <run>/models/<variant>/operating_points.json)")
    p.set_defaults(func=run)


def marks(table: OperatingTable, budgets: list[float], targets: list[str]) -> list[tuple[str, OperatingPoint]]:
    """(label, chosen point) for each budget and target (OperatingPointError when unreachable)."""
    from cscr.operating import for_budget, for_quality

    return ([(f"budget {b:.4g}", for_budget(table, b)) for b in budgets]
            + [(f"quality {t}", for_quality(table, t)) for t in targets])


def format_table(table: OperatingTable, n_rows: int = 15) -> str:
    """The compact view: about ``n_rows`` efficient points across the cost range."""
    from cscr.operating import compact_rows

    r = table.reachable()
    head = (f"operating points of {table.variant} on {table.n_prompts} {table.split} prompts "
            f"({table.n_dropped} dropped for a missing quality cell), {len(table.lambdas)} knob values, "
            f"{int(table.efficient.sum())} efficient; cost in {table.cost_unit} per request\n"
            f"best single expert {r['best_expert']}: quality {r['best_expert_quality']:.4f} at "
            f"{float(table.expert_cost[list(table.expert_names).index(r['best_expert'])]):.6g}")
    lines = [head, "", f"{'lambda':>10}  {'cost':>11}  {'quality':>7}  traffic (top experts)"]
    for i in compact_rows(table, n_rows):
        p = table.point(i)
        top = sorted(p.share.items(), key=lambda kv: -kv[1])[:3]
        shares = ", ".join(f"{n} {s:.0%}" for n, s in top)
        lines.append(f"{p.lam:>10.4g}  {p.cost:>11.5g}  {p.quality:>7.4f}  {shares}")
    for name, note in table.estimated.items():
        lines.append(f"(estimated: {name}: {note})")
    return "\n".join(lines)


def plot_table(table: OperatingTable, path: str | os.PathLike[str], marked: list[tuple[str, OperatingPoint]],
               log_cost: bool = False, title: str | None = None) -> Path:
    """Cost vs quality: every grid point, the efficient envelope, the single experts and the
    ``marked`` points; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cscr.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(9, 5.5))
    try:
        env = table.envelope
        ax.scatter(table.cost, table.quality, s=8, color="0.7", label=f"knob grid ({len(table.lambdas)} values)")
        ax.plot(table.cost[env], table.quality[env], "-o", ms=3, color="tab:blue", label="efficient points")
        ax.scatter(table.expert_cost, table.expert_quality, color="black", marker="s", s=22, label="single experts")
        for n, c, q in zip(table.expert_names, table.expert_cost, table.expert_quality, strict=True):
            ax.annotate(n, (c, q), fontsize=7, xytext=(3, -9), textcoords="offset points")
        for k, (label, p) in enumerate(marked):
            ax.scatter([p.cost], [p.quality], marker="*", s=180, color=f"C{(k % 8) + 1}", zorder=5,
                       label=f"{label}: lambda {p.lam:.3g}, cost {p.cost:.3g}, Q {p.quality:.3f}")
        if log_cost and (table.cost > 0).all() and (table.expert_cost > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(f"expected mean cost per request ({table.cost_unit})")
        ax.set_ylabel("expected mean quality")
        ax.set_title(title or f"Operating points: {table.variant}, {table.n_prompts} {table.split} prompts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from cscr.atomic import atomic_write_text
    from cscr.errors import InputError
    from cscr.operating_run import calibrate, checks_markdown, table_path, verify_run
    from cscr.runs.inputs import Run
    from cscr.runs.loader import load_router

    if args.lambdas < 2 or args.rows < 2:
        raise InputError(f"--lambdas and --rows must be >= 2, got {args.lambdas} and {args.rows}")
    folder = Run.of(args.run)
    router = load_router(folder, args.variant)
    out = Path(args.out).expanduser() if args.out else table_path(folder, args.variant)
    table = calibrate(folder, args.variant, router, split=args.split, n_lambdas=args.lambdas, save=False)
    chosen = marks(table, args.budget, args.quality_target)  # unreachable requests fail before any write
    table.save(out)
    png = plot_table(table, out.with_suffix(".png"), chosen, log_cost=args.log_cost)
    print(format_table(table, args.rows))
    for label, p in chosen:
        shares = ", ".join(f"{n} {s:.0%}" for n, s in sorted(p.share.items(), key=lambda kv: -kv[1])[:3])
        print(f"{label}: lambda {p.lam:.4g}, expected cost {p.cost:.5g} {table.cost_unit}, "
              f"expected quality {p.quality:.4f} ({shares})")
    written = [out, png]
    if args.verify:
        checks = verify_run(folder, table, router)
        text = checks_markdown(checks, table.cost_unit)
        print(f"\npromised ({table.split}, {table.n_prompts} prompts) vs realised (test split):\n{text}")
        written.append(atomic_write_text(out.with_name("operating_check.md"), text + "\n"))
    print(f"\nwrote {', '.join(str(w) for w in written)}", file=sys.stdout)
    return 0
