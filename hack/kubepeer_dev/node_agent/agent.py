"""The agent: registers its Node, keeps its Lease, watches the pods bound to it.

A restarted agent first cleans up after the one before (adopt): every process group an
earlier agent recorded is killed (if its pid still names the same process), sandboxes of
pods that are gone are removed, and the pods still bound here are started again in the
sandboxes they had, so their addresses do not change.
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from kubepeer_dev.node_agent import sandbox as sb
from kubepeer_dev.node_agent.pods import NodeSettings, PodWorker, kill_group, process_start_ticks

log = logging.getLogger("node-agent")
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10
NODE_TAINT = "kubepeer.io/node-agent"
# This client's default patch type is JSON Patch; ours are merge patches (lists replaced).
MERGE_PATCH = "application/merge-patch+json"


def _now() -> datetime:
    return datetime.now(UTC)


class KubeApi:
    """The pod workers' window on the API server (see pods.Api)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.api = api

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            obj = self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def claim_path(self, namespace: str, name: str) -> str | None:
        """The host path behind a bound claim: its PersistentVolume's hostPath or local path."""
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        if (pvc.status.phase if pvc.status else None) != "Bound" or not pvc.spec.volume_name:
            return None
        pv = self.core.read_persistent_volume(pvc.spec.volume_name).spec
        source = pv.host_path or pv.local
        return source.path if source else None

    def token(self, pod: dict[str, Any], audience: str | None, seconds: int) -> str:
        meta = pod["metadata"]
        spec = client.V1TokenRequestSpec(
            audiences=[audience] if audience else [],
            expiration_seconds=max(seconds, 600),
            bound_object_ref=client.V1BoundObjectReference(
                kind="Pod", api_version="v1", name=meta["name"], uid=meta["uid"]
            ),
        )
        sa = pod["spec"].get("serviceAccountName") or "default"
        result = self.core.create_namespaced_service_account_token(
            sa, meta["namespace"], client.AuthenticationV1TokenRequest(spec=spec)
        )
        return result.status.token

    def patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.core.patch_namespaced_pod_status(
            meta["name"], meta["namespace"], {"status": status}, _content_type=MERGE_PATCH
        )

    def finish_delete(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
                ),
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise


