"""The operator on a real control plane: AIModels become runners on kwok GPU nodes."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from conftest import GPU_MEMORY_MIB
from kubepeer.api import GROUP, VERSION
from kubepeer.demand import demand_key
from support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.redis]
LOAD_DELAY = "pod-ready.stage.kwok.x-k8s.io/delay"  # kwok holds the pod un-ready this long


@pytest.fixture
def fleet(operator, crds, api, namespace):
    return Fleet(crds, api, namespace)


class Fleet:
    """The test's view of one namespace with the operator running."""

    def __init__(self, cluster, api, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def apply(self, name: str, **spec: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AIModel",
            "metadata": {"name": name},
            "spec": {"pipeline": "text-to-image", "modelId": "org/tiny", **spec},
        }
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body))

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True):
        return self.cluster.kubectl("-n", self.namespace, *args, stdin=stdin, check=check)

    def aimodel(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "aimodels", name
        )

    def status(self, name: str) -> dict[str, Any]:
        return self.aimodel(name).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        seen: list[dict[str, Any]] = [{}]

        def reached() -> dict[str, Any] | None:
            seen[0] = self.status(name)
            return seen[0] if seen[0].get("phase") == phase else None

        try:
            return wait_for(reached, timeout=timeout, what=f"AIModel {name} to be {phase}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status: {json.dumps(seen[0], indent=1)}") from None

    def deployment(self, name: str) -> client.V1Deployment:
        return self.apps.read_namespaced_deployment(name, self.namespace)

    def pods(self, runner: str) -> list[client.V1Pod]:
        selector = f"kubepeer.io/runner={runner}"
        return self.core.list_namespaced_pod(self.namespace, label_selector=selector).items

    def replica_sets(self, runner: str) -> list[client.V1ReplicaSet]:
        selector = f"kubepeer.io/runner={runner}"
        return self.apps.list_namespaced_replica_set(self.namespace, label_selector=selector).items

    def models_configmap(self) -> dict[str, Any]:
        data = self.core.read_namespaced_config_map("kubepeer-models", self.namespace).data
        return {key: json.loads(value) for key, value in data.items()}


