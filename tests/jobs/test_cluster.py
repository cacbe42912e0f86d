"""jobs/cluster.py on a real embedded Ray cluster: connect starts one (fractional CPUs round up),
a second connect joins nothing, disconnect shuts down only what was started, and the console
stays quiet (worker prints, faiss's library probing, torch's read-only-array warning, Ray's
token-auth warning) unless -v."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
from cscr.jobs.cluster import connect, disconnect, set_log_level
set_log_level(None, int(sys.argv[1]))
import ray
started = connect(num_cpus=0.5)
assert started and ray.cluster_resources()["CPU"] == 1.0, ray.cluster_resources()
assert connect() is False  # already up: nothing to start, nothing to shut down later
disconnect(False)
assert ray.is_initialized()

@ray.remote(num_cpus=0.5)
def work():
    import logging, warnings
    import numpy as np, torch, faiss
    print("HELLO-FROM-WORKER", flush=True)
    logging.getLogger("cscr.test").warning("WARNING-FROM-WORKER")
    a = np.zeros(3)
    a.setflags(write=False)
    torch.as_tensor(a)
    return faiss.IndexFlatIP(4).d

assert ray.get(work.remote()) == 4
import time
time.sleep(2)  # let the log monitor forward worker output, if it is going to
disconnect(started)
assert not ray.is_initialized()
print("DONE")
"""

NOISE = ("swigfaiss", "not writable", "Token authentication", "AVX2")


def _run(verbose: int) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CSCR_LOG_LEVEL", "FAISS_OPT_LEVEL")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(verbose)], capture_output=True, text=True,
                         timeout=300, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "DONE" in out.stdout
    return text


def test_quiet_by_default_and_loud_with_verbose():
    quiet = _run(0)
    assert "HELLO-FROM-WORKER" not in quiet and "WARNING-FROM-WORKER" not in quiet
    assert not [n for n in NOISE if n in quiet], quiet[-3000:]
    loud = _run(1)
    assert "HELLO-FROM-WORKER" in loud  # worker output reaches the driver again
    assert not [n for n in NOISE if n in loud], loud[-3000:]  # harmless noise stays filtered
