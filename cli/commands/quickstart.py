"""``cscr quickstart``: the main job. RouterBench end to end on an embedded local Ray cluster:

    prepare (table, splits, MiniLM embeddings)
      -> descriptors (perplexity fingerprints of the 11 experts from their recorded answers,
         scored by the packaged SmolLM2; ``--descriptor probe-outcome`` skips the scorer)
      -> train (CSCR and the vanilla ablation on Ray Train)
      -> evaluate (CSCR, vanilla and the baselines; deferral curves, AUDC / QNC / peak, and the
         paired bootstrap of CSCR against the strongest other router)

Data from ``--data-dir`` or ``CSCR_DATA_DIR``; with neither, the upstream RouterBench file is
downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

DEFAULT_ROUTERS = "cscr,vanilla,knn,umr,parametric,softmax-gate,soft-moe,thompson,pareto-random,random,oracle,single"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="RouterBench end to end: prepare, descriptors, train, evaluate",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder holding routerbench/ (default: $CSCR_DATA_DIR, else the Hub)")
    p.add_argument("--out", default="runs/quickstart", help="run folder")
    p.add_argument("--descriptor", choices=["perplexity", "probe-outcome"], default="perplexity",
                   help="expert descriptors to train with")
    p.add_argument("--epochs", type=int, default=None,
                   help="head epochs (default: cscr train's, the best on validation kept)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers and scorer-LM actors")
    p.add_argument("--routers", default=DEFAULT_ROUTERS, help="routers to evaluate")
    p.set_defaults(func=run)


def _pool_file() -> Path:
    import cscr

    path = Path(cscr.__file__).resolve().parents[1] / "examples" / "pools" / "routerbench.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: quickstart needs the repository's examples/ folder")
    return path


def run(args: argparse.Namespace) -> int:
    from cscr.cli import main as cscr_main

    data_dir = args.data_dir or os.environ.get("CSCR_DATA_DIR")
    t0 = time.perf_counter()
    steps: list[tuple[str, list[str]]] = []
    prepare = ["prepare", "--dataset", "routerbench", "--out", args.out]
    if data_dir:
        prepare += ["--data-dir", data_dir]
    steps.append(("prepare", prepare))
    if args.descriptor == "perplexity":
        steps.append(("descriptors", ["fingerprint", "--pool", str(_pool_file()), "--run", args.out,
                                      "--workers", str(args.workers)]))
    epochs = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    steps.append(("train", ["train", "--run", args.out, "--variant", "cscr,vanilla", "--workers", str(args.workers),
                            *epochs, "--descriptor-kind", args.descriptor]))
    steps.append(("evaluate", ["evaluate", "--run", args.out, "--routers", args.routers, "--compare", "cscr"]))
    for i, (name, argv) in enumerate(steps, 1):
        print(f"\n== quickstart {i}/{len(steps)}: {name} ({time.perf_counter() - t0:.0f}s so far)\n"
              f"   cscr {' '.join(argv)}", flush=True)
        rc = cscr_main(argv)
        if rc:
            print(f"quickstart: step {name!r} failed (exit {rc})", flush=True)
            return rc
    print(f"\nquickstart: done in {time.perf_counter() - t0:.0f}s; report in {Path(args.out) / 'eval' / 'report.md'}")
    return 0
