"""Downloads of the full public data sets from the Hugging Face Hub, for users with network
access. Loaders call this only when no data directory is given (``DataConfig.data_dir is None``);
tests never do.

The CLI sets ``HF_HUB_OFFLINE=1`` by default so that the encoder never reaches the network (and
says so in ``CSCR_HUB_OFFLINE_DEFAULT=1``); a data download is an explicit request, so it is
allowed here unless the user set ``HF_HUB_OFFLINE`` (or ``CSCR_OFFLINE=1``) themselves. Offline,
or with the Hub unreachable, a download fails at once with one clear error (no retries).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}

# Where the full sets live upstream (repo id, files).
HUB_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "routerbench": ("withmartian/routerbench", ("routerbench_0shot.pkl",)),
    "embedllm": ("RZ412/EmbedLLM", ("train.csv", "val.csv", "test.csv")),
    "mixinstruct": (
        "llm-blender/mix-instruct",
        ("train_data_prepared.jsonl", "val_data_prepared.jsonl", "test_data_prepared.jsonl"),
    ),
}


def offline_reason() -> str | None:
    """Why downloads are off, or None: ``CSCR_OFFLINE=1``, or ``HF_HUB_OFFLINE`` set by the user
    (not the CLI's default)."""
    if os.environ.get("CSCR_OFFLINE", "").strip().lower() in _TRUE:
        return "CSCR_OFFLINE is set"
    by_cli = os.environ.get("CSCR_HUB_OFFLINE_DEFAULT", "").strip() == "1"
    if not by_cli and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    return None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the Hub endpoint opens within ``timeout`` seconds, else why not."""
    url = urlparse(endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} is not reachable ({type(exc).__name__}: {exc})"


@contextlib.contextmanager
def online() -> Iterator[None]:
    """Allow Hub downloads inside the block (unless CSCR_OFFLINE=1), whatever HF_HUB_OFFLINE says."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = os.environ.get("CSCR_OFFLINE", "0") == "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _cached(repo: str, names: tuple[str, ...]) -> Path | None:
    """The folder holding every one of ``names`` in the local Hub cache, or None (no network used)."""
    from huggingface_hub import try_to_load_from_cache

    folder = None
    for name in names:
        hit = try_to_load_from_cache(repo_id=repo, filename=name, repo_type="dataset")
        if not isinstance(hit, str):
            return None
        folder = Path(hit).parent
    return folder


def download(dataset: str, files: tuple[str, ...] | None = None) -> Path:
    """Download ``dataset``'s upstream files (or the named subset) into the Hub cache and
    return the folder that holds them."""
    from huggingface_hub import hf_hub_download

    if dataset not in HUB_SOURCES:
        raise ValueError(f"{dataset} has no Hub source; give a data directory (known Hub sources: {sorted(HUB_SOURCES)})")
    repo, default_files = HUB_SOURCES[dataset]
    hint = "download the files yourself and pass --data-dir (or set CSCR_DATA_DIR)"
    cached = _cached(repo, files or default_files)
    if cached is not None:
        return cached
    why = offline_reason() or unreachable_reason()
    if why:
        raise FileNotFoundError(f"{dataset}: no data directory given and the Hugging Face Hub cannot be used "
                                f"({why}) to download {repo}; {hint}")
    folder: Path | None = None
    with online():
        for name in files or default_files:
            try:
                path = hf_hub_download(repo_id=repo, filename=name, repo_type="dataset")
            except Exception as exc:  # network, auth, offline mode: one clear message
                raise FileNotFoundError(
                    f"could not download {name} of {repo} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
                    f"{hint}"
                ) from exc
            folder = Path(path).parent
    assert folder is not None
    return folder
