"""Probe-outcome descriptors (SPEC.md section 2, "beyond the write-up", labelled as such).

Beyond the write-up: not one of the paper's two descriptor kinds. As in UniRoute, an expert is
described by how it did on the N held-out probe prompts:

    d_probe(h) = normalize( standardize( [Q(x_i, h)]_{i=1..N} ) )

standardised per expert across the probes (mean 0, variance 1 over its observed cells), missing
cells set to 0 after standardising, then L2-normalised. It needs no logits and no response texts,
only the routing table, so training works for any pool that has recorded outcomes. An expert
with the same quality on every observed probe carries no information: its descriptor is the
zero vector (similarity 0 to every prompt).
"""

from __future__ import annotations

import hashlib

import numpy as np

from cscr.data.table import RoutingTable

KIND = "probe-outcome"


def probe_rows(table: RoutingTable) -> np.ndarray:
    """Row indices of the probe split (ValueError when the table has none)."""
    rows = table.split_index("probe")
    if rows.size < 2:
        raise ValueError(f"table {table.source!r} has {rows.size} probe prompt(s): probe-outcome descriptors "
                         "need a probe split (DataConfig.probe_size > 1 when preparing the run)")
    return rows


def probe_basis_id(table: RoutingTable, rows: np.ndarray | None = None) -> str:
    """Identifies the coordinates: the ordered probe prompt ids."""
    rows = probe_rows(table) if rows is None else rows
    digest = hashlib.sha256("\x1f".join(table.prompt_ids[rows]).encode()).hexdigest()[:16]
    return f"probe:{len(rows)}:{digest}"


def standardize_normalize(values: np.ndarray) -> np.ndarray:
    """(M, N) per-row standardised over observed (non-NaN) cells, NaN -> 0, then unit rows."""
    v = np.asarray(values, dtype=np.float64)  # (M, N)
    obs = ~np.isnan(v)  # (M, N)
    cnt = obs.sum(axis=1, keepdims=True)  # (M, 1)
    mean = np.where(obs, v, 0.0).sum(axis=1, keepdims=True) / np.maximum(cnt, 1)  # (M, 1)
    var = np.where(obs, (v - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / np.maximum(cnt, 1)  # (M, 1)
    std = np.sqrt(var)  # (M, 1)
    z = np.where(obs & (std > 1e-12), (v - mean) / np.where(std > 1e-12, std, 1.0), 0.0)  # (M, N)
    norm = np.linalg.norm(z, axis=1, keepdims=True)  # (M, 1)
    return (z / np.where(norm > 0, norm, 1.0)).astype(np.float32)  # (M, N)


def probe_outcome_descriptors(table: RoutingTable, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{expert: (N,) float32} for every expert of ``table``, over its probe split (or ``rows``)."""
    rows = probe_rows(table) if rows is None else np.asarray(rows)
    vecs = standardize_normalize(table.quality[rows].T)  # (M, N)
    return {name: vecs[j] for j, name in enumerate(table.expert_names)}
