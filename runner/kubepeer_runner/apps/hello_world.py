"""hello-world: a single-shot HTTP app. Every call, on any path, gets one JSON answer that
says what the orchestrator told the app about it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

SESSION_HEADERS = ("livepeer-runner-route", "livepeer-session-id", "livepeer-session-control")


def create_app() -> FastAPI:
    app = FastAPI(title="hello-world", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "OK"}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def hello(path: str, request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({
            "message": "hello, world",
            "method": request.method,
            "path": "/" + path,
            "bytes": len(body),
            # What the orchestrator says about this call; never the session token.
            "session": {h.removeprefix("livepeer-"): request.headers.get(h)
                        for h in SESSION_HEADERS},
        })  # fmt: skip

    return app
