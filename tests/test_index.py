"""The FAISS expert index against brute-force ground truth, run-time pool updates, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cscr.index import ExpertIndex, ExpertIndexError, gpu_available


def synthetic(m=12, d=16, n=50, seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((m, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = rng.standard_normal((n, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return {f"e{j}": vecs[j] for j in range(m)}, q


def brute_topk(vecs, q, k, allowed=None):
    s = q @ vecs.T
    if allowed is not None:
        s[:, [j for j in range(vecs.shape[0]) if j not in allowed]] = -np.inf
    return np.sort(s, axis=1)[:, ::-1][:, :k]


def test_search_matches_brute_force():
    desc, q = synthetic()
    index = ExpertIndex.from_descriptors(desc, use_gpu=False)
    scores, pos = index.search(q, 4)
    vecs = np.stack(list(desc.values()))
    np.testing.assert_allclose(scores, brute_topk(vecs, q, 4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(q @ vecs.T, pos, 1), scores, rtol=1e-5, atol=1e-6)
    _, names = index.search_names(q[:2], 3)
    assert [index.names[p] for p in pos[0][:3]] == names[0]


def test_candidates_restrict_the_search():
    desc, q = synthetic()
    index = ExpertIndex.from_descriptors(desc, use_gpu=False)
    cands = ["e1", "e5", "e7"]
    scores, pos = index.search(q, 2, candidates=cands)
    assert set(pos.ravel()) <= {1, 5, 7}
    vecs = np.stack(list(desc.values()))
    np.testing.assert_allclose(scores, brute_topk(vecs, q, 2, {1, 5, 7}), rtol=1e-5, atol=1e-6)
    # k larger than the candidate set: padded with -1 / -inf
    scores, pos = index.search(q[:3], 5, candidates=["e2", "e3"])
    assert (pos[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    with pytest.raises(ExpertIndexError, match="unknown candidate"):
        index.search(q, 2, candidates=["nope"])


def test_add_remove_replace_by_name():
    desc, q = synthetic(m=5)
    index = ExpertIndex.from_descriptors(desc, use_gpu=False)
    target = q[0]
    index.add("new", target * 3.0)  # not unit: normalised on the way in
    _, names = index.search_names(q[:1], 1)
    assert names[0] == ["new"]
    index.remove("new")
    assert "new" not in index and len(index) == 5
    _, names = index.search_names(q[:1], 5)
    assert "new" not in names[0]
    index.replace("e3", target)
    _, names = index.search_names(q[:1], 1)
    assert names[0] == ["e3"]
    assert index.names == ["e0", "e1", "e2", "e3", "e4"]
    with pytest.raises(ExpertIndexError, match="already in the index"):
        index.add("e1", target)
    with pytest.raises(ExpertIndexError, match="unknown expert 'zz'"):
        index.remove("zz")
    with pytest.raises(ExpertIndexError, match="dimension 3, the index 16"):
        index.add("bad", np.ones(3))


def test_save_load_roundtrip_and_manifest(tmp_path):
    desc, q = synthetic()
    index = ExpertIndex.from_descriptors(desc, use_gpu=False, kind="probe-outcome")
    index.save(tmp_path / "idx")
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert man["pool"] == list(desc) and man["dimension"] == 16 and man["kind"] == "probe-outcome"
    back = ExpertIndex.load(tmp_path / "idx", pool=list(reversed(desc)), dim=16, use_gpu=False)
    a, b = index.search(q, 3), back.search(q, 3)
    np.testing.assert_array_equal(a[1], b[1])
    # saving again over an existing folder works (atomic folder swap)
    index.remove("e0")
    index.save(tmp_path / "idx")
    assert ExpertIndex.load(tmp_path / "idx").names == index.names


def test_load_refuses_another_pool_or_dimension(tmp_path):
    desc, _ = synthetic(m=4)
    ExpertIndex.from_descriptors(desc, use_gpu=False).save(tmp_path / "idx")
    with pytest.raises(ExpertIndexError, match=r"another pool.*\['e3'\] extra.*\['x9'\]"):
        ExpertIndex.load(tmp_path / "idx", pool=["e0", "e1", "e2", "x9"])
    with pytest.raises(ExpertIndexError, match="built for dimension 16, expected 8"):
        ExpertIndex.load(tmp_path / "idx", dim=8)
    with pytest.raises(ExpertIndexError, match="not an expert index"):
        ExpertIndex.load(tmp_path / "nothing")
    # a manifest edited to name another pool no longer matches the stored checksum
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    m["pool"][0] = "renamed"
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExpertIndexError, match="does not match its manifest"):
        ExpertIndex.load(tmp_path / "idx")


def test_bad_queries_and_gpu_request_without_gpu():
    desc, q = synthetic(m=3)
    index = ExpertIndex.from_descriptors(desc, use_gpu=False)
    with pytest.raises(ExpertIndexError, match=r"queries must be \(n, 16\)"):
        index.search(q[:, :4], 2)
    if not gpu_available():
        with pytest.raises(ExpertIndexError, match="faiss-gpu"):
            ExpertIndex(16, use_gpu=True)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and gpu_available()
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs CUDA and faiss-gpu")
def test_gpu_index_matches_cpu():
    desc, q = synthetic(m=40, d=64, n=500)
    cpu = ExpertIndex.from_descriptors(desc, use_gpu=False)
    gpu = ExpertIndex.from_descriptors(desc, use_gpu=None)
    assert gpu.use_gpu
    np.testing.assert_allclose(gpu.search(q, 4)[0], cpu.search(q, 4)[0], rtol=1e-4, atol=1e-5)
    cands = [f"e{j}" for j in range(0, 40, 3)]
    np.testing.assert_array_equal(gpu.search(q, 4, cands)[1], cpu.search(q, 4, cands)[1])
    gpu.remove("e0")
    assert gpu.search(q, 40)[1].max() < 39
