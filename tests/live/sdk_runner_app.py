"""A Live Runner app made with the official gateway SDK on the runner's side, as apps use it:
run by tests/live/test_live_runner_registry.py with the SDK's own interpreter. Within a
session it asks the orchestrator, through the SDK and the session headers it was given, for
trickle channels (`create_trickle_channels`), drops them (`remove_trickle_channels`), makes a
proxy URL (`create_proxy`) and ends the session (`stop_runner_session`).

    .gateway-sdk/bin/python tests/live/sdk_runner_app.py PORT
"""

from __future__ import annotations

import sys

from aiohttp import web
from livepeer_gateway import (
    create_proxy,
    create_trickle_channels,
    remove_trickle_channels,
    stop_runner_session,
)


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "OK"})


async def channels(request: web.Request) -> web.Response:
    wanted = [{"name": "in", "mime_type": "video/mp2t"},
              {"name": "out", "mime_type": "application/json"}]  # fmt: skip
    made = await create_trickle_channels(request, wanted)
    return web.json_response({"channels": made})


async def drop(request: web.Request) -> web.Response:
    return web.json_response({"deleted": await remove_trickle_channels(request, ["in"])})


async def proxy(request: web.Request) -> web.Response:
    made = await create_proxy(request)
    return web.json_response({"proxy_id": made.proxy_id, "url": made.url})


async def done(request: web.Request) -> web.Response:
    await stop_runner_session(request)
    return web.json_response({"stopped": True})


def main() -> None:
    app = web.Application()
    app.add_routes([web.get("/health", health), web.post("/channels", channels),
                    web.post("/drop", drop), web.post("/proxy", proxy),
                    web.post("/done", done)])  # fmt: skip
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
