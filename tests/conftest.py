"""Fixtures for every suite.

Servers are real: `cluster` starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (GPU nodes) once per session via hack/cluster; each test that
uses `namespace` gets a fresh namespace in it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml
from kubernetes import client, config

from kubepeer_dev.devchain import DevChain
from tests.support import wait_for

# Shared helpers (plugins) assert too.
pytest.register_assert_rewrite("tests.paying", "tests.proxies")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KUBEPEER_CACHE", Path.home() / ".cache" / "kubepeer"))
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


# Each test's tier, by the folder it is filed in (README: `make test-fast` runs the first two).
TIERS = {"unit": "unit", "cluster": "cluster", "agent": "cluster", "e2e": "e2e"}
TIER_NAMES = ("unit", "integration", "cluster", "e2e")


def folder(item: pytest.Item) -> str:
    """The folder under tests/ a test is filed in."""
    return Path(str(item.path)).relative_to(REPO / "tests").parts[0]


def tier(item: pytest.Item) -> str:
    return TIERS.get(folder(item), "integration")


def worker_group(item: pytest.Item) -> str:
    """Which tests run on one pytest-xdist worker (`make test`: `-n 3 --dist loadgroup`).

    - node-agent: the node agent's network namespaces and host routes, and the demo's own
      cluster and agent, are one at a time on this machine;
    - control-plane: the other cluster tests share one control plane (and operator);
    - otherwise the test's module, whose module-scoped fleets are then started once.
    """
    if item.get_closest_marker("agent") or folder(item) == "agent":
        return "node-agent"
    if tier(item) == "cluster":
        return "control-plane"
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(tier(item))
        item.add_marker(pytest.mark.xdist_group(worker_group(item)))
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


class SocketOpened(AssertionError):
    """A unit test reached for the network: it belongs in the integration tier."""


@pytest.fixture(autouse=True)
def _unit_tests_open_no_sockets(request: pytest.FixtureRequest,
                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A unit test runs no process and opens no socket: connecting or binding one fails it
    (an event loop's own socketpair is not a network socket, and is allowed)."""
    if request.node.get_closest_marker("unit") is None:
        return

    original: dict[str, Callable[..., object]] = {}
    for name in ("connect", "connect_ex", "bind"):
        original[name] = getattr(socket.socket, name)

        def guard(sock: socket.socket, address: object, *rest: object, _name: str = name) -> object:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                raise SocketOpened(
                    f"a unit test called socket.{_name}({address!r}): file it under the tier "
                    "it needs (tests/<folder>: integration runs processes on loopback)"
                )
            return original[_name](sock, address, *rest)

        monkeypatch.setattr(socket.socket, name, guard)


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

    def kubeconfig_for(
        self, api: client.ApiClient, namespace: str, account: str, path: Path
    ) -> Path:
        """A kubeconfig that authenticates as a ServiceAccount (a one-hour bound token)."""
        token = (
            client.CoreV1Api(api)
            .create_namespaced_service_account_token(
                account, namespace, {"spec": {"expirationSeconds": 3600}}
            )
            .status.token
        )
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"] = [{"name": account, "user": {"token": token}}]
        for context in config["contexts"]:
            context["context"]["user"] = account
        path.write_text(yaml.safe_dump(config))
        return path

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


AGENT_NODE = "agent-0"
AGENT_TAINT = "kubepeer.io/node-agent"  # kubepeer_dev.node_agent.agent's NODE_TAINT


@dataclass
class NodeAgent:
    """hack/node-agent serving one Node of the session's cluster (see README)."""

    node: str
    state_dir: Path
    log: Path
    cluster: Cluster
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(REPO / "hack" / "node-agent"), "--kubeconfig", str(self.cluster.kubeconfig),
             "--node", self.node, "--state-dir", str(self.state_dir),
             "--bin-dir", str(self.cluster.bin_dir), "--gpus", "4",
             "--parent-pid", str(os.getpid())],  # a pytest killed hard takes the agent down
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(
            lambda: self.process.poll() is not None or "watching" in self.log.read_text(),
            timeout=60,
            what="hack/node-agent to register its node",
        )
        assert self.process.poll() is None, self.log.read_text()[-3000:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log_file(self, namespace: str, pod: str, container: str) -> Path:
        """The container's log file, from the agent's JSON log index."""
        index = json.loads((self.state_dir / "logs.json").read_text())
        return Path(index[f"{namespace}/{pod}"]["logs"][container])

    def toleration(self) -> dict:
        """The agent node is tainted so that only pods meant for it land there."""
        return {"key": AGENT_TAINT, "operator": "Exists", "effect": "NoSchedule"}

    def affinity(self) -> dict:
        """Node affinity that pins a pod to this agent's node."""
        term = {"key": "kubernetes.io/hostname", "operator": "In", "values": [self.node]}
        return {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [term]}]
                }
            }
        }


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "needs root: the node agent makes network namespaces, veth pairs and host routes"
        )


