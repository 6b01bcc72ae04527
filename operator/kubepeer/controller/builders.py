"""Pure builders: AIModels in, the manifests of their runners out. No I/O here.

A *runner* is one Deployment and one Service. A dedicated runner serves one AIModel; a
share-group runner packs every AIModel of one `gpu.shareGroup` into one pod on one GPU
(the runner's multi-model mode, configured by the MODELS env var; see DESIGN.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from kubepeer.api import API_VERSION, AIModelSpec, WarmPolicy
from kubepeer.contracts import labels as L
from kubepeer.controller.settings import OperatorSettings

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, as NVIDIA GPU feature discovery writes it
AUTH_TOKEN_KEY = "token"
MODELS_VOLUME = "models"
RUNNER_UID = 10001


class InvalidSpec(ValueError):
    """An AIModel (or a share group) that cannot be turned into a runner, and why."""


@dataclass(frozen=True)
class Member:
    """One AIModel as a runner sees it."""

    name: str
    uid: str
    spec: AIModelSpec
    created: str = ""  # creationTimestamp: the older member keeps its place in a group


@dataclass(frozen=True)
class RunnerPlan:
    """What one runner must serve; built from AIModels, turned into manifests below."""

    name: str
    namespace: str
    members: tuple[Member, ...]
    share_group: str | None = None

    @classmethod
    def dedicated(cls, namespace: str, member: Member) -> RunnerPlan:
        return cls(name=L.runner_name(aimodel=member.name), namespace=namespace, members=(member,))

    @classmethod
    def group(cls, namespace: str, share_group: str, members: list[Member]) -> RunnerPlan:
        """The runner of the members admitted to the group (see `admit_group`)."""
        if not members:
            raise InvalidSpec(f"share group '{share_group}' has no AIModels")
        return cls(
            name=L.runner_name(share_group=share_group),
            namespace=namespace,
            members=tuple(sorted(members, key=lambda m: m.name)),
            share_group=share_group,
        )

    # --- what the plan implies, derived from its members ---

    @property
    def lead(self) -> AIModelSpec:
        return self.members[0].spec

    @property
    def replicas(self) -> int:
        return max(m.spec.desired_replicas for m in self.members)

    @property
    def warm(self) -> bool:
        return any(m.spec.warm.policy is WarmPolicy.ALWAYS for m in self.members)

    @property
    def gpus(self) -> int:
        return 1 if self.share_group else self.lead.gpu.count

    @property
    def min_gpu_memory_mib(self) -> int | None:
        needs = [m.spec.gpu.min_memory_mib for m in self.members if m.spec.gpu.min_memory]
        return max(needs) if needs else None

    @property
    def gpu_products(self) -> list[str]:
        allowed = [set(m.spec.gpu.products) for m in self.members if m.spec.gpu.products]
        return sorted(set.intersection(*allowed)) if allowed else []

    def labels(self) -> dict[str, str]:
        result = L.common_labels(self.name)
        if self.share_group:
            result[L.SHARE_GROUP] = self.share_group
        else:
            result[L.AIMODEL] = L.label_value(self.members[0].name)
            result[L.PIPELINE] = self.lead.pipeline.value
        return result

    def models_annotation(self) -> str:
        return json.dumps(
            [
                {
                    "aimodel": m.name,
                    "pipeline": m.spec.pipeline.value,
                    "modelId": m.spec.model_id,
                }
                for m in self.members
            ],
            separators=(",", ":"),
        )


def admit_group(share_group: str, members: list[Member]) -> tuple[list[Member], dict[str, str]]:
    """Which members one runner process can serve together, and why the others cannot.

    Members join in creation order; one that conflicts with those already in (a pipeline
    the runner already serves, another image, another model cache, no common GPU product)
    is refused on its own, so a bad newcomer never tears down a working group."""
    admitted: list[Member] = []
    refused: dict[str, str] = {}
    for m in sorted(members, key=lambda m: (m.created, m.name)):
        problem = _group_conflict(share_group, admitted, m)
        if problem:
            refused[m.name] = problem
        else:
            admitted.append(m)
    return admitted, refused


def _group_conflict(share_group: str, admitted: list[Member], newcomer: Member) -> str | None:
    if not admitted:
        return None
    spec, first = newcomer.spec, admitted[0]
    same_pipeline = next((m for m in admitted if m.spec.pipeline is spec.pipeline), None)
    where = f"share group '{share_group}'"
    if same_pipeline:
        return (
            f"{where} already serves pipeline {spec.pipeline.value} with AIModel "
            f"'{same_pipeline.name}': one runner serves each pipeline once"
        )
    if spec.image != first.spec.image:
        return (
            f"{where} runs image {first.spec.image or 'default'} (AIModel '{first.name}'), "
            f"this AIModel asks for {spec.image or 'default'}: one process serves the group"
        )
    if spec.model_cache != first.spec.model_cache:
        return f"{where} mounts the modelCache of AIModel '{first.name}'; this one differs"
    products = [set(m.spec.gpu.products) for m in (*admitted, newcomer) if m.spec.gpu.products]
    if products and not set.intersection(*products):
        return f"{where} allows no GPU product both its members and this AIModel accept"
    return None


def owner_references(plan: RunnerPlan) -> list[dict[str, Any]]:
    """Every member owns the runner: it is garbage-collected when the last one goes."""
    dedicated = plan.share_group is None
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "AIModel",
            "name": m.name,
            "uid": m.uid,
            "controller": dedicated,
            "blockOwnerDeletion": dedicated,
        }
        for m in plan.members
    ]


def runner_env(
    plan: RunnerPlan, settings: OperatorSettings, model_dir: str
) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if plan.share_group:
        models = [
            {
                "pipeline": m.spec.pipeline.value,
                "model_id": m.spec.model_id,
                "optimizations": [o.value for o in m.spec.optimizations],
            }
            for m in plan.members
        ]
        env.append({"name": "MODELS", "value": json.dumps(models, separators=(",", ":"))})
    else:
        env += [
            {"name": "PIPELINE", "value": plan.lead.pipeline.value},
            {"name": "MODEL_ID", "value": plan.lead.model_id},
        ]
        env += [{"name": flag.value, "value": "true"} for flag in plan.lead.optimizations]
    env.append({"name": "MODEL_DIR", "value": model_dir})
    env.append(
        {
            "name": "AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": settings.auth_secret, "key": AUTH_TOKEN_KEY}},
        }
    )
    seen = {e["name"] for e in env}
    for m in plan.members:
        for var in m.spec.env:
            if var.name not in seen:
                env.append(var.to_wire())
                seen.add(var.name)
    return env


def node_affinity(plan: RunnerPlan) -> dict[str, Any] | None:
    return gpu_node_affinity(plan.gpu_products, plan.min_gpu_memory_mib)


def gpu_node_affinity(products: list[str], min_memory_mib: int | None) -> dict[str, Any] | None:
    """Required node affinity for GPU products and a least GPU memory (NVIDIA GFD labels)."""
    expressions: list[dict[str, Any]] = []
    if products:
        expressions.append({"key": GPU_PRODUCT_LABEL, "operator": "In", "values": products})
    if min_memory_mib:
        # `Gt` compares the label as an integer: more than (need - 1) MiB means at least need.
        expressions.append(
            {"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(min_memory_mib - 1)]}
        )
    if not expressions:
        return None
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        }
    }


def restricted_container() -> dict[str, Any]:
    """What Pod Security "restricted" asks of a container, so pods start in such namespaces."""
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def gpu_tolerations(tolerations: list[dict[str, Any]], gpus: int) -> list[dict[str, Any]]:
    """The tolerations asked for, plus the GPU nodes' taint when GPUs are, without repeats."""
    if gpus:
        tolerations = [*tolerations, {"key": GPU_RESOURCE, "operator": "Exists",
                                      "effect": "NoSchedule"}]  # fmt: skip
    return [dict(t) for t in {json.dumps(t, sort_keys=True): t for t in tolerations}.values()]


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": min(period, 5),
        "failureThreshold": failures,
    }


