"""The trained baselines (umr, thompson, parametric, softmax-gate, soft-moe) on tables whose right
answer is known, plus a smoke run on the real RouterBench data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cscr.data.table import Expert, RoutingTable
from cscr.routers import RouterContext, RouterError, get_router
from cscr.routers.parametric import ParametricRouter
from cscr.routers.soft_moe import SoftMoERouter
from cscr.routers.softmax_gate import cheapest_positive
from cscr.routers.thompson import ThompsonRouter
from cscr.routers.umr import UMRRouter, cluster_errors

CHEAP, A, B = 0, 1, 2  # expert columns: cheap and always wrong, A right on cluster 1, B right everywhere
ROUTERS = ["umr", "parametric", "softmax-gate", "soft-moe"]
# umr: 4 clusters over 2 true ones, so every cluster gets validation prompts; the MLPs: small
# batches, so that 240 train prompts make enough steps
NN = {"batch_size": 32}
KW = {"umr": {"n_clusters": 4}, "parametric": NN, "softmax-gate": NN, "soft-moe": NN}
# Soft-MoE maximises expected quality and is blind to cost while training: where A and B are
# both always right on cluster 1 it has no reason to weight A, so it gets a cluster 1 on which
# A is strictly better (B right half the time)
TABLE = {"soft-moe": {"b_c1": 0.5}}


def two_clusters(n: int = 400, seed: int = 0, missing_a: float = 0.0,
                 b_c1: float = 1.0) -> tuple[RoutingTable, np.ndarray, np.ndarray]:
    """(table, embeddings, cluster id 0/1). ``missing_a``: share of A's cluster-1 cells left missing;
    ``b_c1``: B's chance of being right on cluster 1."""
    rng = np.random.default_rng(seed)
    d = 16
    cluster = rng.integers(0, 2, n)
    emb = 0.25 * rng.standard_normal((n, d))
    emb[np.arange(n), cluster] += 1.0
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    q = np.zeros((n, 3))
    q[:, A] = (cluster == 0).astype(float)
    q[:, B] = 1.0
    q[(cluster == 0) & (rng.random(n) >= b_c1), B] = 0.0
    q[(cluster == 0) & (rng.random(n) < missing_a), A] = np.nan
    cost = np.tile([0.01, 0.1, 1.0], (n, 1))
    splits = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2])
    table = RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=[f"prompt {i}" for i in range(n)],
                         splits=splits, categories=np.where(cluster == 0, "c1", "c2"),
                         experts=[Expert("cheap"), Expert("A"), Expert("B")], quality=q, cost=cost,
                         source="synthetic")
    return table, emb, cluster


@pytest.fixture(scope="module")
def synth():
    return two_clusters()


def fitted(name: str, table: RoutingTable, emb: np.ndarray, seed: int = 0):
    return get_router(name, **KW[name]).fit(RouterContext.from_table(table, emb, seed=seed))


@pytest.mark.parametrize("name", ROUTERS)
def test_routes_by_cluster_and_cost(name, synth):
    table, emb, cluster = two_clusters(**TABLE[name]) if name in TABLE else synth
    r = fitted(name, table, emb)
    test = table.split_index("test")
    c1, c2 = test[cluster[test] == 0], test[cluster[test] == 1]
    assert (r.route(emb[c1], 0.5) == A).mean() >= 0.95  # right and cheaper than B
    assert (r.route(emb[c2], 0.0) == B).mean() >= 0.95  # the only right one
    top = r.knob_grid(emb[test])[-1]
    assert (r.route(emb[test], top) == CHEAP).all()  # lambda large: the cheapest
    sweep = r.route_sweep(emb[test], np.array([0.0, 0.5, top]))
    assert sweep.shape == (3, len(test)) and (sweep[1] == r.route(emb[test], 0.5)).all()


@pytest.mark.parametrize("name", ROUTERS)
def test_missing_cells_are_masked_not_zero(name):
    # most of A's cluster-1 cells missing: read as 0, A would look worse than B there
    table, emb, cluster = two_clusters(seed=1, missing_a=0.5 if name in TABLE else 0.7,
                                       **TABLE.get(name, {}))
    test = table.split_index("test")
    c1 = test[cluster[test] == 0]
    assert (fitted(name, table, emb).route(emb[c1], 0.3) == A).mean() >= 0.9
    zeroed = table.subset()
    zeroed.quality = np.nan_to_num(zeroed.quality)  # the mistake this test guards against
    assert (fitted(name, zeroed, emb).route(emb[c1], 0.3) == A).mean() <= 0.5


