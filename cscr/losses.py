"""Cost-spectrum InfoNCE (SPEC.md section 4) and its vanilla variant: pure tensor functions.

Notation: N queries in a batch, M experts, D' descriptor width, B cost bands.

* ``cost_bands(costs, B)``: band id of each expert from the quantiles of the M expert costs.
* ``band_temperatures``: ``tau_b = tau_min + alpha * mean cost of band b``.
* ``positives_from_quality(Q, tolerance)``: the positive set ``P(i)`` (quality >= the prompt's
  best quality minus the tolerance; a prompt whose best quality is 0 has none) and the mask of
  observed cells. A missing cell is never a positive and is left out of the denominator.
* ``cost_spectrum_infonce``: the loss. For query i and band b with at least one positive,

      loss_ib = - log( sum_{m in P_ib} exp(s_im / tau_b) / sum_{m' observed} exp((s_im' - gamma c_m') / tau_b) )

  ``loss_i`` is the mean of ``loss_ib`` over the bands with a positive; the batch loss is the mean
  over queries with at least one positive. A batch without any positive gives a zero that still
  carries a (zero) gradient, never NaN. With B = 1 and gamma = 0 this is multi-positive InfoNCE
  (the "vanilla" ablation).
* ``quality_logits`` / ``quality_bce`` (beyond the write-up, labelled so): the descriptor-conditioned
  quality predictor ``P(good | x, m) = sigmoid(a * q.d_m + b(d_m))`` with one shared scale ``a > 0``
  and a bias computed from the descriptor (no per-expert parameter, so a new expert still joins by
  its descriptor alone), trained with binary cross-entropy on the observed quality cells (graded
  quality in [0, 1] is a soft target; missing cells are skipped). The training loss is then
  ``InfoNCE + bce_weight * BCE``: ``q.d_m`` keeps the contrastive geometry and the utility is in
  quality units, commensurate with ``lambda * c_m``.
* ``routing_regret`` (beyond the write-up, labelled so; off by default): minus what a softened
  routing choice earns over a spectrum of cost knobs, from the quality map's P(good); weighted by
  ``loss.regret_weight``. It scores the ranking between experts that routing reads, which the
  BCE fits only cell by cell.

No I/O, no framework: the training loop (cscr/training/loop.py) calls these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

#: floor on a band temperature, so that tau_min = 0 with a zero-cost band stays finite
TAU_FLOOR = 1e-4


def cost_bands(costs: Tensor | np.ndarray, n_bands: int) -> Tensor:
    """(M,) int64 band id of each expert: which of ``n_bands`` cost-quantile bands it falls in.

    The B - 1 interior edges are the k/B quantiles (linear interpolation) of the M costs; an
    expert whose cost equals an edge goes to the lower band, so equal costs always share a band.
    With B > M some bands are empty (they never enter the loss).
    """
    if int(n_bands) < 1:
        raise ValueError(f"number of cost bands must be >= 1, got {n_bands}")
    c = torch.as_tensor(costs, dtype=torch.float64).reshape(-1)  # (M,)
    if c.numel() == 0:
        raise ValueError("cost_bands needs at least one expert cost")
    if n_bands == 1:
        return torch.zeros(c.shape, dtype=torch.int64)  # (M,)
    probs = torch.arange(1, n_bands, dtype=torch.float64) / n_bands  # (B-1,)
    edges = torch.quantile(c, probs)  # (B-1,) interior edges, non-decreasing
    return torch.bucketize(c, edges, right=False).to(torch.int64)  # (M,) in [0, B)


def band_temperatures(costs: Tensor, bands: Tensor, tau_min: float, alpha: float,
                      n_bands: int | None = None) -> Tensor:
    """(B,) ``tau_b = tau_min + alpha * mean cost of band b`` (empty bands: tau_min), floored."""
    n_bands = int(bands.max().item()) + 1 if n_bands is None else int(n_bands)
    onehot = torch.nn.functional.one_hot(bands, n_bands).to(costs.dtype)  # (M, B)
    count = onehot.sum(0)  # (B,)
    mean_cost = (onehot * costs[:, None]).sum(0) / count.clamp_min(1)  # (B,)
    return (tau_min + alpha * mean_cost).clamp_min(TAU_FLOOR)  # (B,)


def positives_from_quality(quality: Tensor | np.ndarray, tolerance: float = 0.0) -> tuple[Tensor, Tensor]:
    """(positives (N, M) bool, observed (N, M) bool) from quality (N, M) with NaN = missing.

    A positive is an observed cell with ``Q >= best - tolerance`` and ``Q > 0``, where ``best`` is
    the prompt's best observed quality: on 0/1 data, the correct experts; a prompt nobody
    answered well has no positive (and is skipped by the loss).
    """
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must be in [0, 1], got {tolerance}")
    q = torch.as_tensor(quality).to(torch.float64)  # (N, M)
    if q.ndim != 2:
        raise ValueError(f"quality must be (N, M), got shape {tuple(q.shape)}")
    observed = ~torch.isnan(q)  # (N, M)
    filled = torch.where(observed, q, torch.full_like(q, -1.0))  # (N, M) missing below any quality
    best = filled.max(dim=1, keepdim=True).values  # (N, 1)
    positives = observed & (filled >= best - tolerance) & (filled > 0)  # (N, M)
    return positives, observed


def cost_spectrum_infonce(q: Tensor, e: Tensor, positives: Tensor, costs: Tensor, bands: Tensor | int,
                          tau_min: float = 0.05, alpha: float = 0.25, gamma: float = 0.2,
                          mask: Tensor | None = None) -> Tensor:
    """The cost-spectrum InfoNCE loss of SPEC.md section 4 (a scalar tensor).

    q: (N, D') routing queries (unit rows); e: (M, D') expert descriptors (unit rows);
    positives: (N, M) bool P(i); costs: (M,) c_m in [0, 1]; bands: (M,) int band ids (from
    ``cost_bands``) or the number of bands B; mask: (N, M) bool observed cells (None: all).
    """
    if q.ndim != 2 or e.ndim != 2 or q.shape[1] != e.shape[1]:
        raise ValueError(f"q must be (N, D) and e (M, D) with one D, got {tuple(q.shape)} and {tuple(e.shape)}")
    n, m = q.shape[0], e.shape[0]
    if positives.shape != (n, m):
        raise ValueError(f"positives must be ({n}, {m}), got {tuple(positives.shape)}")
    costs = torch.as_tensor(costs, dtype=q.dtype, device=q.device).reshape(-1)  # (M,)
    if costs.shape != (m,):
        raise ValueError(f"costs must be ({m},), got {tuple(costs.shape)}")
    band_ids = cost_bands(costs.detach().cpu(), bands) if isinstance(bands, int) else bands
    band_ids = torch.as_tensor(band_ids, dtype=torch.int64, device=q.device).reshape(-1)  # (M,)
    if band_ids.shape != (m,) or (band_ids < 0).any():
        raise ValueError(f"bands must be ({m},) non-negative band ids, got {tuple(band_ids.shape)}")
    n_bands = int(band_ids.max().item()) + 1
    observed = torch.ones(n, m, dtype=torch.bool, device=q.device) if mask is None else mask.to(torch.bool)  # (N, M)
    pos = positives.to(torch.bool) & observed  # (N, M) a missing cell is never positive

    tau = band_temperatures(costs, band_ids, tau_min, alpha, n_bands)  # (B,)
    s = q @ e.T  # (N, M) similarities s_im
    in_band = band_ids[None, :] == torch.arange(n_bands, device=q.device)[:, None]  # (B, M)
    pos_b = pos[:, None, :] & in_band[None, :, :]  # (N, B, M) P_ib
    has = pos_b.any(dim=2)  # (N, B) b in K_i
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    num_logits = s[:, None, :] / tau[None, :, None]  # (N, B, M)
    den_logits = (s - gamma * costs[None, :])[:, None, :] / tau[None, :, None]  # (N, B, M)
    num_logits = torch.where(pos_b, num_logits, neg_inf)  # (N, B, M)
    den_logits = torch.where(observed[:, None, :], den_logits, neg_inf)  # (N, B, M)
    # rows (i, b) without a positive are replaced by zeros so logsumexp and its gradient stay finite
    num_logits = torch.where(has[:, :, None], num_logits, torch.zeros_like(num_logits))  # (N, B, M)
    den_logits = torch.where(has[:, :, None], den_logits, torch.zeros_like(den_logits))  # (N, B, M)
    loss_ib = torch.logsumexp(den_logits, dim=2) - torch.logsumexp(num_logits, dim=2)  # (N, B)
    loss_ib = torch.where(has, loss_ib, torch.zeros_like(loss_ib))  # (N, B)
    n_bands_i = has.sum(dim=1)  # (N,) |K_i|
    keep = n_bands_i > 0  # (N,) queries with a positive
    loss_i = loss_ib.sum(dim=1) / n_bands_i.clamp_min(1)  # (N,)
    n_keep = keep.sum()
    if n_keep == 0:
        return (s * 0.0).sum()  # () zero, with a gradient path
    return (loss_i * keep).sum() / n_keep  # ()


def vanilla_infonce(q: Tensor, e: Tensor, positives: Tensor, tau: float = 0.05,
                    mask: Tensor | None = None) -> Tensor:
    """Multi-positive InfoNCE: the cost-spectrum loss with B = 1 and gamma = 0 (the "vanilla" ablation)."""
    m = e.shape[0]
    zeros = torch.zeros(m, dtype=q.dtype, device=q.device)  # (M,)
    return cost_spectrum_infonce(q, e, positives, zeros, torch.zeros(m, dtype=torch.int64), tau, 0.0, 0.0, mask)


def quality_logits(q: Tensor, e: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """(N, M) logits ``scale * q.d_m + bias_m`` of P(good | x, m) (beyond the write-up).

    q: (N, D') unit queries; e: (M, D') unit descriptors; scale: () shared slope a > 0;
    bias: (M,) per-expert bias computed from each descriptor (never a free per-expert parameter).
    """
    if q.ndim != 2 or e.ndim != 2 or q.shape[1] != e.shape[1]:
        raise ValueError(f"q must be (N, D) and e (M, D) with one D, got {tuple(q.shape)} and {tuple(e.shape)}")
    if bias.shape != (e.shape[0],):
        raise ValueError(f"bias must be ({e.shape[0]},), got {tuple(bias.shape)}")
    s = q @ e.T  # (N, M) similarities
    return scale * s + bias[None, :]  # (N, M)


def quality_bce(logits: Tensor, quality: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against quality in [0, 1] over observed cells.

    logits: (N, M) from ``quality_logits``; quality: (N, M) targets in [0, 1] (a missing cell may
    hold anything, NaN included, when ``mask`` marks it False); mask: (N, M) bool observed cells
    (None: all). No observed cell gives a zero that still carries a (zero) gradient.
    """
    if logits.shape != quality.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and quality {tuple(quality.shape)} differ in shape")
    observed = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask.to(torch.bool)  # (N, M)
    target = torch.where(observed, quality.to(logits.dtype), torch.zeros_like(logits))  # (N, M) NaN-free
    if ((target < 0) | (target > 1)).any():
        raise ValueError("quality targets must lie in [0, 1]")
    cell = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (N, M)
    cell = torch.where(observed, cell, torch.zeros_like(cell))  # (N, M) missing cells skipped
    n_obs = observed.sum()
    if n_obs == 0:
        return (logits * 0.0).sum()  # () zero, with a gradient path
    return cell.sum() / n_obs  # ()


