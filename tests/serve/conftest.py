"""Fixtures of the serving tests: a real trained run on a RouterBench slice, tiny random LMs,
the real MiniLM encoder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serve_helpers import make_tiny_lm, make_trained_run  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shared_data) -> Path:
    return make_trained_run(tmp_path_factory.mktemp("serve-run") / "run", shared_data)


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lms")
    return {name: make_tiny_lm(root / name, seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="session")
def encoder():
    from cscr.encoder import Encoder

    return Encoder()
