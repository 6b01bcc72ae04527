"""Fixtures for every suite.

Servers are real: `cluster` starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (GPU nodes) once per session via hack/cluster; each test that
uses `namespace` gets a fresh namespace in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config

from support import wait_for

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / ".artifacts"
GPU_NODES = 2
GPUS_PER_NODE = 4
GPU_MEMORY_MIB = 24576


def _cuda_available() -> bool:
    try:
        import torch  # optional: only the runner extra has torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@dataclass(frozen=True)
class Cluster:
    name: str
    kubeconfig: Path
    bin_dir: Path
    state_dir: Path

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))


def _hack_cluster(*args: str) -> str:
    result = subprocess.run(
        [str(REPO / "hack" / "cluster"), *args], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise RuntimeError(f"hack/cluster {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout.strip()


@pytest.fixture(scope="session")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    name = f"pytest-{os.getpid()}"
    kubeconfig = tmp_path_factory.mktemp("cluster") / "kubeconfig"
    _hack_cluster(
        "up",
        "--name",
        name,
        "--nodes",
        str(GPU_NODES),
        "--gpus-per-node",
        str(GPUS_PER_NODE),
        "--gpu-memory",
        str(GPU_MEMORY_MIB),
        "--kubeconfig",
        str(kubeconfig),
    )
    bin_dir = Path(_hack_cluster("bin"))
    state_dir = Path(_hack_cluster("dir", "--name", name))
    try:
        yield Cluster(name=name, kubeconfig=kubeconfig, bin_dir=bin_dir, state_dir=state_dir)
    finally:
        if request.session.testsfailed and (state_dir / "logs").is_dir():
            kept = ARTIFACTS / "cluster-logs" / name
            shutil.copytree(state_dir / "logs", kept, dirs_exist_ok=True)
            print(f"\ncluster logs kept in {kept}")
        _hack_cluster("down", "--name", name)


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Iterator[client.ApiClient]:
    with cluster.api_client() as api_client:
        yield api_client


@pytest.fixture
def namespace(request: pytest.FixtureRequest, api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it to go)."""
    slug = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # Pods are refused until the controller-manager has made the default ServiceAccount.
    wait_for(
        lambda: core.list_namespaced_service_account(name).items,
        timeout=30,
        what=f"the default ServiceAccount in {name}",
    )
    yield name
    core.delete_namespace(name, propagation_policy="Background")
