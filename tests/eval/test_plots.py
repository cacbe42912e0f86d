"""Deferral figures: one colour per router in every figure, expert labels that do not overlap,
the legend outside the data, titles, and the log cost axis."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from cscr.config import EvalConfig  # noqa: E402
from cscr.data.table import Expert, RoutingTable  # noqa: E402
from cscr.eval import evaluate_routers  # noqa: E402
from cscr.eval.plots import ROUTER_COLOURS, deferral_figure, plot_deferral, router_style  # noqa: E402
from cscr.routers import RouterContext, available_routers, get_router  # noqa: E402

# mean costs like RouterBench's crowded cheap end: mixtral-8x7b-chat and gpt-3.5-turbo-1106 nearly coincide
COSTS = {"mistral-7b-chat": 0.08, "mixtral-8x7b-chat": 0.24, "gpt-3.5-turbo-1106": 0.25, "Yi-34B-Chat": 0.26,
         "claude-instant-v1": 0.36, "claude-v2": 3.8, "gpt-4-1106-preview": 5.0}
QUALS = {"mistral-7b-chat": 0.59, "mixtral-8x7b-chat": 0.747, "gpt-3.5-turbo-1106": 0.750, "Yi-34B-Chat": 0.755,
         "claude-instant-v1": 0.684, "claude-v2": 0.567, "gpt-4-1106-preview": 0.879}


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    names = list(COSTS)
    n = 400
    q = (rng.random((n, len(names))) < np.array([QUALS[m] for m in names])).astype(float)
    c = np.array([COSTS[m] for m in names])[None, :] * rng.uniform(0.9, 1.1, (n, len(names)))
    splits = np.where(np.arange(n) % 2 == 0, "train", "test")
    t = RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=[f"t{i}" for i in range(n)], splits=splits,
                     categories=[""] * n, experts=[Expert(m) for m in names], quality=q, cost=c, source="crowded")
    emb = rng.standard_normal((n, 6)).astype(np.float32)
    ctx = RouterContext.from_table(t, emb, seed=0)
    routers = {name: get_router(name).fit(ctx) for name in ["oracle", "random", "pareto-random", "knn"]}
    return evaluate_routers(routers, t, emb, t.split_index("test"), EvalConfig(bootstrap=20))


def test_every_registered_router_has_its_own_colour():
    names = [n for n in available_routers() if n != "single"]
    colours = [router_style(n)[0] for n in names]
    assert len(set(colours)) == len(names), dict(zip(names, colours, strict=True))
    assert router_style("oracle")[0] != router_style("softmax-gate")[0]
    # a variant keeps its router's colour with its own dashes; a new name takes none of the named colours
    assert router_style("cscr@perplexity")[0] == router_style("cscr")[0]
    assert router_style("cscr@perplexity")[1] != router_style("cscr")[1]
    assert router_style("my-router")[0] not in ROUTER_COLOURS.values()
    assert router_style("my-router") == router_style("my-router")


def _boxes(fig, artists):
    """The labels' text extents (a label put further out has a leader line to its point)."""
    from matplotlib.text import Text

    r = fig.canvas.get_renderer()
    out = []
    for a in artists:
        a.update_positions(r)
        out.append(Text.get_window_extent(a, r))
    return out


def test_labels_do_not_overlap_and_the_legend_sits_outside_the_axes(result):
    fig = deferral_figure(result, title="Main table: crowded (test split)")
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        labels = [t for t in ax.texts if "(" in t.get_text()]
        assert sorted(t.get_text().split(" (")[0] for t in labels) == sorted(COSTS)
        assert any(t.get_text() == f"gpt-3.5-turbo-1106 ({result.expert_quality[2]:.3f})" for t in labels)
        boxes = _boxes(fig, labels)
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b)
        frame = ax.get_window_extent(fig.canvas.get_renderer())
        for b in boxes:  # inside the axes
            assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
        legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
        assert legend.x0 >= frame.x1  # to the right of the data, hiding no point
        assert ax.get_title() == "Main table: crowded (test split)"
        assert ax.get_xscale() == "linear"
    finally:
        plt.close(fig)


def test_router_colours_match_across_figures_and_log_cost(result):
    fig = deferral_figure(result, log_cost=True)
    try:
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel()
        by_label = {ln.get_label().split(" (")[0]: to_hex(ln.get_color()) for ln in ax.get_lines()
                    if " (AUDC" in ln.get_label()}
        assert set(by_label) == {"oracle", "random", "pareto-random", "knn"}
        for name, colour in by_label.items():
            assert colour == to_hex(router_style(name)[0])
    finally:
        plt.close(fig)


def test_plot_deferral_writes_a_png(result, tmp_path):
    path = plot_deferral(result, tmp_path / "d.png", title="t", log_cost=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()  # closed after writing
