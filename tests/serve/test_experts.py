"""Expert backends and on-the-fly fingerprints without Ray (real tiny LMs, real loopback sockets)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from cscr.serve.experts import ExpertError, OpenAIUpstreamExpert, TransformersExpert, cut_at_stop
from cscr.serve.protocol import ExpertSpec, GenerationRequest, ProtocolError
from serve_helpers import HangingServer, free_port


def _run(coro):
    return asyncio.run(coro)


async def _collect(agen) -> str:
    return "".join([piece async for piece in agen])


@pytest.fixture(scope="module")
def tiny(tiny_lms) -> TransformersExpert:
    return TransformersExpert(ExpertSpec(name="tiny", model=str(tiny_lms["a"])), num_threads=1)


def test_cut_at_stop():
    assert cut_at_stop("abc STOP def", ["STOP"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)
    assert cut_at_stop("a.b;c", [";", "."]) == ("a", True)


def test_stream_passes_the_same_tokens_as_generate(tiny):
    for req in (GenerationRequest(kind="chat", messages=[{"role": "user", "content": "Say hello"}], max_tokens=12),
                GenerationRequest(kind="completion", prompt="Once upon a time", max_tokens=12)):
        whole = _run(tiny.generate(req))
        assert whole.completion_tokens == 12 and whole.finish_reason == "length" and whole.prompt_tokens > 0
        assert _run(_collect(tiny.stream(req))) == whole.text  # greedy: identical text


def test_max_tokens_is_capped_by_the_spec(tiny_lms):
    capped = TransformersExpert(ExpertSpec(name="t", model=str(tiny_lms["a"]), max_new_tokens=3))
    out = _run(capped.generate(GenerationRequest(kind="completion", prompt="Hello", max_tokens=50)))
    assert out.completion_tokens == 3


def test_stop_strings_cut_the_answer(tiny):
    req = GenerationRequest(kind="completion", prompt="Once upon a time", max_tokens=12)
    text = _run(tiny.generate(req)).text
    stop = text[len(text) // 2:][:3]  # a piece of the greedy answer
    if not stop.strip():
        pytest.skip("greedy answer of the random model is blank")
    cut = _run(tiny.generate(req.model_copy(update={"stop": [stop]})))
    assert stop not in cut.text and text.startswith(cut.text) and cut.finish_reason == "stop"
    streamed = _run(_collect(tiny.stream(req.model_copy(update={"stop": [stop]}))))
    assert streamed == cut.text


def test_upstream_refused_connection_fails_after_its_retries():
    spec = ExpertSpec(name="gone", backend="openai", model="m", base_url=f"http://127.0.0.1:{free_port()}/v1",
                      retries=2, timeout_s=2.0)
    expert = OpenAIUpstreamExpert(spec, backoff_s=0.05)
    req = GenerationRequest(kind="chat", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ExpertError, match="failed after 3 attempt"):
        _run(expert.generate(req))


def test_upstream_that_hangs_times_out():
    server = HangingServer()
    try:
        spec = ExpertSpec(name="hung", backend="openai", model="m", base_url=f"http://127.0.0.1:{server.port}/v1",
                          retries=0, timeout_s=0.5)
        expert = OpenAIUpstreamExpert(spec)
        t0 = time.perf_counter()
        with pytest.raises(ExpertError, match="Timeout"):
            _run(expert.generate(GenerationRequest(kind="completion", prompt="hi")))
        assert time.perf_counter() - t0 < 5
        with pytest.raises(ExpertError):
            _run(_collect(expert.stream(GenerationRequest(kind="completion", prompt="hi"))))
    finally:
        server.close()


def test_upstream_needs_its_key_variable(monkeypatch):
    monkeypatch.delenv("CSCR_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="CSCR_NO_SUCH_KEY is not set"):
        OpenAIUpstreamExpert(ExpertSpec(name="x", backend="openai", model="m", base_url="http://127.0.0.1:1/v1",
                                        api_key_env="CSCR_NO_SUCH_KEY"))


def test_on_the_fly_footprint_matches_the_fingerprint_jobs(tmp_path, trained_run, tiny_lms):
    """A run with logit descriptors written the way jobs/fingerprint.py writes them: the plan
    rebuilt from the run gives the same footprint for the same model."""
    import shutil

    from cscr.serve.fingerprint import fingerprint_plan, logit_footprint_of

    from cscr.data.table import RoutingTable
    from cscr.fingerprints.basis import TokenBasis
    from cscr.fingerprints.logit import LogitFootprintUDF, footprint_from_rows
    from cscr.fingerprints.store import DescriptorStore
    from cscr.run import RunPaths

    run = RunPaths.of(tmp_path / "run")
    shutil.copytree(RunPaths.of(trained_run).table, run.table)
    table = RoutingTable.load(run.table)
    rows = table.split_index("probe")[:6]  # the job's --n-probes 6
    probes = [str(t) for t in table.texts[rows]]
    basis = TokenBasis.from_texts(probes, 8)
    udf = LogitFootprintUDF("tiny-a", str(tiny_lms["a"]), list(basis.strings), steps=2)
    out = udf({"probe_id": np.asarray(table.prompt_ids[rows]), "text": np.asarray(probes, dtype=object)})
    stored = footprint_from_rows(out["step_mean"])
    DescriptorStore(run.descriptors).write("tiny-a", "logit", stored, basis_id=basis.basis_id,
                                           source=f"logit T=2 K={basis.size} N=6 {tiny_lms['a']}")

    plan = fingerprint_plan(run.root, "logit", basis.basis_id)
    assert plan.probes == probes and plan.basis == list(basis.strings) and plan.steps == 2
    np.testing.assert_allclose(logit_footprint_of(str(tiny_lms["a"]), plan), stored, atol=1e-5)
    other = np.asarray(logit_footprint_of(str(tiny_lms["b"]), plan))
    assert float(other @ stored) < 0.999  # another model: another footprint
    with pytest.raises(ProtocolError, match="cannot rebuild the token basis"):
        fingerprint_plan(run.root, "logit", "tok8-0000000000000000")
