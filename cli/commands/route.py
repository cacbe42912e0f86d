"""``cscr route``: one routing decision offline, from a budget, a quality target or a raw knob.

    cscr route --run runs/routerbench "Write a haiku about routers"
    cscr route --run runs/routerbench --budget 0.0005 "What is 17 * 23?"
    cscr route --run runs/routerbench --quality-target 0.95x --max-cost 0.001 "Prove that ..."
    cscr route --run runs/llmrouter --category gsm8k "Tom has 3 apples ..."

The prompt is embedded with the run's encoder (the model and long-prompt mode its embedding
manifest records, as serving does) and ranked by the run's router (``--variant``). ``--budget``
(expected mean cost per request, run's unit) and ``--quality-target`` (absolute, or ``0.95x``
the best single expert's quality) choose lambda from the run's operating-point table
(``cscr calibrate``; computed and stored first when missing); ``--cost-weight`` sets lambda
itself. ``--max-cost`` is a hard cap per request: experts whose mean cost per request (train
split, run's unit) is above it are not considered, and the expected figures are recomputed for
the experts that remain. ``--category`` gives the prompt's category (a category of the run's train
split): the head's category prior blends that category's quality row instead of the category it
reads from the prompt, at the weight ``cscr train`` chose for given categories (a router without a
prior refuses it). Prints the ranked decision (expert, utility, score) and the chosen
lambda with its expected cost and quality.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "route one prompt offline: ranked experts at a budget, quality target or cost weight"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("route", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the prompt to route")
    p.add_argument("--run", required=True, help="run folder made by `cscr prepare` (and `cscr train` for cscr)")
    p.add_argument("--variant", default="cscr", help="router: cscr, vanilla, cscr@KIND or a registered router")
    p.add_argument("--budget", type=float, default=None, metavar="COST",
                   help="expected mean cost per request, in the run's unit (USD or params)")
    p.add_argument("--quality-target", default=None, metavar="Q", help="expected quality: 0.7, or 0.95x the best expert")
    p.add_argument("--cost-weight", type=float, default=None, metavar="LAMBDA", help="the raw cost knob lambda")
    p.add_argument("--max-cost", type=float, default=None, metavar="COST",
                   help="hard cap: only experts whose mean cost per request is at most COST")
    p.add_argument("--category", default=None, metavar="NAME",
                   help="the prompt's category, when known (one of the run's train categories)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from cscr.errors import InputError
    from cscr.operating import OperatingTable, at_cost_weight, choose
    from cscr.operating_run import calibrate, table_path
    from cscr.runs.inputs import Run
    from cscr.runs.loader import load_router

    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    folder = Run.of(args.run)
    router = load_router(folder, args.variant)
    categories = None if args.category is None else [args.category]
    router.check_categories(categories)  # before the operating points and the encoder
    t = folder.table
    train = t.split_index("train")
    mean_cost = dict(zip(t.expert_names, t.cost[train].mean(axis=0).tolist(), strict=True))
    candidates = None
    if args.max_cost is not None:
        if not np.isfinite(args.max_cost) or args.max_cost < 0:
            raise InputError(f"--max-cost must be a finite number >= 0, got {args.max_cost}")
        allowed = [n for n in router.expert_names if mean_cost.get(n, np.inf) <= args.max_cost]
        if not allowed:
            cheapest = min(router.expert_names, key=lambda n: mean_cost.get(n, np.inf))
            raise InputError(f"no expert costs at most --max-cost {args.max_cost} {t.cost_unit} per request; the "
                             f"cheapest is {cheapest} at {mean_cost[cheapest]:.6g}")
        candidates = None if len(allowed) == len(router.expert_names) else allowed
    path = table_path(folder, args.variant)
    if candidates is not None:  # the stored table covers the whole pool: recompute for the candidates
        table = calibrate(folder, args.variant, router, candidates=candidates, save=False)
    elif path.exists() and list(OperatingTable.load(path).expert_names) == list(router.expert_names):
        table = OperatingTable.load(path)
    else:
        print(f"route: no operating-point table for {args.variant} at {path}: computing it", file=sys.stderr)
        table = calibrate(folder, args.variant, router)
    point = choose(table, args.budget, args.quality_target, args.cost_weight) or at_cost_weight(table, 0.0)

    from cscr.encoder import Encoder

    emb = np.asarray(Encoder.from_run(folder.root).encode([args.prompt]), dtype=np.float32)
    ranked = router.rank(emb, point.lam, candidates, categories=categories)[0]
    asked = ("budget" if args.budget is not None else "") + \
        (" quality-target" if args.quality_target is not None else "") + \
        ("cost-weight" if args.cost_weight is not None else "")
    print(f"lambda {point.lam:.6g} ({asked.strip() or 'default'}): expected cost {point.cost:.6g} {t.cost_unit} per "
          f"request, expected quality {point.quality:.4f} (on {table.n_prompts} {table.split} prompts)")
    if candidates is not None:
        print(f"max-cost {args.max_cost}: routing among {', '.join(candidates)}")
    if categories is not None:
        print(f"category {args.category!r}, as given (the expected figures above are the router's, without hints)")
    print(f"\n{'rank':>4}  {'expert':<32} {'utility':>9} {'score':>9} {'mean cost':>11}")
    for k, r in enumerate(ranked, 1):
        u = "-" if r.utility is None else f"{r.utility:.4f}"
        s = "-" if r.score is None else f"{r.score:.4f}"
        print(f"{k:>4}  {r.expert:<32} {u:>9} {s:>9} {mean_cost.get(r.expert, float('nan')):>11.5g}")
    print(f"\nchoice: {ranked[0].expert}")
    return 0
