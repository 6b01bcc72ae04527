"""A Live Runner client made with the official Livepeer gateway SDK (`livepeer-gateway`), as
apps use it against one orchestrator's `/discovery`. Run by tests/live/test_live_runner_apps.py
with the SDK's own interpreter (.gateway-sdk, made by hack/setup); prints one JSON report.

    .gateway-sdk/bin/python tests/live/sdk_apps.py discover ORCH_URL [APP]
    .gateway-sdk/bin/python tests/live/sdk_apps.py call ORCH_URL APP PATH PAYLOAD
    .gateway-sdk/bin/python tests/live/sdk_apps.py stream ORCH_URL APP PATH PAYLOAD
    .gateway-sdk/bin/python tests/live/sdk_apps.py reserve ORCH_URL APP
    .gateway-sdk/bin/python tests/live/sdk_apps.py stop CONTROL_URL
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from livepeer_gateway import (
    LiveRunnerSession,
    call_runner,
    discover_runners,
    reserve_session,
    stop_runner_session,
)


async def discover(orch: str, app: str | None = None) -> dict:
    entries = await discover_runners(discovery_url=f"{orch}/discovery", app=app)
    return {"entries": entries}


async def _runner_url(orch: str, app: str, path: str) -> str:
    entries = await discover_runners(discovery_url=f"{orch}/discovery", app=app)
    url = entries[0]["runners"][0]["url"]
    return url + path


async def call(orch: str, app: str, path: str, payload: str) -> dict:
    result = await call_runner(await _runner_url(orch, app, path), payload=json.loads(payload))
    return {"data": result.data, "content_type": result.content_type}


async def stream(orch: str, app: str, path: str, payload: str) -> dict:
    started = time.monotonic()
    lines = []
    async with await call_runner(
        await _runner_url(orch, app, path), payload=json.loads(payload), stream=True,
        timeout=30,
    ) as answer:  # fmt: skip
        async for line in answer.aiter_lines():
            if line:
                lines.append({"at": round(time.monotonic() - started, 3), "line": line})
        return {"status": answer.status, "content_type": answer.content_type, "lines": lines}


async def reserve(orch: str, app: str) -> dict:
    session = await reserve_session(discovery_url=f"{orch}/discovery", app=app)
    return {"session_id": session.session_id, "app_url": session.app_url,
            "control_url": session.control_url}  # fmt: skip


async def stop(control_url: str) -> dict:
    session = LiveRunnerSession(session_id="-", app_url="-", runner_url="-",
                                control_url=control_url)  # fmt: skip
    await stop_runner_session(session)
    return {"released": session.released}


COMMANDS = {"discover": discover, "call": call, "stream": stream, "reserve": reserve,
            "stop": stop}  # fmt: skip

if __name__ == "__main__":
    command, *args = sys.argv[1:]
    try:
        report = asyncio.run(COMMANDS[command](*args))
    except Exception as exc:  # the test reads what the SDK raised
        report = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(report))
