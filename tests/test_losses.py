"""Cost-spectrum InfoNCE against a slow loop-based reference (values and gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cscr.losses import (
    band_temperatures,
    cost_bands,
    cost_spectrum_infonce,
    positives_from_quality,
    quality_bce,
    quality_logits,
    routing_regret,
    vanilla_infonce,
)


def reference_loss(q, e, positives, costs, bands, tau_min, alpha, gamma, mask=None):
    """SPEC.md section 4 written out with Python loops over queries, bands and experts."""
    n, m = positives.shape
    if mask is None:
        mask = torch.ones(n, m, dtype=torch.bool)
    band_list = sorted({int(b) for b in bands})
    tau = {}
    for b in band_list:
        members = [j for j in range(m) if int(bands[j]) == b]
        tau[b] = max(tau_min + alpha * sum(float(costs[j]) for j in members) / len(members), 1e-4)
    losses = []
    for i in range(n):
        terms = []
        for b in band_list:
            pos = [j for j in range(m) if positives[i, j] and mask[i, j] and int(bands[j]) == b]
            if not pos:
                continue
            s = [torch.dot(q[i], e[j]) for j in range(m)]
            num = sum(torch.exp(s[j] / tau[b]) for j in pos)
            den = sum(torch.exp((s[j] - gamma * costs[j]) / tau[b]) for j in range(m) if mask[i, j])
            terms.append(-torch.log(num / den))
        if terms:
            losses.append(sum(terms) / len(terms))
    if not losses:
        return (q.sum() + e.sum()) * 0.0
    return sum(losses) / len(losses)


def random_case(seed, n=7, m=6, d=5, missing=0.2):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    e = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    quality = torch.rand(n, m, generator=g, dtype=torch.float64).round()  # 0/1
    quality[torch.rand(n, m, generator=g) < missing] = float("nan")
    costs = torch.rand(m, generator=g, dtype=torch.float64)
    costs = costs / costs.max()
    return q.requires_grad_(), e.requires_grad_(), quality, costs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_bands", [1, 2, 3, 5])
def test_matches_loop_reference_values_and_gradients(seed, n_bands):
    q, e, quality, costs = random_case(seed)
    pos, mask = positives_from_quality(quality, tolerance=0.0)
    bands = cost_bands(costs, n_bands)
    kw = dict(tau_min=0.05, alpha=0.25, gamma=0.2)
    fast = cost_spectrum_infonce(q, e, pos, costs, bands, mask=mask, **kw)
    gq, ge = torch.autograd.grad(fast, (q, e))
    slow = reference_loss(q, e, pos, costs, bands, mask=mask, **kw)
    rq, re_ = torch.autograd.grad(slow, (q, e))
    assert torch.isfinite(fast)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10, abs=1e-10)
    torch.testing.assert_close(gq, rq, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ge, re_, rtol=1e-8, atol=1e-10)


def test_graded_quality_with_tolerance_matches_reference():
    g = torch.Generator().manual_seed(3)
    q, e, _, costs = random_case(11)
    quality = torch.rand(7, 6, generator=g, dtype=torch.float64)
    quality[0, 2] = float("nan")
    pos, mask = positives_from_quality(quality, tolerance=0.15)
    assert pos.sum() > q.shape[0]  # several positives per prompt on graded data
    bands = cost_bands(costs, 3)
    fast = cost_spectrum_infonce(q, e, pos, costs, bands, 0.02, 0.4, 0.3, mask)
    slow = reference_loss(q, e, pos, costs, bands, 0.02, 0.4, 0.3, mask)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)


def test_reduces_to_multi_positive_infonce_when_one_band_and_no_gamma():
    q, e, quality, costs = random_case(5, missing=0.0)
    pos, _ = positives_from_quality(quality)
    tau = 0.07
    loss = cost_spectrum_infonce(q, e, pos, costs, 1, tau_min=tau, alpha=0.0, gamma=0.0)
    logits = q @ e.T / tau  # (N, M)
    keep = pos.any(1)
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
    expected = (torch.logsumexp(logits, dim=1) - lse_pos)[keep].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # the costs are irrelevant once there is one band and no penalty
    other = cost_spectrum_infonce(q, e, pos, costs.flip(0), 1, tau_min=tau, alpha=0.0, gamma=0.0)
    assert other.item() == pytest.approx(loss.item(), rel=1e-12)
    assert vanilla_infonce(q, e, pos, tau).item() == pytest.approx(loss.item(), rel=1e-12)


def test_single_positive_single_band_is_cross_entropy():
    q, e, _, costs = random_case(2, missing=0.0)
    target = torch.tensor([0, 3, 1, 5, 2, 2, 4])
    pos = torch.nn.functional.one_hot(target, 6).bool()
    loss = vanilla_infonce(q, e, pos, tau=0.1)
    ce = torch.nn.functional.cross_entropy(q @ e.T / 0.1, target)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-12)


def test_no_positive_anywhere_gives_zero_with_a_gradient_not_nan():
    q, e, _, costs = random_case(0)
    quality = torch.zeros(7, 6, dtype=torch.float64)  # nobody is right
    quality[0, :] = float("nan")  # a fully missing row too
    pos, mask = positives_from_quality(quality)
    assert not pos.any()
    loss = cost_spectrum_infonce(q, e, pos, costs, cost_bands(costs, 5), mask=mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(e.grad).all()
    assert (q.grad == 0).all()


def test_queries_without_positive_are_skipped_not_averaged_in():
    q, e, quality, costs = random_case(4, missing=0.0)
    pos, _ = positives_from_quality(quality)
    pos[0] = False
    bands = cost_bands(costs, 2)
    full = cost_spectrum_infonce(q, e, pos, costs, bands)
    rest = cost_spectrum_infonce(q[1:], e, pos[1:], costs, bands)
    assert full.item() == pytest.approx(rest.item(), rel=1e-12)


def test_missing_cells_are_never_positive_and_leave_the_denominator():
    q, e, _, costs = random_case(6, missing=0.0)
    quality = torch.ones(7, 6, dtype=torch.float64)
    quality[:, 4] = float("nan")
    pos, mask = positives_from_quality(quality)
    assert not pos[:, 4].any() and not mask[:, 4].any()
    bands = torch.zeros(6, dtype=torch.int64)
    # alpha = 0: the band temperature (a property of the pool, not of a prompt) stays the same
    with_mask = cost_spectrum_infonce(q, e, pos, costs, bands, 0.05, 0.0, 0.2, mask=mask)
    keep = [0, 1, 2, 3, 5]
    dropped = cost_spectrum_infonce(q, e[keep], pos[:, keep], costs[keep], bands[keep], 0.05, 0.0, 0.2)
    assert with_mask.item() == pytest.approx(dropped.item(), rel=1e-12)


def test_gamma_sits_only_in_the_denominator():
    """Negatives of equal similarity are weighted by exp(-gamma c / tau): the loss pushes a cheap
    wrong expert away harder than an expensive one; the positive's pull does not depend on gamma."""
    e = torch.eye(3, dtype=torch.float64)
    s = torch.tensor([[0.3, 0.5, 0.5]], dtype=torch.float64, requires_grad=True)  # s_im directly
    costs = torch.tensor([0.5, 0.05, 1.0], dtype=torch.float64)
    pos = torch.tensor([[True, False, False]])
    bands = torch.zeros(3, dtype=torch.int64)
    tau, gamma = 0.1, 0.5
    cost_spectrum_infonce(s, e, pos, costs, bands, tau, 0.0, gamma).backward()
    g = s.grad[0]
    assert g[1] > g[2] > 0  # cheap negative 1 pushed harder than expensive negative 2
    w = torch.exp((s.detach()[0] - gamma * costs) / tau)
    assert (g[1] / g[2]).item() == pytest.approx((w[1] / w[2]).item(), rel=1e-10)
    assert g[0] < 0  # the positive is pulled in


