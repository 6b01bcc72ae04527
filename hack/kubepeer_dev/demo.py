#!/usr/bin/env python3
"""`make demo`: the whole stack, installed the way users install it, serving paid jobs.

    python -m kubepeer_dev.demo up    [--name N] [--state-dir DIR]  (make demo; starts afresh)
    python -m kubepeer_dev.demo down  [--name N] [--state-dir DIR]  (make demo-down)

Steps, each with a log under <state-dir>/logs/:
 1. a local cluster (hack/cluster): kwok GPU nodes and the node agent's node, on which
    every pod of the chart really runs as local processes in network namespaces;
 2. the dev chain (Hardhat, on the host's address in the agent node's network, so pods
    reach it): Livepeer's contracts as our strict test TicketBroker, a round initialized,
    the orchestrator's account (keystore) active, a gateway sender funded;
 3. tiny models (kubepeer_dev.tiny_models, cached) behind a PersistentVolume;
 4. `helm install` of helm/kubepeer with the Secrets it references;
 5. the sample Pricing, two AIModels and a LiveRunner (manifests/demo/): text-to-image
    Always, image-to-text OnDemand, the `echo` app Always;
 6. a gateway (kubepeer_dev.gateway_sim), run inside the agent node's network namespace so it
    dials the proxy's Service through the node's kube-proxy: paid text-to-image jobs, the
    image saved, then image-to-text, which wakes the OnDemand model;
 7. a paid Live Runner session through the official gateway SDK
    (hack/live_runner_client.py, paying through kubepeer_dev.remote_signer with the gateway's
    key), in the same namespace: discovered, challenged (402), paid, kept funded, proxied;
 8. the winning tickets redeemed on the chain by the chart's payments Deployment;
and a summary. The chain here is a local dev node: no real ETH, nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # the checkout this tooling is installed from

NAMESPACE = "kubepeer"
RELEASE = "kubepeer"
AGENT_NODE = "agent-0"
AGENT_TAINT = "kubepeer.io/node-agent"
CHAIN_PORT = 8545
PASSWORD = "kubepeer-demo"  # the dev chain's keystore only: a demo, not a secret
T2I_MODEL = "kubepeer-tiny/stable-diffusion"
I2T_MODEL = "kubepeer-tiny/blip"
IMAGES = 3
# The proxy's public URL. A fixed ClusterIP from the low band of hack/cluster's service range
# (10.0.0.0/24: its first 16 addresses), which the apiserver keeps for addresses asked for by
# name and hands out dynamically only once the rest is gone (KEP-3070). A fixed address in
# the upper band (10.0.0.80 once) can already be another Service's, and the install fails.
PROXY_CLUSTER_IP = "10.0.0.8"
PROXY_PORT = 8935
# Dev-chain economics: the base fee is Arbitrum-quiet and the proxy sizes tickets for it,
# and a ticket wins one time in two (--evs-per-win 2), so a few jobs show redemptions.
BASE_FEE_WEI = 100
EVS_PER_WIN = 2
ETH = 10**18
STEPS = 8
APP = "examples/echo"  # the demo's LiveRunner (manifests/demo/liverunner-echo.yaml)
SESSION_SECONDS = 4  # how long the SDK holds its paid session


class StepFailed(RuntimeError):
    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class Paths:
    state: Path

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def out(self) -> Path:
        return self.state / "out"

    @property
    def secrets(self) -> Path:
        return self.state / "secrets"

    @property
    def facts(self) -> Path:
        return self.state / "demo.json"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def log(self, name: str) -> Path:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self.logs / name


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run(
    argv: list[str], log: Path, *, env: dict[str, str] | None = None, stdin: str | None = None,
    timeout: float = 600, what: str = "",
) -> str:  # fmt: skip
    """Run a command, its output appended to `log`; stdout returned; StepFailed on failure."""
    with log.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n")
    try:
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{what or argv[0]} took over {timeout:.0f}s", log) from None
    with log.open("a") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise StepFailed(f"{what or argv[0]} failed: {' / '.join(tail)}", log)
    return result.stdout


def wait(
    check: Callable[[], Any], *, timeout: float, what: str, log: Path | None = None,
    every: float = 1.0, progress: Callable[[], str] | None = None,
) -> Any:  # fmt: skip
    """Poll `check` until truthy; a progress line every 15 s; StepFailed after `timeout`."""
    start = last_said = time.monotonic()
    while True:
        value = check()
        if value:
            return value
        now = time.monotonic()
        if now - start > timeout:
            detail = f" ({progress()})" if progress else ""
            raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what}{detail}", log)
        if now - last_said >= 15:
            say(f"  ... still waiting for {what}" + (f": {progress()}" if progress else ""))
            last_said = now
        time.sleep(every)


class Kube:
    def __init__(self, bin_dir: Path, kubeconfig: Path, log: Path) -> None:
        self.bin_dir, self.kubeconfig, self.log = bin_dir, kubeconfig, log

    def __call__(self, *args: str, stdin: str | None = None, what: str = "") -> str:
        argv = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        return run(argv, self.log, stdin=stdin, what=what or f"kubectl {args[0]}", timeout=180)

    def json(self, *args: str) -> dict:
        return json.loads(self("get", "-o", "json", *args))

    def apply(self, manifests: list[dict], what: str) -> None:
        self("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                   "items": manifests}), what=what)  # fmt: skip

    def helm(self, *args: str, what: str = "helm", timeout: float = 600) -> str:
        argv = [str(self.bin_dir / "helm"), "--kubeconfig", str(self.kubeconfig), *args]
        return run(argv, self.log, what=what, timeout=timeout)


# -- 1. the cluster ------------------------------------------------------------------------
def cluster_up(paths: Paths, name: str) -> dict:
    log = paths.log("cluster.log")
    argv = [str(REPO / "hack" / "cluster"), "up", "--name", name, "--nodes", "2",
            "--gpus-per-node", "4", "--agent-node", AGENT_NODE,
            "--kubeconfig", str(paths.kubeconfig)]  # fmt: skip
    run(argv, log, what="hack/cluster up", timeout=900)
    bin_dir = Path(run([str(REPO / "hack" / "cluster"), "bin"], log).strip())
    cluster_dir = Path(run([str(REPO / "hack" / "cluster"), "dir", "--name", name], log).strip())
    net = json.loads((cluster_dir / "node-agent" / "node-net.json").read_text())
    return {"bin_dir": str(bin_dir), "cluster_dir": str(cluster_dir), "node_netns": net["netns"],
            "host_ip": net["host_ip"]}  # fmt: skip


# -- 2. the chain --------------------------------------------------------------------------
def chain_up(paths: Paths, host_ip: str) -> dict:
    from eth_account import Account

    from kubepeer_dev.devchain import DevChain

    log = paths.log("hardhat.log")
    chain = DevChain.start(CHAIN_PORT, log, host=host_ip, detach=True)
    (paths.state / "hardhat.pid").write_text(str(chain.process.pid))
    chain.set_gas_price(BASE_FEE_WEI)
    chain.start_round(1)
    orchestrator = chain.new_account(10 * ETH)
    chain.set_active(orchestrator.address)  # only an active orchestrator claims reserves
    gateway = chain.new_account(3 * ETH)
    chain.fund_sender(gateway, deposit=ETH, reserve=ETH)
    paths.secrets.mkdir(parents=True, exist_ok=True)
    (paths.secrets / "keystore.json").write_text(
        json.dumps(Account.encrypt(orchestrator.key, PASSWORD))
    )
    (paths.secrets / "password").write_text(PASSWORD)
    (paths.secrets / "rpc-url").write_text(chain.url)
    (paths.secrets / "gateway.key").write_text(gateway.key.hex())
    (paths.state / "broker-abi.json").write_text(json.dumps(chain.broker.abi))
    return {"chain_url": chain.url, "controller": chain.controller.address,
            "broker": chain.broker.address, "orchestrator": orchestrator.address,
            "gateway": gateway.address}  # fmt: skip


# -- 3. tiny models -------------------------------------------------------------------------
def models_up(paths: Paths) -> str:
    """The tiny models in the shared cache (built once: kubepeer_dev.tiny_models)."""
    from kubepeer_dev import tiny_models

    model_dir = tiny_models.cached_dir()
    run([sys.executable, "-m", "kubepeer_dev.tiny_models", str(model_dir),
         "--pipeline", "text-to-image", "--pipeline", "image-to-text"],
        paths.log("models.log"), what="kubepeer_dev.tiny_models", timeout=900)  # fmt: skip
    return str(model_dir)


def models_volume(model_dir: str) -> list[dict]:
    """A hostPath PersistentVolume on the model cache, claimed in our namespace: the CRD
    allows no hostPath, and the node agent mounts a bound claim's host path."""
    return [
        {"apiVersion": "v1", "kind": "PersistentVolume",
         "metadata": {"name": "kubepeer-demo-models"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                  "storageClassName": "", "hostPath": {"path": model_dir},
                  "claimRef": {"namespace": NAMESPACE, "name": "tiny-models"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "tiny-models", "namespace": NAMESPACE},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                  "volumeName": "kubepeer-demo-models",
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]  # fmt: skip


def redis_volume(data_dir: Path) -> dict:
    """The chart's Redis keeps its AOF on a claim (data-kubepeer-redis-0); this cluster has
    no provisioner, so an admin's hostPath PersistentVolume is made for that claim."""
    data_dir.mkdir(parents=True, exist_ok=True)
    claim = {"namespace": NAMESPACE, "name": "data-kubepeer-redis-0"}
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "kubepeer-demo-redis"},
            "spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": "", "hostPath": {"path": str(data_dir)},
                     "claimRef": claim}}  # fmt: skip


