"""Encoder backends (issue 13 item 6): torch, onnx and onnx-int8 on RouterBench, in one run.

Speed. Every backend embeds the same RouterBench test prompts in the default ``windows``
long-prompt mode, through ``Encoder.encode`` (tokenising and windows included), chunk by chunk,
the backends' order rotated from chunk to chunk so that a drifting machine load falls on all of
them alike: prompts/s by wall clock and by process CPU time. Latency: single-prompt calls (what
a served request does) on a subsample, the backends again interleaved per prompt: p50 and p90.
All as ratios to torch, with the load average before and after; ``--threads`` (default 1) is
torch's thread count and ONNX Runtime's intra-op count alike.

Routing. A trained RouterBench run (``--run``; made when missing: ``cscr prepare`` with the
torch encoder, then ``cscr train --plain --variant cscr --descriptor-kind probe-outcome``, the
quickest path, no scorer LM). Its trained CSCR head routes the test prompts as each backend
embedded them; test AUDC (SPEC's, ``cscr.eval.evaluate.evaluate_routers``) per backend, its
difference to torch's against the +-0.002 tolerance, and the paired bootstrap interval of that
difference. The table is printed and written to ``<run>/encoder_backends.md``.

    python bench/encoder_backends.py [--run runs/encoder-backends] [--threads 1] [--latency-prompts 64]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cscr.config import ENCODER_BACKENDS, EncoderConfig  # noqa: E402

TOLERANCE = 0.002  # |AUDC(backend) - AUDC(torch)| accepted


def _data_dir(arg: str | None) -> str:
    return arg or os.environ.get("CSCR_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


def ensure_run(run: Path, data_dir: str) -> None:
    """A prepared RouterBench run with a trained CSCR head (made when missing)."""
    from cscr.cli import main as cscr_main

    steps = []
    if not (run / "embeddings" / "manifest.json").exists():
        steps.append(["prepare", "--dataset", "routerbench", "--data-dir", data_dir, "--out", str(run)])
    if not (run / "models" / "cscr" / "head.pt").exists():
        steps.append(["train", "--run", str(run), "--plain", "--variant", "cscr", "--descriptor-kind", "probe-outcome"])
    for argv in steps:
        rc = cscr_main(argv)
        if rc != 0:
            raise SystemExit(f"cscr {' '.join(argv)} exited {rc}")


def interleaved_throughput(encoders: dict, texts: list[str], chunk: int) -> tuple[dict, dict, dict]:
    """(vectors, wall seconds, CPU seconds) per backend, chunks in rotating backend order."""
    names = list(encoders)
    vecs: dict[str, list[np.ndarray]] = {b: [] for b in names}
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for i, start in enumerate(range(0, len(texts), chunk)):
        part = texts[start : start + chunk]
        for b in names[i % len(names):] + names[: i % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            vecs[b].append(encoders[b].encode(part))
            wall[b] += time.perf_counter() - t0
            cpu[b] += time.process_time() - c0
    return {b: np.concatenate(v) for b, v in vecs.items()}, wall, cpu


def interleaved_latency(encoders: dict, texts: list[str]) -> dict[str, np.ndarray]:
    """Per-prompt seconds of single-prompt calls, backends in rotating order per prompt."""
    names = list(encoders)
    out: dict[str, list[float]] = {b: [] for b in names}
    for i, t in enumerate(texts):
        for b in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            encoders[b].encode([t])
            out[b].append(time.perf_counter() - t0)
    return {b: np.array(v) for b, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/encoder-backends", help="trained RouterBench run (made when missing)")
    ap.add_argument("--data-dir", default=None, help="folder holding routerbench/ (default: ../shared/data)")
    ap.add_argument("--threads", type=int, default=1, help="threads per backend (torch and ONNX Runtime)")
    ap.add_argument("--chunk", type=int, default=64, help="prompts per interleaved throughput chunk")
    ap.add_argument("--latency-prompts", type=int, default=64, help="single-prompt calls per backend")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples of dAUDC")
    args = ap.parse_args()

    import torch

    from cscr.encoder import get_encoder, load_run_embeddings
    from cscr.eval.evaluate import evaluate_routers
    from cscr.eval.significance import paired_bootstrap_audc
    from cscr.lexical import for_run
    from cscr.runs.heads import load_trained
    from cscr.runs.inputs import Run
    from cscr.runs.loader import load_router

    run_dir = Path(args.run)
    t_setup = time.perf_counter()
    ensure_run(run_dir, _data_dir(args.data_dir))
    t_setup = time.perf_counter() - t_setup
    run = Run.of(run_dir)
    table = run.table
    rows = table.split_index("test")
    texts = [str(t) for t in table.texts[rows]]
    router = load_router(run, "cscr")
    kind = load_trained(run_dir, "cscr").descriptor_kind

    torch.set_num_threads(args.threads)  # before the sessions are made: ONNX Runtime takes torch's count
    # each backend with the run's lexical view appended (as serving embeds); cosines read the encoder's part
    encoders = {b: for_run(get_encoder(EncoderConfig(backend=b)), run_dir) for b in ENCODER_BACKENDS}
    d = get_encoder(EncoderConfig()).dim
    for enc in encoders.values():
        enc.encode(texts[:8])  # warm up
    load0 = os.getloadavg()
    vecs, wall, cpu = interleaved_throughput(encoders, texts, args.chunk)
    pick = np.random.default_rng(0).permutation(len(texts))[: args.latency_prompts]
    lat = interleaved_latency(encoders, [texts[i] for i in pick])
    load1 = os.getloadavg()

    # routing: the run's trained head on each backend's test embeddings (other rows: the run's own)
    base = load_run_embeddings(run_dir)
    cached = np.sum(base[rows, :d] * vecs["torch"][:, :d], axis=1).min()  # the run's cache vs torch now
    results = {}
    for b in ENCODER_BACKENDS:
        emb = base.copy()
        emb[rows] = vecs[b]
        results[b] = evaluate_routers({"cscr": router}, table, emb, rows)
    ref = results["torch"]
    n = len(texts)
    lines = [
        f"RouterBench test split: {n} prompts ({ref.n_dropped} dropped for a missing quality cell before AUDC), "
        f"long_prompt=windows, batch {EncoderConfig().batch_size}, {args.threads} thread(s) per backend; "
        f"head: {run_dir}/models/cscr ({kind} descriptors), trained on the run's torch embeddings",
        f"machine: {os.cpu_count()} CPUs; load average (1/5/15 min) {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} "
        f"before, {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} after",
        f"torch now vs the run's cached torch embeddings: min cosine {cached:.6f}",
        "",
        "| backend | prompts/s (wall) | x torch | CPU s/prompt | x torch (CPU) | p50 ms/prompt | p90 ms | "
        "p50 x torch | cosine to torch (min / mean) | test AUDC | dAUDC vs torch (95% CI) | within +-0.002 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in ENCODER_BACKENDS:
        cos = np.sum(vecs[b][:, :d] * vecs["torch"][:, :d], axis=1)
        r = results[b].routers["cscr"]
        d = r.audc - ref.routers["cscr"].audc
        if b == "torch":
            ci = "-"
        else:
            bs = paired_bootstrap_audc(r.choices, ref.routers["cscr"].choices, ref.quality, ref.cost,
                                       args.bootstrap, 0)
            ci = f"{d:+.4f} ({bs.ci_low:+.4f}, {bs.ci_high:+.4f})"
        p50, p90 = np.median(lat[b]) * 1e3, np.quantile(lat[b], 0.9) * 1e3
        lines.append(
            f"| {b} | {n / wall[b]:.1f} | {wall['torch'] / wall[b]:.2f} | {cpu[b] / n:.4f} | "
            f"{cpu['torch'] / cpu[b]:.2f} | {p50:.1f} | {p90:.1f} | {np.median(lat['torch']) * 1e3 / p50:.2f} | "
            f"{cos.min():.4f} / {cos.mean():.4f} | {r.audc:.4f} | {ci} | "
            f"{'yes' if abs(d) <= TOLERANCE else 'NO'} |")
    lines += ["", f"(set-up of the run: {t_setup:.0f} s; p50/p90 over {len(pick)} single-prompt calls)"]
    text = "\n".join(lines)
    print(text)
    (run_dir / "encoder_backends.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
