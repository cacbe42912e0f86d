"""Expert backends and on-the-fly fingerprints without Ray (real tiny LMs, a real local
OpenAI-compatible server, real loopback sockets)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cscr.serve.experts import Expert, ExpertError, build_backend
from cscr.serve.protocol import GenerationRequest, ProtocolError
from serve_helpers import HangingServer, free_port

from cscr.llm import cut_at_stop, prompt_ids
from cscr.llm.hf import HFBackend
from cscr.models import tiny_random_lm
from cscr.pool import ExpertSpec

sys.path.insert(0, str(Path(__file__).parents[1] / "fingerprints"))
from openai_server import LocalServer, ServerState  # noqa: E402


def _run(coro):
    return asyncio.run(coro)


async def _collect(agen) -> str:
    return "".join([piece async for piece in agen])


def chat(text: str, **kw) -> GenerationRequest:
    return GenerationRequest(kind="chat", messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture(scope="module")
def tiny(tiny_lms) -> Expert:
    return build_backend(ExpertSpec(name="tiny", model=str(tiny_lms["a"])), torch_threads=1)


@pytest.fixture(scope="module")
def plain_lm(tmp_path_factory) -> Path:
    """A tiny LM whose tokenizer has no chat template."""
    return tiny_random_lm(tmp_path_factory.mktemp("plain") / "lm", seed=3)


def test_cut_at_stop():
    assert cut_at_stop("abc STOP def", ["STOP"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)
    assert cut_at_stop("a.b;c", [";", "."]) == ("a", True)


def test_stream_passes_the_same_tokens_as_generate(tiny):
    for req in (chat("Say hello", max_tokens=12),
                GenerationRequest(kind="completion", prompt="Once upon a time", max_tokens=12)):
        whole = _run(tiny.generate(req))
        assert whole.completion_tokens == 12 and whole.finish_reason == "length" and whole.prompt_tokens > 0
        assert _run(_collect(tiny.stream(req))) == whole.text  # greedy: identical text


def test_max_tokens_above_the_spec_is_refused_and_a_default_is_capped(tiny_lms):
    capped = build_backend(ExpertSpec(name="t", model=str(tiny_lms["a"]), max_new_tokens=3))
    req = GenerationRequest(kind="completion", prompt="Hello", max_tokens=50)
    with pytest.raises(ProtocolError, match=r"max_tokens=50 is above what expert 't' generates \(3 tokens\)") as err:
        _run(capped.generate(req))
    assert err.value.status == 400 and err.value.code == "max_tokens_too_large"
    out = _run(capped.generate(req.model_copy(update={"max_tokens_is_default": True})))
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


def test_served_prompts_are_the_ones_labelling_and_fingerprints_use(plain_lm, tiny_lms):
    """One formatter: a served chat of one user message is the labelled text (raw text without a
    template, the template's user turn with one), and the greedy answers agree."""
    text = "What is 17 + 25? Answer with a number."
    for path in (plain_lm, tiny_lms["a"]):
        batch = HFBackend(str(path), batch_size=1)
        served = build_backend(ExpertSpec(name="x", model=str(path)), torch_threads=1)
        ids = prompt_ids(batch.tokenizer, [{"role": "user", "content": text}])
        assert ids == batch.encode([text])[0]
        g = batch.generate([text], max_new_tokens=8)[0]
        s = _run(served.generate(chat(text, max_tokens=8)))
        assert s.prompt_tokens == g.prompt_tokens == len(ids)
        assert s.text.strip() == g.text
    tok = HFBackend(str(plain_lm)).tokenizer
    assert prompt_ids(tok, [{"role": "user", "content": text}]) == tok.encode(text)  # raw text, no "user:"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    assert prompt_ids(tok, convo) == tok.encode("Be brief.\n\nHi\n\nHello.\n\n2+2?")


def test_a_prompt_longer_than_the_context_is_a_400_not_a_cut(tiny):
    long = "word " * 3000  # SmolLM2's tokenizer: > 1024 tokens, the tiny GPT-2's context
    for req in (chat(long, max_tokens=4), GenerationRequest(kind="completion", prompt=long, max_tokens=4)):
        with pytest.raises(ProtocolError, match="context is 1024 tokens") as err:
            _run(tiny.generate(req))
        assert err.value.status == 400 and err.value.code == "context_length_exceeded"
        with pytest.raises(ProtocolError, match="context is 1024 tokens"):
            _run(_collect(tiny.stream(req)))
    # near the end of the context: the client's max_tokens is refused, never capped; the server's
    # default (the client named none) is shortened to what fits
    n = len(prompt_ids(tiny.llm.tokenizer, "word " * 1000, completion=True))
    near = GenerationRequest(kind="completion", prompt="word " * 1000, max_tokens=200)
    with pytest.raises(ProtocolError, match=rf"you requested {n + 200} tokens \({n} in the prompt, 200 in the "
                                            rf"completion\)\..*\(at most {1024 - n} completion tokens fit\)") as err:
        _run(tiny.generate(near))
    assert err.value.status == 400 and err.value.code == "context_length_exceeded" and err.value.param == "prompt"
    shortened = _run(tiny.generate(near.model_copy(update={"max_tokens_is_default": True})))
    assert shortened.completion_tokens <= 1024 - n < 200


def test_an_abandoned_transformers_stream_stops_generating(tiny):
    req = GenerationRequest(kind="completion", prompt="Once upon a time", max_tokens=200)
    llm = tiny.llm
    before = llm.streamed_tokens
    full = _run(_collect(tiny.stream(req)))
    n_full = llm.streamed_tokens - before
    if n_full < 100:
        pytest.skip(f"the random model stopped after {n_full} tokens")

    async def first_piece_then_close() -> None:
        agen = tiny.stream(req)
        await agen.__anext__()
        await agen.aclose()

    before = llm.streamed_tokens
    _run(first_piece_then_close())
    assert llm._lock.acquire(timeout=10)  # the generation thread ended
    llm._lock.release()
    assert 0 < llm.streamed_tokens - before < n_full / 2 and full


@pytest.fixture(scope="module")
def upstream(tiny_lms):
    with LocalServer(ServerState(str(tiny_lms["a"]), slow_s=2.0, flaky_failures=2, delay_s=0.0)) as srv:
        yield srv


def up(name: str, server, **kw) -> Expert:
    return build_backend(ExpertSpec(name="up", kind="black-box", source={"base_url": server.base_url, "model": name},
                                    **kw))


def test_upstream_answers_whole_and_streamed(upstream):
    expert = up("tiny", upstream, timeout_s=30)
    for req in (chat("Say hello", max_tokens=6), GenerationRequest(kind="completion", prompt="Hello", max_tokens=6)):
        whole = _run(expert.generate(req))
        assert whole.text and whole.prompt_tokens > 0
        assert _run(_collect(expert.stream(req))).strip() == whole.text.strip()


def test_upstream_retries_are_the_sdks(upstream):
    before = upstream.state.requests
    out = _run(up("flaky", upstream, max_retries=3, timeout_s=30).generate(chat("hi", max_tokens=4)))
    assert out.text and upstream.state.requests - before == 3  # two 503s, then an answer


def test_an_abandoned_upstream_stream_is_closed(upstream):
    upstream.state.stream_piece_s = 0.2
    expert = up("tiny", upstream, timeout_s=30)

    async def first_piece_then_close() -> None:
        agen = expert.stream(chat("Tell me a story", max_tokens=16))
        await agen.__anext__()
        await agen.aclose()

    before = upstream.state.streams_closed_early
    try:
        _run(first_piece_then_close())
        deadline = time.time() + 5
        while upstream.state.streams_closed_early == before and time.time() < deadline:
            time.sleep(0.05)
    finally:
        upstream.state.stream_piece_s = 0.05
    assert upstream.state.streams_closed_early == before + 1


def test_upstream_refused_connection_fails_after_its_retries():
    spec = ExpertSpec(name="gone", backend="openai", model="m", base_url=f"http://127.0.0.1:{free_port()}/v1",
                      retries=2, timeout_s=2.0)
    expert = build_backend(spec)
    with pytest.raises(ExpertError, match=r"failed after 3 attempt\(s\): APIConnectionError"):
        _run(expert.generate(chat("hi")))


def test_upstream_that_hangs_times_out():
    server = HangingServer()
    try:
        spec = ExpertSpec(name="hung", backend="openai", model="m", base_url=f"http://127.0.0.1:{server.port}/v1",
                          retries=0, timeout_s=0.5)
        expert = build_backend(spec)
        t0 = time.perf_counter()
        with pytest.raises(ExpertError, match="Timeout"):
            _run(expert.generate(GenerationRequest(kind="completion", prompt="hi")))
        assert time.perf_counter() - t0 < 5
        with pytest.raises(ExpertError, match="Timeout"):
            _run(_collect(expert.stream(GenerationRequest(kind="completion", prompt="hi"))))
    finally:
        server.close()


def test_upstream_needs_its_key_variable(monkeypatch):
    monkeypatch.delenv("CSCR_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="CSCR_NO_SUCH_KEY is not set"):
        build_backend(ExpertSpec(name="x", backend="openai", model="m", base_url="http://127.0.0.1:1/v1",
                                 api_key_env="CSCR_NO_SUCH_KEY"))


def _logit_run(tmp_path, trained_run, tiny_lms, n: int = 6, k: int = 8, steps: int = 2):
    """A run with logit descriptors of tiny-a computed the way jobs/fingerprint.py computes them."""
    import shutil

    from cscr.data.table import RoutingTable
    from cscr.fingerprints.basis import TokenBasis
    from cscr.fingerprints.logit import LogitFootprintUDF, footprint_from_rows
    from cscr.runs.paths import RunPaths

    run = RunPaths.of(tmp_path / "run")
    shutil.copytree(RunPaths.of(trained_run).table, run.table)
    table = RoutingTable.load(run.table)
    rows = table.split_index("probe")[:n]  # the job's --n-probes
    probes = [str(t) for t in table.texts[rows]]
    basis = TokenBasis.from_texts(probes, k)
    udf = LogitFootprintUDF("tiny-a", str(tiny_lms["a"]), list(basis.strings), steps=steps,
                            backend_kwargs={"max_prompt_tokens": 16})
    out = udf({"probe_id": np.asarray(table.prompt_ids[rows]), "text": np.asarray(probes, dtype=object)})
    return run, probes, basis, footprint_from_rows(out["step_mean"])


def test_on_the_fly_footprint_matches_the_fingerprint_jobs(tmp_path, trained_run, tiny_lms):
    """The plan is rebuilt from the store's structured settings (N, T, K, the probe cut) and
    gives the same footprint for the same model."""
    from cscr.serve.fingerprint import fingerprint_plan, logit_footprint_of

    from cscr.fingerprints.store import DescriptorStore, FingerprintSettings

    run, probes, basis, stored = _logit_run(tmp_path, trained_run, tiny_lms)
    DescriptorStore(run.descriptors).write("tiny-a", "logit", stored, basis_id=basis.basis_id,
                                           source=f"model {tiny_lms['a']}", settings=FingerprintSettings(
                                               steps=2, basis_size=basis.size, n_probes=6, max_prompt_tokens=16))
    plan = fingerprint_plan(run.root, "logit", basis.basis_id)
    assert plan.probes == probes and plan.basis == list(basis.strings) and plan.steps == 2
    assert plan.max_prompt_tokens == 16
    np.testing.assert_allclose(logit_footprint_of(str(tiny_lms["a"]), plan), stored, atol=1e-5)
    other = np.asarray(logit_footprint_of(str(tiny_lms["b"]), plan))
    assert float(other @ stored) < 0.999  # another model: another footprint
    with pytest.raises(ProtocolError, match="cannot rebuild the token basis"):
        fingerprint_plan(run.root, "logit", "tok8-0000000000000000")


def test_on_the_fly_footprint_reads_a_store_written_before_settings_had_columns(tmp_path, trained_run, tiny_lms):
    """An old store (settings as prose, no N): T is parsed from the prose; N is the job's default
    when that gives the stored basis, and an N that cannot be told apart is a clear error."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from cscr.serve.fingerprint import fingerprint_plan

    from cscr.config import FingerprintConfig
    from cscr.data.table import RoutingTable
    from cscr.runs.paths import RunPaths

    n_probe = len(RoutingTable.load(RunPaths.of(trained_run).table).split_index("probe"))
    default_n = min(FingerprintConfig().n_probes, n_probe)
    for n, root in ((default_n, tmp_path / "default"), (5, tmp_path / "five")):
        run, probes, basis, stored = _logit_run(root, trained_run, tiny_lms, n=n, steps=3)
        old = pa.table({"expert": ["tiny-a"], "kind": ["logit"], "vector": [stored.astype(np.float32).tolist()],
                        "dimension": pa.array([basis.size], pa.int32()), "basis_id": [basis.basis_id],
                        "source": [f"logit T=3 K={basis.size} {tiny_lms['a']}"], "created": ["2026-01-01T00:00:00Z"]})
        run.descriptors.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(old, run.descriptors)
        if n == default_n:
            plan = fingerprint_plan(run.root, "logit", basis.basis_id)
            assert plan.steps == 3 and plan.probes == probes and plan.basis == list(basis.strings)
        else:  # on this table the first 5 to 10 probes share their 8 most frequent strings
            with pytest.raises(ProtocolError, match=r"do not record their probe count N, and N in \[5, 6, 7, 8, 9, 10\]"):
                fingerprint_plan(run.root, "logit", basis.basis_id)
