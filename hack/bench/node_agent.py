#!/usr/bin/env python3
"""Node agent costs: pod start to Ready, and the agent's idle CPU.

1. A tiny text-to-image runner: time from `kubectl create` of the pod to its Ready
   condition through hack/node-agent, against the same command started directly on the
   host until its /readyz answers 200 (the baseline, same run).
2. The agent's CPU use over --idle seconds with 10 Ready pods (readiness probes at the
   kubelet's default 10 s period), against the same agent with no pods.

Needs root (as the agent does). Starts its own cluster (--name bench-agent) and removes it.
Run: sudo .venv/bin/python hack/bench/node_agent.py [--idle 30]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kubepeer_dev import tiny_models

REPO = Path(__file__).resolve().parents[2]

NAME = "bench-agent"
NODE = "bench-agent-0"
TOLERATE = [{"key": "kubepeer.io/node-agent", "operator": "Exists", "effect": "NoSchedule"}]
RUNNER_ENV = {"PIPELINE": "text-to-image", "MODEL_ID": tiny_models.MODEL_IDS["text-to-image"]}


def sh(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=True).stdout


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_start_to_ready(model_dir: Path) -> float:
    port = free_port()
    env = {**os.environ, **RUNNER_ENV, "MODEL_DIR": str(model_dir), "PORT": str(port),
           "HOST": "127.0.0.1"}  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen([str(REPO / ".venv/bin/python"), "-m", "kubepeer_runner"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except OSError:
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait()


def pod(name: str, container: dict, volumes: list | None = None) -> str:
    spec = {"nodeName": NODE, "tolerations": TOLERATE, "containers": [container],
            "volumes": volumes or []}  # fmt: skip
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--idle", type=float, default=30.0)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (the node agent makes network namespaces)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    model_dir = work / "models"
    tiny_models.build(model_dir)
    kc = work / "kubeconfig"
    sh(str(REPO / "hack/cluster"), "up", "--name", NAME, "--nodes", "1", "--kubeconfig", str(kc))
    bin_dir = Path(sh(str(REPO / "hack/cluster"), "bin").strip())

    def kubectl(*a: str, stdin: str | None = None) -> str:
        return sh(str(bin_dir / "kubectl"), "--kubeconfig", str(kc), *a, stdin=stdin)

    agent = subprocess.Popen(
        [str(REPO / "hack/node-agent"), "--kubeconfig", str(kc), "--node", NODE,
         "--state-dir", str(work / "state"), "--bin-dir", str(bin_dir)],
        stdout=(work / "agent.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "watching" not in (work / "agent.log").read_text():  # it registers, then says so
            if time.monotonic() > deadline or agent.poll() is not None:
                raise SystemExit(f"the agent did not start; see {work / 'agent.log'}")
            time.sleep(0.5)
        kubectl("wait", "--for=condition=Ready", f"node/{NODE}", "--timeout=60s")
        direct = direct_start_to_ready(model_dir)
        probe = {"httpGet": {"path": "/readyz", "port": 8000}, "periodSeconds": 1}
        startup = {**probe, "failureThreshold": 300}
        runner = {"name": "runner", "image": "kubepeer-runner", "startupProbe": startup,
                  "readinessProbe": probe,
                  "env": [{"name": k, "value": v} for k, v in
                          {**RUNNER_ENV, "MODEL_DIR": "/models"}.items()],
                  "volumeMounts": [{"name": "models", "mountPath": "/models"}]}  # fmt: skip
        models = [{"name": "models", "hostPath": {"path": str(model_dir)}}]
        started = time.monotonic()
        kubectl("create", "-f", "-", stdin=pod("runner", runner, models))
        kubectl("wait", "--for=condition=Ready", "pod/runner", "--timeout=300s")
        through_agent = time.monotonic() - started
        kubectl("delete", "pod", "runner", "--wait=true")

        empty_before = cpu_seconds(agent.pid)
        time.sleep(args.idle)
        idle_empty = (cpu_seconds(agent.pid) - empty_before) / args.idle
        server = ("import http.server; http.server.HTTPServer(('0.0.0.0', 8080), "
                  "http.server.SimpleHTTPRequestHandler).serve_forever()")  # fmt: skip
        for i in range(10):
            c = {"name": "main", "image": "python", "command": ["python", "-c", server],
                 "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}  # fmt: skip
            kubectl("create", "-f", "-", stdin=pod(f"idle-{i}", c))
        kubectl("wait", "--for=condition=Ready", "pod", "--all", "--timeout=180s")
        time.sleep(5)
        ten_before = cpu_seconds(agent.pid)
        time.sleep(args.idle)
        idle_ten = (cpu_seconds(agent.pid) - ten_before) / args.idle
    finally:
        agent.terminate()
        agent.wait(timeout=120)
        sh(str(REPO / "hack/cluster"), "down", "--name", NAME)
    print(f"runner start to Ready: direct {direct:.2f}s, through the agent {through_agent:.2f}s "
          f"(x{through_agent / direct:.2f})")  # fmt: skip
    print(f"agent idle CPU: no pods {idle_empty * 100:.2f}% of a core, 10 pods "
          f"{idle_ten * 100:.2f}% (x{idle_ten / max(idle_empty, 1e-6):.1f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
