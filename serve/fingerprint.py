"""On-the-fly fingerprints for experts added to a running server (POST /v1/experts).

A new expert's descriptor must live in the coordinates the router was trained in. For logit
footprints (SPEC.md section 2) those are fixed by the probe prompts, the token basis and T, all
recoverable from the run: the probes are the first N of the table's probe split, the basis is
the K most frequent strings of those probes (``TokenBasis.from_texts``; its id is stored with the
descriptors and checked here), N and T are read from the descriptors' source ("logit T=10
K=256 N=192 ..."; N defaults to the fingerprint job's default when absent). The footprint is then
computed by the expert's own replica with the transformers backend.

Other kinds cannot be computed from the model alone here: perplexity fingerprints need the
run's scorer LM on the expert's answers, probe-outcome descriptors need graded answers. For
those the client sends the descriptor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cscr.serve.protocol import ProtocolError
from pydantic import BaseModel

DEFAULT_N_PROBES = 192  # jobs/fingerprint.py --n-probes default


class FingerprintPlan(BaseModel):
    kind: str  # logit
    basis_id: str
    probes: list[str]  # the N probe texts
    basis: list[str]  # the K basis strings
    steps: int  # T


def fingerprint_plan(run_dir: str | Path, kind: str, basis_id: str) -> FingerprintPlan:
    """The probes, basis and T a new expert's footprint needs to match the run's descriptors."""
    from cscr.data.table import RoutingTable
    from cscr.fingerprints.basis import TokenBasis
    from cscr.fingerprints.store import DescriptorStore
    from cscr.run import RunPaths

    if kind != "logit":
        raise ProtocolError(f"the router uses {kind or 'unknown'} descriptors, which cannot be computed "
                            "from the model alone on the server: send the expert's descriptor",
                            param="fingerprint", code="unsupported")
    paths = RunPaths.of(run_dir)
    table = RoutingTable.load(paths.require_table())
    texts = [str(t) for t in table.texts[table.split_index("probe")]]
    info = DescriptorStore(paths.descriptors).info(kind)
    size = int(info["dimension"])  # type: ignore[call-overload]
    source = str(info.get("source", ""))
    n_match = re.search(r"\bN=(\d+)", source)
    t_match = re.search(r"\bT=(\d+)", source)
    # N: recorded in the source when the fingerprint job wrote it; else the job's default (192)
    n = min(int(n_match.group(1)) if n_match else DEFAULT_N_PROBES, len(texts))
    try:
        basis = TokenBasis.from_texts(texts[:n], size)
    except ValueError:
        basis = None
    if basis is None or basis.basis_id != basis_id:
        raise ProtocolError(f"cannot rebuild the token basis {basis_id} from the first {n} prompts of the "
                            "run's probe split: send the expert's descriptor", param="fingerprint",
                            code="unsupported")
    return FingerprintPlan(kind=kind, basis_id=basis_id, probes=texts[:n], basis=list(basis.strings),
                           steps=int(t_match.group(1)) if t_match else 10)


def logit_footprint_of(model: str, plan: FingerprintPlan, **backend_kwargs: Any) -> list[float]:
    """The unit logit footprint of ``model`` (transformers backend) under ``plan``."""
    from cscr.fingerprints.backends.hf import HFBackend
    from cscr.fingerprints.basis import TokenBasis
    from cscr.fingerprints.logit import logit_footprint

    backend = HFBackend(model, **backend_kwargs)
    basis = TokenBasis(tuple(plan.basis))
    if basis.basis_id != plan.basis_id:
        raise ValueError(f"basis strings hash to {basis.basis_id}, the plan says {plan.basis_id}")
    vec = logit_footprint(backend, plan.probes, basis, plan.steps)
    return [float(x) for x in vec]
