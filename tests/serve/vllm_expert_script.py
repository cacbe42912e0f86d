"""Run in a subprocess by test_vllm_expert.py (vLLM starts worker processes: a fresh interpreter
with a ``__main__`` guard). Deploys one Expert deployment with the vLLM backend on a fresh local
Ray cluster and writes its answers, whole and streamed through the Serve handle, as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from cscr.serve.deployments import expert_application
    from cscr.serve.protocol import ExpertSpec, GenerationRequest
    from ray import serve as ray_serve

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
    Path(spec["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
