"""On-the-fly fingerprints for experts added to a running server (POST /v1/experts).

A new expert's descriptor must live in the coordinates the router was trained in. For logit
footprints (SPEC.md section 2) those are fixed by the probe prompts, the token basis, T and the
probe cut, all recoverable from the run: the probes are the first N of the table's probe split,
the basis is the K most frequent strings of those probes (``TokenBasis.from_texts``; its id is
stored with the descriptors and checked here), and N, T and the cut are the store's recorded
fingerprint settings (``FingerprintSettings``). Stores written before N was recorded: N is the
fingerprint job's default when its basis has the stored id, else the one probe count whose basis
has it (several: a clear error, the client sends the descriptor); an unrecorded T or cut is the
job's default (``cscr.config.FingerprintConfig``). The
footprint is then computed with the transformers backend on the expert's own weights.

Other kinds cannot be computed from the model alone here: perplexity fingerprints need the
run's scorer LM on the expert's answers, probe-outcome descriptors need graded answers. For
those the client sends the descriptor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cscr.serve.protocol import ProtocolError
from pydantic import BaseModel


class FingerprintPlan(BaseModel):
    kind: str  # logit
    basis_id: str
    probes: list[str]  # the N probe texts
    basis: list[str]  # the K basis strings
    steps: int  # T
    max_prompt_tokens: int  # each probe's last tokens kept, as when the run was fingerprinted


def _bases(texts: list[str], size: int, basis_id: str, counts: list[int]) -> list[tuple[int, Any]]:
    """(N, basis) for each probe count N in ``counts`` whose basis has the id ``basis_id``."""
    from cscr.fingerprints.basis import TokenBasis

    found = []
    for n in counts:
        try:
            basis = TokenBasis.from_texts(texts[:n], size)
        except ValueError:
            continue
        if basis.basis_id == basis_id:
            found.append((n, basis))
    return found


def fingerprint_plan(run_dir: str | Path, kind: str, basis_id: str) -> FingerprintPlan:
    """The probes, basis, T and cut a new expert's footprint needs to match the run's descriptors."""
    from cscr.config import FingerprintConfig
    from cscr.data.table import RoutingTable
    from cscr.fingerprints.store import DescriptorStore
    from cscr.runs.paths import RunPaths

    if kind != "logit":
        raise ProtocolError(f"the router uses {kind or 'unknown'} descriptors, which cannot be computed "
                            "from the model alone on the server: send the expert's descriptor",
                            param="fingerprint", code="unsupported")
    paths = RunPaths.of(run_dir)
    table = RoutingTable.load(paths.require_table())
    texts = [str(t) for t in table.texts[table.split_index("probe")]]
    store = DescriptorStore(paths.descriptors)
    size = int(store.info(kind)["dimension"])  # type: ignore[call-overload]
    st = store.settings(kind)
    job = FingerprintConfig()
    if st.n_probes is not None:
        n = min(st.n_probes, len(texts))
        found = _bases(texts, size, basis_id, [n])
    else:  # an older store: the job's default N, else the one probe count whose basis is the stored one
        n = min(job.n_probes, len(texts))
        found = _bases(texts, size, basis_id, [n]) or _bases(texts, size, basis_id, list(range(2, len(texts) + 1)))
        if len(found) > 1:
            raise ProtocolError(f"the run's logit descriptors do not record their probe count N, and N in "
                                f"{[m for m, _ in found][:8]} all give the basis {basis_id}: recompute them with "
                                "`cscr fingerprint --force` (which records N), or send the expert's descriptor",
                                param="fingerprint", code="unsupported")
    if not found:
        raise ProtocolError(f"cannot rebuild the token basis {basis_id} from the first {n} prompts of the "
                            "run's probe split: send the expert's descriptor", param="fingerprint",
                            code="unsupported")
    n, basis = found[0]
    return FingerprintPlan(kind=kind, basis_id=basis_id, probes=texts[:n], basis=list(basis.strings),
                           steps=st.steps or job.steps, max_prompt_tokens=st.max_prompt_tokens or job.max_prompt_tokens)


def logit_footprint_of(model: str, plan: FingerprintPlan, **backend_kwargs: Any) -> list[float]:
    """The unit logit footprint of ``model`` (transformers backend) under ``plan``."""
    from cscr.fingerprints.basis import TokenBasis
    from cscr.fingerprints.logit import logit_footprint
    from cscr.llm.hf import HFBackend

    backend = HFBackend(model, **{"max_prompt_tokens": plan.max_prompt_tokens, **backend_kwargs})
    basis = TokenBasis(tuple(plan.basis))
    if basis.basis_id != plan.basis_id:
        raise ValueError(f"basis strings hash to {basis.basis_id}, the plan says {plan.basis_id}")
    vec = logit_footprint(backend, plan.probes, basis, plan.steps)
    return [float(x) for x in vec]