def test_always_model_becomes_a_ready_gpu_runner(fleet):
    fleet.apply(
        "sdxl",
        optimizations=["SFAST"],
        gpu={"count": 1, "minMemory": "16Gi", "products": ["NVIDIA-A10G", "NVIDIA-L4"]},
        warm={"policy": "Always"},
    )
    status = fleet.wait_phase("sdxl", "Ready")
    assert status["readyReplicas"] == 1
    assert status["observedGeneration"] == fleet.aimodel("sdxl")["metadata"]["generation"]
    assert status["lastColdStartSeconds"] >= 0
    ready = fleet.condition("sdxl", "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "AllReplicasReady")

    deployment = fleet.deployment("runner-sdxl")
    pod_spec = deployment.spec.template.spec
    runner = pod_spec.containers[0]
    assert runner.resources.limits["nvidia.com/gpu"] == "1"
    env = {e.name: e for e in runner.env}
    assert env["PIPELINE"].value == "text-to-image"
    assert env["MODEL_ID"].value == "org/tiny"
    assert env["SFAST"].value == "true"
    assert env["AUTH_TOKEN"].value_from.secret_key_ref.name == "kubepeer-runner-auth"
    assert runner.startup_probe.failure_threshold * runner.startup_probe.period_seconds >= 600
    assert runner.readiness_probe.http_get.path == "/readyz"
    assert runner.liveness_probe.http_get.path == "/livez"
    terms = pod_spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    expressions = {e.key: e for e in terms.node_selector_terms[0].match_expressions}
    assert expressions["nvidia.com/gpu.product"].values == ["NVIDIA-A10G", "NVIDIA-L4"]
    assert expressions["nvidia.com/gpu.memory"].operator == "Gt"
    assert expressions["nvidia.com/gpu.memory"].values == [str(16 * 1024 - 1)]
    assert pod_spec.priority_class_name == "kubepeer-warm"
    assert deployment.metadata.owner_references[0].kind == "AIModel"

    [pod] = fleet.pods("runner-sdxl")
    node = fleet.core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
    service = fleet.core.read_namespaced_service("runner-sdxl", fleet.namespace)
    assert service.spec.selector == {"kubepeer.io/runner": "runner-sdxl"}
    # The auth token exists, and is never in the pod spec itself.
    secret = fleet.core.read_namespaced_secret("kubepeer-runner-auth", fleet.namespace)
    token = base64.b64decode(secret.data["token"]).decode()
    assert len(token) >= 32
    assert env["AUTH_TOKEN"].value is None
    assert token not in json.dumps(fleet.core.api_client.sanitize_for_serialization(deployment))


def test_model_needing_more_vram_than_any_gpu_fails_with_the_schedulers_reason(fleet):
    assert GPU_MEMORY_MIB < 80 * 1024
    fleet.apply("huge", gpu={"count": 1, "minMemory": "80Gi"})
    status = fleet.wait_phase("huge", "Failed")
    ready = fleet.condition("huge", "Ready")
    assert ready["reason"] == "Unschedulable"
    assert "node affinity" in ready["message"]
    assert status["readyReplicas"] == 0
    events = fleet.kubectl("get", "events", "--field-selector", "involvedObject.name=huge").stdout
    assert "Failed" in events


def test_spec_change_rolls_the_runner_and_an_unchanged_apply_does_not(fleet):
    fleet.apply("rolling", image="example.invalid/runner:v1")
    fleet.wait_phase("rolling", "Ready")
    first = {rs.metadata.name for rs in fleet.replica_sets("runner-rolling")}
    assert len(first) == 1

    fleet.apply("rolling", image="example.invalid/runner:v1")  # same spec again
    time.sleep(2)  # several status intervals: time for a wrong rollout to show
    assert {rs.metadata.name for rs in fleet.replica_sets("runner-rolling")} == first
    assert fleet.deployment("runner-rolling").metadata.generation == 1

    fleet.apply("rolling", image="example.invalid/runner:v2", optimizations=["DEEPCACHE"])
    wait_for(
        lambda: len(fleet.replica_sets("runner-rolling")) == 2,
        timeout=30,
        what="a second ReplicaSet for the new spec",
    )
    runner = fleet.deployment("runner-rolling").spec.template.spec.containers[0]
    assert runner.image == "example.invalid/runner:v2"
    assert "DEEPCACHE" in {e.name for e in runner.env}
    fleet.wait_phase("rolling", "Ready")


def test_on_demand_model_wakes_on_scale_and_sleeps_when_idle(fleet, redis_server):
    fleet.apply("cold", warm={"policy": "OnDemand", "maxReplicas": 2, "idleTimeout": "3s"})
    fleet.wait_phase("cold", "Idle")
    assert fleet.deployment("runner-cold").spec.replicas == 0
    assert fleet.deployment("runner-cold").spec.template.spec.priority_class_name == "kubepeer-cold"

    # kwok makes the woken runner take 2 s to turn ready, as a model load would.
    fleet.kubectl("patch", "deployment", "runner-cold", "--type", "merge", "-p", json.dumps(
        {"spec": {"template": {"metadata": {"annotations": {LOAD_DELAY: "2s"}}}}}
    ))  # fmt: skip

    # A job in flight keeps it awake past its idle timeout...
    redis = redis_server.client()
    key = demand_key(fleet.namespace, "cold")
    redis.hset(key, mapping={"last_request": time.time(), "in_flight": 1})
    fleet.kubectl("scale", "aimodel", "cold", "--replicas", "1")
    fleet.wait_phase("cold", "Loading")
    status = fleet.wait_phase("cold", "Ready")
    assert 1.5 <= status["lastColdStartSeconds"] < 15
    assert len(fleet.pods("runner-cold")) == 1
    time.sleep(4)
    assert fleet.aimodel("cold")["spec"]["replicas"] == 1

    # ...and once it is done, idleTimeout later the model scales to zero.
    redis.hset(key, mapping={"last_request": time.time(), "in_flight": 0})
    fleet.wait_phase("cold", "Idle", timeout=30)
    assert fleet.aimodel("cold")["spec"]["replicas"] == 0
    assert fleet.deployment("runner-cold").spec.replicas == 0
    events = fleet.kubectl("get", "events", "--field-selector", "involvedObject.name=cold").stdout
    assert "ScaledToZero" in events


@pytest.fixture
def small_gpu_node(api) -> Iterator[str]:
    """A kwok node of our own with 2 GPUs of a product no other test asks for."""
    core = client.CoreV1Api(api)
    name, product = f"preempt-{int(time.time())}", "TEST-PREEMPT-GPU"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.memory": "24576",
            },
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "2"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "2"},
        },
    }
    core.create_node(node)
    wait_for(
        lambda: any(
            c.type == "Ready" and c.status == "True"
            for c in core.read_node(name).status.conditions or []
        ),
        timeout=30,
        what="the extra GPU node to be Ready",
    )
    yield product
    core.delete_node(name)


