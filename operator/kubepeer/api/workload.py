"""What every GPU workload Kubepeer runs shares, AIModel and LiveRunner alike: the GPUs a
replica needs, the warm-start policy, and the container's tolerations, env and resources."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

from pydantic import Field, model_validator

from kubepeer.api.common import (
    DnsLabel,
    Duration,
    KubeModel,
    MemoryQuantity,
    cel,
    duration_seconds,
    quantity_bytes,
)

MAX_GPUS_PER_REPLICA = 8
MAX_REPLICAS = 64


class WarmPolicy(StrEnum):
    """How an AIModel is kept ready."""

    ALWAYS = "Always"
    ON_DEMAND = "OnDemand"
    REVENUE = "Revenue"


class Gpu(KubeModel):
    model_config = KubeModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.shareGroup) || self.count == 1",
                    "a share group packs several models onto one GPU, so gpu.count must be 1",
                    ".shareGroup",
                ),
            ]
        }
    }

    count: int = Field(
        default=1,
        ge=0,
        le=MAX_GPUS_PER_REPLICA,
        description="GPUs per replica (nvidia.com/gpu). 0 runs on CPU, for tests and tiny models.",
    )
    min_memory: MemoryQuantity | None = Field(
        default=None,
        description=(
            "Least memory each GPU must have, e.g. 24Gi. Matched against the node label "
            "nvidia.com/gpu.memory (MiB) that NVIDIA GPU feature discovery sets."
        ),
    )
    products: list[str] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "GPU products allowed, as in the node label nvidia.com/gpu.product "
            "(e.g. NVIDIA-A100-SXM4-80GB). Empty allows any."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    share_group: DnsLabel | None = Field(
        default=None,
        description=(
            "Pack this model with the other AIModels of the same share group into one runner "
            "pod on one GPU (warm multi-model serving for small models)."
        ),
    )

    @model_validator(mode="after")
    def _share_group_needs_one_gpu(self) -> Self:
        if self.share_group is not None and self.count != 1:
            raise ValueError(
                f"gpu.count is {self.count}: a share group packs several models onto one GPU, "
                "so gpu.count must be 1"
            )
        return self

    @property
    def min_memory_mib(self) -> int | None:
        return None if self.min_memory is None else quantity_bytes(self.min_memory) // 2**20


class Warm(KubeModel):
    model_config = KubeModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                    "warm.minReplicas must not exceed warm.maxReplicas",
                    ".minReplicas",
                ),
                cel(
                    "self.policy != 'Always' || !has(self.minReplicas) || self.minReplicas >= 1",
                    "policy Always keeps at least one replica warm: warm.minReplicas must be >= 1"
                    " (use policy OnDemand to scale to zero)",
                    ".minReplicas",
                ),
                cel(
                    "self.policy != 'OnDemand' || !has(self.minReplicas) || self.minReplicas == 0",
                    "policy OnDemand scales to zero: warm.minReplicas must be 0"
                    " (use policy Always to keep replicas warm)",
                    ".minReplicas",
                ),
            ]
        }
    }

    policy: WarmPolicy = Field(
        default=WarmPolicy.ALWAYS,
        description=(
            "Always: keep minReplicas loaded, each on its own GPU. OnDemand: scale to zero "
            "after idleTimeout without requests, wake on the first request, and run at a "
            "lower priority so that Always models can preempt it. Revenue: OnDemand, kept "
            "warm while its expected earnings beat its GPU time (the operator's "
            "--gpu-price-eth-per-hour), and asleep soon after its jobs stop while they do not."
        ),
    )
    min_replicas: int | None = Field(
        default=None,
        ge=0,
        le=MAX_REPLICAS,
        description="Replicas kept when idle. Defaults to 1 for Always and 0 for OnDemand.",
    )
    max_replicas: int = Field(
        default=1,
        ge=1,
        le=MAX_REPLICAS,
        description="Most replicas the proxy, kubectl scale or an autoscaler may ask for.",
    )
    idle_timeout: Duration = Field(
        default="10m",
        description="OnDemand only: scale to zero after this long without requests (90s, 10m).",
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> Self:
        if self.min_replicas is None:
            return self
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"warm.minReplicas ({self.min_replicas}) must not exceed "
                f"warm.maxReplicas ({self.max_replicas})"
            )
        if self.policy is WarmPolicy.ALWAYS and self.min_replicas < 1:
            raise ValueError(
                "policy Always keeps at least one replica warm: warm.minReplicas must be >= 1 "
                "(use policy OnDemand to scale to zero)"
            )
        if self.policy is WarmPolicy.ON_DEMAND and self.min_replicas != 0:
            raise ValueError(
                f"policy OnDemand scales to zero: warm.minReplicas is {self.min_replicas}, "
                "must be 0 (use policy Always to keep replicas warm)"
            )
        return self

    @property
    def on_demand(self) -> bool:
        """Woken by its jobs (the proxy holds them while it wakes), its demand recorded."""
        return self.policy is not WarmPolicy.ALWAYS

    @property
    def floor(self) -> int:
        """The replicas kept when there is no demand."""
        if self.min_replicas is not None:
            return self.min_replicas
        return 1 if self.policy is WarmPolicy.ALWAYS else 0

    def desired(self, replicas: int | None) -> int:
        """Replicas to run now for a requested count: never below the floor nor above
        maxReplicas (no request: the floor)."""
        requested = self.floor if replicas is None else replicas
        return max(self.floor, min(requested, self.max_replicas))

    @property
    def idle_timeout_seconds(self) -> float:
        return duration_seconds(self.idle_timeout)


class Toleration(KubeModel):
    key: str | None = Field(default=None, max_length=316, description="Taint key to tolerate.")
    operator: str | None = Field(
        default=None,
        description="Exists or Equal (default Equal).",
        json_schema_extra={"enum": ["Exists", "Equal"]},
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value to match.")
    effect: str | None = Field(
        default=None,
        description="NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
        json_schema_extra={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint."
    )


class EnvVar(KubeModel):
    name: str = Field(
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256, description="Variable name."
    )
    value: str | None = Field(default=None, description="Variable value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, ...).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class Resources(KubeModel):
    requests: dict[str, str] = Field(
        default_factory=dict, description="CPU and memory requests of the runner container."
    )
    limits: dict[str, str] = Field(
        default_factory=dict,
        description="Limits of the runner container (nvidia.com/gpu comes from gpu.count).",
    )


REPLICAS_WITHIN_MAX = cel(
    "!has(self.replicas) || self.replicas <= self.warm.maxReplicas",
    "spec.replicas must not exceed spec.warm.maxReplicas",
    ".replicas",
)


class WorkloadSpec(KubeModel):
    """The spec parts every workload has: the GPUs a replica needs, the warm policy, the
    replicas wanted now, and where and how its pods run. A subclass's CEL rules must
    include REPLICAS_WITHIN_MAX (pydantic keeps only the subclass's schema extras)."""

    # `default: {}` in the schema lets the server fill in these objects' own defaults,
    # so `kubectl get -o yaml` shows the policy in force.
    gpu: Gpu = Field(
        default_factory=Gpu,
        description="GPUs each replica needs.",
        json_schema_extra={"default": {}},
    )
    warm: Warm = Field(
        default_factory=Warm,
        description="The warm-start policy.",
        json_schema_extra={"default": {}},
    )
    replicas: int | None = Field(
        default=None,
        ge=0,
        le=MAX_REPLICAS,
        description=(
            "Replicas wanted now, between the warm floor and warm.maxReplicas. Set through "
            "the scale subresource by the proxy, kubectl scale or an autoscaler."
        ),
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels its pods require."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints its pods tolerate."
    )
    resources: Resources = Field(
        default_factory=Resources, description="CPU and memory for its container."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64, description="Extra env vars for its container."
    )

    @model_validator(mode="after")
    def _replicas_within_bounds(self) -> Self:
        if self.replicas is not None and self.replicas > self.warm.max_replicas:
            raise ValueError(
                f"spec.replicas ({self.replicas}) must not exceed "
                f"spec.warm.maxReplicas ({self.warm.max_replicas})"
            )
        return self

    @property
    def desired_replicas(self) -> int:
        """Replicas to run now: the requested count, never below the warm floor."""
        return self.warm.desired(self.replicas)
