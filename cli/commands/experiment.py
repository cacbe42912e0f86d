"""``cscr experiment``: the generalisation experiments of SPEC.md section 8 on a prepared run.

    cscr experiment unseen-experts --run runs/routerbench [--seed 0]
    cscr experiment ood --run runs/mmlu --split stem          # RouteLLM MMLU: STEM -> the rest
    cscr experiment ood --run runs/llmrouter --split tasks    # LLMRouter: leave one task group out
    cscr experiment ood --run runs/routerbench --split categories   # leave one category out

unseen-experts trains on two thirds of the experts (cost-stratified, seeded) and routes over the
held-out third through their descriptors only (cscr/experiments/unseen.py); ood trains on some
prompt categories and tests on the others (cscr/experiments/ood.py). Both write report.md,
metrics.json, metrics.csv and deferral PNGs into ``<run>/experiments/<name>`` and list the
routers that could not take part, with the reason. CSCR is compared with the strongest other
router (paired bootstrap, McNemar) on every evaluation set that matters.

Descriptors come from the run's store (``--descriptor KIND``; by default the kind the run was
last trained with, else probe-outcome, which unseen-experts first computes from the probe split,
an explicit step written to the store: cscr.runs.descriptors.prepare_descriptors). CSCR trains
with the hyperparameters the run was last trained with (RUN/settings.json; one line says which),
with ``--seed`` and ``--epochs`` over them. For ood with probe-outcome descriptors they are
computed in memory from the training group's probe prompts only, so no held-out prompt is seen.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from cscr.config import EvalConfig, TrainConfig, asdict
from cscr.console import say
from cscr.errors import InputError
from cscr.runs.paths import RunPaths

UNSEEN_ROUTERS = "cscr,vanilla,umr,knn,pareto-random,thompson,random,oracle,parametric,softmax-gate,soft-moe"
OOD_ROUTERS = "cscr,vanilla,umr,knn,parametric,softmax-gate,soft-moe,thompson,pareto-random,random,oracle"
SPLITS = ("auto", "stem", "tasks", "categories")
MAX_CATEGORY_GROUPS = 20


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("experiment", help="generalisation experiments: unseen-experts, ood",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", required=True, help="run folder made by `cscr prepare`")
    common.add_argument("--seed", type=int, default=0, help="seed of the split, the training and random routers")
    common.add_argument("--descriptor", default=None, metavar="KIND",
                        help="descriptor kind from the run's store (default: the kind the run was last trained "
                             "with, else probe-outcome)")
    common.add_argument("--epochs", type=int, default=None,
                        help="CSCR training epochs (default: the run's last training's, else TrainConfig's)")
    common.add_argument("--lambdas", type=int, default=EvalConfig.n_lambdas, help="knob values per sweep")
    common.add_argument("--bootstrap", type=int, default=EvalConfig.bootstrap, help="paired bootstrap resamples")
    common.add_argument("--out", default=None, help="output folder (default: <run>/experiments/<name>)")

    u = sub.add_parser("unseen-experts", parents=[common], help="route over experts held out of training",
                       description="Train on two thirds of the experts, route over the held-out third.")
    u.add_argument("--routers", default=UNSEEN_ROUTERS, help=f"comma-separated (default: {UNSEEN_ROUTERS})")
    u.add_argument("--frac", type=float, default=1 / 3, help="fraction of experts held out (default 1/3)")
    u.add_argument("--unseen", default=None, metavar="E1,E2",
                   help="hold out exactly these experts (default: a cost-stratified draw)")
    u.add_argument("--newcomer-levels", choices=("on", "off"), default=None,
                   help="let the held-out experts be calibrated on their probe outcomes where the seen experts' "
                        "train and validation answers choose it (on), or never (off); default: the run's training "
                        "record (on)")
    u.set_defaults(func=run_unseen_cmd)

    o = sub.add_parser("ood", parents=[common], help="train on some prompt categories, test on the rest",
                       description="Out-of-distribution prompts: train on one group of categories, test on "
                                   "another. stem: RouteLLM MMLU STEM subjects -> the other subjects; tasks: "
                                   "LLMRouter task groups, each held out in turn; categories: each category "
                                   "held out in turn; auto: stem for MMLU subjects, tasks for LLMRouter "
                                   "task names, else categories.")
    o.add_argument("--routers", default=OOD_ROUTERS, help=f"comma-separated (default: {OOD_ROUTERS})")
    o.add_argument("--split", default="auto", choices=SPLITS, help="how to group categories (default: auto)")
    o.add_argument("--group", default=None, metavar="NAME", help="run only the split that holds out this group")
    o.add_argument("--guard", action="store_true",
                   help="also evaluate cscr+guard: the cscr head with the out-of-distribution guard (cscr guard) "
                        "searched inside the training groups only")
    o.add_argument("--far-share", type=float, default=None,
                   help="with --guard: the held-out groups' weight against the in-distribution validation rows "
                        "in the guard's search, in [0, 1] (default 0.5, as cscr guard)")
    o.set_defaults(func=run_ood_cmd)


# ---------------------------------------------------------------- shared

def _routers(spec: str) -> list[str]:
    from cscr.routers import RouterError, available_routers

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise InputError("--routers is empty")
    available = [n for n in available_routers() if n != "single"]
    for n in names:
        if n == "single" or n.startswith("single:"):
            raise InputError("single experts are always evaluated as points; leave 'single' out of --routers")
        if n not in available:
            raise RouterError(f"unknown router {n!r}; available: {', '.join(available)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"router(s) listed twice: {dup}")
    return names


def _configs(args: argparse.Namespace) -> tuple[TrainConfig, EvalConfig, str | None]:
    """(TrainConfig, EvalConfig, descriptor kind): the run's recorded training settings
    (cscr.runs.settings, said in one line) with --seed, --epochs and --descriptor over them."""
    from cscr.runs.settings import training_defaults

    given = {"seed"} | ({"epochs"} if args.epochs is not None else set())
    rec = training_defaults(args.run, kind=args.descriptor, kind_flag="--descriptor", given=given, log=say)
    train = dataclasses.replace(rec.train or TrainConfig(), seed=args.seed)
    if args.epochs is not None:
        train = dataclasses.replace(train, epochs=args.epochs)
    return train, EvalConfig(n_lambdas=args.lambdas, bootstrap=args.bootstrap, seed=args.seed), rec.descriptor_kind


def _load(args: argparse.Namespace, lexical: bool = True) -> tuple[RunPaths, Any, Any]:
    """The run's paths, table and prompt features (without its lexical view unless ``lexical``)."""
    from cscr.encoder import load_run_embeddings
    from cscr.runs.inputs import Run

    run = Run.of(args.run)
    return run.paths, run.table, load_run_embeddings(run.root, lexical=lexical)


