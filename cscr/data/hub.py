"""Downloads of the full public data sets from the Hugging Face Hub, for users with network
access. Loaders call this only when no data directory is given (``DataConfig.data_dir is None``);
tests never do.

The CLI sets ``HF_HUB_OFFLINE=1`` so that the encoder never reaches the network; a data download
is an explicit request, so it is allowed here unless ``CSCR_OFFLINE=1``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# Where the full sets live upstream (repo id, files).
HUB_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "routerbench": ("withmartian/routerbench", ("routerbench_0shot.pkl",)),
    "embedllm": ("RZ412/EmbedLLM", ("train.csv", "val.csv", "test.csv")),
    "mixinstruct": (
        "llm-blender/mix-instruct",
        ("train_data_prepared.jsonl", "val_data_prepared.jsonl", "test_data_prepared.jsonl"),
    ),
}


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


def download(dataset: str, files: tuple[str, ...] | None = None) -> Path:
    """Download ``dataset``'s upstream files (or the named subset) into the Hub cache and
    return the folder that holds them."""
    from huggingface_hub import hf_hub_download

    if dataset not in HUB_SOURCES:
        raise ValueError(f"{dataset} has no Hub source; give a data directory (known Hub sources: {sorted(HUB_SOURCES)})")
    repo, default_files = HUB_SOURCES[dataset]
    folder: Path | None = None
    with online():
        for name in files or default_files:
            try:
                path = hf_hub_download(repo_id=repo, filename=name, repo_type="dataset")
            except Exception as exc:  # network, auth, offline mode: one clear message
                raise FileNotFoundError(
                    f"could not download {name} of {repo} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
                    f"download it yourself and pass --data-dir (or set CSCR_DATA_DIR)"
                ) from exc
            folder = Path(path).parent
    assert folder is not None
    return folder