def test_cost_bands_are_quantiles_and_ties_share_a_band():
    costs = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert cost_bands(costs, 5).tolist() == [0, 1, 2, 3, 4]
    assert cost_bands(costs, 1).tolist() == [0] * 5
    assert cost_bands(np.array([0.5, 0.1, 0.5, 0.5, 0.9]), 3).tolist()[0] == cost_bands(
        np.array([0.5, 0.1, 0.5, 0.5, 0.9]), 3).tolist()[2]
    b = cost_bands(np.linspace(0, 1, 11), 20)  # more bands than experts
    assert b.tolist() == sorted(b.tolist()) and len(set(b.tolist())) == 11
    with pytest.raises(ValueError, match="bands must be >= 1"):
        cost_bands(costs, 0)


def test_band_temperatures():
    costs = torch.tensor([0.0, 0.2, 0.6, 1.0], dtype=torch.float64)
    bands = torch.tensor([0, 0, 1, 1])
    tau = band_temperatures(costs, bands, tau_min=0.05, alpha=0.25)
    assert tau.tolist() == pytest.approx([0.05 + 0.25 * 0.1, 0.05 + 0.25 * 0.8])
    assert band_temperatures(costs, bands, 0.0, 0.25)[0].item() == pytest.approx(0.025)
    assert band_temperatures(costs, torch.tensor([0, 0, 0, 0]), 0.0, 0.0).item() > 0  # floored


