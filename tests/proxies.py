"""Proxies for tests: `kubepeer proxy` over TLS on loopback, real runners with tiny
models behind it, real Redis; a gateway made from gateway-wire.md's facts in front.

Runner endpoints come from the proxy's static endpoint file (the API server refuses
loopback addresses in EndpointSlices, and kwok pod IPs must never be dialled).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from kubepeer.livepeer import net_pb2
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.sender import SenderInfo
from kubepeer.payments.senders import SenderWatch
from kubepeer.payments.watcher import save_view
from tests.conftest import RedisServer, free_port
from tests.runners import RunnerProcess, start_runner, stop
from tests.support import wait_for

RECIPIENT = bytes.fromhex("5a" * 20)
SD = "kubepeer-tiny/stable-diffusion"
LLAMA = "kubepeer-tiny/llama"
SVD = "kubepeer-tiny/svd"
RUNNER_TOKEN = "proxy-test-runner-token"
CAPABILITY = {"text-to-image": 27, "image-to-video": 29, "llm": 33, "live-video-to-video": 35}
# A text-to-image job the tiny model answers in one step.
T2I = {"prompt": "a cat", "height": 32, "width": 48, "num_inference_steps": 1, "seed": 3,
       "model_id": SD}  # fmt: skip


def models_json(
    price: str = "1/4", capacity: int = 1, extra: list[dict] | None = None, base: bool = True
) -> dict:
    def entry(aimodel, pipeline, model_id, runner="runner-fleet", warm="Always"):
        return {
            "aimodel": aimodel, "pipeline": pipeline, "modelId": model_id,
            "capability": CAPABILITY[pipeline], "runner": runner, "port": 8000,
            "capacity": capacity, "warm": warm, "maxReplicas": 2,
            "price": {"unit": "pixel", "weiPerUnit": price, "gateways": {}, "surge": None},
        }  # fmt: skip

    models = [
        *(
            [entry("sd", "text-to-image", SD), entry("llama", "llm", LLAMA),
             entry("svd", "image-to-video", SVD)]
            if base else []
        ),
        *(entry(**e) for e in extra or []),
    ]  # fmt: skip
    return {"version": 1, "models": models}


@dataclass
class ProxyServer:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    scheme: str = "https"
    pem: bytes = b""

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=False, timeout=120, **kw)

    def channel(self) -> grpc.Channel:
        if self.scheme == "http":
            return grpc.insecure_channel(f"127.0.0.1:{self.port}")
        credentials = grpc.ssl_channel_credentials(root_certificates=self.pem)
        return grpc.secure_channel(f"127.0.0.1:{self.port}", credentials)

    def set_endpoints(self, table: dict[str, list[str]]) -> None:
        path = self.workdir / "endpoints.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table))
        tmp.replace(path)

    def set_apps(self, document: dict) -> None:
        path = self.workdir / "apps.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        tmp.replace(path)

    def set_models(self, document: dict) -> None:
        path = self.workdir / "models.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        tmp.replace(path)


def start_proxy(
    workdir: Path, redis: RedisServer, *, models: dict | None, endpoints: dict | None,
    args: list[str] = (), plaintext: bool = False, shared: Path | None = None,
    namespace: str = "test", kubeconfig: Path | None = None, runner_token: str = RUNNER_TOKEN,
    recipient: bytes | None = RECIPIENT, apps: dict | None = None,
) -> ProxyServer:  # fmt: skip
    """`kubepeer proxy` as a process; `shared` holds the secrets every replica shares.
    `recipient=None`: no --recipient (private mode only: the proxy advertises zero).

    `models=None`: the operator's table ConfigMaps, watched; `endpoints=None`: the runner
    Services' EndpointSlices, watched (only for pods at addresses we own: node-agent pods).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    shared = shared or workdir
    if not (shared / "recipient-secret").exists():
        (shared / "recipient-secret").write_bytes(os.urandom(32))
        (shared / "auth-secret").write_bytes(os.urandom(32))
        (shared / "runner-token").write_text(runner_token)
    port = free_port()
    proxy = ProxyServer(port, None, workdir / "proxy.log", workdir,  # type: ignore[arg-type]
                        scheme="http" if plaintext else "https")  # fmt: skip
    if models is not None:  # else: the operator's table ConfigMaps, watched
        proxy.set_models(models)
    if endpoints is not None:
        proxy.set_endpoints(endpoints)
    if apps is not None:  # else: the operator's app table ConfigMaps, watched
        proxy.set_apps(apps)
    command = [
        sys.executable, "-m", "kubepeer.cli", "proxy", "--bind", f"127.0.0.1:{port}",
        "--public-url", proxy.url, "--namespace", namespace, "--redis-url", redis.url,
        *(["--models-file", str(workdir / "models.json")] if models is not None else []),
        *(["--endpoints-file", str(workdir / "endpoints.json")] if endpoints is not None else []),
        *(["--apps-file", str(workdir / "apps.json")] if apps is not None else []),
        *(["--recipient", "0x" + recipient.hex()] if recipient is not None else []),
        "--recipient-secret-file", str(shared / "recipient-secret"),
        "--auth-secret-file", str(shared / "auth-secret"),
        "--runner-token-file", str(shared / "runner-token"),
        *(["--no-wake"] if kubeconfig is None else []),
        *(["--plaintext"] if plaintext else []), *args,
        # The suite on another server: KUBEPEER_PROXY_SERVER=hypercorn.
        *(["--server", os.environ["KUBEPEER_PROXY_SERVER"]]
          if os.environ.get("KUBEPEER_PROXY_SERVER") else []),
    ]  # fmt: skip
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)
    if kubeconfig is not None:  # the proxy wakes OnDemand models through this API server
        env["KUBECONFIG"] = str(kubeconfig)
    proxy.process = subprocess.Popen(
        command, env=env, stdout=proxy.log.open("wb"), stderr=subprocess.STDOUT
    )

    def up() -> bool:
        if proxy.process.poll() is not None:
            raise RuntimeError(f"proxy exited:\n{proxy.log.read_text()}")
        try:
            with proxy.http() as client:
                return client.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=60, what="the proxy to be ready")
    if not plaintext:
        proxy.pem = ssl.get_server_certificate(("127.0.0.1", port)).encode()
    return proxy


