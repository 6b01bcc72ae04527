"""Runner manifests from AIModels: pure functions, no cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubepeer.api import AIModelSpec
from kubepeer.controller import labels as L
from kubepeer.controller.builders import (
    InvalidSpec,
    Member,
    RunnerPlan,
    build_priority_classes,
    build_runner_deployment,
    build_runner_service,
)
from kubepeer.controller.fleet import plan_namespace
from kubepeer.controller.settings import OperatorSettings

SETTINGS = OperatorSettings(runner_image="runner:default", startup_timeout_seconds=900)


def member(name: str = "sdxl", **spec: Any) -> Member:
    full = {"pipeline": "text-to-image", "modelId": "org/model", **spec}
    return Member(name=name, uid=f"uid-{name}", spec=AIModelSpec.model_validate(full))


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def test_dedicated_runner_carries_the_model_and_its_gpu_needs():
    plan = RunnerPlan.dedicated(
        "ns", member(optimizations=["SFAST", "DEEPCACHE"], gpu={"count": 2})
    )
    deployment = build_runner_deployment(plan, SETTINGS)
    assert deployment["metadata"]["name"] == "runner-sdxl"
    assert container(deployment)["image"] == "runner:default"
    assert container(deployment)["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert env(deployment)["PIPELINE"] == "text-to-image"
    assert env(deployment)["MODEL_ID"] == "org/model"
    assert env(deployment)["SFAST"] == env(deployment)["DEEPCACHE"] == "true"
    assert env(deployment)["AUTH_TOKEN"] == {
        "secretKeyRef": {"name": "kubepeer-runner-auth", "key": "token"}
    }
    [owner] = deployment["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("AIModel", "sdxl", True)
    assert deployment["spec"]["template"]["metadata"]["labels"][L.AIMODEL] == "sdxl"


def test_startup_probe_waits_as_long_as_the_settings_allow_a_load_to_take():
    deployment = build_runner_deployment(RunnerPlan.dedicated("ns", member()), SETTINGS)
    startup = container(deployment)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    assert container(deployment)["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_vram_and_products_become_node_affinity():
    plan = RunnerPlan.dedicated("ns", member(gpu={"minMemory": "24Gi", "products": ["B", "A"]}))
    terms = build_runner_deployment(plan, SETTINGS)["spec"]["template"]["spec"]["affinity"]
    [term] = terms["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["A", "B"]},
        {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["24575"]},
    ]


def test_cpu_only_model_asks_for_no_gpu_and_no_gpu_toleration():
    deployment = build_runner_deployment(
        RunnerPlan.dedicated("ns", member(gpu={"count": 0})), SETTINGS
    )
    assert "limits" not in container(deployment).get("resources", {})
    assert "tolerations" not in deployment["spec"]["template"]["spec"]


def test_policy_picks_the_priority_class():
    warm = build_runner_deployment(RunnerPlan.dedicated("ns", member()), SETTINGS)
    cold = build_runner_deployment(
        RunnerPlan.dedicated("ns", member(warm={"policy": "OnDemand"})), SETTINGS
    )
    assert warm["spec"]["template"]["spec"]["priorityClassName"] == "kubepeer-warm"
    assert cold["spec"]["template"]["spec"]["priorityClassName"] == "kubepeer-cold"
    assert cold["spec"]["replicas"] == 0
    classes = {c["metadata"]["name"]: c for c in build_priority_classes(SETTINGS)}
    assert classes["kubepeer-warm"]["value"] > classes["kubepeer-cold"]["value"]
    assert classes["kubepeer-cold"]["preemptionPolicy"] == "Never"


def test_share_group_is_one_runner_on_one_gpu_with_every_model():
    members = [
        member("whisper", pipeline="audio-to-text", modelId="w", gpu={"shareGroup": "g"}),
        member("blip", pipeline="image-to-text", modelId="b", gpu={"shareGroup": "g"}),
    ]
    plan = RunnerPlan.group("ns", "g", members)
    deployment = build_runner_deployment(plan, SETTINGS)
    assert deployment["metadata"]["name"] == "runner-group-g"
    assert container(deployment)["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert "PIPELINE" not in env(deployment)
    assert json.loads(env(deployment)["MODELS"]) == [
        {"pipeline": "image-to-text", "model_id": "b", "optimizations": []},
        {"pipeline": "audio-to-text", "model_id": "w", "optimizations": []},
    ]
    owners = deployment["metadata"]["ownerReferences"]
    assert {o["name"] for o in owners} == {"whisper", "blip"}
    assert not any(o["controller"] for o in owners)
    annotation = deployment["spec"]["template"]["metadata"]["annotations"][L.MODELS_ANNOTATION]
    assert [m["aimodel"] for m in json.loads(annotation)] == ["blip", "whisper"]


def test_share_group_refuses_mixed_images():
    members = [
        member("a", image="one", gpu={"shareGroup": "g"}),
        member("b", image="two", gpu={"shareGroup": "g"}),
    ]
    with pytest.raises(InvalidSpec, match="mixes runner images"):
        RunnerPlan.group("ns", "g", members)


def test_planning_a_namespace_reports_invalid_groups_per_model():
    def body(name: str, **spec: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "uid": name},
            "spec": {"pipeline": "llm", "modelId": "m", **spec},
        }

    plan = plan_namespace(
        "ns",
        [
            body("solo"),
            body("a", image="one", gpu={"shareGroup": "g"}),
            body("b", image="two", gpu={"shareGroup": "g"}),
        ],
    )
    assert set(plan.runners) == {"runner-solo"}
    assert set(plan.invalid) == {"a", "b"}
    assert "mixes runner images" in plan.invalid["a"]


def test_service_selects_the_runner_pods():
    plan = RunnerPlan.dedicated("ns", member())
    service = build_runner_service(plan, SETTINGS)
    deployment = build_runner_deployment(plan, SETTINGS)
    selector = service["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_long_names_are_shortened_deterministically():
    name = L.runner_name(aimodel="x" * 80)
    assert len(name) <= 63
    assert name == L.runner_name(aimodel="x" * 80)
    assert name != L.runner_name(aimodel="x" * 79)


def test_building_twice_gives_the_same_manifest():
    plan = RunnerPlan.dedicated("ns", member(env=[{"name": "A", "value": "1"}]))
    assert build_runner_deployment(plan, SETTINGS) == build_runner_deployment(plan, SETTINGS)
