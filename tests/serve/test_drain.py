"""A graceful stop (issue 13, item 3): while the server drains, an ingress answers new requests with
a 503 in OpenAI's shape that says to retry (Retry-After, Connection: close), lets the requests in
flight finish, and counts them (serve.deployments.EdgeGate over the real ingress app)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
from cscr.serve.deployments import EdgeGate
from fastapi import FastAPI


def test_a_draining_ingress_finishes_what_it_serves_and_refuses_new_requests():
    release = asyncio.Event()
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await release.wait()
        return {"status": "done"}

    follower = SimpleNamespace(draining=False, version=4)
    gate = EdgeGate(app, follower)

    async def go():
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://cscr") as client:
            inflight = asyncio.create_task(client.get("/slow"))
            for _ in range(100):
                if gate.inflight == 1:
                    break
                await asyncio.sleep(0.01)
            assert gate.inflight == 1
            follower.draining = True  # the controller said: drain
            refused = await client.get("/slow")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            assert refused.headers["connection"] == "close" and refused.headers["x-cscr-pool-version"] == "4"
            assert refused.json()["error"]["code"] == "server_draining"
            assert gate.inflight == 1  # the refused request was never in flight
            release.set()
            done = await inflight
            assert done.status_code == 200 and done.json() == {"status": "done"}
            assert done.headers["x-cscr-pool-version"] == "4" and gate.inflight == 0

    asyncio.run(go())
