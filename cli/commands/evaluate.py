"""``cscr evaluate``: fit routers on a prepared run and evaluate them on its test split.

    cscr evaluate --run runs/routerbench --routers oracle,random,pareto-random,knn,single
    cscr evaluate --run runs/routerbench --routers cscr,vanilla,knn,pareto-random,oracle --compare cscr

Router names: any registered router (``cscr evaluate --list``); ``single`` expands to one
router per expert (each a single point), ``single:NAME`` is one expert; ``cscr@KIND`` (or
``vanilla@KIND``) is the head trained with descriptor kind KIND (``cscr train --descriptor-kind
KIND`` keeps one per kind), so descriptor kinds are compared on the same run; ``cscr+category`` is
the ``cscr`` head handed each prompt's category from the table, as ``per-category`` is. Every router is
loaded with ``cscr.runs.loader.load_router``, as ``cscr serve`` loads it. Prints AUDC / QNC /
peak per router and writes report.md, metrics.json, metrics.csv and deferral.png into
``<run>/eval`` (or ``--out``). ``--compare NAME`` adds the paired bootstrap (delta AUDC, 95%
interval, one-sided p) and McNemar's exact test at a matched budget of NAME against the
strongest other router (by AUDC, the oracle excluded), printed under the table. Each trained head
evaluated is named above the table: its folder, descriptor kind and basis, k, when it was trained,
its best epoch and validation AUDC.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cscr.config import EvalConfig
from cscr.console import say
from cscr.errors import InputError

DEFAULT_ROUTERS = "oracle,random,pareto-random,per-category,knn,single"
TRAINED_HEADS = ("cscr", "vanilla")  # routers that load models/<variant>[@<kind>]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate routers on a run's test split (AUDC, QNC, peak)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=False, help="run folder made by `cscr prepare` (e.g. runs/routerbench)")
    p.add_argument("--routers", default=DEFAULT_ROUTERS, help=f"comma-separated router names (default: {DEFAULT_ROUTERS})")
    p.add_argument("--compare", default=None, metavar="ROUTER",
                   help="significance of ROUTER against the strongest other router (not the oracle)")
    p.add_argument("--budget", type=float, default=None,
                   help="matched budget (mean cost) for McNemar (default: the best single expert's mean test cost)")
    p.add_argument("--candidates", default=None, metavar="E1,E2,...",
                   help="route among these experts only (default: the whole pool)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="rows to evaluate on")
    p.add_argument("--lambdas", type=int, default=EvalConfig.n_lambdas, help="knob values per sweep")
    p.add_argument("--bootstrap", type=int, default=EvalConfig.bootstrap, help="paired bootstrap resamples")
    p.add_argument("--seed", type=int, default=EvalConfig.seed, help="seed of random routers and the bootstrap")
    p.add_argument("--binarize-at", type=float, default=EvalConfig.binarize_at,
                   help="correctness threshold on quality for McNemar")
    p.add_argument("--out", default=None, help="report folder (default: <run>/eval)")
    p.add_argument("--list", action="store_true", help="list the available routers and exit")
    p.add_argument("--log-cost", action="store_true", help="deferral plot with a logarithmic cost axis")
    p.set_defaults(func=run)


def parse_routers(spec: str, expert_names: list[str], available: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """[(display name, variant for ``load_router``, router kwargs)] from ``a,b,cscr@KIND,single,single:NAME``;
    clear errors."""
    from cscr.routers.base import RouterError

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise InputError("--routers is empty")
    out: list[tuple[str, str, dict[str, Any]]] = []
    for name in names:
        base, _, arg = name.partition(":")
        head_of, at, kind = base.partition("@")  # cscr@KIND: the head trained with that kind
        if at and (head_of not in TRAINED_HEADS or not kind):
            raise RouterError(f"{name!r}: '@KIND' goes with {' or '.join(TRAINED_HEADS)} "
                              "(e.g. cscr@perplexity: the head trained with perplexity descriptors)")
        if head_of not in available:
            raise RouterError(f"unknown router {base!r}; available: {', '.join(available)}")
        if base == "single":
            experts = [arg] if arg else expert_names
            for e in experts:
                if e not in expert_names:
                    raise RouterError(f"single: unknown expert {e!r}; the pool has {expert_names}")
                out.append((f"single:{e}", "single", {"expert": e}))
        elif arg:
            raise RouterError(f"router {base!r} takes no ':' argument (got {name!r})")
        elif at:
            out.append((base, base, {}))
        else:
            out.append((base, base, {}))
    displays = [d for d, _, _ in out]
    dup = sorted({d for d in displays if displays.count(d) > 1})
    if dup:
        raise InputError(f"router(s) listed twice: {dup}")
    return out


def head_lines(paths: Any, variants: list[str], log: Any = say) -> list[str]:
    """One line per trained head among ``variants`` (which head is evaluated); a line on stderr
    for a plain ``cscr`` / ``vanilla`` head trained with another descriptor kind than the run's
    last training (cscr.runs.settings)."""
    from cscr.runs.settings import head_config, head_line, recorded_training

    heads = [v for v in variants if v.partition("@")[0] in TRAINED_HEADS]
    if not heads:
        return []
    rec = recorded_training(paths)
    for v in heads:
        kind = (head_config(paths, v) or {}).get("descriptor_kind")
        if "@" not in v and rec is not None and rec.descriptor_kind and kind and kind != rec.descriptor_kind:
            log(f"cscr: note: {v} was trained with {kind!r} descriptors, the run's last training "
                f"({rec.source.name}) with {rec.descriptor_kind!r}: `--routers {v}@{rec.descriptor_kind}` "
                "evaluates that one")
    return [line for line in (head_line(paths, v) for v in heads) if line]


def run(args: argparse.Namespace) -> int:
    from cscr.routers import available_routers
    from cscr.routers.cscr import GivenCategoryRouter
    from cscr.runs.inputs import Run
    from cscr.runs.loader import load_router

    available = available_routers()
    if args.list:
        print("\n".join(available))
        return 0
    if not args.run:
        raise InputError("--run is required (a folder made by `cscr prepare`)")
    cfg = EvalConfig(n_lambdas=args.lambdas, bootstrap=args.bootstrap, seed=args.seed, binarize_at=args.binarize_at)
    folder = Run.of(args.run)
    paths = folder.paths
    table = folder.table
    candidates = None
    if args.candidates:
        candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
        unknown = sorted(set(candidates) - set(table.expert_names))
        if unknown or not candidates:
            raise InputError(f"--candidates: unknown expert(s) {unknown}; the pool has {table.expert_names}")
    specs = parse_routers(args.routers, candidates or table.expert_names, available)
    if args.compare is not None and args.compare not in [d for d, _, _ in specs]:
        raise InputError(f"--compare {args.compare!r} is not among --routers ({', '.join(d for d, _, _ in specs)})")
    emb = folder.embeddings
    rows = table.split_index(args.split)
    if len(rows) == 0:
        raise InputError(f"{paths.root}: the table has no {args.split} prompts")

    routers = {}
    for display, variant, kwargs in specs:
        t0 = time.perf_counter()
        routers[display] = load_router(folder, variant, seed=cfg.seed, **kwargs)
        say(f"evaluate: fitted {display} ({time.perf_counter() - t0:.1f}s)")
    heads = head_lines(paths, [v for _, v, _ in specs])
    heads += [f"{d}: the cscr head handed each prompt's category from the table, as per-category is "
              f"(evaluation only); category prior w = {r.w:g}, chosen on the validation split"
              for d, r in routers.items() if isinstance(r, GivenCategoryRouter)]

    from cscr.eval.evaluate import evaluate_routers
    from cscr.eval.report import format_header, format_table, write_report

    t0 = time.perf_counter()
    result = evaluate_routers(routers, table, emb, rows, cfg, compare=args.compare, budget=args.budget,
                              candidates=candidates)
    say(f"evaluate: swept {len(routers)} routers over {len(result.rows)} {args.split} prompts "
         f"({time.perf_counter() - t0:.1f}s)")
    out_dir = Path(args.out).expanduser() if args.out else paths.eval
    written = write_report(result, out_dir, title=f"Deferral curves: {paths.root.name} ({args.split} split, "
                           f"{len(result.rows)} prompts)", log_cost=args.log_cost)
    print(format_header(result))
    for line in heads:
        print(line)
    print()
    print(format_table(result))
    for s in result.significance:
        print()
        print(s.line())
    print()
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0