def build_runner_deployment(plan: RunnerPlan, settings: OperatorSettings) -> dict[str, Any]:
    lead = plan.lead
    cache = lead.model_cache
    model_dir = cache.mount_path if cache else settings.model_dir
    volume: dict[str, Any] = {"name": MODELS_VOLUME}
    volume.update(cache.volume.to_wire() if cache else {"emptyDir": {}})

    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    for m in plan.members:
        limits.update(m.spec.resources.limits)
        requests.update(m.spec.resources.requests)
    if plan.gpus:
        limits[GPU_RESOURCE] = str(plan.gpus)

    period = settings.probe_period_seconds
    container: dict[str, Any] = {
        "name": "runner",
        "image": lead.image or settings.image_for(lead.pipeline),
        "ports": [{"name": "http", "containerPort": settings.runner_port, "protocol": "TCP"}],
        "env": runner_env(plan, settings, model_dir),
        "resources": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        "volumeMounts": [
            {
                "name": MODELS_VOLUME,
                "mountPath": model_dir,
                "readOnly": bool(cache and cache.read_only),
            }
        ],
        # /readyz and /livez mirror /health without needing AUTH_TOKEN: kubelet probes
        # cannot carry a secret. Loading big weights may take many minutes, so the startup
        # probe allows startup_timeout_seconds before liveness may restart anything.
        "startupProbe": _probe(
            "/readyz", period, math.ceil(settings.startup_timeout_seconds / period)
        ),
        "readinessProbe": _probe("/readyz", period, 1),
        "livenessProbe": _probe("/livez", period, settings.liveness_failure_threshold),
        "securityContext": restricted_container(),
    }

    tolerations = gpu_tolerations(
        [t.to_wire() for m in plan.members for t in m.spec.tolerations], plan.gpus
    )
    node_selector: dict[str, str] = {}
    for m in reversed(plan.members):
        node_selector.update(m.spec.node_selector)

    pod_spec: dict[str, Any] = {
        "priorityClassName": (
            settings.warm_priority_class if plan.warm else settings.cold_priority_class
        ),
        "containers": [container],
        "volumes": [volume],
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # runners never call the API server
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,  # the runner image's user (runner/Dockerfile)
            "runAsGroup": RUNNER_UID,
            "fsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 30,
    }
    if affinity := node_affinity(plan):
        pod_spec["affinity"] = affinity
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations

    labels = plan.labels()
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": plan.name,
            "namespace": plan.namespace,
            "labels": labels,
            "annotations": {L.MODELS_ANNOTATION: plan.models_annotation()},
            "ownerReferences": owner_references(plan),
        },
        "spec": {
            "replicas": plan.replicas,
            # A rollout that has not finished loading by then is reported, not waited on.
            "progressDeadlineSeconds": settings.startup_timeout_seconds + 60,
            "selector": {"matchLabels": {L.RUNNER: plan.name}},
            # Keep serving while rolling: bring the new replica up before the old goes.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": pod_spec,
            },
        },
    }


