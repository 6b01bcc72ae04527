#!/usr/bin/env python3
"""The operator at fleet scale, against raw Deployments measured in the same run.

For each N: a fresh control plane with N/2 kwok GPU nodes of 2 GPUs each, then
1. baseline: `kubectl apply` of N Deployments equal to the runners the operator would make
   (same pod template, one GPU each): seconds until every one is Ready; then they go;
2. the operator (a process, under its own ServiceAccount and RBAC): `kubectl apply` of N
   AIModels (Always, one GPU): seconds until every runner Deployment is Ready, and until
   every AIModel's status says Ready;
3. at rest (the N models idle): API requests per second the operator makes, read from the
   API server's own metrics (`apiserver_flowcontrol_dispatched_requests_total` of a
   FlowSchema that matches only the operator's ServiceAccount; every request but a watch's
   stream is dispatched through API Priority and Fairness).

Run: .venv/bin/python hack/bench/fleet.py [--sizes 100,300,1000] [--rest 60]
Never touches a kwok pod IP: nothing listens there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kubepeer.api import AIModelSpec
from kubepeer.contracts.labels import MANAGED_BY
from kubepeer.controller.builders import (
    Member,
    RunnerPlan,
    build_auth_secret,
    build_priority_classes,
    build_runner_deployment,
)
from kubepeer.controller.rbac import operator_rbac
from kubepeer.controller.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]

SPEC = {"pipeline": "text-to-image", "modelId": "org/bench", "warm": {"policy": "Always"}}
SA_NAMESPACE = "kubepeer-system"
FLOW_SCHEMA = "kubepeer-operator-bench"


class Cluster:
    def __init__(self, name: str, nodes: int, workdir: Path) -> None:
        self.name, self.workdir = name, workdir
        self.kubeconfig = workdir / "admin.kubeconfig"
        out = subprocess.run(
            [str(REPO / "hack" / "cluster"), "up", "--name", name, "--nodes", str(nodes),
             "--gpus-per-node", "2", "--kubeconfig", str(self.kubeconfig)],
            capture_output=True, text=True, check=True, timeout=900,
        )  # fmt: skip
        del out
        self.bin = subprocess.run(
            [str(REPO / "hack" / "cluster"), "bin"], capture_output=True, text=True, check=True
        ).stdout.strip()

    def kubectl(self, *args: str, stdin: str | None = None, kubeconfig: Path | None = None) -> str:
        result = subprocess.run(
            [f"{self.bin}/kubectl", "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            input=stdin, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args[:3])}: {result.stderr[-2000:]}")
        return result.stdout

    def items(self, *args: str) -> list[dict[str, Any]]:
        return json.loads(self.kubectl("get", *args, "-o", "json"))["items"]

    def down(self) -> None:
        subprocess.run([str(REPO / "hack" / "cluster"), "down", "--name", self.name],
                       capture_output=True, check=False)  # fmt: skip


def apply_all(cluster: Cluster, manifests: list[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(manifests))


def wait_until(what: str, done: Callable[[], bool], timeout: float, every: float = 1.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if done():
            return time.monotonic() - start
        time.sleep(every)
    raise TimeoutError(f"{what}: not done after {timeout:.0f}s")


def ready_deployments(cluster: Cluster, namespace: str) -> int:
    return sum(
        1
        for d in cluster.items("deployments", "-n", namespace)
        if (d.get("status") or {}).get("readyReplicas", 0) >= 1
    )


def raw_deployments(n: int, namespace: str, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The runners the operator would build, as plain Deployments nobody owns."""
    spec = AIModelSpec.model_validate(SPEC)
    out: list[dict[str, Any]] = [
        *build_priority_classes(settings),
        build_auth_secret(namespace, settings, "bench-token"),
    ]
    for i in range(n):
        plan = RunnerPlan.dedicated(namespace, Member(name=f"m{i:04d}", uid="-", spec=spec))
        deployment = build_runner_deployment(plan, settings)
        del deployment["metadata"]["ownerReferences"]
        del deployment["metadata"]["labels"][MANAGED_BY]  # not the operator's to manage
        out.append(deployment)
    return out


def aimodels(n: int) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "kubepeer.io/v1alpha1", "kind": "AIModel",
         "metadata": {"name": f"m{i:04d}", "namespace": "models"},
         "spec": {**SPEC, "pricing": {"price": {"pricePerUnit": "1", "currency": "wei"}}}}
        for i in range(n)
    ]  # fmt: skip


