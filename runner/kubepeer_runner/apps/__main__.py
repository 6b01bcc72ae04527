"""`kubepeer-app NAME`: serve one example Live Runner app on $PORT (8080) of $HOST."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from kubepeer_runner.apps import echo, hello_world, tokens

APPS: dict[str, Callable[[], Any]] = {
    "echo": echo.create_app,
    "hello-world": hello_world.create_app,
    "tokens": tokens.create_app,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubepeer-app", description=__doc__)
    parser.add_argument("app", choices=sorted(APPS), help="which app to serve")
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(APPS[args.app](), host=args.host, port=args.port, log_config=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
