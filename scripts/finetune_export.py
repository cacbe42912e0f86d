"""Export a run for fine-tuning its encoder off this machine (issue 10: the encoder-fine-tuning probe).

Writes one compressed ``.npz``: the run's prompts cut into pieces exactly as the run's encoder cuts them
(``Encoder.pieces``: the long-prompt mode; unique pieces tokenised with the model's tokenizer), each
expert's quality, each prompt's category and split, the nested cross-validation fold of every train +
val row (scripts/foldcv.py: the same folds as ``category_probe.py --nested``; -1 for the test rows), and
the encoder's first 64 vectors of the run (without a lexical view: the device checks it reproduces them
before fine-tuning).
``scripts/finetune_device.py`` reads it beside a copy of the encoder's weights; ``scripts/finetune_probe.py``
scores what comes back. ``--weights DIR`` also writes the encoder's transformers files there, its
weights as float16 (half the bytes: a device call carries at most 64 MiB). The file also holds, per
variant (each fold, and ``full``: the train split), the CSCR head's training arrays as ``cscr train``
builds them (``prepare_arrays`` on that variant's training rows: positives, observed cells, the
smoothed BCE targets, the descriptors and the costs), for ``finetune_device.py --objective cscr``.

    python scripts/finetune_export.py --run runs/llmr --out .gpu_ft/llmr.npz --weights .gpu_ft/minilm
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}  # anything else (probe rows): 3
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def write_weights(model_dir: str, out: str) -> None:
    """The transformers folder ``model_dir`` copied to ``out`` with ``model.safetensors`` in float16 (written
    atomically: an existing ``out`` is replaced whole)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cscr.atomic import atomic_dir

    def fill(tmp) -> None:
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        save_file({k: v.half().contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        for name in MODEL_FILES:
            if os.path.exists(os.path.join(model_dir, name)):
                shutil.copy(os.path.join(model_dir, name), os.path.join(tmp, name))

    atomic_dir(out, fill)


def fold_ids(table, emb, k: int = 5) -> np.ndarray:
    """(n,) the nested-CV fold of each train + val row of ``table`` (-1: test and probe rows), as
    ``category_probe.py --nested`` cuts them (the folds of the table without its test rows)."""
    from foldcv import make_folds, without_test

    keep = np.flatnonzero(table.splits != "test")
    _, folds = make_folds(without_test(table, emb)[0], k)
    fold = np.full(len(table.splits), -1, dtype=np.int64)
    for i, f in enumerate(folds):
        fold[keep[f]] = i
    return fold


def cscr_arrays(run, table, emb, k: int) -> dict[str, np.ndarray]:
    """Per variant ``v`` (``fold<i>``: the nested layout of fold i; ``full``: the table as it is), the
    default head's training arrays: ``v__rows`` (the training rows, indices into ``table``),
    ``v__positives``, ``v__observed``, ``v__targets`` (the BCE targets, category-smoothed as in
    training), ``v__descriptors`` and ``v__costs``."""
    from foldcv import fold_table, make_folds, without_test

    from cscr.config import TrainConfig
    from cscr.training.arrays import prepare_arrays
    from cscr.training.loop import bce_targets

    cfg = TrainConfig()
    desc, kind, basis = run.trained_descriptors()
    keep = np.flatnonzero(table.splits != "test")
    t2, e2 = without_test(table, emb)
    pool, folds = make_folds(t2, k)
    layouts = [(f"fold{i}", fold_table(t2, pool, folds, i, nested=True), e2, keep) for i in range(k)]
    layouts.append(("full", table, emb, np.arange(len(table.splits))))
    out: dict[str, np.ndarray] = {}
    for name, t, e, back in layouts:
        arrays = prepare_arrays(t, e, desc, cfg.loss.tolerance, kind, basis)
        train = t.split_index("train")
        observed_any = ~np.isnan(t.quality[train]).all(axis=1)  # prepare_arrays keeps these rows
        out[f"{name}__rows"] = back[train[observed_any]]
        out[f"{name}__positives"] = arrays.positives
        out[f"{name}__observed"] = arrays.observed
        out[f"{name}__targets"] = bce_targets(arrays, cfg.loss.category_smoothing)
        out[f"{name}__descriptors"] = arrays.descriptors
        out[f"{name}__costs"] = arrays.costs.astype(np.float32)
        if len(out[f"{name}__rows"]) != arrays.n:
            raise RuntimeError(f"{name}: {len(out[f'{name}__rows'])} rows against {arrays.n} training arrays")
    return out


def main(argv: list[str] | None = None) -> int:
    from cscr.encoder import encoder_config_for_run, get_encoder, load_run_embeddings
    from cscr.runs.inputs import Run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--weights", default=None, help="also write the encoder's files here (weights in float16)")
    a = p.parse_args(argv)
    try:
        run = Run.of(a.run)
        table, emb = run.table, run.embeddings
    except (FileNotFoundError, ValueError) as exc:
        print(f"finetune_export: {exc}", file=sys.stderr)
        return 2
    enc = get_encoder(encoder_config_for_run(run.root))
    if a.weights:
        from cscr.encoder import _model_ref

        model_dir = _model_ref(enc.cfg)[0]
        if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
            print(f"finetune_export: --weights needs a local model folder with model.safetensors, not {model_dir}",
                  file=sys.stderr)
            return 2
        write_weights(model_dir, a.weights)
    pieces = enc.pieces(list(table.texts))
    uniq = list(dict.fromkeys(p for ps in pieces for p in ps))
    pos = {p: i for i, p in enumerate(uniq)}
    ptr = np.cumsum([0] + [len(ps) for ps in pieces]).astype(np.int64)
    idx = np.array([pos[p] for ps in pieces for p in ps], dtype=np.int64)
    tok = enc.model.tokenizer(uniq, max_length=enc.cfg.max_seq_length, truncation=True, padding=False)["input_ids"]
    if max(max(t) for t in tok) >= 2**15:
        print("finetune_export: token ids do not fit int16", file=sys.stderr)
        return 2
    ids = np.zeros((len(tok), max(len(t) for t in tok)), dtype=np.int16)  # 0 = [PAD]
    for i, t in enumerate(tok):
        ids[i, :len(t)] = t
    cats = np.asarray(table.categories, dtype=str)
    names = sorted(set(cats.tolist()))
    fold = fold_ids(table, emb, a.folds)
    tmp = a.out + ".tmp.npz"
    np.savez_compressed(tmp, ids=ids, ptr=ptr, idx=idx, quality=table.quality.astype(np.float32),
                        cat=np.array([names.index(c) for c in cats], dtype=np.int64),
                        splits=np.array([SPLIT_CODE.get(s, 3) for s in table.splits], dtype=np.int64),
                        fold=fold, ref=np.asarray(load_run_embeddings(run.root, lexical=False)[:64], dtype=np.float32),
                        n_cat=len(names),
                        **cscr_arrays(run, table, emb, a.folds))
    os.replace(tmp, a.out)
    print(f"{a.run}: {len(pieces)} prompts, {len(uniq)} unique pieces (longest {ids.shape[1]} tokens), "
          f"{table.quality.shape[1]} experts, {len(names)} categories, folds "
          f"{[int((fold == i).sum()) for i in range(a.folds)]}; {os.path.getsize(a.out)} bytes -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