@pytest.mark.parametrize("name", ROUTERS)
def test_seeded_and_reproducible(name, synth):
    table, emb, _ = synth

    def state(seed):  # what the seed decides: UMR's centroids, the MLPs' predictions
        r = fitted(name, table, emb, seed=seed)
        return r.centroids if name == "umr" else r.utilities(emb)

    s0 = state(0)
    assert np.array_equal(s0, state(0))
    assert not np.array_equal(s0, state(3))


def test_candidates_restrict_choices(synth):
    table, emb, _ = synth
    r = fitted("parametric", table, emb)
    assert set(r.route(emb, 0.0, candidates=["cheap", "A"])) <= {CHEAP, A}
    with pytest.raises(RouterError, match="unknown expert"):
        r.route(emb, 0.0, candidates=["nope"])


# ---- UMR ----
def test_cluster_errors_mask_and_fallback():
    assign = np.array([0, 0, 1, 1])
    q = np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, np.nan], [0.0, np.nan]])
    err = cluster_errors(assign, q, k=3)
    # cluster 0: expert 0 one observed right answer -> 0 (the NaN is not a 0); expert 1 wrong -> 1
    # cluster 1: expert 0 wrong -> 1; expert 1 nothing observed -> its global error 1
    # cluster 2 is empty: global errors (2/3 for expert 0, 1 for expert 1)
    assert np.allclose(err, [[0.0, 1.0], [1.0, 1.0], [2 / 3, 1.0]])
    with pytest.raises(RouterError, match="no observed validation answer"):
        cluster_errors(assign, np.full((4, 2), np.nan), k=2)


def test_umr_default_k_clamped_and_unseen_experts(synth):
    table, emb, cluster = synth
    idx = np.concatenate([table.split_index("train")[:5], table.split_index("val", "test")])
    r = UMRRouter().fit(RouterContext.from_table(table.subset(idx), emb[idx]))
    assert r.centroids.shape[0] == 5  # k = 20 clamped to the 5 train prompts
    # an explicit pool scored from validation answers only
    ctx = RouterContext.from_table(table, emb)
    r = UMRRouter(n_clusters=4).fit(ctx, experts=["B", "A"], val_rows=table.split_index("val"))
    assert r.expert_names == ["B", "A"] and np.allclose(r.costs, [1.0, 0.1])
    test = table.split_index("test")
    c1 = test[cluster[test] == 0]
    assert (r.route(emb[c1], 0.5) == 1).mean() >= 0.95  # A, now column 1


# ---- Thompson ----
def bandit_table(n: int = 600, p=(0.9, 0.4), costs=(1.0, 1.0), seed: int = 0) -> RoutingTable:
    rng = np.random.default_rng(seed)
    q = (rng.random((n, len(p))) < np.array(p)).astype(float)
    return RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=["x"] * n, splits=["test"] * n,
                        categories=[""] * n, experts=[Expert(f"e{j}") for j in range(len(p))],
                        quality=q, cost=np.tile(costs, (n, 1)), source="synthetic")


def thompson_on(table: RoutingTable, seed: int = 0, **kw) -> tuple[ThompsonRouter, np.ndarray]:
    emb = np.zeros((table.n, 4), dtype=np.float32)
    ctx = RouterContext(table, emb, np.arange(table.n), np.arange(0), seed=seed)
    return ThompsonRouter(**kw).fit(ctx), emb


def test_thompson_converges_to_the_better_expert():
    table = bandit_table()
    r, emb = thompson_on(table)
    s = r.stream(emb, np.array([0.0]), np.arange(table.n))
    assert (s.choices[0, -200:] == 0).mean() >= 0.9
    mean = s.posterior_mean[0]
    assert abs(mean[0] - 0.9) < 0.05 and mean[0] > mean[1]


def test_thompson_sweep_lambda_and_seed():
    table = bandit_table(p=(0.9, 0.4), costs=(1.0, 0.2))
    r, emb = thompson_on(table, seed=0)
    rows = np.arange(table.n)
    grid = r.knob_grid(emb, 50, rows)
    ch = r.route_sweep(emb, grid, rows)
    assert ch.shape == (len(grid), table.n)
    assert (ch[-1] == 1).all()  # top of the grid: always the cheap expert
    assert (ch[0, -200:] == 0).mean() >= 0.9  # lambda 0: the better one
    assert np.array_equal(ch, r.route_sweep(emb, grid, rows))  # reproducible
    r1, _ = thompson_on(table, seed=1)
    assert not np.array_equal(ch[0], r1.route_sweep(emb, grid, rows)[0])
    with pytest.raises(RouterError, match="pass the table rows"):
        r.route(emb, 0.0)