def _compare_cscr(result: Any) -> None:
    """Significance of CSCR against the strongest other router (the oracle excluded), in place."""
    from cscr.eval.evaluate import compare_routers

    variants = [v for v in ("cscr", "cscr+guard") if v in result.routers]
    for v in variants:  # each against the strongest router that is not a cscr variant
        other = result.strongest_other(v, exclude=variants)
        if other is not None:
            result.significance.append(compare_routers(result, v, other))


def _settings(args: argparse.Namespace, routers: list[str], train: TrainConfig, ev: EvalConfig,
              kind: str, **extra: Any) -> dict[str, Any]:
    return {"routers": routers, "seed": args.seed, "descriptor_kind": kind, "train": asdict(train),
            "eval": asdict(ev), **extra}


def _finish(written: dict[str, Path]) -> int:
    print(written["report.md"].read_text())
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


# ---------------------------------------------------------------- unseen experts

def run_unseen_cmd(args: argparse.Namespace) -> int:
    from cscr.experiments.report import write_unseen
    from cscr.experiments.unseen import run_unseen, split_experts
    from cscr.runs.descriptors import prepare_descriptors, read_descriptors

    routers = _routers(args.routers)
    paths, table, emb = _load(args)
    train, ev, kind = _configs(args)
    if args.newcomer_levels is not None:
        train = dataclasses.replace(train, newcomer_levels=args.newcomer_levels == "on")
    if args.unseen:
        unseen = [s.strip() for s in args.unseen.split(",") if s.strip()]
        unknown = sorted(set(unseen) - set(table.expert_names))
        if unknown:
            raise InputError(f"--unseen: unknown expert(s) {unknown}; the pool has {table.expert_names}")
        seen = [n for n in table.expert_names if n not in unseen]
        unseen = [n for n in table.expert_names if n in unseen]
    else:
        seen, unseen = split_experts(table, args.frac, args.seed)
    say(f"unseen-experts: training on {len(seen)} experts, holding out {unseen}")
    kind = prepare_descriptors(paths, kind, table, say)
    desc, kind, basis = read_descriptors(paths, table.expert_names, kind)
    res = run_unseen(table, emb, routers, seen, unseen, train, ev, desc, args.seed, say)
    for name, why in res.excluded.items():
        say(f"unseen-experts: {name} cannot take part: {why}")
    _compare_cscr(res.evaluation)
    out = Path(args.out).expanduser() if args.out else paths.experiment("unseen-experts")
    settings = _settings(args, routers, train, ev, kind, basis_id=basis, frac_unseen=args.frac)
    return _finish(write_unseen(res, out, paths.root, settings))