@pytest.fixture(scope="session")
def node_agent(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeAgent]:
    """hack/node-agent registering AGENT_NODE: pods bound to it run as local processes."""
    needs_root()
    workdir = tmp_path_factory.mktemp("node-agent")
    agent = NodeAgent(AGENT_NODE, workdir / "state", workdir / "agent.log", cluster)
    agent.start()
    cluster.kubectl("wait", "--for=condition=Ready", f"node/{AGENT_NODE}", "--timeout=60s")
    yield agent
    agent.stop()
    if request.session.testsfailed:
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(agent.log, ARTIFACTS / "node-agent.log")
        print(f"\nnode agent log kept in {ARTIFACTS / 'node-agent.log'}")


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Iterator[client.ApiClient]:
    with cluster.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The cluster with Kubepeer's CRDs installed from crds/."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    for name in (
        "aimodels.kubepeer.io",
        "liverunners.kubepeer.io",
        "pricings.kubepeer.io",
        "clusterkopfpeerings.kopf.dev",
    ):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    # Discovery (used by kubectl) catches up a moment after Established.
    wait_for(
        lambda: cluster.kubectl("get", "aimodels", "-A", check=False).returncode == 0,
        timeout=30,
        what="the aimodels resource in discovery",
    )
    return cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a loopback port, for the session."""
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no"],
        stdout=(workdir / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, process=process)
    wait_for(lambda: _pings(server), timeout=20, what="redis-server to answer PING")
    yield server
    process.terminate()
    process.wait(timeout=10)


def _pings(server: RedisServer) -> bool:
    try:
        return bool(server.client().ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevChain]:
    """Hardhat's dev node on a loopback port, with our test TicketBroker deployed."""
    log = tmp_path_factory.mktemp("chain") / "hardhat.log"
    dev = DevChain.start(free_port(), log)
    yield dev
    dev.stop()


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """kubepeer_dev.tiny_models's models in a MODEL_DIR, cached by source and library versions."""
    from kubepeer_dev import tiny_models as builder

    model_dir = builder.cached_dir()
    builder.build(model_dir)
    return model_dir


@dataclass(frozen=True)
class OperatorProcess:
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def operator(
    request: pytest.FixtureRequest, crds: Cluster, redis_server: RedisServer, tmp_path_factory
) -> Iterator[OperatorProcess]:
    """`kubepeer operator` as a real process, watching the whole test cluster.

    Module-scoped: an operator watching every namespace would also act on the AIModels of
    later modules that run operators of their own (test_rbac's restricted one), and two
    operators with different runner images flip a runner's template for ever.
    """
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(crds.kubeconfig),
        "KUBEPEER_RUNNER_IMAGE": "example.invalid/kubepeer-runner:test",
        "KUBEPEER_REVENUE_INTERVAL_SECONDS": "1",  # Revenue models decided every second
        # kwok's pods load in about a second: with no patience any cold start loses a job
        "KUBEPEER_GATEWAY_PATIENCE_SECONDS": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "kubepeer.cli", "operator", "--status-interval", "0.5",
         "--redis-url", redis_server.url],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for(
        lambda: process.poll() is not None or "watching" in log.read_text(),
        timeout=120,  # importing kopf and the kubernetes client takes long on a busy machine
        what="the operator to start",
    )
    assert process.poll() is None, log.read_text()
    yield OperatorProcess(process=process, log=log)
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    if request.session.testsfailed:
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log, ARTIFACTS / "operator.log")
        print(f"\noperator log kept in {ARTIFACTS / 'operator.log'}")


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
