"""`python jobs/{embed,fingerprint,label}.py`: a user's mistake is one line on stderr and exit 2,
before any cluster starts (the three share `data_job_main`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cscr.jobs import embed, fingerprint, label

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("job", "argv", "said"), [
    (embed, ["--run", "{tmp}/no-run"], "embed: error: {tmp}/no-run has no routing table"),
    (embed, ["--run", "{tmp}", "--batch-size", "0"], "embed: error: batch_size must be > 0, got 0"),
    (fingerprint, ["--pool", "{tmp}/none.yaml", "--run", "{tmp}/r"], "fingerprint: error: pool file not found: {tmp}/none.yaml"),
    (fingerprint, ["--pool", "p.yaml", "--run", "r", "--workers", "0"], "fingerprint: error: --workers must be >= 1, got 0"),
    (label, ["--pool", "{tmp}/none.yaml", "--out", "{tmp}/o", "--tasks", "builtin"], "label: error: pool file not found: {tmp}/none.yaml"),
])
def test_a_mistake_is_one_line_and_exit_2(job, argv, said, tmp_path, capsys):
    assert job.main([a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(said.format(tmp=tmp_path)) and captured.err.count("\n") == 1, captured.err


def test_the_script_exits_2_and_an_unknown_option_is_argparses_2(tmp_path):
    for argv in (["--run", str(tmp_path / "no-run")], ["--no-such-option"]):
        proc = subprocess.run([sys.executable, "jobs/embed.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
