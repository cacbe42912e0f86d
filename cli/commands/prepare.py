"""``cscr prepare``: routing table (with splits) and prompt embeddings for one data set.

    cscr prepare --dataset routerbench --data-dir ../shared/data --out runs/routerbench
    cscr prepare --dataset routellm --option subset=mmlu --out runs/mmlu
    cscr prepare --dataset generic --option file=my_logs.jsonl --out runs/mine
    cscr prepare --dataset routerbench --out runs/rb --ray        # embeddings on Ray Data

The data directory comes from ``--data-dir`` or ``CSCR_DATA_DIR``; with neither, loaders that
know a Hub copy (routerbench, embedllm, mixinstruct) download it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from cscr.jobs.data_options import add_embed_ray_options, add_encoder_options, embed_config

from cscr.config import DataConfig, asdict
from cscr.runs.paths import RunPaths

if TYPE_CHECKING:
    from cscr.data.table import RoutingTable

DATASETS = ["routerbench", "llmrouter", "routellm", "embedllm", "mixinstruct", "routerarena", "generic"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("prepare", help="build a run's routing table, splits and prompt embeddings",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"data set: {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=None, help="folder with the source files (default: $CSCR_DATA_DIR; else the Hub)")
    p.add_argument("--out", required=True, help="run folder to write (e.g. runs/routerbench)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option, repeatable (routellm subset=mmlu|gsm8k|both, prices=FILE; "
                        "mixinstruct metric=bertscore; generic file=PATH|FOLDER, prices=FILE, clip_quality=true, "
                        "FIELD=dotted.path e.g. quality=evaluation_result.score; routerarena prices=FILE, "
                        "cost_source=tokens|recorded, clip_quality=true; llmrouter answer_tokens=128)")
    p.add_argument("--cost", choices=["usd", "params"], default="usd", help="cost unit where the source offers both")
    p.add_argument("--missing", choices=["mask", "drop"], default="mask", help="rows with an empty quality cell")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--probe-size", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    add_encoder_options(p)
    p.add_argument("--embedding-cache", default=None, metavar="DIR|off",
                   help="shared prompt-embedding cache (default: $CSCR_CACHE_DIR/embeddings or ~/.cache/cscr/embeddings)")
    p.add_argument("--lexical-dims", type=int, default=0, metavar="N",
                   help="a lexical view of each prompt (character n-gram TF-IDF, fitted on the train split, "
                        "SVD to N dims, e.g. 128) beside the encoder's vector, for a fixed pool: better routing "
                        "over the trained experts, worse over experts that join later; 0: none "
                        "(default: 0, off; cscr/lexical.py)")
    p.add_argument("--no-embed", action="store_true", help="write the table only")
    p.add_argument("--ray", action="store_true",
                   help="embed with Ray Data (jobs/embed.py; the shared cache is not used) with these options:")
    add_embed_ray_options(p.add_argument_group("--ray"))
    p.set_defaults(func=run)


def parse_options(items: list[str]) -> dict[str, str]:
    from cscr.errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def summary(table: RoutingTable) -> str:
    import numpy as np

    from cscr.data.table import SPLITS

    rows = ", ".join(f"{s} {int((table.splits == s).sum())}" for s in SPLITS)
    missing = int(np.isnan(table.quality).sum())
    lines = [
        f"source      {table.source}",
        f"prompts     {table.n} ({rows})",
        f"experts     {len(table.experts)}; cost unit {table.cost_unit}",
        f"missing     {missing} quality cells in {int(np.isnan(table.quality).any(axis=1).sum())} rows "
        f"(policy: {table.meta.get('missing_policy', '?')}; rows dropped: {table.meta.get('rows_dropped', 0)})",
    ]
    mean_q = np.nanmean(table.quality, axis=0) if table.n else np.zeros(len(table.experts))
    mean_c = table.cost.mean(axis=0)
    width = max(len(e.name) for e in table.experts)
    lines.append(f"  {'expert':<{width}}  {'quality':>7}  {'mean cost':>10}")
    for e, q, c in zip(table.experts, mean_q, mean_c, strict=True):
        lines.append(f"  {e.name:<{width}}  {q:7.3f}  {c:10.4g}")
    for key in ("cost_model", "cost_source", "quality_rule", "duplicate_sample_ids_note", "missing_cost_policy"):
        if key in table.meta:
            lines.append(f"note        {key}: {table.meta[key]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cscr.data import load_dataset

    if args.lexical_dims < 0:
        from cscr.errors import InputError

        raise InputError(f"--lexical-dims must be >= 0, got {args.lexical_dims}")
    t0 = time.perf_counter()
    data_dir = args.data_dir or os.environ.get("CSCR_DATA_DIR") or None
    cfg = DataConfig(dataset=args.dataset, data_dir=data_dir, val_fraction=args.val_fraction,
                     probe_size=args.probe_size, seed=args.seed, cost=args.cost, missing=args.missing)
    table = load_dataset(args.dataset, cfg, **parse_options(args.option))
    paths = RunPaths.of(args.out)
    table.save(paths.table)
    from cscr.runs.settings import record_settings

    # the run's settings record; the embedding manifest records the encoder
    record_settings(paths, "prepare", {**asdict(cfg), "options": parse_options(args.option)})
    t_table = time.perf_counter() - t0
    print(f"cscr prepare: {args.dataset} -> {paths.root}")
    print(summary(table))
    print(f"table       {paths.table} ({t_table:.1f}s)")
    if args.no_embed:
        return 0
    t1 = time.perf_counter()
    job = embed_config(args, run=str(paths.root))
    enc_cfg = job.encoder
    if args.ray:
        from cscr.jobs.embed import run as embed_job

        emb = embed_job(job, table).vectors
    else:
        from cscr.encoder import embed_table, get_encoder

        shared = {None: True, "off": False}.get(args.embedding_cache, args.embedding_cache)
        emb = embed_table(table, get_encoder(enc_cfg), paths.embeddings, shared=shared)
    print(f"embeddings  {paths.embeddings} ({emb.shape[0]} x {emb.shape[1]}, long prompts: {enc_cfg.long_prompt}, "
          f"backend: {enc_cfg.backend}, {time.perf_counter() - t1:.1f}s)")
    from cscr.lexical import LexicalConfig, fit_for_table

    t2 = time.perf_counter()
    view = fit_for_table(table, paths.embeddings, LexicalConfig(dims=args.lexical_dims))
    if view is not None:
        print(f"lexical     {view.dims} dims from {len(view.vocabulary)} character n-grams of the "
              f"{view.fitted_on} train prompts (appended to every router's prompt features; "
              f"{time.perf_counter() - t2:.1f}s)")
    else:
        print("lexical     none" + (" (--lexical-dims 0)" if args.lexical_dims == 0 else
                                     " (too few train prompts for a lexical view)"))
    from cscr.encoder import distinctness, distinctness_warning

    dist = distinctness(table.texts, emb)
    print(f"distinct    {dist.line()}")
    warning = distinctness_warning(dist, enc_cfg.long_prompt)
    if warning:
        print(warning, file=sys.stderr)
    print(f"total       {time.perf_counter() - t0:.1f}s")
    sys.stdout.flush()
    return 0
