"""Checks the router tests share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from cscr.serve.service import RouterService


def assert_served_as_evaluated(router: Any, encoder: Any, e: np.ndarray, candidates: Sequence[str]) -> None:
    """``Router.rank`` picks what the evaluation sweep picks at every knob value of a small grid, with
    and without ``candidates``, and ``RouterService`` (what serving runs) decides the same."""
    grid = router.knob_grid(e, 7)
    for cands in (None, list(candidates)):
        want = np.array(router.expert_names)[router.route_sweep(e, grid, candidates=cands)]
        for lam, expected in zip(grid, want, strict=True):
            assert [r[0].expert for r in router.rank(e, float(lam), cands)] == list(expected)
    service = RouterService(encoder, router)
    want = np.array(router.expert_names)[router.route_sweep(e, grid)]
    for lam, expected in zip(grid, want, strict=True):
        assert [d.chosen for d in service.decide(e, float(lam))] == list(expected)