def node_manifest(
    name: str, settings: NodeSettings, gpus: int, product: str, memory_mib: int
) -> dict[str, Any]:
    """Same labels and capacity shape as hack/cluster's kwok GPU nodes, without kwok's
    annotation, so kwok leaves it to us."""
    capacity = {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "node-agent",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.memory": str(memory_mib),
            },
            "annotations": {"kubepeer.io/node-agent": "true"},
        },
        "spec": {
            "podCIDR": settings.net.cidr,
            "podCIDRs": [settings.net.cidr],
            # Only pods that tolerate it land here: the operator's tests keep to kwok nodes.
            "taints": [{"key": NODE_TAINT, "value": "true", "effect": "NoSchedule"}],
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def node_status(settings: NodeSettings, capacity: dict[str, str]) -> dict[str, Any]:
    stamp = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "hack/node-agent is posting ready status",
        "lastHeartbeatTime": stamp,
        "lastTransitionTime": stamp,
    }
    return {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [ready],
        "addresses": [
            {"type": "InternalIP", "address": settings.net.host_ip},
            {"type": "Hostname", "address": settings.node},
        ],
        "nodeInfo": {
            "kubeletVersion": "node-agent",
            "operatingSystem": "linux",
            "architecture": "amd64",
            "containerRuntimeVersion": "node-agent://processes",
            "kernelVersion": "",
            "osImage": "",
            "kubeProxyVersion": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    }


class Agent:
    def __init__(
        self, api: client.ApiClient, settings: NodeSettings, manifest: dict[str, Any]
    ) -> None:
        self.api = api
        self.kube = KubeApi(api)
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.settings = settings
        self.manifest = manifest
        self.workers: dict[str, PodWorker] = {}
        self.stop = threading.Event()

    # --- node ----------------------------------------------------------------------------
    def register(self) -> None:
        name = self.settings.node
        try:
            self.core.create_node(self.manifest)
            log.info("registered node %s", name)
        except ApiException as e:
            if e.status != 409:
                raise
            labels = self.manifest["metadata"]["labels"]
            self.core.patch_node(name, {"metadata": {"labels": labels}}, _content_type=MERGE_PATCH)
        self._post_status()

    def _post_status(self) -> None:
        capacity = self.manifest["status"]["capacity"]
        self.core.patch_node_status(
            self.settings.node,
            {"status": node_status(self.settings, capacity)},
            _content_type=MERGE_PATCH,
        )

    def _renew_lease(self) -> None:
        name, ns = self.settings.node, "kube-node-lease"
        stamp = _now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # MicroTime
        body = {
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": stamp,
            },
        }
        try:
            self.coord.patch_namespaced_lease(
                name, ns, {"spec": body["spec"]}, _content_type=MERGE_PATCH
            )
        except ApiException as e:
            if e.status != 404:
                raise
            node = self.core.read_node(name)
            body["metadata"]["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node.metadata.uid}
            ]
            self.coord.create_namespaced_lease(ns, body)

    def heartbeat(self) -> None:
        beats = 0
        while not self.stop.is_set():
            try:
                self._renew_lease()
                if beats % 3 == 0:
                    self._post_status()
                beats += 1
            except Exception as e:
                log.warning("heartbeat failed: %s", e)
            self.stop.wait(HEARTBEAT_SECONDS)

    # --- crash safety --------------------------------------------------------------------
    def adopt(self) -> None:
        """Kill what an earlier agent left running; drop sandboxes of pods that are gone."""
        pods_dir = self.settings.state_dir / "pods"
        if not pods_dir.is_dir():
            return
        for pod_dir in pods_dir.iterdir():
            procs_file = pod_dir / "processes.json"
            if procs_file.exists():
                for name, p in json.loads(procs_file.read_text())["processes"].items():
                    if process_start_ticks(p["pid"]) == p["ticks"]:
                        log.info(
                            "adopt: killing %s (pid %d) left by an earlier agent", name, p["pid"]
                        )
                        kill_group(p["pid"], signal.SIGKILL)
                procs_file.unlink()
            saved = pod_dir / "sandbox.json"
            if saved.exists() and not self._bound_here(pod_dir.name):
                sb.destroy(sb.Sandbox.from_json(saved.read_text()), self.settings.net)
                saved.unlink()

    def _bound_here(self, uid: str) -> bool:
        pods = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.settings.node}"
        )
        return any(p.metadata.uid == uid for p in pods.items)

    def shutdown(self) -> None:
        """Stop every pod's processes and remove its sandbox (the test session ends)."""
        self.stop.set()
        for w in list(self.workers.values()):
            w.stopping.set()
        for w in list(self.workers.values()):
            w.join(timeout=15)

    # --- pods ----------------------------------------------------------------------------
    def _dispatch(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker:
                worker.gone.set()
                self.workers.pop(uid, None)
            return
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and worker is None:
            return
        if worker is None:
            worker = PodWorker(pod, self.settings, self.kube)
            self.workers[uid] = worker
            worker.update(pod)
            worker.start()
        else:
            worker.update(pod)
        self._write_index()

    def _write_index(self) -> None:
        """The log index: namespace/pod -> {uid, ip, containers: {name: log file}}."""
        index = {
            f"{w.ns}/{w.name}": {
                "uid": w.uid,
                "logs": {
                    c["name"]: str(w.dir / f"{c['name']}.log") for c in w.pod["spec"]["containers"]
                },
            }
            for w in self.workers.values()
        }
        path = self.settings.state_dir / "logs.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(path)

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.settings.node}"
        while not self.stop.is_set():
            listing = self.api.sanitize_for_serialization(
                self.core.list_pod_for_all_namespaces(field_selector=selector)
            )
            seen = set()
            for pod in listing["items"]:
                seen.add(pod["metadata"]["uid"])
                self._dispatch("ADDED", pod)
            for uid in set(self.workers) - seen:  # deleted while we were not watching
                self._dispatch("DELETED", self.workers[uid].pod)
            rv = listing["metadata"]["resourceVersion"]
            try:
                for event in watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=rv,
                    timeout_seconds=300,
                ):
                    if self.stop.is_set():
                        return
                    if event["type"] == "ERROR":
                        break
                    self._dispatch(event["type"], event["raw_object"])
            except ApiException as e:
                if e.status != 410:
                    log.warning("pod watch failed: %s", e)
                    time.sleep(1)
            except Exception as e:
                log.warning("pod watch broke: %s", e)
                time.sleep(1)


def ca_pem_from_kubeconfig(path: Path) -> tuple[str, int]:
    """The API server's CA and port, from the admin kubeconfig the agent uses."""
    import yaml

    doc = yaml.safe_load(path.read_text())
    cluster = doc["clusters"][0]["cluster"]
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
    else:
        ca = (path.parent / cluster["certificate-authority"]).read_text()
    port = int(cluster["server"].rsplit(":", 1)[1].strip("/"))
    return ca, port
