"""hack/node-agent against the real control plane: pods bound to its node really run.

Each test pins its pods to the agent's node (node affinity plus the agent node's taint)
and checks what a kubelet would be held to: probes drive Ready, EndpointSlices point at
addresses that answer, restarts back off, deletion honours the grace period, the process
has its ServiceAccount's rights and no more, and a killed agent converges.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubepeer.api import GROUP, VERSION
from tests.conftest import NodeAgent
from tests.support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.agent]
RUNNER_IMAGE = "example.invalid/kubepeer-runner:test"
PYTHON_IMAGE = "python:3.12"
TINY_SD = "kubepeer-tiny/stable-diffusion"


def agent_pod_spec(agent: NodeAgent, containers: list[dict], **extra: Any) -> dict:
    return {
        "affinity": agent.affinity(),
        "tolerations": [agent.toleration()],
        "containers": containers,
        **extra,
    }


def python_container(script: str, name: str = "main", **extra: Any) -> dict:
    return {"name": name, "image": PYTHON_IMAGE, "command": ["python", "-c", script], **extra}


def http_get(url: str, timeout: float = 5, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_json(url: str, body: dict, headers: dict | None = None, timeout: float = 120):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Pods:
    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api)
        self.ns = namespace

    def create(self, name: str, spec: dict, labels: dict | None = None) -> None:
        body = {"metadata": {"name": name, "labels": labels or {}}, "spec": spec}
        self.core.create_namespaced_pod(self.ns, body)

    def get(self, name: str) -> client.V1Pod:
        return self.core.read_namespaced_pod(name, self.ns)

    def ready(self, name: str) -> bool:
        conds = self.get(name).status.conditions or []
        return any(c.type == "Ready" and c.status == "True" for c in conds)

    def wait_ready(self, name: str, timeout: float = 120) -> client.V1Pod:
        wait_for(lambda: self.ready(name), timeout=timeout, what=f"pod {name} to be Ready")
        return self.get(name)

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> client.V1Pod:
        wait_for(
            lambda: self.get(name).status.phase == phase, timeout=timeout, what=f"{name} {phase}"
        )
        return self.get(name)

    def container(self, name: str) -> client.V1ContainerStatus:
        return self.get(name).status.container_statuses[0]


@pytest.fixture
def pods(node_agent, api, namespace) -> Pods:
    return Pods(api, namespace)


def tiny_runner_container(model_dir: Path, **extra: Any) -> dict:
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1}
    return {
        "name": "runner",
        "image": RUNNER_IMAGE,
        "ports": [{"name": "http", "containerPort": 8000}],
        "env": [
            {"name": "PIPELINE", "value": "text-to-image"},
            {"name": "MODEL_ID", "value": TINY_SD},
            {"name": "MODEL_DIR", "value": "/models"},
        ],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "startupProbe": {**probe, "failureThreshold": 300},
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/livez", "port": "http"}},
        **extra,
    }


def assert_png_response(status: int, body: Any) -> None:
    assert status == 200, body
    url = body["images"][0]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


IMAGE_REQUEST = {"prompt": "a cat", "height": 64, "width": 64, "num_inference_steps": 2}


def test_runner_deployment_is_ready_behind_its_service_and_serves_images(
    node_agent, api, namespace, pods, tiny_models
):
    apps = client.AppsV1Api(api)
    labels = {"app": "tiny-runner"}
    template_spec = agent_pod_spec(
        node_agent,
        [tiny_runner_container(tiny_models)],
        volumes=[{"name": "models", "hostPath": {"path": str(tiny_models)}}],
    )
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "tiny-runner"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": template_spec},
            },
        },
    )
    pods.core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "tiny-runner"},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    )
    started = time.monotonic()
    wait_for(
        lambda: apps.read_namespaced_deployment("tiny-runner", namespace).status.ready_replicas,
        timeout=180,
        what="the runner Deployment to have a ready replica",
    )
    print(f"\nrunner pod start to Ready through the agent: {time.monotonic() - started:.1f}s")
    (pod,) = pods.core.list_namespaced_pod(namespace, label_selector="app=tiny-runner").items
    ip = pod.status.pod_ip
    assert ip.startswith("10.244."), ip
    assert pod.spec.node_name == node_agent.node
    # Ready came from the runner's own /readyz: it answers 200 and its access log has it.
    assert http_get(f"http://{ip}:8000/readyz")[0] == 200
    log = node_agent.log_file(namespace, pod.metadata.name, "runner").read_text()
    assert '"GET /readyz HTTP/1.1" 200' in log

    def endpoint_ips() -> set[str]:
        slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=tiny-runner"
        )
        return {
            a
            for s in slices.items
            for e in s.endpoints or []
            if e.conditions.ready
            for a in e.addresses
        }

    wait_for(lambda: ip in endpoint_ips(), timeout=30, what=f"{ip} in the EndpointSlice")
    assert_png_response(*post_json(f"http://{ip}:8000/text-to-image", IMAGE_REQUEST))

    # Another pod on the node reaches the runner by its Service's DNS name.
    client_script = (
        "import json, urllib.request\n"
        "req = urllib.request.Request('http://tiny-runner/text-to-image', "
        f"data=json.dumps({IMAGE_REQUEST!r}).encode(), "
        "headers={'content-type': 'application/json'})\n"
        "body = json.load(urllib.request.urlopen(req, timeout=120))\n"
        "print('IMAGE', body['images'][0]['url'][:22])\n"
    )
    pods.create(
        "dns-client",
        agent_pod_spec(node_agent, [python_container(client_script)], restartPolicy="Never"),
    )
    done = pods.wait_phase("dns-client", "Succeeded", timeout=120)
    assert done.status.container_statuses[0].state.terminated.exit_code == 0
    out = node_agent.log_file(namespace, "dns-client", "main").read_text()
    assert "IMAGE data:image/png;base64," in out


READINESS_GATED_SERVER = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path != '/ready' or os.path.exists(os.environ['FLAG'])
        self.send_response(200 if ok else 503); self.end_headers()
http.server.HTTPServer(('0.0.0.0', 8080), H).serve_forever()
"""


