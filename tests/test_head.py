"""The MLP head: shapes, unit outputs, width and activation from the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cscr.config import ConfigError, HeadConfig
from cscr.head import Head


def test_forward_gives_unit_queries_of_descriptor_width():
    head = Head(HeadConfig(in_dim=384, hidden=64, out_dim=12))
    q = head(torch.randn(5, 384))
    assert q.shape == (5, 12)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(5))


def test_width_and_activation_follow_the_config():
    head = Head(HeadConfig(in_dim=8, hidden=32, out_dim=4, activation="relu"))
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 32), (32, 4)]
    assert any(isinstance(m, torch.nn.ReLU) for m in head.modules())
    assert any(isinstance(m, torch.nn.GELU) for m in Head(HeadConfig(in_dim=8, hidden=4, out_dim=2)).modules())
    with pytest.raises(ConfigError, match="activation"):
        HeadConfig(activation="tanh")


def test_encode_matches_forward_in_batches_and_restores_mode():
    torch.manual_seed(0)
    head = Head(HeadConfig(in_dim=16, hidden=8, out_dim=3, dropout=0.5))
    head.train()
    x = np.random.default_rng(0).standard_normal((25, 16)).astype(np.float32)
    out = head.encode(x, batch_size=7)
    assert head.training
    head.eval()
    with torch.no_grad():
        ref = head(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        head.encode(x[:, :5])


def test_gradients_reach_both_layers():
    head = Head(HeadConfig(in_dim=6, hidden=5, out_dim=3))
    head(torch.randn(4, 6))[:, 0].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