def build_runner(plan: RunnerPlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The runner's Service and Deployment, the Deployment stamped with the hash of both:
    equal hashes mean nothing to write. The Service goes first, so a failure leaves the
    Deployment's old hash and the next reconcile retries both."""
    service = build_runner_service(plan, settings)
    deployment = build_runner_deployment(plan, settings)
    deployment["metadata"]["annotations"][L.CONTENT_HASH] = content_hash(service, deployment)
    return [service, deployment]


def content_hash(*manifests: dict[str, Any]) -> str:
    text = json.dumps(manifests, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_runner_service(plan: RunnerPlan, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": plan.name,
            "namespace": plan.namespace,
            "labels": plan.labels(),
            "ownerReferences": owner_references(plan),
        },
        "spec": {
            # Headless: the proxy picks endpoints itself, so no ClusterIP is allocated.
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": {L.RUNNER: plan.name},
            "ports": [
                {
                    "name": "http",
                    "port": settings.runner_port,
                    "targetPort": "http",
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_auth_secret(namespace: str, settings: OperatorSettings, token: str) -> dict[str, Any]:
    """The runners' AUTH_TOKEN, shared by the proxy; made once per namespace, never rotated here."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": settings.auth_secret,
            "namespace": namespace,
            "labels": {L.PART_OF: "kubepeer", L.MANAGED_BY: "kubepeer-operator"},
        },
        "stringData": {AUTH_TOKEN_KEY: token},
    }


def build_priority_classes(settings: OperatorSettings) -> list[dict[str, Any]]:
    """Warm runners outrank cold ones, so the scheduler preempts a cold model to place a warm."""
    return [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": name, "labels": {L.PART_OF: "kubepeer"}},
            "value": value,
            "globalDefault": False,
            "preemptionPolicy": preemption,
            "description": description,
        }
        for name, value, preemption, description in (
            (
                settings.warm_priority_class,
                settings.warm_priority,
                "PreemptLowerPriority",
                "Kubepeer Always runners: may preempt OnDemand runners",
            ),
            (
                settings.cold_priority_class,
                settings.cold_priority,
                "Never",
                "Kubepeer OnDemand runners: preemptible, never preempt",
            ),
        )
    ]
