"""Small real parts for the serving tests: tiny random causal LMs saved from a config, a plain
dot-product router on the Router interface, and the real MiniLM encoder."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np

from cscr.routers.base import Router


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


class DotRouter(Router):
    """Utilities = emb . d_m on the top-k experts (-inf elsewhere); live add/remove."""

    def __init__(self, descriptors: dict[str, np.ndarray], costs: dict[str, float], top_k: int = 4) -> None:
        super().__init__()
        self.top_k = top_k
        self.expert_names = list(descriptors)
        self.desc = np.stack([unit(descriptors[n]) for n in self.expert_names])  # (M, d)
        self.costs = np.array([costs[n] for n in self.expert_names], dtype=np.float64)

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        s = np.asarray(emb, dtype=np.float64) @ self.desc.T  # (n, M)
        k = min(self.top_k, s.shape[1])
        kth = -np.sort(-s, axis=1)[:, k - 1 : k]  # (n, 1)
        return np.where(s >= kth, s, -np.inf)

    def add_expert(self, name: str, descriptor: np.ndarray, cost: float) -> None:
        if descriptor.shape != (self.desc.shape[1],):
            raise ValueError(f"descriptor has dimension {descriptor.shape}, the index {self.desc.shape[1]}")
        self.expert_names.append(name)
        self.desc = np.vstack([self.desc, unit(descriptor)[None]])
        self.costs = np.append(self.costs, cost)

    def remove_expert(self, name: str) -> None:
        j = self.expert_names.index(name)
        self.expert_names.pop(j)
        self.desc = np.delete(self.desc, j, axis=0)
        self.costs = np.delete(self.costs, j)


def make_tiny_lm(out_dir: Path, seed: int) -> Path:
    """A 2-layer random GPT-2 with SmolLM2's tokenizer (and chat template), saved as an HF folder."""
    from cscr.models import tiny_random_lm

    return tiny_random_lm(out_dir, seed, tokenizer="smollm2")


