"""The lexical view (cscr/lexical.py): fitted on the train split by ``cscr prepare`` on real
LLMRouter prompts (generic logs), stored with the run, appended alike to what training reads and what serving
embeds (real MiniLM), refitted for out-of-distribution splits, and refused when damaged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cscr.cli import main
from cscr.serve.service import RouterService

from cscr.encoder import Encoder, load_run_embeddings
from cscr.lexical import LexicalConfig, LexicalView, WithLexical, features, for_run, refit_features
from cscr.runs.inputs import Run
from cscr.runs.paths import RunPaths

# forms MiniLM reads alike: a cloze stem (OpenBookQA-like) and a where-question (CommonsenseQA-like)
TEXTS = [f"a desert environment has low {w}" for w in ("rain", "water", "trees", "shade", "snow")] + \
        [f"Where would you find a {w}?" for w in ("steak house", "canoe", "ladder", "goldfish", "gong")]


def test_fit_transform_save_load_and_refusals(tmp_path):
    view = LexicalView.fit(TEXTS, LexicalConfig(dims=4, weight=0.5))
    assert view is not None and view.dims == 4 and view.fitted_on == len(TEXTS)
    z = view.transform(TEXTS)
    assert z.shape == (10, 4) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 0.5, rtol=1e-5)
    # the two forms land apart: each text is nearer its own form's centroid
    a, b = z[:5].mean(0), z[5:].mean(0)
    assert all((r @ a > r @ b) == (i < 5) for i, r in enumerate(z))

    view.save(tmp_path)
    again = LexicalView.load(tmp_path)
    assert again is not None and again.digest == view.digest
    np.testing.assert_array_equal(again.transform(["Where would you find a lake?"]),
                                  view.transform(["Where would you find a lake?"]))
    assert features(np.ones((2, 3)), TEXTS[:2], None).shape == (2, 3)
    assert features(np.ones((2, 3)), TEXTS[:2], view).shape == (2, 7)

    # nothing to fit, or switched off
    assert LexicalView.fit(TEXTS, LexicalConfig(dims=0)) is None
    assert LexicalView.fit(["one", "two"]) is None
    with pytest.raises(ValueError, match="dims must be >= 0"):
        LexicalConfig(dims=-1)

    # a damaged view is refused with the command that rebuilds it
    np.save(tmp_path / "lexical" / "components.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="damaged.*cscr prepare"):
        LexicalView.load(tmp_path)
    meta = tmp_path / "lexical" / "lexical.json"
    view.save(tmp_path)
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "digest": "0" * 12}))
    with pytest.raises(ValueError, match="digest"):
        LexicalView.load(tmp_path)


def _logs(tmp_path, shared_data):
    """Routing logs (the generic loader's schema) on 90 real LLMRouter prompts of three tasks."""
    rows, seen = [], {"openbook_qa": 0, "commonsense_qa": 0, "gsm8k": 0}
    with open(shared_data / "llmrouter" / "default_query_train.jsonl") as f:
        for line in f:
            item = json.loads(line)
            task = item["task_name"]
            if seen.get(task, 30) >= 30:
                continue
            seen[task] += 1
            i = len(rows) // 2
            rows += [{"prompt_id": f"q{i}", "prompt": item["query"], "model": m, "category": task,
                      "quality": float((i + k) % 3 == 0), "cost": 0.001 * (k + 1)} for k, m in enumerate(["small", "large"])]
    logs = tmp_path / "logs.jsonl"
    logs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return logs


def test_prepare_fits_on_train_and_serving_embeds_as_training_read(tmp_path, shared_data, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["prepare", "--dataset", "generic", "--option", f"file={_logs(tmp_path, shared_data)}", "--probe-size", "4",
            "--out", str(out)]
    assert main([*base, "--lexical-dims", "16"]) == 0
    cap = capsys.readouterr().out
    run = Run.of(out)
    view = LexicalView.load(run.paths.embeddings)
    n_train = len(run.table.split_index("train"))
    assert view is not None and view.dims == 16 and view.fitted_on == n_train
    assert f"lexical     16 dims from {len(view.vocabulary)} character n-grams of the {n_train} train prompts" in cap

    emb = load_run_embeddings(out)
    assert emb.shape == (run.table.n, 384 + 16)
    np.testing.assert_array_equal(emb[:, :384], load_run_embeddings(out, lexical=False))
    # the served encoder (Encoder.from_run) gives the features training read, for the run's own prompts
    rows = run.table.split_index("test")[:6]
    served = Encoder.from_run(out).encode(list(run.table.texts[rows]))
    np.testing.assert_allclose(served, emb[rows], atol=1e-5)

    # a head trained on the run routes served prompts as it routes the run's own features
    assert main(["train", "--run", str(out), "--plain", "--epochs", "2", "--threads", "1"]) == 0
    capsys.readouterr()
    loads = []
    real_load = LexicalView.load
    monkeypatch.setattr(LexicalView, "load", classmethod(lambda cls, d: loads.append(d) or real_load(d)))
    service = RouterService.from_run(out)
    assert isinstance(service.encoder, WithLexical) and service.router.head.cfg.in_dim == 384 + 16
    # start-up reads the view once, whether the service is built directly or as a replica builds it
    assert len(loads) == 1
    from cscr.serve.router_core import make_service

    assert isinstance(make_service({"run": str(out)}).encoder, WithLexical) and len(loads) == 2
    monkeypatch.undo()
    # whichever encoder it is given, the service appends the run's view once (for_run is idempotent)
    plain = Encoder.from_run(out)
    assert RouterService.from_run(out, encoder=plain).encoder is plain
    assert for_run(plain.encoder, out).view.digest == view.digest and for_run(plain, out) is plain
    other = WithLexical(plain.encoder, LexicalView.fit(TEXTS, LexicalConfig(dims=4)))
    with pytest.raises(ValueError, match="appends lexical view"):
        RouterService.from_run(out, encoder=other)
    texts = list(run.table.texts[rows])
    for lam in (0.0, 0.5):
        want = [r[0].expert for r in service.router.rank(emb[rows], lam)]
        assert [d.chosen for d in service.route(texts, lam)] == want

    # an out-of-distribution split refits the view on its own training rows only
    fit_rows = run.table.split_index("train")[:40]
    refit = refit_features(emb[:, :384], run.table.texts, view, fit_rows)
    own = LexicalView.fit(list(run.table.texts[fit_rows]), view.cfg)
    assert own is not None
    np.testing.assert_array_equal(refit[:, :384], emb[:, :384])
    np.testing.assert_allclose(refit[:, 384:], own.transform(list(run.table.texts)), atol=1e-6)

    # --lexical-dims 0 removes the view; a negative count is refused
    assert main([*base, "--lexical-dims", "0"]) == 0
    assert "lexical     none (--lexical-dims 0)" in capsys.readouterr().out
    assert not (RunPaths.of(out).embeddings / "lexical").exists()
    assert load_run_embeddings(out).shape == (run.table.n, 384)
    assert main([*base, "--lexical-dims", "-1"]) != 0