def stop_proxy(proxy: ProxyServer, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace` s. A proxy with live streams' trickle readers
    still connected (their runner outlives it) waits for them up to its graceful timeout:
    tests that do not check its shutdown pass a short grace."""
    if proxy.process.poll() is None:
        proxy.process.send_signal(signal.SIGTERM)
        try:
            proxy.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
            proxy.process.wait()


PROBE_SOURCE = Path(__file__).resolve().parent / "proxy" / "grpcprobe"
CACHE = Path(os.environ.get("KUBEPEER_CACHE", Path.home() / ".cache" / "kubepeer"))


def grpc_go_probe() -> Path:
    """tests/proxy/grpcprobe built once with grpc-go from the Go module proxy, cached by content."""
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        digest.update((PROBE_SOURCE / name).read_bytes())
    binary = CACHE / "grpcprobe" / digest.hexdigest()[:16] / "grpcprobe"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["go", "build", "-o", str(binary.with_suffix(".partial")), "."],
            cwd=PROBE_SOURCE, check=True, timeout=900,
            env={**os.environ, "GOFLAGS": "-mod=readonly"},
        )  # fmt: skip
        binary.with_suffix(".partial").replace(binary)
    return binary


def go_get_orchestrator(proxy: ProxyServer, request: net_pb2.OrchestratorRequest):
    """(OrchestratorInfo, None) or (None, "ERR <code>: <message>") from grpc-go."""
    result = subprocess.run(
        [str(grpc_go_probe()), f"127.0.0.1:{proxy.port}", proxy.scheme],
        input=request.SerializeToString().hex() + "\n", capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    out = result.stdout.strip()
    if result.returncode == 0:
        return net_pb2.OrchestratorInfo.FromString(bytes.fromhex(out)), None
    return None, out or result.stderr


class FreshChainView:
    """A fixed chain view kept fresh in Redis, standing in for the payments process's chain
    watcher (which needs the dev chain's contracts; not started by these tests); and the
    payments process's real sender watch, answering every sender as well funded in place of
    the broker (tests/chain/test_sender_funds.py runs it against the dev chain)."""

    VIEW = ChainView(l1_block=5_000, current_round=10, creation_round=10,
                     creation_round_block_hash=bytes.fromhex("ab" * 32))  # fmt: skip
    FUNDED = SenderInfo(deposit=10**21, withdraw_round=0, reserve=10**21, reserve_alloc=10**20)

    def __init__(self, redis) -> None:
        self.redis = redis
        self.stop = threading.Event()
        save_view(redis, self.VIEW)
        threading.Thread(target=self._keep, daemon=True).start()
        SenderWatch(redis, lambda _: self.FUNDED, stop=self.stop).start()

    def _keep(self) -> None:
        while not self.stop.wait(5):
            save_view(self.redis, self.VIEW)


@pytest.fixture(scope="module")
def sd_runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    """A runner process serving the tiny text-to-image model, for a module."""
    models = [{"pipeline": "text-to-image", "model_id": SD}]
    env = {"MODELS": json.dumps(models), "MODEL_DIR": str(tiny_models), "AUTH_TOKEN": RUNNER_TOKEN}
    process = start_runner(env, tmp_path_factory.mktemp("runner") / "runner.log")
    yield process
    stop(process)


@pytest.fixture(scope="module")
def chain_facts(redis_server) -> Iterator[FreshChainView]:
    """The payments process's chain view and sender watch, stood in for: a module that
    imports this fixture has them on the session's Redis."""
    view = FreshChainView(redis_server.client())
    yield view
    view.stop.set()