def test_readiness_follows_the_probe_not_the_process(node_agent, pods, namespace):
    container = python_container(
        READINESS_GATED_SERVER,
        ports=[{"name": "http", "containerPort": 8080}],
        env=[{"name": "FLAG", "value": "/flags/ready"}],
        volumeMounts=[{"name": "flags", "mountPath": "/flags"}],
        readinessProbe={"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
    )
    pods.create(
        "gated",
        agent_pod_spec(node_agent, [container], volumes=[{"name": "flags", "emptyDir": {}}]),
    )
    pod = pods.wait_phase("gated", "Running")
    time.sleep(4)  # four probe periods answering 503
    assert not pods.ready("gated")
    assert http_get(f"http://{pod.status.pod_ip}:8080/ready")[0] == 503
    # The mount mechanism: the container's /flags is the emptyDir under the pod's dir.
    mounts = json.loads(process_env(pid_of(node_agent, pod))["KUBEPEER_MOUNTS"])
    Path(mounts["/flags"], "ready").touch()
    pods.wait_ready("gated", timeout=10)


def waiting_reason(pods: list[client.V1Pod]) -> str | None:
    """The first container's waiting reason among these pods, if any is waiting."""
    for pod in pods:
        for cs in pod.status.container_statuses or []:
            if cs.state.waiting:
                return cs.state.waiting.reason
    return None


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


def pid_of(agent: NodeAgent, pod: client.V1Pod, container: str = "main") -> int:
    procs = agent.state_dir / "pods" / pod.metadata.uid / "processes.json"
    return json.loads(procs.read_text())["processes"][container]["pid"]


FAILING_LIVENESS_SERVER = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(500 if self.path == '/livez' else 200); self.end_headers()
http.server.HTTPServer(('0.0.0.0', 8080), H).serve_forever()
"""


def test_failing_liveness_probe_restarts_the_container(node_agent, pods):
    container = python_container(
        FAILING_LIVENESS_SERVER,
        ports=[{"name": "http", "containerPort": 8080}],
        livenessProbe={
            "httpGet": {"path": "/livez", "port": "http"},
            "periodSeconds": 1,
            "failureThreshold": 2,
        },
    )
    pods.create(
        "unhealthy", agent_pod_spec(node_agent, [container], terminationGracePeriodSeconds=2)
    )
    first = pods.wait_phase("unhealthy", "Running")
    first_pid = pid_of(node_agent, first)
    wait_for(
        lambda: pods.container("unhealthy").restart_count >= 1,
        timeout=30,
        what="a restart after the liveness probe failed",
    )
    status = pods.container("unhealthy")
    assert status.last_state.terminated is not None
    assert (
        not Path(f"/proc/{first_pid}").exists()
        or process_env(first_pid).get("HOSTNAME") != "unhealthy"
    )


IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, lambda *a: print('SIGTERM ignored', flush=True))
print('running', flush=True)
while True:
    time.sleep(0.1)
"""


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(node_agent, pods, namespace):
    pods.create(
        "stubborn",
        agent_pod_spec(
            node_agent, [python_container(IGNORES_SIGTERM)], terminationGracePeriodSeconds=3
        ),
    )
    pod = pods.wait_phase("stubborn", "Running")
    pid = pid_of(node_agent, pod)
    deleted = time.monotonic()
    pods.core.delete_namespaced_pod("stubborn", namespace)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=10, what="the process to end")
    stopped = time.monotonic() - deleted
    assert 2.0 <= stopped <= 6.0, f"stopped {stopped:.1f}s after delete with a 3s grace period"
    assert "SIGTERM ignored" in node_agent.log_file(namespace, "stubborn", "main").read_text()

    def gone() -> bool:
        try:
            pods.get("stubborn")
        except client.ApiException as e:
            return e.status == 404
        return False

    wait_for(gone, timeout=10, what="the pod object to be removed")