def app_clients(base: str, key: str, admin_key: str, **extra: Any) -> SimpleNamespace:
    """What a live-app fixture yields: ``base``, an ``http`` client with the API key, an ``admin``
    client with the admin key, and ``extra`` (the pool, the state folder, a local service ...)."""
    def client(k: str) -> httpx.Client:
        return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {k}"}, timeout=300)

    return SimpleNamespace(base=base, http=client(key), admin=client(admin_key), **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(application: Any, port: int, metrics_port: int | None = None) -> Iterator[str]:
    """``application`` served as "cscr" on "/" at loopback ``port``, on a fresh local Ray cluster
    of 2 CPUs (never a teammate's; Prometheus on ``metrics_port`` when given); yields the base URL.
    Serve and the cluster are shut down on the way out."""
    import ray
    from ray import serve as ray_serve

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             **({"_metrics_export_port": metrics_port} if metrics_port else {}))
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        ray_serve.run(application, name="cscr", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        ray_serve.shutdown()
        ray.shutdown()


class HangingServer:
    """A loopback TCP server that accepts connections and never answers (an upstream that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2)
        for c in self.conns:
            c.close()
        self.sock.close()


RB_EXPERTS = ["mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "gpt-4-1106-preview"]


def make_trained_run(run_dir: Path, data_dir: Path, experts: list[str] = RB_EXPERTS,
                     sizes: dict[str, int] | None = None, epochs: int = 3) -> Path:
    """A real trained CSCR run on a slice of the real RouterBench table: table, MiniLM embeddings,
    probe-outcome descriptors and a head trained for a few epochs with the plain loop."""
    from cscr.config import DataConfig, IndexConfig, TrainConfig
    from cscr.data import load_dataset
    from cscr.encoder import Encoder, embed_table
    from cscr.runs.paths import RunPaths
    from cscr.training.plain import train_run

    sizes = sizes or {"train": 120, "val": 30, "probe": 16, "test": 16}
    table = load_dataset("routerbench", DataConfig(data_dir=str(data_dir), probe_size=sizes["probe"]))
    length = np.array([len(str(t)) for t in table.texts])
    # the shortest prompts of each split (the few-shot ARC prompts are long: slow to embed here)
    rows = np.concatenate([idx[np.argsort(length[idx], kind="stable")[:k]]
                           for s, k in sizes.items() for idx in [table.split_index(s)]])
    sub = table.subset(np.sort(rows), experts)
    paths = RunPaths.of(run_dir)
    sub.save(paths.table)
    embed_table(sub, Encoder(), paths.embeddings, progress=None)
    cfg = TrainConfig(epochs=epochs, batch_size=64, index=IndexConfig(top_k=len(experts)))
    train_run(str(paths.root), "cscr", cfg, log=None)
    return paths.root


# ---- in-process parts of the CompletionService tests (no Ray) ----
# normalised costs: at a high cost weight the order is broken, hung, tiny-a, tiny-b
COSTS = {"broken": 0.05, "hung": 0.1, "tiny-a": 0.3, "tiny-b": 1.0}


def reference():
    from cscr.serve.service import CostReference

    return CostReference(best_expert="tiny-b", best_cost=1.0, scale=2.5, unit="usd")


class BrokenExpert:
    """Fails every call at once, like a replica that raises."""

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, req):
        self.calls += 1
        raise RuntimeError("expert crashed")

    async def stream(self, req):
        self.calls += 1
        raise RuntimeError("expert crashed")
        yield ""  # makes this an async generator


class HungExpert:
    """Never answers (an upstream that hangs); counts the abandoned calls that were cancelled."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def _wait(self) -> None:
        import asyncio

        self.started += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def generate(self, req):
        await self._wait()

    async def stream(self, req):
        await self._wait()
        yield ""


class MidStreamFailure:
    """Streams two pieces, then fails (too late to fall back)."""

    async def generate(self, req):
        from cscr.serve.protocol import GenerationResult

        return GenerationResult(text="ab")

    async def stream(self, req):
        yield "a"
        yield "b"
        raise RuntimeError("connection reset")


def router_service(encoder, costs: dict[str, float] | None = None, ref=None):
    """A real RouterService: CSCR from parts (a seeded random head) over ``costs`` (default: COSTS)."""
    import torch
    from cscr.serve.service import RouterService

    from cscr.config import HeadConfig
    from cscr.head import Head
    from cscr.routers.cscr import CSCRRouter

    torch.manual_seed(0)
    head = Head(HeadConfig(in_dim=384, hidden=32, out_dim=16))
    rng = np.random.default_rng(0)
    costs = dict(costs if costs is not None else COSTS)
    desc = {n: rng.standard_normal(16) for n in costs}
    router = CSCRRouter.from_parts(head, desc, costs, top_k=len(costs))
    return RouterService(encoder, router, reference=ref if ref is not None else reference())


def tiny_backends(tiny_lms) -> dict:
    """tiny-a and tiny-b: the tiny LMs behind the real serving backend (transformers)."""
    from cscr.serve.experts import build_backend

    from cscr.pool import ExpertSpec

    return {name: build_backend(ExpertSpec(name=name, model=str(tiny_lms[lm]), max_new_tokens=limit))
            for name, lm, limit in (("tiny-a", "a", 32), ("tiny-b", "b", 64))}


class FlakyExpert:
    """A real backend that can be switched to be dead (``ExpertUnavailable``: its replicas are
    gone), to fail (raise), to hang, and back to answering ("ok"); counts the calls it got."""

    def __init__(self, inner, mode: str = "ok") -> None:
        self.inner = inner
        self.mode = mode
        self.calls = 0

    async def _check(self) -> None:
        import asyncio

        from cscr.serve.health import ExpertUnavailable

        self.calls += 1
        if self.mode == "dead":
            raise ExpertUnavailable("its replicas are dead")
        if self.mode == "fail":
            raise RuntimeError("expert crashed")
        if self.mode == "hang":
            await asyncio.sleep(3600)

    async def generate(self, req):
        await self._check()
        return await self.inner.generate(req)

    async def stream(self, req):
        await self._check()
        async for piece in self.inner.stream(req):
            yield piece


def long_expert(tiny_lms, max_new_tokens: int = 1000):
    """tiny-b behind the real transformers backend, allowed long answers (about a minute of
    generation here: long enough to see whether an abandoned one stops)."""
    from cscr.serve.experts import build_backend

    from cscr.pool import ExpertSpec

    return build_backend(ExpertSpec(name="long", model=str(tiny_lms["b"]), max_new_tokens=max_new_tokens))


def seconds_until_idle(expert, within: float) -> float:
    """Seconds until a transformers expert generates nothing (its one-generation lock is free),
    failing after ``within`` seconds."""
    import time

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < within:
        if not expert.llm._lock.locked():
            return time.perf_counter() - t0
        time.sleep(0.02)
    raise AssertionError(f"the expert still generates {within} s after its request was abandoned")


class LiveServer:
    """An ASGI app behind a real uvicorn server on a loopback port, in a thread (real HTTP: a
    client that disconnects is seen as a disconnect)."""

    def __init__(self, app) -> None:
        import time

        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.perf_counter()
        while not self.server.started:
            if time.perf_counter() - t0 > 30:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
