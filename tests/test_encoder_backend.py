"""The encoder's ONNX Runtime backends (cscr.encoder_onnx) against the torch one: real
all-MiniLM-L6-v2, real RouterBench prompts. The ONNX export is made once per session (about
10 s) and shared by the tests through each test's private user cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cscr.cli import main

from cscr.config import ENCODER_BACKENDS, ConfigError, DataConfig, EncoderConfig
from cscr.data.table import Expert, RoutingTable
from cscr.encoder import Encoder, embed_table, encoder_id_for, get_encoder, load_run_embeddings
from cscr.encoder_onnx import FILES, export_folder
from cscr.runs.paths import RunPaths

TEXTS = [
    "What is the capital of France?",
    "Which city is the capital of France?",
    "Write a Python function that reverses a list.",
    "Solve for x: 3x + 5 = 20.",
]
PREAMBLE = " ".join(f"Example {i}: which planet is closest to the sun? Answer: Mercury." for i in range(40))
LONG = [PREAMBLE + " Question: what is the boiling point of water at sea level in Celsius?",
        PREAMBLE + " Question: write a Python function that sorts a list of strings by length.",
        PREAMBLE + " Question: who painted the Mona Lisa?"]


def _table(texts: list[str]) -> RoutingTable:
    n = len(texts)
    return RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=texts, splits=["train"] * (n - 1) + ["test"],
                        categories=[""] * n, experts=[Expert("a"), Expert("b")], quality=np.zeros((n, 2)),
                        cost=np.ones((n, 2)))


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory) -> Path:
    """The user cache holding the session's one export (both files)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'cscr[onnx]'")
    root = tmp_path_factory.mktemp("onnx-export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSCR_CACHE_DIR", str(root))
        Encoder(EncoderConfig(backend="onnx-int8"))
    return root


@pytest.fixture
def exported(onnx_export, _private_user_cache) -> Path:
    """This test's user cache (conftest) with the session's export linked in: nothing re-exported."""
    (Path(os.environ["CSCR_CACHE_DIR"]) / "onnx").symlink_to(onnx_export / "onnx", target_is_directory=True)
    return onnx_export


@pytest.fixture(scope="session")
def routerbench_prompts(shared_data) -> list[str]:
    """24 RouterBench test prompts: 8 per task (few-shot ARC and Winogrande ones are long)."""
    from cscr.data import load_dataset

    table = load_dataset("routerbench", DataConfig(data_dir=str(shared_data)))
    test = table.split_index("test")
    picks = [r for cat in np.unique(table.categories[test]) for r in test[table.categories[test] == cat][:8]]
    return [str(t) for t in table.texts[picks]]


def test_the_backend_is_part_of_the_encoder_id_and_a_bad_name_is_refused():
    ids = {b: encoder_id_for(EncoderConfig(backend=b)) for b in ENCODER_BACKENDS}  # without loading anything
    assert len(set(ids.values())) == len(ENCODER_BACKENDS)
    assert ids["torch"].startswith("all-MiniLM-L6-v2-win8-") and ids["torch"].count("-") == 5  # as before backends
    assert ids["onnx"].startswith("all-MiniLM-L6-v2-win8-onnx-")
    assert ids["onnx-int8"].startswith("all-MiniLM-L6-v2-win8-onnxint8-")
    assert encoder_id_for(EncoderConfig(backend="onnx-int8", long_prompt="head")) != ids["onnx-int8"]
    assert encoder_id_for(EncoderConfig(backend="onnx-int8", batch_size=8)) == ids["onnx-int8"]  # same vectors
    with pytest.raises(ConfigError, match=r"encoder backend must be one of \('torch', 'onnx', 'onnx-int8'\), got 'tensorrt'"):
        EncoderConfig(backend="tensorrt")


