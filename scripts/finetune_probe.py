"""Nested cross-validation with fold-specific features: does fine-tuning the encoder change the order?

For fold k the features are the encoder fine-tuned without fold k's labels (scripts/finetune_device.py:
array ``fold<k>``); the run's own (frozen MiniLM) vectors are scored in the same run for reference. The
folds, the routers and the scoring are ``category_probe.py --nested``'s: fold k is scored, fold k+1 is
where every router makes its choices, the test split is removed first and never read. Rows: ``head``
(the CSCR default), ``parametric``, ``per-category`` (given the label; it reads no features),
``softcat`` and ``head+cat w=0.75`` (the head blended with the true category's table), and the
category accuracy of a softmax regression on the features
(``category_probe.fold_utilities``: one scoring for both scripts).

    python scripts/finetune_probe.py --run runs/llmr --features runs/evidence/finetune/llmr_ft0.npz,runs/evidence/finetune/llmr_ft1.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from category_probe import fold_utilities
    from foldcv import fold_table, make_folds, scored_rows, without_test

    from cscr.runs.inputs import Run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--features", required=True, help="comma-separated .npz files holding fold0 .. fold<K-1>")
    p.add_argument("--folds", type=int, default=5)
    a = p.parse_args(argv)

    run = Run.of(a.run)
    table, emb = run.table, run.embeddings
    ft: dict[str, np.ndarray] = {}
    for f in a.features.split(","):
        try:
            with np.load(f) as z:
                ft.update({k: z[k].astype(np.float32) for k in z.files})
        except (OSError, ValueError, AttributeError) as exc:  # missing, not an .npz, or a bare .npy
            print(f"finetune_probe: cannot read {f} as an .npz of features: {exc}", file=sys.stderr)
            return 2
    missing = [f"fold{k}" for k in range(a.folds) if f"fold{k}" not in ft]
    if missing:
        print(f"finetune_probe: the features hold no {', '.join(missing)} (found: {', '.join(sorted(ft)) or 'nothing'})",
              file=sys.stderr)
        return 2
    bad = [k for k, v in ft.items() if v.ndim != 2 or v.shape[0] != len(table.splits)]
    if bad:
        print(f"finetune_probe: {', '.join(bad)} have the wrong row count (the run has {len(table.splits)} prompts)",
              file=sys.stderr)
        return 2
    keep = np.flatnonzero(table.splits != "test")
    table, emb = without_test(table, emb)
    desc, kind, basis = run.trained_descriptors()
    cats = np.asarray(table.categories, dtype=str)
    pool, folds = make_folds(table, a.folds)
    res: dict[str, list[float]] = {}
    for k in range(a.folds):
        t0 = time.time()
        t = fold_table(table, pool, folds, k, nested=True)
        rows = scored_rows(t, True)
        for feat in ("frozen", "fine-tuned"):
            e = emb if feat == "frozen" else ft[f"fold{k}"][keep]
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            u, f = fold_utilities(t, e, rows, cats, desc, kind, basis)
            u["head+cat w=0.75"] = 0.25 * u["head"] + 0.75 * u["per-category"]
            res.setdefault(f"{feat} category accuracy", []).append(f.accuracy)
            for name, util in u.items():
                res.setdefault(f"{feat} {name}", []).append(f.audc(util))
        print(f"fold {k}: " + "  ".join(f"{n} {v[-1]:.4f}" for n, v in res.items() if n.endswith(("head", "parametric"))),
              f"{time.time() - t0:.0f} s", flush=True)
    for name, vals in res.items():
        print(f"{name:36s} {np.mean(vals):.4f}   {' '.join(f'{v:.4f}' for v in vals)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
