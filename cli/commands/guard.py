"""``cscr guard --run RUN``: choose and attach the out-of-distribution guard of a trained head.

    cscr guard --run runs/rb                  # search (w, gate), write RUN/models/cscr/guard/
    cscr guard --run runs/rb --show           # what the run's guard is, if any
    cscr guard --run runs/rb --off            # remove it

The guard (cscr/guard.py; beyond the write-up, labelled so) shrinks the head's expected quality
towards each expert's mean train quality on prompts far from the training prompts. Its weight w and
gate are chosen by nested leave-one-group-out over the prompt categories of the train, val and
probe rows (heads retrained with the run's training configuration, category prior included; the test
split is never read), weighing the held-out groups' AUDC against the in-distribution validation
rows' (--far-share, default 0.5: the share of far-off traffic the operator expects); w = 0 wins when
no shrink pays for itself, and then no guard is written. LLMRouter task
names are grouped as the ood experiment groups them; more than --max-groups categories are dealt
into that many groups. Once written, every consumer of the run's router (``cscr evaluate``,
``cscr route``, ``cscr serve``) routes through it, and the operating-point table that turns budgets
and quality targets into the knob is rewritten for it (also on --off); retraining the head removes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

HELP = "choose and attach the out-of-distribution guard of a trained head (nested leave-one-group-out)"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("guard", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder with a trained head (`cscr train`)")
    p.add_argument("--variant", default="cscr", help="trained head: cscr or vanilla (default cscr)")
    p.add_argument("--seed", type=int, default=None, help="training seed of the search's heads (default: the head's)")
    p.add_argument("--max-groups", type=int, default=8, help="most held-out groups in the search (default 8)")
    p.add_argument("--far-share", type=float, default=None,
                   help="weight of the held-out groups against the in-distribution validation rows in the "
                        "choice, in [0, 1]: the share of far-off traffic expected (default 0.5; 1: held-out "
                        "groups alone)")
    p.add_argument("--show", action="store_true", help="print the run's guard and exit")
    p.add_argument("--off", action="store_true", help="remove the run's guard")
    p.set_defaults(func=run)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from cscr.errors import InputError
    from cscr.experiments.ood import search_guard
    from cscr.guard import Guard, far_share_of, load_guard, remove_guard, save_guard
    from cscr.runs.descriptors import DEFAULT_KIND, read_descriptors
    from cscr.runs.heads import load_trained
    from cscr.runs.inputs import Run

    if args.max_groups < 2:
        raise InputError(f"--max-groups must be at least 2, got {args.max_groups}")
    far_share = far_share_of(args.far_share, "--far-share")
    run_ = Run.of(args.run)
    folder = run_.paths.model(args.variant)
    if args.show or args.off:
        if args.off:
            if remove_guard(folder):
                print(f"removed the guard in {folder}")
                _recalibrate(run_, args.variant)
            else:
                print(f"no guard in {folder}")
            return 0
        guard = load_guard(folder)
        if guard is None:
            print(f"no guard in {folder} (run `cscr guard --run {run_.paths.root}`)")
        else:
            rec = guard.record()
            rec.pop("search", None)
            print(json.dumps(rec, indent=1))
        return 0
    trained = load_trained(run_.paths, args.variant)
    cfg = trained.config if args.seed is None else dataclasses.replace(trained.config, seed=args.seed)
    table, emb = run_.table, run_.embeddings
    desc = None
    kind = trained.descriptor_kind or DEFAULT_KIND
    if kind != DEFAULT_KIND:  # fingerprints from the store; probe-outcome ones come from each split's probes
        desc, kind, _ = read_descriptors(run_.paths, table.expert_names, kind)
    say(f"guard search on {run_.paths.root} ({args.variant}, {kind} descriptors, seed {cfg.seed}): each group "
        f"of categories held out in turn; the test split is not read")
    search = search_guard(table, emb, cfg, args.variant, desc, max_groups=args.max_groups, log=say,
                          far_share=far_share)
    print(f"mean AUDC, held-out groups ({len(search.per_group)}: {', '.join(search.per_group)}) and in "
          f"distribution; * = chosen (weights {far_share:g} and {1 - far_share:g})\n{search.table()}")
    if search.w <= 0.0:
        removed = remove_guard(folder)
        print(f"no shrink paid for itself (w = 0 chosen): no guard written"
              f"{'; the previous guard was removed' if removed else ''}")
        if removed:
            _recalibrate(run_, args.variant)
        return 0
    guard = Guard.fit(table, emb, search.w, search.gate, search=search.record())
    out = save_guard(folder, guard)
    print(f"guard: w = {guard.w}, gate = {guard.gate} (about {guard.gate:.0%} of training prompts count as far) "
          f"-> {out}")
    _recalibrate(run_, args.variant)
    return 0


def _recalibrate(run: Any, variant: str) -> None:
    """The operating-point table (budgets, quality targets -> lambda) belongs to the router as it
    routes now: rewrite it, as `cscr train` does after saving a head."""
    from cscr.operating_run import calibrate_after_training

    calibrate_after_training(run, variant, log=say)