def test_positives_from_quality_rules():
    quality = np.array([[1.0, 0.0, 1.0, np.nan], [0.0, 0.0, np.nan, 0.0], [0.9, 0.8, 0.5, 0.85]])
    pos, obs = positives_from_quality(quality, tolerance=0.1)
    assert pos.tolist() == [[True, False, True, False], [False] * 4, [True, True, False, True]]
    assert obs.tolist()[0] == [True, True, True, False]
    with pytest.raises(ValueError, match="tolerance"):
        positives_from_quality(quality, tolerance=2)


def test_shape_errors_are_clear():
    q, e, quality, costs = random_case(0)
    pos, _ = positives_from_quality(quality)
    with pytest.raises(ValueError, match="positives must be"):
        cost_spectrum_infonce(q, e, pos[:, :3], costs, 2)
    with pytest.raises(ValueError, match="costs must be"):
        cost_spectrum_infonce(q, e, pos, costs[:2], 2)
    assert math.isfinite(cost_spectrum_infonce(q.float(), e.float(), pos, costs.float(), 2).item())


def reference_bce(q, e, quality, scale, bias, mask):
    """The quality BCE written out cell by cell: mean over observed cells of -[y log p + (1-y) log(1-p)]."""
    n, m = quality.shape
    cells = []
    for i in range(n):
        for j in range(m):
            if not mask[i, j]:
                continue
            p = 1.0 / (1.0 + torch.exp(-(scale * torch.dot(q[i], e[j]) + bias[j])))
            y = quality[i, j]
            cells.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)))
    return sum(cells) / len(cells)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("graded", [False, True])
def test_quality_bce_matches_loop_reference_values_and_gradients(seed, graded):
    q, e, quality, _ = random_case(seed)
    if graded:
        g = torch.Generator().manual_seed(100 + seed)
        quality = torch.where(torch.isnan(quality), quality, torch.rand(quality.shape, generator=g, dtype=torch.float64))
    mask = ~torch.isnan(quality)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.linspace(-1, 1, e.shape[0], dtype=torch.float64).requires_grad_()
    got = quality_bce(quality_logits(q, e, scale, bias), quality, mask)
    want = reference_bce(q, e, quality, scale, bias, mask)
    assert torch.allclose(got, want, atol=1e-10)
    g1 = torch.autograd.grad(got, (q, e, scale, bias))
    g2 = torch.autograd.grad(want, (q, e, scale, bias))
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_quality_bce_skips_missing_cells_and_is_zero_without_any():
    q, e, quality, _ = random_case(3, missing=0.4)
    mask = ~torch.isnan(quality)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.zeros(e.shape[0], dtype=torch.float64)
    logits = quality_logits(q, e, scale, bias)
    base = quality_bce(logits, quality, mask)
    changed = torch.where(mask, quality, torch.full_like(quality, 0.7))  # a missing cell's value never counts
    assert torch.equal(quality_bce(logits, changed, mask), base)
    none = quality_bce(logits, quality, torch.zeros_like(mask))
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        quality_bce(logits, torch.full_like(logits, 2.0), mask)
    with pytest.raises(ValueError, match="bias must be"):
        quality_logits(q, e, scale, bias[:2])


