"""jobs/fingerprint.py on a simulated two-node Ray cluster (ray.cluster_utils.Cluster), with tiny
real causal LMs: logit footprints and perplexity fingerprints of recorded answers in one mixed
pool (K = N), resuming, --force, a changed basis refused. (Live and API answers are covered
without Ray in tests/fingerprints.)"""

from __future__ import annotations

import numpy as np
import pytest
from cscr.jobs.data_options import FingerprintJob
from cscr.jobs.fingerprint import run as fingerprint_job

from cscr.config import FingerprintConfig
from cscr.data.table import Expert, RoutingTable
from cscr.errors import InputError
from cscr.fingerprints.store import DescriptorStore
from cscr.models import tiny_random_lm
from cscr.pool import pool_from_dict
from cscr.runs.paths import RunPaths
from cscr.tasks import builtin_tasks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    return tiny_random_lm(tmp / "a", seed=0), tiny_random_lm(tmp / "b", seed=1, chat_template=True)


def _run_with_table(tmp_path, n: int = 12) -> RunPaths:
    """A run whose table has n probe prompts and one expert's recorded answers."""
    tasks = builtin_tasks(40, seed=2)[:n]
    run = RunPaths.of(tmp_path / "run")
    RoutingTable(prompt_ids=[t.id for t in tasks], texts=[t.prompt for t in tasks], splits=["probe"] * n,
                 categories=[t.category for t in tasks], experts=[Expert("rec", kind="recorded")],
                 quality=np.ones((n, 1)), cost=np.ones((n, 1)),
                 responses=np.array([[t.answer if i % 3 else f"I believe it is {t.answer}, yes"]
                                     for i, t in enumerate(tasks)], dtype=object)).save(run.table)
    return run


def _job(run_dir, scorer: str | None = None, force: bool = False, workers: int = 1,
         basis_size: int = 256) -> FingerprintJob:
    fp = FingerprintConfig(n_probes=12, steps=2, max_new_tokens=4, scorer=scorer, basis_size=basis_size)
    return FingerprintJob(run=str(run_dir), fingerprint=fp, cpus_per_worker=0.5, batch_size=4, force=force,
                          workers=workers)


def test_mixed_pool_on_two_nodes_then_resume_and_force(cluster, models, tmp_path):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    a, b = models
    pool = pool_from_dict({"name": "mixed", "experts": [
        {"name": "a", "kind": "open-weights", "source": {"model": str(a)}, "cost": {"n_params": 1}},
        {"name": "b", "kind": "open-weights", "source": {"model": str(b)}, "cost": {"n_params": 2}},
        {"name": "rec", "kind": "recorded", "source": {}, "cost": {"n_params": 3}},
    ]})
    run = _run_with_table(tmp_path)
    job = _job(run.root, scorer=str(a))
    out = fingerprint_job(job, pool)  # Ray is up (the fixture): joined, left running
    assert sorted(out.done) == ["a", "b", "rec"] and out.descriptors == str(run.descriptors)
    store = DescriptorStore(run.descriptors)
    logit, ppl = store.read("logit"), store.read("perplexity")
    assert sorted(logit) == ["a", "b"] and sorted(ppl) == ["rec"]
    # N = K: the two kinds share one space, so a mixed pool reads as one
    mixed = store.read(["logit", "perplexity"], experts=["a", "b", "rec"])
    assert {v.shape for v in mixed.values()} == {(12,)}
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in mixed.values())
    assert not np.allclose(logit["a"], logit["b"], atol=1e-3)
    assert store.info("logit")["basis_id"].startswith("tok12-")

    again = fingerprint_job(job, pool)  # resumable: nothing left to do
    assert again.done == [] and sorted(again.skipped) == ["a", "b", "rec"]
    rec_only = pool_from_dict({"experts": [pool.get("rec").model_dump()]})
    forced = fingerprint_job(_job(run.root, scorer=str(a), force=True), rec_only)
    assert forced.done == ["rec"]
    np.testing.assert_allclose(store.read("perplexity")["rec"], ppl["rec"], atol=1e-6)  # deterministic

    with pytest.raises(InputError, match="under another basis"):
        fingerprint_job(_job(run.root, scorer=str(b)), pool)  # another scorer: other coordinates


def test_no_table_uses_generated_probes_and_logit_only_pool(cluster, models, tmp_path):
    a, _ = models
    pool = pool_from_dict({"experts": [
        {"name": "a", "kind": "open-weights", "source": {"model": str(a)}, "cost": {"n_params": 1}}]})
    out = fingerprint_job(_job(tmp_path / "fresh", basis_size=16, workers=2), pool)
    assert out.done == ["a"] and out.probes == 12
    assert DescriptorStore(RunPaths.of(tmp_path / "fresh").descriptors).read("logit")["a"].shape == (16,)
