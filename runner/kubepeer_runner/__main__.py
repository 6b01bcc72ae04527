"""`python -m kubepeer_runner`: serve the models the environment names, on port 8000."""

from __future__ import annotations

import logging
import os
import sys

from kubepeer_runner.config import ConfigError, RunnerConfig


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from MODEL_DIR, never a hub
    # Before torch loads OpenMP: its idle workers sleep instead of spinning for a while after
    # each operator, which took the CPU from the event loop (answers, probes) and from each
    # other wherever cores are shared (hack/bench/runner.py: ~4x slower CPU inference and
    # twice the HTTP overhead on 2 busy cores). On a GPU host it costs nothing measurable.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        config = RunnerConfig.from_env()
    except ConfigError as exc:
        print(f"kubepeer-runner: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from kubepeer_runner.app import create_app

    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_config=None,  # keep the logging set up above, so load errors reach the log
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
