"""A bounded schema fuzz of the HTTP API (schemathesis over the app's own OpenAPI schema).

Every operation of ``/openapi.json`` (the admin endpoints and /healthz included) gets
``EXAMPLES`` valid and ``EXAMPLES`` invalid requests generated from its schema (and the three
serving operations ``EXAMPLES`` more valid ones naming a served model), sent in-process
to the FastAPI app over a real CompletionService (CSCR router on MiniLM, tiny LMs behind the
transformers backend). Two servers: one whose admin key the fuzzer
does not have (it sends the API key): every operation; one with the admin API disabled: the
operations that read the admin key (the admin endpoints and /healthz), the only ones that differ
between the two (the serving operations never read it). Asserted: no response
with status >= 500, every error in OpenAI's shape, no admin operation ever succeeds, and every
status is one the schema documents for that operation. The counts are printed (``-s``)."""

from __future__ import annotations

import collections
import json

import pytest
from cscr.serve.admin import AdminService
from cscr.serve.completion import CompletionService, CompletionSettings
from cscr.serve.local import LocalExperts, LocalRouter
from cscr.serve.metrics import Tally
from cscr.serve.routes import EdgeSettings, build_api
from fastapi.testclient import TestClient
from serve_helpers import router_service, tiny_backends

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

KEY, ADMIN = "fuzz-api-key", "admin-key-the-fuzzer-does-not-have"
EXAMPLES = 100  # per operation and mode (valid, invalid): 200 requests per operation and server
ADMIN_PATHS = {"/v1/experts", "/v1/experts/{name}"}
SERVED_MODELS = ["cscr", "cscr:0", "cscr:1000", "tiny-a", "tiny-b"]
SERVED_OPERATIONS = {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/route"}


@pytest.fixture(scope="module")
def parts(encoder, tiny_lms):
    return router_service(encoder), tiny_backends(tiny_lms)


def make_app(parts, admin_key: str | None):
    """The served experts are the two tiny LMs (experts that fail by design would make 502s:
    the fallback loop is tested in test_completion); at most 4 tokens per answer."""
    router, tiny = parts
    local = LocalRouter(router)
    experts = LocalExperts(dict(tiny), {"tiny-a": 4, "tiny-b": 4})
    completion = CompletionService(local, experts, CompletionSettings(expert_timeout_s=30, default_max_tokens=2),
                                   Tally())
    admin = AdminService(local, experts, completion)
    return build_api(completion, admin, EdgeSettings(api_key=KEY, admin_key=admin_key, enable_docs=True))


def openai_shaped(body: bytes) -> bool:
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return (isinstance(obj, dict) and set(obj) == {"error"} and isinstance(obj["error"], dict)
            and set(obj["error"]) == {"message", "type", "param", "code"} and isinstance(obj["error"]["message"], str))


def fuzz_operation(client, op, mode, codes: set[str], statuses: collections.Counter, problems: list[str],
                   samples: list[str], served: bool = False) -> None:
    """Up to ``EXAMPLES`` generated requests of one operation in one mode (valid or invalid);
    ``served``: valid bodies whose ``model`` is one the server has (and, for chat, with at least
    one message), so that they reach the router, the fallback loop and the experts."""
    label = f"{op.method.upper()} {op.path}"

    @given(case=op.as_strategy(generation_mode=mode, headers={"Authorization": f"Bearer {KEY}"}),
           model=st.sampled_from(SERVED_MODELS))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def send(case, model: str) -> None:
        if served and isinstance(case.body, dict):
            body = {**case.body, "model": model}
            if "messages" in body and not body["messages"]:
                body["messages"] = [{"role": "user", "content": "What is the capital of France?"}]
            case.body = body
        kw = case.as_transport_kwargs(base_url="http://testserver")
        body = kw.get("data") if kw.get("json") is None else json.dumps(kw["json"]).encode()
        r = client.request(kw["method"], kw["url"], params=kw.get("params"), headers=kw.get("headers"),
                           content=body)
        statuses[r.status_code] += 1
        if r.status_code == 400 and mode == GenerationMode.POSITIVE and not served and len(samples) < 3:
            samples.append(r.json()["error"]["message"][:100])
        what = f"{label} -> {r.status_code}: {r.content[:200]!r}"
        if r.status_code >= 500:
            problems.append(f"server error: {what}")
        if r.status_code >= 400 and not openai_shaped(r.content):
            problems.append(f"not OpenAI's error shape: {what}")
        if op.path in ADMIN_PATHS and r.status_code < 300:
            problems.append(f"admin operation succeeded without the admin key: {what}")
        if str(r.status_code) not in codes:
            problems.append(f"undocumented status: {what}")

    try:
        send()
    except Unsatisfiable:  # no invalid request exists (no body; any string is a valid path part)
        assert mode == GenerationMode.NEGATIVE and not op.body, label


def fuzz(app, paths: set[str] | None = None) -> tuple[dict[str, collections.Counter], list[str]]:
    """Send the generated requests (to the operations on ``paths``; None: all of them); returns the
    status counts per operation and the problems."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    documented = app.openapi()["paths"]
    client = TestClient(app, raise_server_exceptions=False)
    counts: dict[str, collections.Counter] = {}
    problems: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        if paths is not None and op.path not in paths:
            continue
        label = f"{op.method.upper()} {op.path}"
        counts[label] = collections.Counter()
        samples: list[str] = []  # why schema-valid requests got a 400
        codes = set(documented[op.path][op.method.lower()]["responses"])
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(client, op, mode, codes, counts[label], problems, samples)
        if label in SERVED_OPERATIONS:
            fuzz_operation(client, op, GenerationMode.POSITIVE, codes, counts[label], problems, samples,
                           served=True)
        if samples:
            print(f"  {label}: schema-valid requests refused, e.g. {samples}")
    return counts, problems


def report(name: str, counts: dict[str, collections.Counter]) -> None:
    total = collections.Counter()
    print(f"\nschema fuzz, {name}:")
    for label, statuses in counts.items():
        total.update(statuses)
        print(f"  {label:32s} {sum(statuses.values()):4d} requests  {dict(sorted(statuses.items()))}")
    print(f"  {'all':32s} {sum(total.values()):4d} requests  {dict(sorted(total.items()))}")


@pytest.mark.parametrize("admin_key", [ADMIN, None], ids=["admin-key-unknown-to-the-fuzzer", "admin-disabled"])
def test_the_schema_fuzz_finds_no_server_error(parts, admin_key):
    app = make_app(parts, admin_key)
    counts, problems = fuzz(app, None if admin_key else ADMIN_PATHS | {"/healthz"})
    report("admin key the fuzzer lacks" if admin_key else "admin API disabled", counts)
    admin_ops = {"GET /v1/experts", "POST /v1/experts", "DELETE /v1/experts/{name}", "GET /healthz"}
    serving_ops = SERVED_OPERATIONS | {"GET /v1/models"}
    every_op = {f"{m.upper()} {path}" for path, ops in app.openapi()["paths"].items() for m in ops}
    assert every_op == admin_ops | serving_ops  # a new operation must be sorted into one of the two
    assert set(counts) == (every_op if admin_key else admin_ops)
    for label in (SERVED_OPERATIONS if admin_key else set()) | {"POST /v1/experts"}:
        assert sum(counts[label].values()) >= EXAMPLES, counts  # (a GET without parameters is one request)
    assert not problems, "\n".join(dict.fromkeys(problems))
    admin = collections.Counter()
    for label, statuses in counts.items():
        if label.split()[1] in ADMIN_PATHS:
            admin.update(statuses)
    # 404: a name the path pattern does not match (a newline in it): "no such endpoint", no handler ran
    assert set(admin) <= ({400, 401, 404, 413} if admin_key else {400, 403, 404, 413}), admin