# ---------------------------------------------------------------- out-of-distribution prompts

def resolve_split(split: str, categories: set[str]) -> str:
    """``auto`` -> stem (MMLU subjects), tasks (LLMRouter task names) or categories."""
    from cscr.experiments.ood import LLMROUTER_TASK_GROUPS, STEM_SUBJECTS, mmlu_subject

    if split != "auto":
        return split
    if any(mmlu_subject(c) in STEM_SUBJECTS for c in categories):
        return "stem"
    tasks = {c for cats in LLMROUTER_TASK_GROUPS.values() for c in cats}
    return "tasks" if categories <= tasks else "categories"


def ood_splits(table: Any, split: str, group: str | None = None) -> list[Any]:
    """The OODSplits of ``split`` for ``table`` (one clear error when its categories do not fit)."""
    from cscr.data.table import TableError
    from cscr.experiments.ood import leave_one_group_out, stem_vs_rest

    cats = {str(c) for c in table.categories if str(c).strip()}
    if not cats:
        raise InputError(f"the table ({table.source}) has no prompt categories: the ood experiment needs them "
                         "(prepare RouteLLM MMLU with `--option subset=mmlu`, or LLMRouter)")
    try:
        if split == "stem":
            splits = [stem_vs_rest(table)]
        elif split == "tasks":
            splits = leave_one_group_out(table)
        else:
            if len(cats) < 2:
                raise InputError(f"--split categories needs at least two categories; the table has {sorted(cats)}")
            if len(cats) > MAX_CATEGORY_GROUPS:
                raise InputError(f"--split categories would hold out {len(cats)} categories one at a time "
                                 f"(more than {MAX_CATEGORY_GROUPS}); use --split stem or tasks, or --group NAME")
            splits = leave_one_group_out(table, {c: [c] for c in sorted(cats)})
    except TableError as exc:
        shown = sorted(cats)[:8]
        raise InputError(f"--split {split} does not fit this table ({table.source}; categories "
                         f"{shown}{' ...' if len(cats) > 8 else ''}): {exc}") from exc
    if group is not None:
        names = [s.test_group for s in splits]
        splits = [s for s in splits if s.test_group == group]
        if not splits:
            raise InputError(f"--group {group!r}: no such held-out group for --split {split}; groups: {names}")
    return splits


def run_ood_cmd(args: argparse.Namespace) -> int:
    from cscr.experiments.ood import run_ood
    from cscr.experiments.report import slug, write_ood
    from cscr.guard import far_share_of
    from cscr.runs.descriptors import DEFAULT_KIND, read_descriptors

    routers = _routers(args.routers)
    if args.guard and "cscr" not in routers:
        raise InputError("--guard evaluates the cscr head with its guard: put cscr in --routers")
    if args.far_share is not None and not args.guard:
        raise InputError("--far-share weighs the guard's search: add --guard")
    far_share = far_share_of(args.far_share, "--far-share")
    paths, table, emb = _load(args, lexical=False)  # the run's lexical view, if any, is refitted per split
    train, ev, kind = _configs(args)
    split = resolve_split(args.split, {str(c) for c in table.categories if str(c).strip()})
    splits = ood_splits(table, split, args.group)
    kind = kind or DEFAULT_KIND
    desc, basis = None, "per split: probe prompts of the training group"
    if kind != DEFAULT_KIND:  # fingerprints from the store (their probe prompts may include any group)
        desc, kind, basis = read_descriptors(paths, table.expert_names, kind)
    from cscr.lexical import LexicalView, refit_features

    view = LexicalView.load(paths.embeddings)
    results = []
    for i, s in enumerate(splits, 1):
        say(f"ood[{split}] {i}/{len(splits)}: train on {s.train_group}, test on {s.test_group} ({s.counts})")
        # the run's lexical view saw every train prompt's text: refit it on this split's training rows
        e = refit_features(emb, table.texts, view, s.emb_rows[s.table.split_index("train")])
        res = run_ood(s, e, routers, train, ev, desc, args.seed, say, guard=args.guard, far_share=far_share)
        _compare_cscr(res.out_of_distribution)
        results.append(res)
    name = f"ood-{split}" if args.group is None else f"ood-{split}-{slug(args.group)}"
    out = Path(args.out).expanduser() if args.out else paths.experiment(name)
    settings = _settings(args, routers, train, ev, kind, basis_id=basis, split=split, group=args.group,
                         guard=args.guard, **({"far_share": far_share} if args.guard else {}))
    return _finish(write_ood(results, out, split, paths.root, settings))
