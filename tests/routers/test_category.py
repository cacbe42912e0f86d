"""The per-category lookup router (SPEC.md section 7): by-hand tables, no categories, new prompts."""

from __future__ import annotations

import numpy as np
import pytest

from cscr.data.table import Expert, RoutingTable
from cscr.eval.evaluate import evaluate_routers
from cscr.routers import RouterContext, RouterError, available_routers, get_router


def make(q, c, cats, splits):
    q, c = np.asarray(q, float), np.asarray(c, float)
    n, m = q.shape
    table = RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=[f"t{i}" for i in range(n)],
                         splits=np.asarray(splits), categories=list(cats),
                         experts=[Expert(f"e{j}") for j in range(m)], quality=q, cost=c)
    emb = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    return table, emb, RouterContext.from_table(table, emb)


# train: math prompts are solved by the dear expert e1 only, chat prompts by both; test rows 4, 5
Q = [[0, 1], [0, 1], [1, 1], [1, 0.5], [0, 1], [1, 1]]
C = [[1, 10]] * 6
CATS = ["math", "math", "chat", "chat", "math", "chat"]
SPLITS = ["train"] * 4 + ["test"] * 2


def test_lookup_by_hand():
    table, emb, ctx = make(Q, C, CATS, SPLITS)
    r = get_router("per-category").fit(ctx)
    assert "per-category" in available_routers() and r.categories == ["chat", "math"]
    u = r.utilities(emb[4:], rows=np.array([4, 5]))
    np.testing.assert_allclose(u, [[0.0, 1.0], [1.0, 0.75]], atol=1e-5)  # per-category train means
    np.testing.assert_array_equal(r.route(emb[4:], 0.0, rows=np.array([4, 5])), [1, 0])  # math -> e1, chat -> e0
    # costs are normalised (c = 0.1, 1): at lambda above 1 / 0.9 even math goes to the cheap e0
    np.testing.assert_array_equal(r.route(emb[4:], 1.2, rows=np.array([4, 5])), [0, 0])
    res = evaluate_routers({"per-category": r}, table, emb, table.split_index("test"))
    assert res.routers["per-category"].peak == pytest.approx(1.0)  # both test prompts right at lambda 0


def test_without_categories_it_is_the_best_expert_overall():
    table, emb, ctx = make(Q, C, [""] * 6, SPLITS)
    r = get_router("per-category").fit(ctx)
    u = r.utilities(emb[4:], rows=np.array([4, 5]))
    np.testing.assert_allclose(u, np.tile([0.5, 0.875], (2, 1)), atol=1e-5)  # means over all train prompts


def test_new_prompts_unseen_categories_and_missing_cells_fall_back_to_overall_means():
    q = np.array(Q, dtype=float)
    q[0, 1] = np.nan  # a missing cell is left out of the mean
    cats = CATS[:5] + ["poetry"]  # a category with no train prompt
    table, emb, ctx = make(q, C, cats, SPLITS)
    r = get_router("per-category").fit(ctx)
    overall = np.array([0.5, 2.5 / 3])
    np.testing.assert_allclose(r.utilities(emb[5:], rows=np.array([5]))[0], overall, atol=1e-5)
    np.testing.assert_allclose(r.utilities(emb[:2])[0], overall, atol=1e-5)  # no rows: a new request
    np.testing.assert_allclose(r.utilities(emb[4:5], rows=np.array([4]))[0], [0.0, 1.0], atol=1e-5)
    with pytest.raises(RouterError, match="rows has shape"):
        r.utilities(emb[:2], rows=np.array([1]))
    with pytest.raises(RouterError, match="rows must index the fitted table"):
        r.utilities(emb[:1], rows=np.array([99]))


def test_needs_train_prompts():
    _, _, ctx = make(Q, C, CATS, ["test"] * 6)
    with pytest.raises(RouterError, match="needs train prompts"):
        get_router("per-category").fit(ctx)
