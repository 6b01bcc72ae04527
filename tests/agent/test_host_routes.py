"""No packet for a pod or service address leaves the machine (hack/cluster's host routes)."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from kubernetes import client

from tests.conftest import REPO, needs_root
from tests.support import wait_for

pytestmark = pytest.mark.cluster


def test_host_routes_are_in_place(cluster):
    needs_root()
    check = subprocess.run(
        [str(REPO / "hack" / "cluster"), "net", "check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert "blackhole 10.250.0.0/16" in routes  # kwok's fake pods
    assert "blackhole 10.244.0.0/16" in routes  # the node agent's pods


def test_connection_to_a_kwok_pod_fails_locally_within_a_second(cluster, api, namespace):
    needs_root()
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "on-kwok"},
            "spec": {
                "nodeName": "gpu-node-0",
                "containers": [{"name": "c", "image": "example.invalid/nothing:1"}],
            },
        },
    )
    ip = wait_for(
        lambda: core.read_namespaced_pod("on-kwok", namespace).status.pod_ip,
        timeout=30,
        what="kwok to give the pod an address",
    )
    assert ip.startswith("10.250."), f"kwok pod address {ip} outside its blackholed range"
    started = time.monotonic()
    # A blackhole route answers connect() with EINVAL at once, on this machine.
    with pytest.raises(OSError, match="Invalid argument"), socket.create_connection((ip, 80), 5):
        pass
    assert time.monotonic() - started < 1.0