def test_prepare_refuses_an_unknown_backend(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--dataset", "generic", "--out", str(tmp_path / "r"), "--encoder-backend", "tensorrt"])
    assert exc.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_backends_embed_real_prompts_as_torch_does(exported, routerbench_prompts):
    prompts = routerbench_prompts + TEXTS
    torch_vecs = get_encoder(EncoderConfig()).encode(prompts)
    fp32 = get_encoder(EncoderConfig(backend="onnx")).encode(prompts)
    int8 = get_encoder(EncoderConfig(backend="onnx-int8")).encode(prompts)
    for v in (fp32, int8):
        assert v.shape == torch_vecs.shape and v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.sum(fp32 * torch_vecs, axis=1).min() > 0.9999  # the same float32 network
    cos = np.sum(int8 * torch_vecs, axis=1)
    assert cos.min() > 0.98, cos  # int8 weights and activations: close, not equal (about 0.99 measured)
    # what routing reads: which prompts are alike
    sims_t, sims_q = torch_vecs @ torch_vecs.T, int8 @ int8.T
    assert np.abs(sims_q - sims_t).max() < 0.05
    # each prompt's nearest other prompt under int8 is torch's nearest, or one within 0.01 of it
    # (RouterBench's few-shot prompts come in near-ties)
    rows = np.arange(len(prompts))
    np.fill_diagonal(sims_t, -1)
    np.fill_diagonal(sims_q, -1)
    gap = sims_t[rows, sims_t.argmax(axis=1)] - sims_t[rows, sims_q.argmax(axis=1)]
    assert gap.max() < 0.01, gap


@pytest.mark.slow
def test_an_int8_vector_depends_on_its_text_only(exported, routerbench_prompts):
    """Dynamic quantisation scales activations per call: a batch would change its texts' vectors."""
    enc = get_encoder(EncoderConfig(backend="onnx-int8"))
    prompts = routerbench_prompts[:6] + TEXTS
    batched = enc.encode(prompts)
    alone = np.concatenate([enc.encode([p]) for p in prompts])
    np.testing.assert_allclose(batched, alone, atol=1e-6)
    np.testing.assert_allclose(enc.encode(prompts[::-1])[::-1], batched, atol=1e-6)


@pytest.mark.slow
def test_windows_mode_with_the_int8_backend(exported):
    enc = get_encoder(EncoderConfig(backend="onnx-int8", long_prompt="windows"))
    assert (enc.token_counts(LONG) > enc.window).all()
    pieces = enc.pieces(LONG[:1])[0]
    assert len(pieces) > 2  # several windows
    mean = enc.encode(pieces).mean(axis=0)
    np.testing.assert_allclose(enc.encode(LONG[:1])[0], mean / np.linalg.norm(mean), atol=1e-5)
    w = enc.encode(LONG)
    ref = get_encoder(EncoderConfig(long_prompt="windows")).encode(LONG)
    assert np.sum(w * ref, axis=1).min() > 0.98
    # the questions past the shared preamble are seen, as torch sees them
    upper = np.triu_indices(3, 1)
    assert (w @ w.T)[upper].max() < 0.995
    np.testing.assert_allclose((w @ w.T)[upper], (ref @ ref.T)[upper], atol=0.01)


@pytest.mark.slow
def test_a_run_records_the_backend_and_from_run_serves_with_it(exported, tmp_path, capsys):
    logs = tmp_path / "logs.jsonl"
    rows = [{"prompt_id": f"q{i}", "prompt": t, "model": m, "quality": float((i + k) % 2), "cost": 0.001 * (k + 1)}
            for i, t in enumerate(TEXTS + LONG) for k, m in enumerate(["small", "large"])]
    logs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    assert main(["prepare", "--dataset", "generic", "--option", f"file={logs}", "--probe-size", "1",
                 "--val-fraction", "0", "--out", str(out), "--encoder-backend", "onnx-int8"]) == 0
    assert "backend: onnx-int8" in capsys.readouterr().out
    manifest = json.loads((RunPaths.of(out).embeddings / "manifest.json").read_text())
    assert manifest["backend"] == "onnx-int8" and manifest["config"]["backend"] == "onnx-int8"
    served = Encoder.from_run(out)
    assert served.cfg.backend == "onnx-int8" and served.encoder_id == manifest["encoder_id"]
    table = RoutingTable.load(RunPaths.of(out).table)
    np.testing.assert_allclose(served.encode(list(table.texts)), load_run_embeddings(out), atol=1e-5)

    # the same prompts embedded by torch: another encoder id, so the caches never mix
    plain = RunPaths.of(tmp_path / "plain")
    _table(TEXTS).save(plain.table)
    embed_table(_table(TEXTS), get_encoder(EncoderConfig()), plain.embeddings, progress=None)
    assert Encoder.from_run(plain.root).cfg.backend == "torch"  # a run made without the option
    assert {p.name for p in (Path(os.environ["CSCR_CACHE_DIR"]) / "embeddings").iterdir()} == {
        served.encoder_id, encoder_id_for(EncoderConfig())}


@pytest.mark.slow
def test_the_export_is_made_once_and_reused(exported):
    folder = next((exported / "onnx").iterdir())
    info = json.loads((folder / "export.json").read_text())
    assert set(info["files"].values()) == set(FILES.values()) and all((folder / f).exists() for f in FILES.values())
    assert info["min_cosine_to_torch"]["onnx"] > 0.9999
    stamp = {f: (folder / f).stat().st_mtime_ns for f in FILES.values()}
    again = export_folder(None, folder.name, exported)  # already there: the model is not even read
    assert again == folder and {f: (folder / f).stat().st_mtime_ns for f in FILES.values()} == stamp
    broken = exported / "onnx" / "broken-000000000000"
    broken.mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete ONNX export"):
        export_folder(None, broken.name, exported)
    broken.rmdir()
    assert not [p for p in (exported / "onnx").iterdir() if p.name.startswith(".")]  # no temporary folder left