# -- 4. the chart ---------------------------------------------------------------------------
def secret(name: str, files: dict[str, Path]) -> dict:
    data = {key: base64.b64encode(path.read_bytes()).decode() for key, path in files.items()}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": NAMESPACE}, "data": data}  # fmt: skip


def chart_values(facts: dict) -> dict:
    """What this machine needs from helm/kubepeer's values (see its values.yaml): every pod
    on the node agent's node, one replica each, the dev chain, and tickets sized for it."""
    return {
        "nodeSelector": {"kubernetes.io/hostname": AGENT_NODE},
        "tolerations": [{"key": AGENT_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
        "proxy": {
            "replicas": 1,
            "publicUrl": f"https://{PROXY_CLUSTER_IP}:{PROXY_PORT}",
            "service": {"clusterIP": PROXY_CLUSTER_IP},
            "recipient": facts["orchestrator"],
            "gasPrice": BASE_FEE_WEI,
            "extraArgs": ["--evs-per-win", str(EVS_PER_WIN)],
        },
        "payments": {"replicas": 1, "network": "dev", "controller": facts["controller"]},
        "secrets": {
            "rpcUrl": {"existingSecret": "kubepeer-demo-rpc", "key": "url"},
            "keystore": {
                "existingSecret": "kubepeer-demo-keystore",
                "keystoreKey": "keystore.json",
                "passwordKey": "password",
            },
        },
    }


def install(kube: Kube, facts: dict) -> None:
    kube("create", "namespace", NAMESPACE, what="kubectl create namespace")
    s = Path(facts["secrets"])
    kube.apply(
        [
            secret("kubepeer-demo-keystore",
                   {"keystore.json": s / "keystore.json", "password": s / "password"}),
            secret("kubepeer-demo-rpc", {"url": s / "rpc-url"}),
            *models_volume(facts["model_dir"]),
            redis_volume(Path(facts["state"]) / "redis-data"),
        ],
        "the keystore, RPC URL and model volume",
    )  # fmt: skip
    values = Path(facts["state"]) / "values.yaml"
    values.write_text(json.dumps(chart_values(facts), indent=2))
    kube.helm("install", RELEASE, str(REPO / "helm" / "kubepeer"), "--namespace", NAMESPACE,
              "--values", str(values), what="helm install", timeout=300)  # fmt: skip
    wait_pods_ready(kube, Path(facts["cluster_dir"]), timeout=300)


BROKEN = {"CrashLoopBackOff", "CreateContainerConfigError", "ErrImagePull", "ImagePullBackOff"}


def pod_log(cluster_dir: Path, namespace: str, pod: str) -> Path | None:
    """The node agent's log file of a pod's first container (its logs.json index)."""
    try:
        index = json.loads((cluster_dir / "node-agent" / "logs.json").read_text())
        return Path(next(iter(index[f"{namespace}/{pod}"]["logs"].values())))
    except (OSError, KeyError, StopIteration, ValueError):
        return None


def fail_if_broken(kube: Kube, cluster_dir: Path) -> dict[str, str]:
    """Each pod's state ("Ready", else why not); StepFailed, naming its log, for a pod that
    cannot start (bad config, unknown image, crashing again and again)."""
    out = {}
    for pod in kube.json("-n", NAMESPACE, "pods")["items"]:
        name, status = pod["metadata"]["name"], pod.get("status") or {}
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in status.get("conditions", []))  # fmt: skip
        waiting = [(c.get("state") or {}).get("waiting") or {}
                   for c in status.get("containerStatuses", [])]  # fmt: skip
        reason = next((w["reason"] for w in waiting if w.get("reason")), status.get("phase"))
        if reason in BROKEN and (reason != "CrashLoopBackOff" or pod_restarts(pod) >= 2):
            log = pod_log(cluster_dir, NAMESPACE, name)
            message = next((w.get("message", "") for w in waiting if w.get("message")), "")
            raise StepFailed(f"pod {name}: {reason} {message}".strip(), log or kube.log)
        out[name] = "Ready" if ready else str(reason)
    return out


def component_log(kube: Kube, cluster_dir: Path, component: str) -> Path | None:
    """The log of the chart's pod for `component` (proxy, payments, ...), if it has one."""
    selector = f"app.kubernetes.io/component={component}"
    pods = kube.json("-n", NAMESPACE, "pods", "-l", selector)["items"]
    return pod_log(cluster_dir, NAMESPACE, pods[0]["metadata"]["name"]) if pods else None


def wait_pods_ready(kube: Kube, cluster_dir: Path, timeout: float) -> None:
    """helm's --wait, with progress, and a broken pod named at once (with its log)."""

    def states() -> dict[str, str]:
        return fail_if_broken(kube, cluster_dir)

    def all_ready() -> bool:
        current = states()
        return bool(current) and all(v == "Ready" for v in current.values())

    def progress() -> str:
        current = states()
        ready = sum(v == "Ready" for v in current.values())
        rest = ", ".join(f"{k}: {v}" for k, v in current.items() if v != "Ready")
        return f"{ready}/{len(current)} pods ready" + (f" ({rest})" if rest else "")

    wait(all_ready, timeout=timeout, what="the chart's pods Ready", log=kube.log,
         progress=progress, every=2)  # fmt: skip


def pod_restarts(pod: dict) -> int:
    return sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses", []))


# -- 5. samples --------------------------------------------------------------------------
def apply_samples(kube: Kube) -> None:
    kube("-n", NAMESPACE, "apply", "-f", str(REPO / "manifests" / "demo"), what="the samples")


def aimodel(kube: Kube, name: str, kind: str = "aimodel") -> dict:
    return kube.json("-n", NAMESPACE, kind, name)


def phase(kube: Kube, name: str, kind: str = "aimodel") -> str:
    return (aimodel(kube, name, kind).get("status") or {}).get("phase", "")


# -- 6. the gateway -------------------------------------------------------------------------
def gateway_jobs(paths: Paths, facts: dict) -> list[dict]:
    """kubepeer_dev.gateway_sim inside the agent node's netns: the proxy's Service address is
    served there by the node's kube-proxy (the host has no route to Service addresses)."""
    log = paths.log("gateway.log")
    out = run(
        ["ip", "netns", "exec", facts["node_netns"], sys.executable,
         "-m", "kubepeer_dev.gateway_sim", "--orchestrator", facts["proxy_url"],
         "--key-file", str(paths.secrets / "gateway.key"), "--out", str(paths.out),
         "--text-to-image", T2I_MODEL, "--images", str(IMAGES),
         "--image-to-text", I2T_MODEL],
        log, what="the gateway's jobs", timeout=900,
    )  # fmt: skip
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# -- 7. a Live Runner session -----------------------------------------------------------------
def live_session(paths: Paths, facts: dict) -> dict:
    """The official SDK (its own venv) reserving a paid session on the echo app and keeping
    it funded, paying through a remote signer that holds the gateway's key; both in the
    agent node's netns, where the proxy's Service answers."""
    log = paths.log("live-runner.log")
    port = 9877
    netns = ["ip", "netns", "exec", facts["node_netns"]]
    with log.open("ab") as out:
        signer = subprocess.Popen(
            [*netns, sys.executable, "-m", "kubepeer_dev.remote_signer",
             "--key-file", str(paths.secrets / "gateway.key"), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        signer_url = f"http://127.0.0.1:{port}"
        probe = [*netns, sys.executable, "-c",
                 f"import urllib.request as u; u.urlopen(u.Request('{signer_url}/"
                 "sign-orchestrator-info', b'{}', method='POST'), timeout=2)"]  # fmt: skip
        wait(lambda: subprocess.run(probe, capture_output=True).returncode == 0, timeout=60,
             log=log, what="the remote signer")  # fmt: skip
        out = run(
            [*netns, str(REPO / ".gateway-sdk" / "bin" / "python"),
             str(REPO / "hack" / "live_runner_client.py"), "hold", facts["proxy_url"], APP,
             str(SESSION_SECONDS), signer_url],
            log, what="the SDK's paid session", timeout=300,
        )  # fmt: skip
    finally:
        signer.terminate()
        signer.wait(10)
    report = json.loads(out.strip().splitlines()[-1])
    if "error" in report or report.get("statuses") != [200] * SESSION_SECONDS:
        raise StepFailed(f"the Live Runner session failed: {report}", log)
    return report


# -- 8. redemptions --------------------------------------------------------------------------
def redis_client(kube: Kube) -> Any:
    """The chart's Redis, at its pod's address (ours: the agent's netns, routed from here)."""
    import redis

    pods = kube.json("-n", NAMESPACE, "pods", "-l", "app.kubernetes.io/component=redis")["items"]
    ready = [p for p in pods if p["status"].get("podIP")]
    if not ready:
        raise StepFailed("no Redis pod with an address", kube.log)
    return redis.Redis(host=ready[0]["status"]["podIP"], port=6379, socket_timeout=10)


def fast_forward(facts: dict) -> int:
    """Mine past the tickets' params: the redeemer reveals recipientRand only once they
    expire (EXPIRATION_BLOCKS after issue; on Arbitrum that many L1 blocks, ~8 minutes)."""
    from web3 import Web3

    from kubepeer.payments.recipient import EXPIRATION_BLOCKS

    w3 = Web3(Web3.HTTPProvider(facts["chain_url"]))
    w3.provider.make_request("hardhat_mine", [hex(EXPIRATION_BLOCKS + 1)])
    return EXPIRATION_BLOCKS + 1


def redeemed_tickets(facts: dict) -> list[dict]:
    """The broker's WinningTicketRedeemed events for our recipient: what the chain says."""
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(facts["chain_url"]))
    abi = json.loads((Path(facts["state"]) / "broker-abi.json").read_text())
    broker = w3.eth.contract(address=facts["broker"], abi=abi)
    events = broker.events.WinningTicketRedeemed().get_logs(from_block=0)
    mine = [e for e in events if e.args.recipient == facts["orchestrator"]]
    return [{"tx": "0x" + e.transactionHash.hex().removeprefix("0x"),
             "face_value": e.args.faceValue, "nonce": e.args.senderNonce}
            for e in mine]  # fmt: skip


# -- up and down ------------------------------------------------------------------------------
def up(paths: Paths, name: str) -> dict:
    if paths.facts.exists() or cluster_exists(name):
        say("a demo is already up: taking it down first")
        down(paths, name, quiet=True)
    paths.state.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {"name": name, "state": str(paths.state),
                             "secrets": str(paths.secrets)}  # fmt: skip
    save = lambda: paths.facts.write_text(json.dumps(facts, indent=2))  # noqa: E731
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    def step(n: int, title: str, fn: Callable[[], Any], log: str) -> Any:
        say(f"{n}/{STEPS} {title} ...")
        start = time.monotonic()
        try:
            value = fn()
        except StepFailed:
            raise
        except Exception as exc:  # anything unforeseen: still a message and the log to read
            raise StepFailed(f"{title}: {type(exc).__name__}: {exc}", paths.log(log)) from exc
        timings[title] = time.monotonic() - start
        say(f"{n}/{STEPS} {title}: done in {timings[title]:.1f}s")
        return value

    facts |= step(1, "cluster with GPU nodes and the node agent", lambda: cluster_up(paths, name),
                  "cluster.log")  # fmt: skip
    save()
    kube = Kube(Path(facts["bin_dir"]), paths.kubeconfig, paths.log("kubectl.log"))
    facts |= step(2, "dev chain (TicketBroker, round, funded gateway)",
                  lambda: chain_up(paths, facts["host_ip"]), "hardhat.log")  # fmt: skip
    save()
    facts["model_dir"] = step(3, "tiny models", lambda: models_up(paths), "models.log")
    step(4, "helm install helm/kubepeer", lambda: install(kube, facts), "kubectl.log")
    facts["proxy_url"] = f"https://{PROXY_CLUSTER_IP}:{PROXY_PORT}"
    save()

    def samples() -> None:
        apply_samples(kube)
        cluster_dir = Path(facts["cluster_dir"])

        def ready() -> bool:
            fail_if_broken(kube, cluster_dir)
            return phase(kube, "text-to-image") == phase(kube, "echo", "liverunner") == "Ready"

        def progress() -> str:
            return (f"text-to-image {phase(kube, 'text-to-image') or 'no status yet'}, "
                    f"echo {phase(kube, 'echo', 'liverunner') or 'no status yet'}")  # fmt: skip

        wait(ready, timeout=300, log=kube.log, progress=progress,
             what="AIModel text-to-image and LiveRunner echo Ready")  # fmt: skip

    step(5, "sample Pricing, AIModels (text-to-image Always, image-to-text OnDemand) and the "
         "echo LiveRunner", samples, "kubectl.log")  # fmt: skip
    asleep = aimodel(kube, "image-to-text")
    facts["image_to_text_replicas_before"] = (asleep.get("status") or {}).get("replicas", 0)
    say(f"  image-to-text: {facts['image_to_text_replicas_before']} replicas (OnDemand, asleep)")
    jobs = step(6, "gateway: paid jobs over the real wire", lambda: gateway_jobs(paths, facts),
                "gateway.log")  # fmt: skip
    failed = [j for j in jobs if j["status"] != 200]
    if failed or not jobs:
        proxy_log = component_log(kube, Path(facts["cluster_dir"]), "proxy")
        raise StepFailed(f"jobs failed: {failed or 'none ran'} (the proxy's log: {proxy_log})",
                         paths.log("gateway.log"))  # fmt: skip
    facts["jobs"] = jobs
    save()
    facts["live_session"] = step(7, "a paid Live Runner session through the gateway SDK",
                                 lambda: live_session(paths, facts), "live-runner.log")  # fmt: skip
    save()

    def redemptions() -> list[dict]:
        won = redis_client(kube).xlen("kubepeer:{pm}:tickets:winning")
        facts["tickets_won"] = won
        say(f"  {won} ticket(s) won; the dev chain mines {fast_forward(facts)} blocks so that "
            "their params expire (on Arbitrum: minutes of L1 blocks)")  # fmt: skip
        payments_log = component_log(kube, Path(facts["cluster_dir"]), "payments")
        wait(lambda: len(redeemed_tickets(facts)) >= won, timeout=180, log=payments_log,
             what=f"{won} winning ticket(s) redeemed on the chain",
             progress=lambda: f"{len(redeemed_tickets(facts))} redeemed")  # fmt: skip
        return redeemed_tickets(facts)

    facts["redeemed"] = step(8, "winning tickets redeemed by the payments Deployment", redemptions,
                             "kubectl.log")  # fmt: skip
    facts["cold_start_seconds"] = (aimodel(kube, "image-to-text").get("status") or {}).get(
        "lastColdStartSeconds"
    )
    facts["timings"] = timings
    facts["wall_seconds"] = time.monotonic() - t0
    save()
    summary(paths, facts)
    return facts


def summary(paths: Paths, facts: dict) -> None:
    jobs = facts["jobs"]
    t2i = [j for j in jobs if j["pipeline"] == "text-to-image"]
    i2t = [j for j in jobs if j["pipeline"] == "image-to-text"]
    tickets = sum(j["tickets"] for j in jobs)
    fees = sum(j["fee_wei"] for j in jobs)
    lines = [
        "",
        f"Kubepeer demo: up in {facts['wall_seconds']:.0f}s",
        f"  jobs: {len(jobs)} paid, all served (gRPC discovery + HTTPS on {facts['proxy_url']})",
    ]
    for j in t2i:
        lines.append(f"    text-to-image  {j['seconds']:6.2f}s  -> {j['output']}")
    for j in i2t:
        caption = j["output"]
        lines.append(f"    image-to-text  {j['seconds']:6.2f}s  -> {caption!r}  (woke the model)")
    cold = facts.get("cold_start_seconds")
    lines += [
        f"  cold start (image-to-text, from zero replicas): {cold:.1f}s"
        if cold
        else "  cold start: not reported by the operator",
        f"  fees charged: {fees} wei over {len(jobs)} jobs; tickets sent: {tickets} "
        f"(EV {jobs[0]['ticket_ev_wei']} wei, win probability {jobs[0]['win_prob']:.2f})",
        f"  Live Runner: a paid {APP} session {facts['live_session']['session_id']} held "
        f"{SESSION_SECONDS}s through the gateway SDK (402 challenge, paid, funded, proxied)",
        f"  tickets won: {facts['tickets_won']}, redeemed on the chain: {len(facts['redeemed'])}",
    ]
    by_tx: dict[str, list[int]] = {}
    for r in facts["redeemed"]:
        by_tx.setdefault(r["tx"], []).append(r["face_value"])
    lines += [f"    tx {tx}: {len(faces)} ticket(s), {sum(faces)} wei to the fee pool"
              for tx, faces in by_tx.items()]  # fmt: skip
    kc = paths.kubeconfig
    lines += [
        f"  outputs: {paths.out}/   logs: {paths.logs}/",
        "",
        "Look around:",
        f"  export KUBECONFIG={kc} PATH={facts['bin_dir']}:$PATH",
        f"  kubectl -n {NAMESPACE} get aimodels,pods -o wide",
        f"  helm -n {NAMESPACE} status {RELEASE}",
        f"  the proxy: {facts['proxy_url']} (Service kubepeer-proxy; from the node's netns:",
        f"    ip netns exec {facts['node_netns']} curl -k {facts['proxy_url']}/healthz)",
        f"  the chain: {facts['chain_url']} (TicketBroker {facts['broker']})",
        "  more jobs (the gateway in the node's netns, where the Service answers):",
        f"    ip netns exec {facts['node_netns']} .venv/bin/python -m kubepeer_dev.gateway_sim "
        f"--orchestrator {facts['proxy_url']} --key-file {paths.secrets}/gateway.key "
        f"--out {paths.out} --text-to-image {T2I_MODEL} --prompt 'a red boat'",
        "  make demo-down   removes all of it",
    ]
    print("\n".join(lines), flush=True)


def cluster_exists(name: str) -> bool:
    result = subprocess.run([str(REPO / "hack" / "cluster"), "dir", "--name", name],
                            capture_output=True, text=True)  # fmt: skip
    return result.returncode == 0 and Path(result.stdout.strip()).is_dir()


def down(paths: Paths, name: str, quiet: bool = False) -> None:
    pid_file = paths.state / "hardhat.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            if b"hardhat" in Path(f"/proc/{pid}/cmdline").read_bytes():  # ours, not a reused pid
                os.killpg(pid, signal.SIGTERM)
        except (FileNotFoundError, ProcessLookupError):
            pass
    if cluster_exists(name):
        subprocess.run([str(REPO / "hack" / "cluster"), "down", "--name", name],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    shutil.rmtree(paths.state, ignore_errors=True)
    if not quiet:
        say(f"demo removed (cluster '{name}', the dev chain, {paths.state})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down"])
    p.add_argument("--name", default="kubepeer-demo", help="the cluster's name (hack/cluster)")
    p.add_argument("--state-dir", type=Path, default=REPO / ".demo", help="logs, outputs, keys")
    args = p.parse_args(argv)
    paths = Paths(args.state_dir.resolve())
    if args.command == "down":
        down(paths, args.name)
        return 0
    if os.geteuid() != 0:
        say("error: the demo needs root (the node agent makes network namespaces); "
            "run: sudo make demo")  # fmt: skip
        return 2
    try:
        up(paths, args.name)
    except StepFailed as exc:
        say(f"error: {exc}")
        if exc.log:
            say(f"  read {exc.log}")
        say("  (the cluster and chain are left up to look at; make demo-down removes them)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
