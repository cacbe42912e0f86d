"""Generated routing tables with a known structure, for smoke tests and benchmarks.

Prompts fall in ``n_clusters`` topics (embedding = topic centre + noise, unit rows); expert j
costs more the larger j, is better on average the more it costs, and has topics it is strong or
weak on, so the cheapest good expert differs by topic: a router that reads the prompt beats every
single expert. Never used for reported quality figures: those come from real data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cscr.data.table import Expert, RoutingTable, assign_splits
from cscr.runs.paths import RunPaths

if TYPE_CHECKING:
    from cscr.config import TrainConfig


def synthetic_table(n: int = 600, n_experts: int = 5, dim: int = 384, n_clusters: int = 4, seed: int = 0,
                    probe_size: int = 48, val_fraction: float = 0.1, noise: float = 0.6,
                    missing: float = 0.0) -> tuple[RoutingTable, np.ndarray, np.ndarray]:
    """(table, embeddings (n, dim) float32 unit rows, topic id (n,))."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, n_clusters, n)
    centres = rng.standard_normal((n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = centres[topic] + noise * rng.standard_normal((n, dim)) / np.sqrt(dim)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    skill = np.linspace(-1.0, 2.0, n_experts)  # (M,) pricier experts are better on average
    affinity = 2.5 * rng.standard_normal((n_experts, n_clusters))  # (M, K) topic strengths
    logits = skill[None, :] + affinity.T[topic]  # (n, M)
    quality = (rng.random((n, n_experts)) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    if missing > 0:
        quality[rng.random(quality.shape) < missing] = np.nan
    unit = np.geomspace(0.01, 1.0, n_experts)  # (M,) mean cost per expert
    cost = unit[None, :] * rng.uniform(0.8, 1.2, (n, n_experts))
    experts = [Expert(f"expert-{j}", kind="recorded", n_params=float(round(unit[j] * 70, 3)))
               for j in range(n_experts)]
    splits = assign_splits(n, None, val_fraction=val_fraction, probe_size=probe_size, seed=seed)
    table = RoutingTable(prompt_ids=np.array([f"s{i:06d}" for i in range(n)]),
                         texts=np.array([f"synthetic prompt {i} on topic {t}" for i, t in enumerate(topic)]),
                         splits=splits, categories=np.array([f"topic-{t}" for t in topic]), experts=experts,
                         quality=quality, cost=cost, source="synthetic", cost_unit="usd")
    return table, emb, topic


def write_synthetic_run(run_dir: str | os.PathLike[str], table: RoutingTable, emb: np.ndarray) -> Path:
    """Save ``table`` and its embeddings as a prepared run folder (the layout ``cscr prepare`` writes)."""
    from cscr.encoder import EmbeddingCache, text_hash, write_manifest

    paths = RunPaths.of(run_dir)
    table.save(paths.table)
    info = {"encoder_id": "synthetic", "model": "synthetic", "dim": int(emb.shape[1])}
    cache = EmbeddingCache(paths.embeddings, "synthetic")
    cache.write(table.prompt_ids, text_hash(table.texts), emb)
    cache.write_info(info)
    write_manifest(paths.embeddings, info, table.n)
    return paths.root


def train_synthetic_head(run_dir: str | os.PathLike[str], table: RoutingTable, emb: np.ndarray,
                         variant: str = "cscr", cfg: TrainConfig | None = None) -> Path:
    """Train a ``variant`` head on a synthetic run folder (``write_synthetic_run``) with its
    probe-outcome descriptors (computed into the run, as ``cscr train`` does) and save it as
    ``cscr train`` leaves it; default: 2 epochs of batches of 128. Returns the model folder."""
    from cscr.config import TrainConfig
    from cscr.fingerprints.probe_outcome import probe_outcome_descriptors
    from cscr.runs.descriptors import compute_probe_outcome
    from cscr.runs.heads import save_trained
    from cscr.training import fit_head, prepare_arrays

    basis = compute_probe_outcome(run_dir, table)
    arrays = prepare_arrays(table, emb, probe_outcome_descriptors(table), 0.0, "probe-outcome", basis)
    return save_trained(run_dir, fit_head(arrays, cfg or TrainConfig(epochs=2, batch_size=128), variant, log=None))
