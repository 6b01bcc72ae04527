"""AIModel: one model serving one Livepeer pipeline, kept warm by a policy."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Self

from pydantic import Field, model_validator

from kubepeer.api.common import Condition, KubeModel, KubeResource, cel
from kubepeer.api.pricing import (
    REF_OR_PRICE,
    UNIT_MUST_FIT,
    USD_NEEDS_RATE,
    Currency,
    Price,
    RefOrPrice,
    cel_unit_fits,
    unit_mismatch,
)
from kubepeer.api.workload import REPLICAS_WITHIN_MAX, WorkloadSpec
from kubepeer.livepeer.capabilities import OptimizationFlag, Pipeline, unit_fits

MAX_CAPACITY = 64


class PricingChoice(RefOrPrice):
    model_config = RefOrPrice.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                REF_OR_PRICE,
                cel(
                    "!has(self.price) || self.price.currency != 'USD' || has(self.price.usdPerEth)",
                    USD_NEEDS_RATE,
                    ".price",
                ),
            ]
        }
    }

    price: Price | None = Field(default=None, description="A price for this model alone.")

    @model_validator(mode="after")
    def _usd_has_a_rate(self) -> Self:
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


class AIModelSpec(WorkloadSpec):
    model_config = WorkloadSpec.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                REPLICAS_WITHIN_MAX,
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
    pricing: PricingChoice | None = Field(
        default=None,
        description="What a job costs. Omitted: the Pricing objects in this namespace decide.",
    )
    model_cache: ModelCache | None = Field(
        default=None, description="The volume holding model weights. Omitted: an emptyDir."
    )

    @model_validator(mode="after")
    def _inline_price_unit_fits(self) -> Self:
        price = self.pricing.price if self.pricing else None
        if price and price.unit and not unit_fits(self.pipeline, price.unit):
            raise ValueError("pricing.price." + unit_mismatch(self.pipeline, price.unit))
        return self


class Phase(StrEnum):
    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    IDLE = "Idle"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class Earnings(KubeModel):
    """The last complete hour of the model's earnings records (`contracts/earnings.py`)."""

    hour: datetime = Field(description="When the hour began.")
    earned_wei: str = Field(
        pattern=r"^[0-9]+$",
        description="What its jobs earned: fees at the tickets' expected value, in wei.",
    )
    jobs: int = Field(ge=0, description="Jobs served.")
    cold_waits: int = Field(ge=0, description="Of them, jobs that waited on a cold start.")
    refused: int = Field(ge=0, description="Jobs refused for capacity.")


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
    earnings: Earnings | None = Field(
        default=None, description="The last complete hour of its earnings, when on record."
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
