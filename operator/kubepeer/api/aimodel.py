"""AIModel: one model serving one Livepeer pipeline, kept warm by a policy."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Self

from pydantic import Field, model_validator

from kubepeer.api.common import (
    Condition,
    DnsLabel,
    Duration,
    KubeModel,
    KubeResource,
    MemoryQuantity,
    cel,
    duration_seconds,
    quantity_bytes,
)
from kubepeer.api.pricing import (
    UNIT_MUST_FIT,
    USD_NEEDS_RATE,
    Currency,
    Price,
    cel_unit_fits,
    unit_mismatch,
)
from kubepeer.livepeer.capabilities import OptimizationFlag, Pipeline, unit_fits

MAX_GPUS_PER_REPLICA = 8
MAX_REPLICAS = 64
MAX_CAPACITY = 64


class WarmPolicy(StrEnum):
    """How an AIModel is kept ready."""

    ALWAYS = "Always"
    ON_DEMAND = "OnDemand"


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
            "lower priority so that Always models can preempt it."
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
    def floor(self) -> int:
        """The replicas kept when there is no demand."""
        if self.min_replicas is not None:
            return self.min_replicas
        return 1 if self.policy is WarmPolicy.ALWAYS else 0

    @property
    def idle_timeout_seconds(self) -> float:
        return duration_seconds(self.idle_timeout)


class PricingChoice(KubeModel):
    model_config = KubeModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "has(self.ref) != has(self.price)",
                    "set exactly one of pricing.ref (a Pricing in this namespace) "
                    "and pricing.price (an inline price)",
                ),
                cel(
                    "!has(self.price) || self.price.currency != 'USD' || has(self.price.usdPerEth)",
                    USD_NEEDS_RATE,
                    ".price",
                ),
            ]
        }
    }

    ref: DnsLabel | None = Field(
        default=None, description="Name of a Pricing in this namespace whose prices apply."
    )
    price: Price | None = Field(default=None, description="A price for this model alone.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.ref is None) == (self.price is None):
            raise ValueError(
                "set exactly one of pricing.ref (a Pricing in this namespace) "
                "and pricing.price (an inline price)"
            )
        if self.price and self.price.currency is Currency.USD and self.price.usd_per_eth is None:
            raise ValueError(f"pricing.price: {USD_NEEDS_RATE}")
        return self


_VOLUME_SOURCE = {"x-kubernetes-preserve-unknown-fields": True}


class CacheVolume(KubeModel):
    """The volume source of a model cache: only kinds that grant nothing beyond the
    namespace (no hostPath, no node files). A node-local cache is an admin's
    PersistentVolume (hostPath or local) that the AIModel claims by PVC."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": {"minProperties": 1, "maxProperties": 1}
    }

    persistent_volume_claim: dict[str, Any] | None = Field(
        default=None,
        description="A PersistentVolumeClaim in this namespace: {claimName, readOnly}.",
        json_schema_extra=_VOLUME_SOURCE,
    )
    csi: dict[str, Any] | None = Field(
        default=None, description="An inline CSI volume.", json_schema_extra=_VOLUME_SOURCE
    )
    ephemeral: dict[str, Any] | None = Field(
        default=None,
        description="A generic ephemeral volume (a PVC made per pod).",
        json_schema_extra=_VOLUME_SOURCE,
    )
    nfs: dict[str, Any] | None = Field(
        default=None, description="An NFS export: {server, path}.", json_schema_extra=_VOLUME_SOURCE
    )
    empty_dir: dict[str, Any] | None = Field(
        default=None, description="A scratch directory per pod.", json_schema_extra=_VOLUME_SOURCE
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if len(self.model_fields_set) != 1:
            raise ValueError(
                "modelCache.volume must name exactly one source: persistentVolumeClaim, csi, "
                "ephemeral, nfs or emptyDir"
            )
        return self


class ModelCache(KubeModel):
    volume: CacheVolume = Field(
        description=(
            "The volume holding the models in the Hugging Face cache layout, "
            "e.g. {persistentVolumeClaim: {claimName: models}}."
        ),
    )
    mount_path: str = Field(
        default="/models",
        pattern=r"^/.*",
        max_length=256,
        description="Where the runner sees the models (its MODEL_DIR).",
    )
    read_only: bool = Field(default=True, description="Mount the cache read-only.")


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


class AIModelSpec(KubeModel):
    model_config = KubeModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.replicas) || self.replicas <= self.warm.maxReplicas",
                    "spec.replicas must not exceed spec.warm.maxReplicas",
                    ".replicas",
                ),
                cel(
                    "!has(self.pricing) || !has(self.pricing.price) "
                    "|| !has(self.pricing.price.unit) || "
                    + cel_unit_fits("self.pipeline", "self.pricing.price.unit"),
                    "pricing.price." + UNIT_MUST_FIT,
                    ".pricing.price.unit",
                ),
            ]
        }
    }

    pipeline: Pipeline = Field(description="The Livepeer pipeline this model serves.")
    model_id: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*$",
        description="Hugging Face model id, e.g. ByteDance/SDXL-Lightning.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Runner image. Defaults per pipeline from the operator's settings.",
    )
    capacity: int = Field(
        default=1,
        ge=1,
        le=MAX_CAPACITY,
        description="Concurrent requests one replica accepts; the proxy queues the rest.",
    )
    optimizations: list[OptimizationFlag] = Field(
        default_factory=list,
        description="Runner optimisations, each passed to the runner as an env var set to true.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
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
    pricing: PricingChoice | None = Field(
        default=None,
        description="What a job costs. Omitted: the Pricing objects in this namespace decide.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a runner pod requires."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the runner pods tolerate."
    )
    resources: Resources = Field(
        default_factory=Resources, description="CPU and memory for the runner container."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64, description="Extra env vars for the runner."
    )
    model_cache: ModelCache | None = Field(
        default=None, description="The volume holding model weights. Omitted: an emptyDir."
    )

    @model_validator(mode="after")
    def _replicas_within_bounds(self) -> Self:
        if self.replicas is not None and self.replicas > self.warm.max_replicas:
            raise ValueError(
                f"spec.replicas ({self.replicas}) must not exceed "
                f"spec.warm.maxReplicas ({self.warm.max_replicas})"
            )
        return self

    @model_validator(mode="after")
    def _inline_price_unit_fits(self) -> Self:
        price = self.pricing.price if self.pricing else None
        if price and price.unit and not unit_fits(self.pipeline, price.unit):
            raise ValueError("pricing.price." + unit_mismatch(self.pipeline, price.unit))
        return self

    @property
    def desired_replicas(self) -> int:
        """Replicas to run now: the requested count, never below the warm floor."""
        requested = self.warm.floor if self.replicas is None else self.replicas
        return max(self.warm.floor, min(requested, self.warm.max_replicas))


class Phase(StrEnum):
    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    IDLE = "Idle"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class AIModelStatus(KubeModel):
    phase: Phase = Field(
        default=Phase.PENDING,
        description=(
            "Pending (waiting for a GPU), Loading (runner loading weights), Ready (serving), "
            "Idle (scaled to zero), Degraded (fewer ready replicas than wanted), "
            "Failed (cannot run as specified; see conditions)."
        ),
    )
    replicas: int = Field(default=0, ge=0, description="Runner replicas that exist.")
    ready_replicas: int = Field(default=0, ge=0, description="Runner replicas serving requests.")
    selector: str | None = Field(
        default=None, description="Label selector of the runner pods (for the scale subresource)."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing and Degraded, with reasons.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this status describes."
    )
    last_cold_start_seconds: float | None = Field(
        default=None, ge=0, description="Seconds from the last scale-up to its first ready replica."
    )
    last_scale_up_time: datetime | None = Field(
        default=None,
        description="When replicas were last wanted after none were (creation or a wake-up).",
    )


class AIModel(KubeResource):
    """A model serving one Livepeer pipeline, kept warm on GPUs by a policy."""

    KIND: ClassVar[str] = "AIModel"
    PLURAL: ClassVar[str] = "aimodels"

    kind: str = Field(default="AIModel", description="AIModel.")
    spec: AIModelSpec = Field(description="What to serve and how to keep it warm.")
    status: AIModelStatus | None = Field(default=None, description="What the operator observed.")