def operator_kubeconfig(cluster: Cluster, settings: OperatorSettings) -> Path:
    cluster.kubectl("create", "namespace", SA_NAMESPACE)
    apply_all(cluster, operator_rbac(settings, SA_NAMESPACE))
    token = cluster.kubectl(
        "-n", SA_NAMESPACE, "create", "token", "kubepeer-operator", "--duration", "6h"
    ).strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = "operator"
    path = cluster.workdir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    # A FlowSchema of its own, so the API server counts the operator's requests apart.
    apply_all(cluster, [{
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
        "metadata": {"name": FLOW_SCHEMA},
        "spec": {
            "priorityLevelConfiguration": {"name": "workload-high"},
            "matchingPrecedence": 100,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [{
                "subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                    "name": "kubepeer-operator", "namespace": SA_NAMESPACE}}],
                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                   "clusterScope": True, "namespaces": ["*"]}],
                "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            }],
        },
    }])  # fmt: skip
    return path


WARMUP = {
    "apiVersion": "kubepeer.io/v1alpha1", "kind": "AIModel",
    "metadata": {"name": "warmup", "namespace": "warmup"},
    "spec": {"pipeline": "text-to-image", "modelId": "org/warmup", "warm": {"policy": "OnDemand"}},
}  # fmt: skip


def warmed_up(cluster: Cluster) -> bool:
    """Whether the operator has written the status of an OnDemand AIModel (no pod, no GPU)
    in a namespace of its own: then its watches are listed and its handlers run."""
    if not cluster.items("namespaces", "--field-selector", "metadata.name=warmup"):
        cluster.kubectl("create", "namespace", "warmup")
        apply_all(cluster, [WARMUP])
    found = cluster.items("aimodels", "-n", "warmup")
    return bool(found and (found[0].get("status") or {}).get("phase"))


def operator_requests(cluster: Cluster) -> int:
    metrics = cluster.kubectl("get", "--raw", "/metrics")
    pattern = re.compile(
        r'^apiserver_flowcontrol_dispatched_requests_total\{[^}]*flow_schema="'
        + FLOW_SCHEMA
        + r'"[^}]*\} (\S+)$',
        re.M,
    )
    return int(sum(float(v) for v in pattern.findall(metrics)))


def bench(n: int, rest: float, workdir: Path) -> dict[str, float]:
    settings = OperatorSettings(runner_image="example.invalid/runner:bench", standalone=True)
    cluster = Cluster(f"bench-op-{n}", max(1, n // 2), workdir)
    process = None
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/aimodels.kubepeer.io")
        result: dict[str, float] = {}

        # 1. baseline: raw Deployments
        cluster.kubectl("create", "namespace", "raw")
        start = time.monotonic()
        apply_all(cluster, raw_deployments(n, "raw", settings))
        wait_until("raw Deployments Ready", lambda: ready_deployments(cluster, "raw") >= n, 3600)
        result["raw"] = time.monotonic() - start
        cluster.kubectl("delete", "namespace", "raw", "--wait=false")
        wait_until("raw pods gone", lambda: not cluster.items("pods", "-n", "raw"), 1800, 2.0)

        # 2. the operator
        kubeconfig = operator_kubeconfig(cluster, settings)
        cluster.kubectl("create", "namespace", "models")
        log = (workdir / f"operator-{n}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "kubepeer.cli", "operator", "--standalone",
             "--runner-image", settings.runner_image],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # Started and watching before the clock starts: under load, importing kopf and the
        # client takes longer than a fixed sleep, and objects that arrive before kopf's first
        # listings are done hold every handler until the last of them is indexed (kopf's
        # pre-indexing gate), so a fixed sleep measured the operator's start-up, not its work.
        wait_until("the operator to handle a first AIModel", lambda: warmed_up(cluster), 300)
        start = time.monotonic()
        apply_all(cluster, aimodels(n))
        runners_at = None
        while True:
            if runners_at is None and ready_deployments(cluster, "models") >= n:
                runners_at = time.monotonic() - start
            phases = [
                (m.get("status") or {}).get("phase")
                for m in cluster.items("aimodels", "-n", "models")
            ]
            if sum(p == "Ready" for p in phases) >= n:
                result["status"] = time.monotonic() - start
                result["runners"] = runners_at or result["status"]
                break
            if time.monotonic() - start > 3600:
                raise TimeoutError("AIModels not all Ready after an hour")
            time.sleep(1.0)

        # 3. at rest
        time.sleep(10)  # the last status writes settle
        before, at = operator_requests(cluster), time.monotonic()
        time.sleep(rest)
        result["rest_rps"] = (operator_requests(cluster) - before) / (time.monotonic() - at)
        return result
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        cluster.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300,1000", help="comma-separated N")
    parser.add_argument("--rest", type=float, default=60.0, help="seconds measured at rest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            r = bench(n, args.rest, Path(tmp))
            print(
                f"N={n:5d} on {max(1, n // 2)} nodes: "
                f"raw Deployments Ready {r['raw']:6.1f}s (baseline) | "
                f"runners Ready {r['runners']:6.1f}s ({r['runners'] / r['raw']:.2f}x) | "
                f"every AIModel Ready {r['status']:6.1f}s ({r['status'] / r['raw']:.2f}x) | "
                f"operator at rest {r['rest_rps']:.2f} req/s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
