"""A Live Runner client made with the official Livepeer gateway SDK (`livepeer-gateway`), as
apps use it against one orchestrator's `/discovery`: for `make demo` and the tests
(tests/live/test_live_runner_*.py). Run with the SDK's own interpreter (.gateway-sdk, made
by hack/setup); prints one JSON report.

    .gateway-sdk/bin/python hack/live_runner_client.py discover ORCH_URL [APP]
    .gateway-sdk/bin/python hack/live_runner_client.py call ORCH_URL APP PATH PAYLOAD [SIGNER]
    .gateway-sdk/bin/python hack/live_runner_client.py stream ORCH_URL APP PATH PAYLOAD [SIGNER]
    .gateway-sdk/bin/python hack/live_runner_client.py reserve ORCH_URL APP
    .gateway-sdk/bin/python hack/live_runner_client.py hold ORCH_URL APP SECONDS SIGNER
    .gateway-sdk/bin/python hack/live_runner_client.py stop CONTROL_URL
    .gateway-sdk/bin/python hack/live_runner_client.py register ORCH_URL SECRET RUNNER_URL APP UNTIL

`register` is the runner's side: the SDK's register_runner (heartbeats, the o2r channel's
session events), held until the file UNTIL exists; it prints `registered <runner id>` first,
a line per session event as it hears it, then its report.

With SIGNER (a remote signer's URL, kubepeer_dev.remote_signer) the SDK pays: the 402 challenge
answered through the signer, metered sessions funded every few seconds as the SDK does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
from livepeer_gateway import (
    LiveRunnerSession,
    LiveRunnerSessionEvent,
    call_runner,
    discover_runners,
    register_runner,
    reserve_session,
    stop_runner_session,
)


async def discover(orch: str, app: str | None = None) -> dict:
    entries = await discover_runners(discovery_url=f"{orch}/discovery", app=app)
    return {"entries": entries}


async def _runner(orch: str, app: str, path: str) -> tuple[str, str | None]:
    """The app's discovered URL with `path`, and its price's unit (None: free)."""
    entries = await discover_runners(discovery_url=f"{orch}/discovery", app=app)
    runner = entries[0]["runners"][0]
    return runner["url"] + path, (runner.get("price_info") or {}).get("unit")


async def call(orch: str, app: str, path: str, payload: str, signer: str | None = None) -> dict:
    url, unit = await _runner(orch, app, path)
    result = await call_runner(url, payload=json.loads(payload), signer_url=signer,
                               payment_unit=unit)  # fmt: skip
    return {"data": result.data, "content_type": result.content_type,
            "session_id": result.session_id}  # fmt: skip


async def stream(orch: str, app: str, path: str, payload: str, signer: str | None = None) -> dict:
    started = time.monotonic()
    lines = []
    url, unit = await _runner(orch, app, path)
    async with await call_runner(
        url, payload=json.loads(payload), stream=True, timeout=30, signer_url=signer,
        payment_unit=unit,
    ) as answer:  # fmt: skip
        async for line in answer.aiter_lines():
            if line:
                lines.append({"at": round(time.monotonic() - started, 3), "line": line})
        return {"status": answer.status, "content_type": answer.content_type, "lines": lines}


async def reserve(orch: str, app: str) -> dict:
    session = await reserve_session(discovery_url=f"{orch}/discovery", app=app)
    return {"session_id": session.session_id, "app_url": session.app_url,
            "control_url": session.control_url}  # fmt: skip


async def hold(orch: str, app: str, seconds: str, signer: str) -> dict:
    """Reserve a paid session, keep it (the SDK funds it) for SECONDS, asking the app's
    health through it each second; then close it."""
    session = await reserve_session(discovery_url=f"{orch}/discovery", app=app,
                                    signer_url=signer)  # fmt: skip
    statuses = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
        for _ in range(int(seconds)):
            await asyncio.sleep(1)
            async with http.get(f"{session.app_url}/health") as answer:
                statuses.append(answer.status)
    released = session.released
    await session.aclose()
    return {"session_id": session.session_id, "statuses": statuses, "released": released}


async def register(orch: str, secret: str, runner_url: str, app: str, until: str) -> dict:
    events: list[dict] = []

    def heard(event: LiveRunnerSessionEvent) -> None:
        events.append({"event": event.event, "session": event.session_id,
                       "timestamp": event.timestamp})  # fmt: skip
        print(f"{event.event} {event.session_id}", flush=True)

    registration = await register_runner(
        orch, secret=secret, runner_url=runner_url, app=app, auto_detect_gpu=False,
        capacity=2, on_session_reserve=heard, on_session_release=heard,
    )  # fmt: skip
    print(f"registered {registration.runner_id}", flush=True)
    while not Path(until).exists():
        await asyncio.sleep(0.2)
    await registration.close()
    return {"runner_id": registration.runner_id, "events": events}


async def stop(control_url: str) -> dict:
    session = LiveRunnerSession(session_id="-", app_url="-", runner_url="-",
                                control_url=control_url)  # fmt: skip
    await stop_runner_session(session)
    return {"released": session.released}


COMMANDS = {"discover": discover, "call": call, "stream": stream, "reserve": reserve,
            "hold": hold, "stop": stop, "register": register}  # fmt: skip

if __name__ == "__main__":
    command, *args = sys.argv[1:]
    try:
        report = asyncio.run(COMMANDS[command](*args))
    except Exception as exc:  # the test reads what the SDK raised
        report = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(report))