def test_thompson_missing_cell_is_no_update():
    table = bandit_table(p=(0.5, 1.0))
    table.quality[:, 0] = np.nan  # expert 0's answers are never known
    r, emb = thompson_on(table)
    s = r.stream(emb, np.array([0.0]), np.arange(table.n))
    assert s.alpha[0, 0] == 1.0 and s.beta[0, 0] == 1.0  # not counted as failures
    assert s.alpha[0, 1] > 1.0 and s.beta[0, 1] == 1.0


def test_thompson_train_prior():
    table = bandit_table(n=200, p=(0.9, 0.1))
    table.splits[:] = "train"
    r, _ = thompson_on(table, prior="train", prior_strength=10.0)
    assert r.a0[0] > r.b0[0] and r.a0[1] < r.b0[1] and np.isclose(r.a0 + r.b0, 12.0).all()


# ---- the losses mask missing cells ----
@pytest.mark.parametrize("cls", [ParametricRouter, SoftMoERouter])
def test_nn_loss_ignores_missing_cells(cls):
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.5, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    cls().loss(logits, y).backward()
    assert logits.grad is not None and logits.grad[0, 2] == 0.0  # the missing cell pulls nothing
    y2 = y.clone()
    y2[0, 2] = 0.0
    assert not torch.isclose(cls().loss(logits, y), cls().loss(logits, y2))  # a 0 is not a NaN


def test_cheapest_positive_labels():
    nan = np.nan
    q = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 0], [0.2, 0.5, 0.45],
                  [1, nan, 1],  # the missing expert is dearer than the label: label stands
                  [nan, 1, 1],  # a cheaper expert is missing: it might have been right, no label
                  [0.2, nan, 0.45]])  # graded, best < 1: the missing one might beat it, no label
    costs = np.array([0.1, 0.5, 1.0])
    assert cheapest_positive(q, costs).tolist() == [0, 1, -1, 1, 0, -1, -1]
    assert cheapest_positive(q, costs, tolerance=0.1)[3] == 1 and cheapest_positive(q, costs, 0.3)[3] == 0


# ---- real data: RouterBench from ../shared/data with real MiniLM embeddings ----
@pytest.fixture(scope="module")
def routerbench_small(shared_data, tmp_path_factory):
    """A seeded sample of the real RouterBench table (every split kept) and its MiniLM embeddings
    (prompts cut at 128 tokens to keep the encoding short on a shared CPU)."""
    from cscr.config import DataConfig, EncoderConfig
    from cscr.data import load_dataset
    from cscr.encoder import Encoder, embed_table

    table = load_dataset("routerbench", DataConfig(data_dir=str(shared_data)))
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.permutation(table.split_index(s))[:k]
                                   for s, k in (("train", 160), ("val", 60), ("test", 120))]))
    table = table.subset(keep)
    emb = embed_table(table, Encoder(EncoderConfig(max_seq_length=128)), tmp_path_factory.mktemp("emb"), progress=None)
    return table, emb


@pytest.mark.slow
def test_smoke_on_routerbench(routerbench_small):
    from cscr.config import EvalConfig
    from cscr.eval import evaluate_routers

    table, emb = routerbench_small
    ctx = RouterContext.from_table(table, emb)
    names = [*ROUTERS, "thompson"]
    routers = {n: get_router(n).fit(ctx) for n in names}
    test = table.split_index("test")
    res = evaluate_routers(routers, table, emb, test, EvalConfig(n_lambdas=40))
    cheapest = int(np.argmin(res.expert_cost))
    for n in names:
        ev = res.routers[n]
        assert ev.choices.shape[1] == len(res.rows) and ev.choices.min() >= 0 and ev.choices.max() < 11
        assert 0.0 < ev.audc <= 1.0 and ev.peak <= 1.0
        assert (ev.choices[-1] == cheapest).mean() >= 0.95  # the top of the grid: the cheapest expert
        if n == "softmax-gate":
            # trained on the cheapest correct expert, the gate sits at the cheap end already at
            # lambda 0 (on RouterBench mostly the cheapest expert): little room for the knob
            assert ev.costs[0] <= np.median(res.expert_cost)
            continue
        assert len(np.unique(ev.costs)) > 2  # the knob moves the router along the cost axis
        assert ev.qualities[0] > res.expert_quality[cheapest]  # lambda 0 beats the cheapest expert


def test_bad_settings_are_refused_by_name():
    from cscr.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epochs'\]"):
        get_router("parametric", epochs=3)
    with pytest.raises(RouterError, match="n_clusters"):
        get_router("umr", n_clusters=0)
    with pytest.raises(RouterError, match="prior must be"):
        get_router("thompson", prior="flat")
    with pytest.raises(RouterError, match="tolerance"):
        get_router("softmax-gate", tolerance=2.0)
