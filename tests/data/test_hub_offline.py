"""Hub loaders fail at once, with one clear error, when offline or when the Hub is unreachable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from cscr.config import DataConfig
from cscr.data import load_dataset


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Nothing cached: a cached copy would (rightly) be used without the network."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("CSCR_HUB_OFFLINE_DEFAULT", raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "CSCR_OFFLINE"])
def test_offline_hub_load_fails_at_once(var, empty_hub_cache, monkeypatch):
    monkeypatch.setenv(var, "1")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"embedllm: no data directory given and the Hugging Face Hub "
                                                rf"cannot be used \({var} is set\).*pass --data-dir"):
        load_dataset("embedllm", DataConfig(dataset="embedllm"))
    assert time.perf_counter() - t0 < 2.0


def test_unreachable_hub_fails_at_once(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"127.0.0.1:\d+ is not reachable.*pass --data-dir"):
        load_dataset("mixinstruct", DataConfig(dataset="mixinstruct"))
    assert time.perf_counter() - t0 < 5.0


def test_cli_default_offline_still_allows_downloads_but_fails_fast_without_network(tmp_path):
    """The CLI's own HF_HUB_OFFLINE default (for the encoder) does not forbid an explicit data
    download; with the Hub unreachable the command says so at once and exits 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CSCR_OFFLINE", "CSCR_DATA_DIR")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HUB_CACHE=str(tmp_path / "hub"))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cscr.cli", "prepare", "--dataset", "embedllm", "--out",
                        str(tmp_path / "run"), "--no-embed"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "is not reachable" in p.stderr and "HF_HUB_OFFLINE is set" not in p.stderr
    assert p.stderr.count("\n") == 1  # one line, no traceback
    assert time.perf_counter() - t0 < 60  # interpreter start + imports; no retries
    assert not (tmp_path / "run").exists()
