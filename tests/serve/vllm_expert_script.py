"""Run in a subprocess by test_vllm_expert.py (vLLM starts worker processes: a fresh interpreter
with a ``__main__`` guard). Deploys one Expert deployment with the vLLM backend on a fresh local
Ray cluster and writes its answers, whole and streamed through the Serve handle, as JSON; then
drives the async vLLM backend directly (an abandoned stream, a prompt too long)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from cscr.serve.app import expert_application
    from cscr.serve.protocol import GenerationRequest
    from ray import serve as ray_serve

    from cscr.pool import ExpertSpec

    spec = json.loads(Path(sys.argv[1]).read_text())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict = {"whole": [], "streamed": [], "tokens": []}
    try:
        handle = ray_serve.run(expert_application(ExpertSpec(
            name="v", backend="vllm", model=spec["model"], num_cpus=0.5, engine_kwargs={"max_model_len": 1024})),
            name="vllm-expert", route_prefix=None)
        for kind, text in spec["requests"]:
            req = GenerationRequest(kind=kind, max_tokens=spec["max_tokens"],
                                    **({"messages": [{"role": "user", "content": text}]} if kind == "chat"
                                       else {"prompt": text}))
            res = handle.generate.remote(req).result()
            out["whole"].append(res.text)
            out["tokens"].append(res.completion_tokens)
            out["streamed"].append(list(handle.options(stream=True).stream.remote(req)))
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    out.update(asyncio.run(direct(spec["model"])))
    Path(spec["out"]).write_text(json.dumps(out))


async def direct(model: str) -> dict:
    """The async vLLM backend without Serve: an abandoned stream is aborted in the engine; a
    prompt longer than the context is refused."""
    from cscr.llm import PromptTooLong, Sampling
    from cscr.llm.vllm_engine import AsyncVLLMBackend

    llm = AsyncVLLMBackend(model, max_model_len=256)
    try:
        stream = llm.astream("Tell me a long story about a dragon.", Sampling(max_tokens=200))
        first = await stream.__anext__()
        running = llm.engine.get_num_unfinished_requests()
        await stream.aclose()
        try:
            await llm.agenerate("word " * 400, Sampling(max_tokens=4), completion=True)
            too_long = ""
        except PromptTooLong as exc:
            too_long = str(exc)
        return {"first_piece": first, "running_before_close": running,
                "running_after_close": llm.engine.get_num_unfinished_requests(), "too_long": too_long}
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