def test_warm_model_preempts_a_cold_one_when_gpus_are_full(fleet, small_gpu_node):
    only_here = {"count": 1, "products": [small_gpu_node]}
    fleet.apply(
        "cold-fill", gpu=only_here, warm={"policy": "OnDemand", "maxReplicas": 2}, replicas=2
    )
    wait_for(
        lambda: fleet.status("cold-fill").get("readyReplicas") == 2,
        timeout=60,
        what="two cold replicas filling the node's GPUs",
    )

    fleet.apply("warm", gpu=only_here, warm={"policy": "Always"})
    fleet.wait_phase("warm", "Ready", timeout=90)
    events = fleet.kubectl("get", "events", "-o", "json").stdout
    assert any(e["reason"] == "Preempted" for e in json.loads(events)["items"])
    assert fleet.status("cold-fill")["readyReplicas"] <= 1


def test_share_group_packs_three_models_into_one_runner_on_one_gpu(fleet):
    for name, pipeline in (
        ("whisper", "audio-to-text"),
        ("blip", "image-to-text"),
        ("sam", "segment-anything-2"),
    ):
        fleet.apply(name, pipeline=pipeline, modelId=f"tiny/{name}", gpu={"shareGroup": "small"})
    for name in ("whisper", "blip", "sam"):
        fleet.wait_phase(name, "Ready")
    runners = fleet.apps.list_namespaced_deployment(fleet.namespace).items
    assert [d.metadata.name for d in runners] == ["runner-group-small"]
    container = runners[0].spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    models = json.loads(next(e.value for e in container.env if e.name == "MODELS"))
    assert [(m["pipeline"], m["model_id"]) for m in models] == [
        ("image-to-text", "tiny/blip"),
        ("segment-anything-2", "tiny/sam"),
        ("audio-to-text", "tiny/whisper"),
    ]
    assert len(runners[0].metadata.owner_references) == 3

    # Leaving the group re-renders the runner with the two that stay.
    fleet.kubectl("delete", "aimodel", "blip")
    wait_for(lambda: len(_group_models(fleet)) == 2, timeout=30, what="the group runner to shrink")


def _group_models(fleet: Fleet) -> list[dict[str, Any]]:
    container = fleet.deployment("runner-group-small").spec.template.spec.containers[0]
    return json.loads(next(e.value for e in container.env if e.name == "MODELS"))


def test_deleting_an_aimodel_garbage_collects_its_runner(fleet):
    fleet.apply("short-lived")
    fleet.wait_phase("short-lived", "Ready")
    fleet.kubectl("delete", "aimodel", "short-lived")
    wait_for(
        lambda: not fleet.apps.list_namespaced_deployment(fleet.namespace).items,
        timeout=30,
        what="the runner Deployment to be garbage-collected",
    )


def test_prices_compile_into_the_proxy_table_and_ai_models_json(fleet):
    fleet.kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Pricing",
        "metadata": {"name": "default"},
        "spec": {
            "usdPerEth": "2000",
            "prices": [{"pipeline": "text-to-image", "pricePerUnit": "0.002", "currency": "USD",
                        "pixelsPerUnit": 1000000}],
        },
    }))  # fmt: skip
    fleet.apply("priced", pricing={"ref": "default"}, capacity=2)
    fleet.apply("unpriced", pipeline="llm", pricing={"ref": "missing"})

    def published() -> dict[str, Any] | None:
        try:
            tables = fleet.models_configmap()
        except client.ApiException:
            return None
        return tables if len(tables["models.json"]["models"]) == 2 else None

    tables = wait_for(published, timeout=30, what="the models ConfigMap with both models")
    priced = next(m for m in tables["models.json"]["models"] if m["aimodel"] == "priced")
    # 0.002 USD per megapixel at 2000 USD/ETH = 1e-6 ETH per 1e6 pixels = 1e6 wei per pixel.
    assert priced["price"]["weiPerUnit"] == "1000000"
    assert (priced["price"]["pricePerUnit"], priced["price"]["pixelsPerUnit"]) == (1000000, 1)
    assert priced["capability"] == 27
    assert priced["runner"] == "runner-priced"
    [entry] = tables["aiModels.json"]
    assert entry == {
        "pipeline": "text-to-image",
        "model_id": "org/tiny",
        "warm": True,
        "capacity": 2,
        "url": "http://kubepeer-proxy:8000",
        "price_per_unit": "0.002USD",
        "pixels_per_unit": 1000000,
        "currency": "USD",
    }

    wait_for(
        lambda: fleet.condition("unpriced", "Priced").get("reason") == "PricingNotFound",
        timeout=30,
        what="the unpriced model's Priced condition",
    )
    assert "'missing' not found" in fleet.condition("unpriced", "Priced")["message"]