def reference_regret(logits, outcome, mask, costs, temperature, spectrum):
    """``routing_regret`` written out with loops over knobs, prompts and experts."""
    lo, hi = float(costs.min()), float(costs.max())
    c = [(float(x) - lo) / (hi - lo) for x in costs]
    terms = []
    for s in spectrum:
        for i in range(logits.shape[0]):
            seen = [j for j in range(logits.shape[1]) if mask[i, j]]
            if not seen:
                continue
            w = [torch.exp((torch.sigmoid(logits[i, j]) - s * c[j]) / temperature) for j in seen]
            total = sum(w)
            terms.append(sum(wj / total * (outcome[i, j] - s * c[j]) for wj, j in zip(w, seen, strict=True)))
    return -sum(terms) / len(terms)


@pytest.mark.parametrize("seed", range(4))
def test_routing_regret_matches_loop_reference_values_and_gradients(seed):
    g = torch.Generator().manual_seed(200 + seed)
    _, _, quality, costs = random_case(seed, missing=0.3)
    mask = ~torch.isnan(quality)
    logits = torch.randn(quality.shape, generator=g, dtype=torch.float64).requires_grad_()
    spectrum = (0.0, 0.1, 1.0)
    got = routing_regret(logits, quality, mask, costs, 0.07, spectrum)
    want = reference_regret(logits, quality, mask, costs, 0.07, spectrum)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0], atol=1e-10)


def test_routing_regret_is_what_the_hard_choice_earns_at_a_low_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    outcome = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    costs = torch.tensor([10.0, 2.0, 1.0], dtype=torch.float64)  # normalised: 1, 1/9, 0
    mask = torch.ones(2, 3, dtype=torch.bool)
    # knob 0: argmax P(good) is expert 0 (earns 1) and expert 1 (earns 1); knob 1: P - c picks expert 1 in both
    hard = -((1.0 + 1.0) + (1.0 - 1 / 9) * 2) / 4
    assert routing_regret(logits, outcome, mask, costs, 1e-4, (0.0, 1.0)).item() == pytest.approx(hard, abs=1e-6)
    # a cell that was not observed is never chosen, whatever its score and outcome
    hidden = mask.clone()
    hidden[0, 0] = False
    assert routing_regret(logits, outcome, hidden, costs, 1e-4, (0.0,)).item() == pytest.approx(-1.0, abs=1e-6)


def test_routing_regret_moves_the_logits_towards_the_cheaper_equally_good_expert():
    logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    outcome = torch.tensor([[1.0, 1.0]], dtype=torch.float64)  # both right: the cheap one is the better choice
    loss = routing_regret(logits, outcome, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]))
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 1] < 0 < grad[0, 0]  # a descent step raises the cheap expert's P(good), lowers the dear one's


def test_routing_regret_without_observed_cells_and_bad_arguments():
    logits = torch.zeros(2, 3, requires_grad=True)
    none = routing_regret(logits, torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.ones(3))
    assert none.item() == 0.0 and none.requires_grad
    equal = routing_regret(logits, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(3))
    assert torch.isfinite(equal) and equal.item() == pytest.approx(-1.0)  # one cost: the knob changes nothing
    with pytest.raises(ValueError, match="share one"):
        routing_regret(logits, torch.ones(2, 2), torch.ones(2, 3, dtype=torch.bool), torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        routing_regret(logits, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="costs must be"):
        routing_regret(logits, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2))
