"""Admin adds may only use what the operator declared (serve.policy): upstreams with their key
variable, packaged models, the pool file's models, paths inside model roots. Each refusal is
immediate, over HTTP too (403 source_not_allowed, OpenAI's error shape)."""

from __future__ import annotations

import time

import pytest
from cscr.serve.policy import SourcePolicy, parse_upstream
from cscr.serve.protocol import ProtocolError

from cscr.pool import ExpertSpec

UP = "https://api.example.test/v1"


def spec(**kw) -> ExpertSpec:
    return ExpertSpec(name="x", **kw)


def refused(policy: SourcePolicy, s: ExpertSpec) -> str:
    with pytest.raises(ProtocolError) as err:
        policy.check(s)
    assert err.value.status == 403 and err.value.code == "source_not_allowed"
    return str(err.value)


def test_upstreams_need_the_declared_url_and_key_variable():
    pool = [ExpertSpec(name="gpt", kind="black-box", source={"base_url": UP, "model": "m", "api_key_env": "UP_KEY"},
                       cost={"input_price": 1.0})]
    policy = SourcePolicy.build(pool, upstreams=["http://127.0.0.1:9/v1=LOCAL_KEY"])
    policy.check(spec(base_url=UP + "/", model="other", api_key_env="UP_KEY"))  # the pool's upstream
    policy.check(spec(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="LOCAL_KEY"))  # declared
    # a secret sent elsewhere, another secret sent to a declared URL, an undeclared URL
    assert "not declared" in refused(policy, spec(base_url="http://127.0.0.1:8123/v1", model="m",
                                                  api_key_env="UP_KEY"))
    refused(policy, spec(base_url=UP, model="m", api_key_env="AWS_SECRET_ACCESS_KEY"))
    refused(policy, spec(base_url=UP, model="m"))
    refused(SourcePolicy(), spec(base_url=UP, model="m", api_key_env="UP_KEY"))


def test_local_models_only_packaged_pool_or_inside_a_root(tmp_path):
    root = tmp_path / "models"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    policy = SourcePolicy.build([ExpertSpec(name="p", model="org/pool-model", cost={"n_params": 1.0})],
                                model_roots=[str(root)])
    policy.check(spec(model="smollm2"))  # packaged
    policy.check(spec(model="org/pool-model"))  # the pool file uses it
    policy.check(spec(model=str(root / "ok")))
    t0 = time.perf_counter()
    for source in ("/etc", "/proc/self/environ", "/dev/zero", "../../..", str(root / ".." / "outside"),
                   str(root / "escape"), "~/.ssh", "org/any-hub-model", str(root / "missing")):
        refused(policy, spec(model=source))
    assert time.perf_counter() - t0 < 1.0  # immediate, nothing is loaded
    # no roots declared: no local path at all
    refused(SourcePolicy(), spec(model=str(root / "ok")))


def test_recorded_experts_and_engine_kwargs_are_the_operators():
    policy = SourcePolicy()
    refused(policy, ExpertSpec(name="r", kind="recorded", source={}))
    refused(policy, spec(model="smollm2", engine_kwargs={"download_dir": "/etc"}))


def test_declared_upstreams_are_checked():
    assert parse_upstream("https://a.test/v1=KEY") == ("https://a.test/v1", "KEY")
    assert parse_upstream("http://127.0.0.1:9/v1") == ("http://127.0.0.1:9/v1", None)
    for bad in ("a.test=KEY", "https://a.test/v1="):
        with pytest.raises(ValueError):
            parse_upstream(bad)
    with pytest.raises(ValueError, match="not a folder"):
        SourcePolicy.build([], model_roots=["/nonexistent-root"])
