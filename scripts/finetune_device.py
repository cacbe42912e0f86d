"""Fine-tune the run's encoder (MiniLM) on the routing labels, once per nested-CV fold, on a GPU machine
(issue 10: the encoder-fine-tuning probe; beyond SPEC, which freezes the encoder). Needs only torch and
transformers, so it runs on a bare GPU image: no cscr, Ray or FAISS.

Reads ``DATA/<set>.npz`` (scripts/finetune_export.py) and the encoder's weights (``--model``, a
transformers folder). For each set and variant:

- ``fold k`` (k = 0..K-1): trains on the folds other than k and k+1 and picks the epoch on fold k+1;
  fold k, the one ``finetune_probe.py`` scores, is never read (no labels, no choices);
- ``full``: trains on the train split and picks the epoch on the val split (the test split is never read).

Objective (``--objective bce``, the default): binary cross-entropy of a linear head on the unit embedding
against each expert's quality (masked where unknown) plus the cross-entropy of the prompt's category.
``--objective cscr``: the CSCR head itself (cscr.head, default configuration) trained jointly with the
encoder on cscr's own loss (the cost-spectrum InfoNCE plus the weighted quality BCE on the smoothed
targets), from the training arrays the export wrote (cscr.config, cscr.head and cscr.losses need only
torch: the repository travels with the call); the epoch is picked by the head's quality BCE on the
choice fold. The embedding is the run's own:
mean-pooled tokens per piece, unit pieces averaged and renormalised; before training, the untuned
model must reproduce the run's first 64 vectors. Writes float16 vectors of every prompt per variant,
``<set>_ft<i>.npz`` (one array per variant), and ``ft_log.json`` (the chosen epochs, the losses).
``--save-encoder`` also writes the ``full`` variant's encoder weights (float16, in parts small enough to
come back from a device call; their sha256 in ``ft_log.json``); ``scripts/finetune_import.py`` makes them
a sentence-transformers folder that ``cscr prepare --encoder`` embeds a run with (the test split once).
``--top-layers N`` fine-tunes only the encoder's last N layers: the states of the layers below them are
computed once per prompt piece and kept, so an epoch costs about N / 6 of a full one, which brings a
train-split fine-tune within a CPU's reach (a variant of its own, not the one the nested CV scored):

    python scripts/finetune_device.py --model .gpu_ft/minilm --data .gpu_ft --out $OUT --sets rllm --folds 0 \
        --epochs 8 --save-encoder

    python scripts/finetune_device.py --model .gpu_ft/minilm --data .gpu_ft --out $OUT --sets llmr,rb

    python scripts/finetune_device.py --model .gpu_ft/minilm --data .gpu_ft --out runs/evidence/ft-top2 --sets rllm \
        --folds 0 --epochs 6 --top-layers 2 --save-encoder
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the encoder's transformers folder")
    p.add_argument("--data", required=True, help="the folder of <set>.npz files")
    p.add_argument("--out", required=True)
    p.add_argument("--sets", required=True, help="comma-separated names of <set>.npz")
    p.add_argument("--epochs", type=int, default=4, help="at most this many; the best on the choice fold is kept")
    p.add_argument("--lr", type=float, default=3e-5, help="the encoder's peak learning rate (warm-up, then linear decay)")
    p.add_argument("--folds", type=int, default=5, help="nested-CV folds (0: only the full variant)")
    p.add_argument("--no-full", action="store_true", help="only the folds (no train-split variant)")
    p.add_argument("--files", type=int, default=1, help="spread each set's variants over this many files")
    p.add_argument("--smoke", type=int, default=0, help="a quick check: N prompts, fold 0 only")
    p.add_argument("--objective", choices=("bce", "cscr"), default="bce")
    p.add_argument("--top-layers", type=int, default=0,
                   help="fine-tune only the encoder's last N layers, the states below them computed once (0: all)")
    p.add_argument("--save-encoder", action="store_true",
                   help="also write the full variant's encoder (float16 safetensors, in parts of at most 15 MiB: "
                        "<set>_encoder.part<i>) for scripts/finetune_import.py")
    a = p.parse_args(argv)
    if a.save_encoder and a.no_full:
        p.error("--save-encoder writes the full variant's encoder: drop --no-full")
    if a.top_layers < 0:
        p.error("--top-layers must be >= 0")

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    scale = 20.0  # logits of the unit embedding: a fixed temperature

    class LowerStates:
        """Per piece (row of ``D["ids"]``), its hidden states (tokens, dim) under all but the encoder's last
        ``n`` layers, padding dropped: computed the first time a piece is asked for, then kept (the frozen
        part of ``--top-layers``)."""

        def __init__(self, base, n: int, D) -> None:
            self.lower, self.ids, self.states = copy.deepcopy(base).to(dev).eval(), D["ids"], {}
            self.lower.encoder.layer = self.lower.encoder.layer[:base.config.num_hidden_layers - n]

        @torch.no_grad()
        def __call__(self, pieces) -> list:
            todo = [int(i) for i in pieces if int(i) not in self.states]
            for s in range(0, len(todo), 128):
                ids = trimmed(torch.as_tensor(self.ids[todo[s:s + 128]].astype(np.int64), device=dev))
                h = self.lower(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state.float()
                for j, i in enumerate(todo[s:s + 128]):
                    self.states[i] = h[j, :int((ids[j] != 0).sum())].clone()
            return [self.states[int(i)] for i in pieces]

    class TopLayers(torch.nn.Module):
        """The encoder's last ``n`` transformer layers over the states of the layers below them, which are
        computed once and kept (``LowerStates``): only these layers train, so an epoch costs about ``n`` / 6
        of a full one (what makes fine-tuning fit on a CPU). ``full()`` is the whole encoder again: the
        frozen lower layers with these."""

        def __init__(self, base, n: int, lower: LowerStates) -> None:
            super().__init__()
            self.layers = copy.deepcopy(base.encoder.layer[base.config.num_hidden_layers - n:]).to(dev)
            self.frozen = (base, lower)  # a tuple: not registered, so neither trained nor in the state dict

        def forward(self, pieces):
            """(b, T, dim) hidden states of these pieces and their (b, T) mask."""
            from transformers.masking_utils import create_bidirectional_mask

            base, lower = self.frozen
            states = lower(pieces)
            h = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long, device=dev) for x in states],
                                                   batch_first=True)
            att = create_bidirectional_mask(config=base.config, inputs_embeds=h, attention_mask=mask)
            for layer in self.layers:
                h = layer(h, att)
            return h, mask

        def full(self):
            base = self.frozen[0]
            model = copy.deepcopy(base)
            cut = base.config.num_hidden_layers - len(self.layers)
            for i, layer in enumerate(self.layers):
                model.encoder.layer[cut + i] = copy.deepcopy(layer)
            return model

    def trainable(base, lower):
        """What a variant fine-tunes: a copy of the whole encoder, or (``--top-layers``) its last layers."""
        return TopLayers(base, a.top_layers, lower) if a.top_layers else copy.deepcopy(base).to(dev)

    def trimmed(ids):  # (b, T) token ids without the columns that are padding in every row
        return ids[:, :max(1, int((ids != 0).sum(1).max()))]

    def piece_vectors(model, D, pieces):
        """(len(pieces), dim) unit mean-pooled token vectors of these pieces (rows of ``D["ids"]``)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            if isinstance(model, TopLayers):
                h, mask = model(pieces)
            else:
                ids = trimmed(torch.as_tensor(D["ids"][pieces].astype(np.int64), device=dev))
                mask = (ids != 0).long()
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return F.normalize((h.float() * m).sum(1) / m.sum(1).clamp(min=1), dim=1)

    def prompt_vectors(model, D, rows):
        ptr, idx = D["ptr"], D["idx"]
        segs = [idx[ptr[r]:ptr[r + 1]] for r in rows]
        uniq, inv = np.unique(np.concatenate(segs), return_inverse=True)
        pv = piece_vectors(model, D, uniq)
        owner = torch.as_tensor(np.repeat(np.arange(len(rows)), [len(s) for s in segs]), device=dev)
        summed = torch.zeros(len(rows), pv.shape[1], device=dev).index_add_(0, owner, pv[torch.as_tensor(inv, device=dev)])
        return F.normalize(summed, dim=1)

    @torch.no_grad()
    def embed_all(model, D, n, bs=256):
        model.eval()
        return torch.cat([prompt_vectors(model, D, np.arange(s, min(s + bs, n))).cpu() for s in range(0, n, bs)]).numpy()

    def ref_cosine(model, D) -> float:
        """The lowest cosine between ``model``'s vectors of the run's first prompts and the run's own (``D["ref"]``)."""
        return float((embed_all(model, D, len(D["ref"])) * D["ref"]).sum(1).min())

    def losses(model, heads, D, rows):
        e = prompt_vectors(model, D, rows)
        qt = torch.as_tensor(D["quality"][rows], device=dev)
        known = ~torch.isnan(qt)
        bce = F.binary_cross_entropy_with_logits(heads["q"](scale * e)[known], qt[known])
        ce = F.cross_entropy(heads["c"](scale * e), torch.as_tensor(D["cat"][rows], device=dev))
        return bce, ce

    def run_epochs(model, modules, opt, n, step, choice_loss, tag):
        """At most ``a.epochs`` epochs over ``n`` rows in batches of 32 (``step(batch) -> loss``), with
        linear warm-up and decay; keeps the encoder of the epoch with the lowest ``choice_loss()``."""
        bs = 32
        steps = a.epochs * ((n + bs - 1) // bs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
        rng = np.random.default_rng(0)
        hist, best = [choice_loss()], None
        for ep in range(a.epochs):
            for m in modules:
                m.train()
            t0 = time.time()
            perm = rng.permutation(n)
            for s in range(0, n, bs):
                loss = step(perm[s:s + bs])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            hist.append(choice_loss())
            if best is None or hist[-1] < best[0]:
                best = (hist[-1], ep + 1, copy.deepcopy(model.state_dict()))
            print(f"  {tag} epoch {ep + 1}: choice-fold BCE {hist[-1]:.4f} (untuned {hist[0]:.4f}) {time.time() - t0:.1f} s",
                  flush=True)
        model.load_state_dict(best[2])
        return model, {"choice_bce": hist, "epoch": best[1]}

    def finetune(base, lower, D, train, choose, tag):
        model = trainable(base, lower)
        dim = base.config.hidden_size
        heads = torch.nn.ModuleDict({"q": torch.nn.Linear(dim, D["quality"].shape[1]),
                                     "c": torch.nn.Linear(dim, int(D["n_cat"]))}).to(dev)
        opt = torch.optim.AdamW([{"params": model.parameters(), "lr": a.lr}, {"params": heads.parameters(), "lr": 1e-3}],
                                weight_decay=0.01)

        @torch.no_grad()
        def choice_bce():
            model.eval()
            return sum(float(losses(model, heads, D, choose[s:s + 256])[0]) * len(choose[s:s + 256])
                       for s in range(0, len(choose), 256)) / len(choose)

        def step(idx):
            bce, ce = losses(model, heads, D, train[idx])
            return bce + ce

        return run_epochs(model, (model, heads), opt, len(train), step, choice_bce, tag)

    if a.objective == "cscr":  # cscr's config, head and losses need only torch (the repository travels)
        import dataclasses

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from cscr.config import TrainConfig
        from cscr.head import Head
        from cscr.losses import cost_bands, cost_spectrum_infonce, quality_bce

    def finetune_cscr(base, lower, D, v, choose, tag):
        cfg = TrainConfig()
        lc = cfg.loss
        rows = D[f"{v}__rows"]
        pos = torch.as_tensor(D[f"{v}__positives"], device=dev)
        obs = torch.as_tensor(D[f"{v}__observed"], device=dev)
        targ = torch.as_tensor(D[f"{v}__targets"], device=dev)
        desc = torch.as_tensor(D[f"{v}__descriptors"], device=dev)
        costs = torch.as_tensor(D[f"{v}__costs"], device=dev)
        bands = cost_bands(D[f"{v}__costs"], lc.bands).to(dev)
        if a.smoke:
            rows, pos, obs, targ = rows[:a.smoke], pos[:a.smoke], obs[:a.smoke], targ[:a.smoke]
        model = trainable(base, lower)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head = Head(dataclasses.replace(cfg.head, in_dim=base.config.hidden_size, out_dim=desc.shape[1],
                                            categories=0)).to(dev)
        opt = torch.optim.AdamW([{"params": model.parameters(), "lr": a.lr},
                                 {"params": head.parameters(), "lr": cfg.lr}], weight_decay=cfg.weight_decay)

        def members(e):
            q = head(e)
            return q if q.ndim == 3 else q[None]

        @torch.no_grad()
        def choice_bce():
            model.eval()
            head.eval()
            tot = 0.0
            for s in range(0, len(choose), 256):
                r = choose[s:s + 256]
                qs = members(prompt_vectors(model, D, r))
                logits = torch.stack([m.logits(qs[i], desc) for i, m in enumerate(head.parts())]).mean(0)
                qt = torch.as_tensor(D["quality"][r], device=dev)
                known = ~torch.isnan(qt)
                tot += float(F.binary_cross_entropy_with_logits(logits[known], qt[known])) * len(r)
            return tot / len(choose)

        def step(idx):
            ib = torch.as_tensor(idx, device=dev)
            qs = members(prompt_vectors(model, D, rows[idx]))
            loss = qs.new_zeros(())
            for i, m in enumerate(head.parts()):
                loss = loss + cost_spectrum_infonce(qs[i], desc, pos[ib], costs, bands, lc.tau_min, lc.alpha,
                                                    lc.gamma, obs[ib])
                if lc.bce_weight > 0:
                    loss = loss + lc.bce_weight * quality_bce(m.logits(qs[i], desc), targ[ib], obs[ib])
            return loss

        model, info = run_epochs(model, (model, head), opt, len(rows), step, choice_bce, tag)
        return model, {**info, "n_train": len(rows)}  # the rows with an observed cell, as cscr train keeps

    def save_encoder(model, name: str, part: int = 15 << 20) -> dict:
        """The model's weights as float16 safetensors bytes, cut into ``<name>_encoder.part<i>`` files of at
        most ``part`` bytes (a device call returns files of at most 16 MiB); their names and sha256."""
        import hashlib

        from safetensors.torch import save

        blob = save({k: v.detach().half().contiguous().cpu() for k, v in model.state_dict().items()},
                    metadata={"format": "pt"})
        parts = []
        for i, s in enumerate(range(0, len(blob), part)):
            parts.append(f"{name}_encoder.part{i}")
            with open(os.path.join(a.out, parts[-1]), "wb") as f:
                f.write(blob[s:s + part])
        print(f"{name}: the full variant's encoder in {len(parts)} parts ({len(blob)} bytes)", flush=True)
        return {"parts": parts, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

    t_all = time.time()
    log: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "epochs_max": a.epochs,
                 "objective": a.objective, "lr": a.lr, "top_layers": a.top_layers}
    base = AutoModel.from_pretrained(a.model).float()
    if a.top_layers > base.config.num_hidden_layers:
        print(f"--top-layers {a.top_layers}: the encoder has {base.config.num_hidden_layers} layers", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    for name in a.sets.split(","):
        D = dict(np.load(os.path.join(a.data, f"{name}.npz")))
        n = len(D["ptr"]) - 1
        low = ref_cosine(copy.deepcopy(base).to(dev), D)
        print(f"{name}: {n} prompts; untuned encoder against the run's vectors: min cosine {low:.5f}", flush=True)
        if low < 0.999:
            print(f"{name}: the export does not reproduce the run's vectors; stopping", file=sys.stderr)
            return 1
        log[name] = {"untuned_min_cosine": low}
        lower = LowerStates(base, a.top_layers, D) if a.top_layers else None  # shared by the set's variants
        if lower is not None:  # the split encoder, untrained, must give the run's vectors too
            low = ref_cosine(TopLayers(base, a.top_layers, lower), D)
            print(f"{name}: the last {a.top_layers} layers over the kept states: min cosine {low:.5f}", flush=True)
            if low < 0.999:
                print(f"{name}: the split encoder does not reproduce the run's vectors; stopping", file=sys.stderr)
                return 1
        variants = [f"fold{k}" for k in range(a.folds)] + ([] if a.no_full else ["full"])
        if a.smoke:
            variants = variants[:1]
        vecs = {}
        for v in variants:
            t0 = time.time()
            if v == "full":
                train, choose = np.flatnonzero(D["splits"] == 0), np.flatnonzero(D["splits"] == 1)
            else:
                k = int(v[4:])
                fold = D["fold"]
                train = np.flatnonzero((fold >= 0) & (fold != k) & (fold != (k + 1) % a.folds))
                choose = np.flatnonzero(fold == (k + 1) % a.folds)
            if a.smoke:
                train, choose = train[:a.smoke], choose[:a.smoke]
            if a.objective == "cscr":
                model, info = finetune_cscr(base, lower, D, v, choose, f"{name}/{v}")
            else:
                model, info = finetune(base, lower, D, train, choose, f"{name}/{v}")
            vecs[v] = embed_all(model, D, a.smoke or n).astype(np.float16)
            info.setdefault("n_train", len(train))
            info.update(seconds=round(time.time() - t0, 1), n_choice=len(choose))
            log[name][v] = info
            print(f"{name}/{v}: epoch {info['epoch']} kept; {info['seconds']} s", flush=True)
            if v == "full" and a.save_encoder:
                log[name]["encoder"] = save_encoder(model.full() if a.top_layers else model, name)
        for i, group in enumerate(np.array_split(np.array(list(vecs)), min(a.files, len(vecs)))):
            np.savez(os.path.join(a.out, f"{name}_ft{i}.npz"), **{str(g): vecs[str(g)] for g in group})
    log["seconds"] = round(time.time() - t_all, 1)
    with open(os.path.join(a.out, "ft_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"done in {log['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
