"""Descriptor store (Parquet, atomic, every kind) and probe-outcome descriptors."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from cscr.data.table import Expert, RoutingTable
from cscr.fingerprints.probe_outcome import (
    probe_basis_id,
    probe_outcome_descriptors,
    standardize_normalize,
)
from cscr.fingerprints.store import DescriptorError, DescriptorStore, FingerprintSettings


@pytest.fixture
def store(tmp_path):
    return DescriptorStore(tmp_path / "run" / "descriptors.parquet")


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_write_read_roundtrip_with_schema(store):
    store.write("a", "logit", unit([1, 2, 3]), basis_id="tok:3", source="hf")
    store.write_many({"b": unit([0, 1, 0]), "c": unit([1, 0, 0])}, "logit", basis_id="tok:3", source="hf")
    got = store.read("logit")
    assert sorted(got) == ["a", "b", "c"]
    np.testing.assert_allclose(got["a"], unit([1, 2, 3]), rtol=1e-6)
    table = pq.read_table(store.path)
    assert table.column_names == ["expert", "kind", "vector", "dimension", "basis_id", "source", "created", "steps",
                                  "basis_size", "n_probes", "scorer", "scorer_context", "max_prompt_tokens"]
    row = table.to_pylist()[0]
    assert row["dimension"] == 3 and row["basis_id"] == "tok:3" and row["source"] == "hf" and row["created"]
    assert store.info("logit")["experts"] == ["a", "b", "c"]
    # order follows `experts`
    assert list(store.read("logit", experts=["c", "a"])) == ["c", "a"]


def test_settings_are_structured_fields(store):
    logit = FingerprintSettings(steps=10, basis_size=3, n_probes=192, max_prompt_tokens=256)
    store.write_many({"a": unit([1, 2, 3]), "b": unit([0, 1, 0])}, "logit", basis_id="tok:3", source="model a",
                     settings=logit)
    ppl = FingerprintSettings(n_probes=2, scorer="smollm2", scorer_context="none", max_prompt_tokens=256)
    store.write("c", "perplexity", unit([1, 1, 0]), basis_id="ppl", settings=ppl)
    assert store.info("logit")["settings"] == logit and store.settings("perplexity") == ppl
    row = pq.read_table(store.path).to_pylist()[0]
    assert (row["steps"], row["basis_size"], row["n_probes"], row["scorer"]) == (10, 3, 192, None)
    # descriptors of one kind made with other settings do not compare: refused
    with pytest.raises(DescriptorError, match=r"other settings .*'steps': \(10, 5\)"):
        store.write("d", "logit", unit([1, 0, 0]), basis_id="tok:3",
                    settings=FingerprintSettings(steps=5, basis_size=3, n_probes=192))
    store.write("a", "logit", unit([1, 0, 0]), basis_id="tok:3", settings=logit)  # replacing one's own row is fine


def test_a_store_with_settings_as_prose_is_read_and_upgraded(store):
    """Stores written before the settings had columns: the prose is parsed once."""
    import pyarrow as pa

    store.path.parent.mkdir(parents=True)
    old = pa.table({"expert": ["a", "b"], "kind": ["logit", "perplexity"],
                    "vector": [unit([1, 2]).tolist(), unit([2, 1]).tolist()],
                    "dimension": pa.array([2, 2], pa.int32()), "basis_id": ["tok2-x", "ppl2-y"],
                    "source": ["logit T=7 K=2 /models/a", "perplexity scorer=gpt2 N=2 recorded"],
                    "created": ["2026-01-01T00:00:00Z"] * 2})
    pq.write_table(old, store.path)
    assert store.settings("logit") == FingerprintSettings(steps=7, basis_size=2)  # N was never written
    assert store.settings("perplexity") == FingerprintSettings(n_probes=2, scorer="gpt2")
    np.testing.assert_allclose(store.read("logit")["a"], unit([1, 2]), rtol=1e-6)
    store.write("c", "logit", unit([0, 1]), basis_id="tok2-x",
                settings=FingerprintSettings(steps=7, basis_size=2, n_probes=2, max_prompt_tokens=256))
    rows = {r["expert"]: r for r in pq.read_table(store.path).to_pylist()}
    assert rows["a"]["steps"] == 7 and rows["b"]["scorer"] == "gpt2" and rows["c"]["n_probes"] == 2
    assert store.settings("logit") == FingerprintSettings(steps=7, basis_size=2, n_probes=2, max_prompt_tokens=256)
    with pytest.raises(DescriptorError, match="other settings"):
        store.write("d", "logit", unit([1, 1]), basis_id="tok2-x", settings=FingerprintSettings(steps=10))


def test_rewrite_replaces_and_kinds_share_the_file(store):
    store.write("a", "logit", unit([1, 0]), basis_id="tok")
    store.write("a", "logit", unit([0, 1]), basis_id="tok")
    store.write("a", "perplexity", unit([1, 1, 1]))
    assert store.kinds() == ["logit", "perplexity"]
    np.testing.assert_allclose(store.read("logit")["a"], [0, 1])
    assert len(pq.read_table(store.path)) == 2
    with pytest.raises(DescriptorError, match="several descriptor kinds"):
        store.read()


def test_mixing_dimensions_is_refused(store):
    store.write_many({"a": unit([1, 0, 0]), "b": unit([0, 1, 0])}, "logit", basis_id="tok")
    with pytest.raises(DescriptorError, match="dimension 3.*new ones 2"):
        store.write("c", "logit", unit([1, 1]), basis_id="tok")
    store.write("c", "perplexity", unit([1, 1]))
    # a mixed pool (logit for a, b; perplexity for c) with different dimensions
    with pytest.raises(DescriptorError, match="different dimensions.*c: perplexity \\(2\\)"):
        store.read(["logit", "perplexity"], experts=["a", "b", "c"])
    with pytest.raises(DescriptorError, match="different dimensions in one write"):
        store.write_many({"x": [1.0, 0.0], "y": [1.0]}, "probe-outcome")


def test_mixed_pool_with_one_dimension_takes_the_first_kind_present(store):
    store.write_many({"a": unit([1, 0]), "b": unit([0, 1])}, "logit", basis_id="tok")
    store.write_many({"b": unit([1, 1]), "c": unit([1, -1])}, "perplexity", basis_id="probes")
    got = store.read(["logit", "perplexity"], experts=["a", "b", "c"])
    np.testing.assert_allclose(got["b"], unit([0, 1]))
    np.testing.assert_allclose(got["c"], unit([1, -1]))


def test_basis_mismatch_within_a_kind_is_refused(store):
    store.write("a", "logit", unit([1, 0]), basis_id="basis-A")
    with pytest.raises(DescriptorError, match="basis 'basis-A'"):
        store.write("b", "logit", unit([0, 1]), basis_id="basis-B")


def test_missing_expert_and_kind_errors_name_them(store):
    store.write("a", "logit", unit([1, 0]))
    with pytest.raises(DescriptorError, match=r"expert\(s\) \['zz'\]"):
        store.read("logit", experts=["a", "zz"])
    with pytest.raises(DescriptorError, match="no 'perplexity' descriptors"):
        store.info("perplexity")
    with pytest.raises(DescriptorError, match="NaN"):
        store.write("b", "logit", [np.nan, 1.0])


def test_remove_by_name_and_kind(store):
    store.write_many({"a": unit([1, 0]), "b": unit([0, 1])}, "logit")
    store.write("a", "perplexity", unit([1, 0]))
    assert store.remove("a", "logit") == 1
    assert store.experts("logit") == ["b"] and store.experts("perplexity") == ["a"]
    assert store.remove(kind="perplexity") == 1
    assert store.kinds() == ["logit"]
    with pytest.raises(DescriptorError):
        store.remove()


def test_writes_are_atomic_no_temp_files_left(store):
    for i in range(3):
        store.write(f"e{i}", "logit", unit([1, i + 1]))
    leftovers = [p.name for p in store.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def _table(quality: np.ndarray, splits: list[str]) -> RoutingTable:
    n, m = quality.shape
    return RoutingTable(prompt_ids=[f"p{i}" for i in range(n)], texts=[f"t{i}" for i in range(n)], splits=splits,
                        categories=[""] * n, experts=[Expert(f"e{j}") for j in range(m)], quality=quality,
                        cost=np.ones((n, m)), source="synthetic")


def test_probe_outcome_is_standardised_quality_on_the_probe_split():
    q = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, np.nan, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    table = _table(q, ["probe", "probe", "probe", "probe", "train"])
    d = probe_outcome_descriptors(table)
    assert sorted(d) == ["e0", "e1", "e2"] and all(v.shape == (4,) for v in d.values())
    col = q[:4, 0]
    z = (col - col.mean()) / col.std()
    np.testing.assert_allclose(d["e0"], z / np.linalg.norm(z), rtol=1e-6)
    # e1: missing cell -> 0 after standardising over its 3 observed probes
    obs = np.array([0.0, 0.0, 1.0])
    z1 = (obs - obs.mean()) / obs.std()
    expected = np.array([z1[0], z1[1], 0.0, z1[2]])
    np.testing.assert_allclose(d["e1"], expected / np.linalg.norm(expected), rtol=1e-6)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-6 for v in d.values())
    assert probe_basis_id(table).startswith("probe:4:")


def test_probe_outcome_constant_expert_is_zero_and_no_probe_split_is_an_error():
    z = standardize_normalize(np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))
    assert (z[0] == 0).all() and abs(np.linalg.norm(z[1]) - 1) < 1e-6
    table = _table(np.ones((3, 2)), ["train", "train", "test"])
    with pytest.raises(ValueError, match="probe split"):
        probe_outcome_descriptors(table)


def test_probe_outcome_on_real_routerbench_probe_split(shared_data):
    pytest.importorskip("cscr.data.routerbench", reason="the routerbench loader is not built yet")
    from cscr.config import DataConfig
    from cscr.data import load_dataset

    table = load_dataset("routerbench", DataConfig(data_dir=str(shared_data)))
    d = probe_outcome_descriptors(table)
    assert len(d) == len(table.experts)
    n_probe = len(table.split_index("probe"))
    vecs = np.stack(list(d.values()))
    assert vecs.shape == (len(table.experts), n_probe)
    # distinct experts get distinct fingerprints
    sims = vecs @ vecs.T
    assert (sims[~np.eye(len(vecs), dtype=bool)] < 0.999).all()