SA_CLIENT = """
from kubernetes import client, config
for how, load in (('kubeconfig', config.load_kube_config),
                  ('in-cluster', config.load_incluster_config)):
    load()
    core = client.CoreV1Api()
    for name in ('allowed', 'denied'):
        try:
            core.read_namespaced_secret(name, '{ns}')
            print(how, name, 200, flush=True)
        except client.ApiException as e:
            print(how, name, e.status, flush=True)
"""


def test_process_has_its_service_accounts_rights_and_no_more(node_agent, api, pods, namespace):
    core, rbac = pods.core, client.RbacAuthorizationV1Api(api)
    for name in ("allowed", "denied"):
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": name}, "stringData": {"k": "v"}}
        )
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-allowed"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": ["allowed"],
                    "verbs": ["get"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-allowed",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    pods.create(
        "sa-client",
        agent_pod_spec(
            node_agent,
            [python_container(SA_CLIENT.format(ns=namespace))],
            serviceAccountName="reader",
            restartPolicy="Never",
        ),
    )
    pods.wait_phase("sa-client", "Succeeded", timeout=60)
    out = node_agent.log_file(namespace, "sa-client", "main").read_text()
    for how in ("kubeconfig", "in-cluster"):  # the Service `kubernetes` via kube-proxy + DNS
        assert f"{how} allowed 200" in out
        assert f"{how} denied 403" in out


class Fleet:
    """AIModels in one namespace, with the operator running as a process."""

    def __init__(self, cluster, api, namespace: str) -> None:
        self.cluster, self.ns = cluster, namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.volumes: list[str] = []  # PersistentVolumes made here (cluster-scoped)

    def apply(self, name: str, agent: NodeAgent, model_dir: Path, **spec: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AIModel",
            "metadata": {"name": name},
            "spec": {
                "pipeline": "text-to-image",
                "modelId": TINY_SD,
                "gpu": {"count": 1},
                "warm": {"policy": "Always"},
                "nodeSelector": {"kubernetes.io/hostname": agent.node},
                "tolerations": [agent.toleration()],
                "modelCache": {
                    "volume": {
                        "persistentVolumeClaim": {"claimName": self.models_claim(model_dir)}
                    },
                    "mountPath": "/models",
                },
                **spec,
            },
        }
        self.cluster.kubectl("-n", self.ns, "apply", "-f", "-", stdin=yaml.safe_dump(body))

    def models_claim(self, model_dir: Path) -> str:
        """A claim bound to a hostPath PersistentVolume on model_dir (the CRD allows no hostPath;
        the node agent mounts a bound claim's host path). The binding is the controller's."""
        pv, claim = f"models-{self.ns}"[:253], "models"
        if not self.core.list_namespaced_persistent_volume_claim(
            self.ns, field_selector=f"metadata.name={claim}"
        ).items:
            self.core.create_persistent_volume({
                "metadata": {"name": pv},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                         "storageClassName": "", "hostPath": {"path": str(model_dir)},
                         "claimRef": {"namespace": self.ns, "name": claim}},
            })  # fmt: skip
            self.core.create_namespaced_persistent_volume_claim(self.ns, {
                "metadata": {"name": claim},
                "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                         "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}},
            })  # fmt: skip
            self.volumes.append(pv)
        return claim

    def delete_volumes(self) -> None:
        for pv in self.volumes:
            self.core.delete_persistent_volume(pv)

    def status(self, name: str) -> dict:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, "aimodels", name)
        return obj.get("status") or {}

    def condition(self, name: str, kind: str) -> dict:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), {})

    def pods(self, runner: str) -> list[client.V1Pod]:
        selector = f"kubepeer.io/runner={runner}"
        return self.core.list_namespaced_pod(self.ns, label_selector=selector).items

    def pod(self, runner: str) -> client.V1Pod:
        (pod,) = self.core.list_namespaced_pod(
            self.ns, label_selector=f"kubepeer.io/runner={runner}"
        ).items
        return pod

    def runner_token(self, pod: client.V1Pod) -> str:
        """The AUTH_TOKEN the operator gave the runner, read from the Secret it names."""
        ref = next(
            e.value_from.secret_key_ref
            for e in pod.spec.containers[0].env
            if e.name == "AUTH_TOKEN"
        )
        secret = self.core.read_namespaced_secret(ref.name, self.ns)
        return base64.b64decode(secret.data[ref.key]).decode()


