"""Fixtures of the fingerprint tests: tiny random GPT-2s (real causal LMs built from a config in
seconds, no download) and the packaged SmolLM2 (converted from its PyPI GGUF once, cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cscr.models import tiny_random_lm


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny random GPT-2 without a chat template."""
    return tiny_random_lm(tmp_path_factory.mktemp("tiny") / "tiny-a", seed=0)


@pytest.fixture(scope="session")
def tiny_lm_b(tmp_path_factory) -> Path:
    """Another tiny random GPT-2 (other weights), with a chat template."""
    return tiny_random_lm(tmp_path_factory.mktemp("tiny") / "tiny-b", seed=1, chat_template=True)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from cscr.models import local_model

    return local_model("smollm2")


@pytest.fixture(scope="session")
def probe_texts() -> list[str]:
    from cscr.tasks import builtin_tasks

    return [t.prompt for t in builtin_tasks(24, seed=5)]