#: the knob values of ``routing_regret``: the quality a router gives up to save the pool's whole cost
#: range (the cost normalised to [0, 1] over the experts); 0 is "quality only"
REGRET_SPECTRUM = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)


def routing_regret(logits: Tensor, outcome: Tensor, mask: Tensor, costs: Tensor, temperature: float = 0.05,
                   spectrum: Sequence[float] = REGRET_SPECTRUM) -> Tensor:
    """The routing decision's loss over a spectrum of cost knobs (beyond the write-up, labelled so).

    For each knob ``s`` in ``spectrum`` the router's choice is relaxed into
    ``pi = softmax((sigmoid(logits) - s c) / temperature)`` over the prompt's observed experts
    (``c``: the costs min-max normalised over the M experts) and scored by what the choice would
    have earned, ``sum_m pi_m (outcome_m - s c_m)``; the loss is minus its mean over knobs and
    prompts. Where the BCE fits each cell's P(good) on its own, this scores the ranking that
    routing reads off them. logits: (N, M); outcome: (N, M) the cells' quality in [0, 1] (recorded,
    or the BCE's targets; anything where ``mask`` is False); mask: (N, M) bool observed cells;
    costs: (M,).
    A batch without an observed cell gives a zero that still carries a (zero) gradient.
    """
    if logits.shape != outcome.shape or logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, outcome {tuple(outcome.shape)} and mask "
                         f"{tuple(mask.shape)} must share one (N, M) shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    c = torch.as_tensor(costs, dtype=logits.dtype, device=logits.device).reshape(-1)  # (M,)
    if c.shape != (logits.shape[1],):
        raise ValueError(f"costs must be ({logits.shape[1]},), got {tuple(c.shape)}")
    span = c.max() - c.min()
    c = (c - c.min()) / span if float(span) > 0 else torch.zeros_like(c)  # (M,) in [0, 1]
    s = torch.as_tensor(list(spectrum), dtype=logits.dtype, device=logits.device)[:, None, None]  # (L, 1, 1)
    observed = mask.to(torch.bool)  # (N, M)
    gain = torch.where(observed, outcome.to(logits.dtype), torch.zeros_like(logits))[None] - s * c  # (L, N, M)
    utility = (torch.sigmoid(logits)[None] - s * c) / temperature  # (L, N, M)
    utility = torch.where(observed[None], utility, torch.full_like(utility, float("-inf")))  # (L, N, M)
    rows = observed.any(dim=1)  # (N,) prompts with an observed cell
    if not bool(rows.any()):
        return (logits * 0.0).sum()  # () zero, with a gradient path
    utility = torch.where(rows[None, :, None], utility, torch.zeros_like(utility))  # (L, N, M) finite softmax
    pi = torch.softmax(utility, dim=2)  # (L, N, M)
    earned = (pi * gain).sum(dim=2)  # (L, N) an unobserved cell has pi = 0 and a finite gain
    return -(earned * rows[None]).sum() / (rows.sum() * len(spectrum))  # ()