@pytest.fixture
def fleet(operator, crds, node_agent, api, namespace) -> Iterator[Fleet]:
    fleet = Fleet(crds, api, namespace)
    yield fleet
    fleet.delete_volumes()


def test_operator_made_runner_serves_with_its_auth_secret(fleet, node_agent, tiny_models):
    fleet.apply("tiny", node_agent, tiny_models)
    wait_for(
        lambda: fleet.status("tiny").get("phase") == "Ready", timeout=180, what="AIModel tiny Ready"
    )
    pod = fleet.pod("runner-tiny")
    assert pod.spec.node_name == node_agent.node
    token = fleet.runner_token(pod)
    port = pod.spec.containers[0].ports[0].container_port
    url = f"http://{pod.status.pod_ip}:{port}/text-to-image"
    assert post_json(url, IMAGE_REQUEST)[0] == 401
    assert post_json(url, IMAGE_REQUEST, {"Authorization": "Bearer wrong"})[0] == 401
    assert_png_response(*post_json(url, IMAGE_REQUEST, {"Authorization": f"Bearer {token}"}))


def test_crashing_runner_backs_off_and_the_aimodel_says_model_load_failed(
    fleet, node_agent, tiny_models
):
    # An env value the runner refuses: it exits 2 at start, every time.
    fleet.apply(
        "crashy", node_agent, tiny_models, env=[{"name": "MAX_INFERENCE_STEPS", "value": "lots"}]
    )
    wait_for(
        lambda: waiting_reason(fleet.pods("runner-crashy")) == "CrashLoopBackOff",
        timeout=90,
        what="the runner to reach CrashLoopBackOff",
    )
    status = fleet.pod("runner-crashy").status.container_statuses[0]
    assert status.restart_count >= 1
    assert status.last_state.terminated.exit_code == 2
    wait_for(
        lambda: fleet.condition("crashy", "Degraded").get("reason") == "ModelLoadFailed",
        timeout=60,
        what="AIModel crashy Degraded/ModelLoadFailed",
    )
    assert fleet.condition("crashy", "Degraded")["status"] == "True"
    assert fleet.status("crashy")["phase"] == "Failed"


def test_unmapped_image_waits_with_err_image_pull(node_agent, pods):
    container = {"name": "main", "image": "nginx:1.27"}
    pods.create("unmapped", agent_pod_spec(node_agent, [container]))
    wait_for(
        lambda: waiting_reason([pods.get("unmapped")]) == "ErrImagePull",
        timeout=30,
        what="ErrImagePull on the unmapped image",
    )
    assert "nginx:1.27" in pods.container("unmapped").state.waiting.message


HTTP_SERVER = """
import http.server, sys
http.server.HTTPServer(('0.0.0.0', 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_sigkilled_agent_restarts_without_orphans_and_converges(node_agent, pods, namespace):
    """Last in this file: it kills the session's agent and starts a new one."""
    container = python_container(
        HTTP_SERVER,
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    )
    pods.create("survivor", agent_pod_spec(node_agent, [container]))
    pod = pods.wait_ready("survivor", timeout=60)
    old_pid, ip = pid_of(node_agent, pod), pod.status.pod_ip

    node_agent.process.send_signal(signal.SIGKILL)
    node_agent.process.wait(timeout=10)
    assert Path(f"/proc/{old_pid}").exists()  # the container outlived its agent
    node_agent.start()

    wait_for(
        lambda: not Path(f"/proc/{old_pid}").exists(), timeout=30, what="the orphan to be killed"
    )
    pod = pods.wait_ready("survivor", timeout=60)
    assert pod.status.pod_ip == ip  # same sandbox, same address
    new_pid = pid_of(node_agent, pod)
    assert new_pid != old_pid
    same_pod = [
        pid
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit())
        if _env_safe(pid).get("HOSTNAME") == "survivor"
        and _env_safe(pid).get("KUBEPEER_MOUNTS") is not None
    ]
    assert same_pod == [new_pid], f"one process for the container, found {same_pod}"
    assert http_get(f"http://{ip}:8080/")[0] == 200


def _env_safe(pid: int) -> dict[str, str]:
    try:
        return process_env(pid)
    except OSError:
        return {}
