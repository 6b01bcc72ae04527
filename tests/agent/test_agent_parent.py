"""A test session killed hard (no fixture teardown) leaves no node agent behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, needs_root
from tests.support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.agent]

# Stands in for pytest: starts the agent as the node_agent fixture does, then waits.
STARTER = """
import os, subprocess, sys, time
agent = subprocess.Popen([*sys.argv[1:], "--parent-pid", str(os.getpid())])
print(f"agent pid {agent.pid}", flush=True)
time.sleep(3600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def test_agent_shuts_down_when_the_process_that_started_it_is_killed(cluster, tmp_path):
    needs_root()
    node, state, log = "agent-orphan", tmp_path / "state", tmp_path / "agent.log"
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(REPO / "hack" / "node-agent"),
         "--kubeconfig", str(cluster.kubeconfig), "--node", node, "--state-dir", str(state)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    agent_pid = None
    try:
        wait_for(
            lambda: starter.poll() is not None or "watching" in log.read_text(),
            timeout=120,
            what="the agent to start",
        )
        assert starter.poll() is None, log.read_text()[-3000:]
        agent_pid = int(re.search(r"agent pid (\d+)", log.read_text()).group(1))
        netns = json.loads((state / "node-net.json").read_text())["netns"]
        assert (Path("/run/netns") / netns).exists()

        starter.send_signal(signal.SIGKILL)  # no teardown runs, as for pytest killed hard
        starter.wait(timeout=10)

        wait_for(lambda: not _running(agent_pid), timeout=60, what="the agent to exit")
        assert "parent process" in log.read_text(), log.read_text()[-3000:]
        assert not (Path("/run/netns") / netns).exists(), "the node netns outlived the agent"
    finally:
        if starter.poll() is None:
            starter.kill()
        if agent_pid is not None and _running(agent_pid):
            os.kill(agent_pid, signal.SIGTERM)  # its own shutdown removes its netns
            try:
                wait_for(lambda: not _running(agent_pid), timeout=30, what="the agent to stop")
            finally:
                if _running(agent_pid):
                    os.kill(agent_pid, signal.SIGKILL)
        cluster.kubectl("delete", "node", node, "--ignore-not-found", check=False)
