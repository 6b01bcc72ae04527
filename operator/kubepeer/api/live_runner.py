"""LiveRunner: any container as a paid Livepeer Live Runner app, kept warm by a policy.

The fields mirror a go-livepeer runners.json entry (live-runner-wire.md 2.1: `app`, `mode`,
`capacity`, `metadata`, `version`, `proxy`, `price_info`) and take their placement and
warm policy from the same parts an AIModel uses (`workload.py`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import ClassVar, Self

from pydantic import Field, field_validator, model_validator

from kubepeer.api.aimodel import MAX_CAPACITY, AIModelStatus
from kubepeer.api.common import DecimalString, KubeModel, KubeResource, cel
from kubepeer.api.pricing import APP_NAME_PATTERN, REF_OR_PRICE, AppPrice, RefOrPrice
from kubepeer.api.workload import REPLICAS_WITHIN_MAX, WorkloadSpec

METADATA_BYTES = 1024  # go-livepeer's limit on a runner's public metadata (LR)


class AppMode(StrEnum):
    """How clients use the app (live-runner-wire.md 3, 4)."""

    PERSISTENT = "persistent"  # a session is reserved, used for a while, then stopped
    SINGLE_SHOT = "single-shot"  # each call is its own reservation


class AppPricingChoice(RefOrPrice):
    model_config = RefOrPrice.model_config | {
        "json_schema_extra": {"x-kubernetes-validations": [REF_OR_PRICE]}
    }

    price: AppPrice | None = Field(default=None, description="A price for this app alone.")


class SecretKey(KubeModel):
    """A key of a Secret in the LiveRunner's namespace."""

    name: str = Field(min_length=1, max_length=253, description="The Secret's name.")
    key: str = Field(default="orchSecret", min_length=1, max_length=253,
                     description="The key whose value is the secret.")  # fmt: skip


class ExternalOrchestrator(KubeModel):
    """A go-livepeer orchestrator each Ready replica registers with by heartbeat
    (live-runner-wire.md 2.3): Kubepeer as the GPU half under it."""

    url: str = Field(
        pattern=r"^https?://[^/\s]+(/.*)?$",
        max_length=512,
        description="Its runner-facing base URL (go-livepeer's -liveRunnerAddr), where "
        "/runners/heartbeat is.",
    )
    secret_ref: SecretKey = Field(
        description="The Secret holding its -orchSecret (read by the operator, never logged)."
    )
    runner_url: str = Field(
        default="http://{podIP}:{port}",
        max_length=512,
        description="How the orchestrator reaches a replica: {podIP}, {pod}, {namespace} and "
        "{port} are filled in. The default is the pod's address, for an orchestrator inside "
        "the cluster network; from outside, a per-replica Service or ingress name.",
    )
    insecure_skip_verify: bool = Field(
        default=False,
        description="Do not verify its TLS certificate (go-livepeer's own is self-signed).",
    )


class LiveRunnerSpec(WorkloadSpec):
    model_config = WorkloadSpec.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                REPLICAS_WITHIN_MAX,
                cel(
                    "!has(self.gpu.shareGroup)",
                    "a LiveRunner app runs in its own pods: gpu.shareGroup is for AIModels",
                    ".gpu.shareGroup",
                ),
            ]
        }
    }

    app: str = Field(
        min_length=1,
        max_length=256,
        pattern=APP_NAME_PATTERN,
        description="The app's name as clients discover it, e.g. streamdiffusion/sdxl-turbo.",
    )
    image: str = Field(min_length=1, max_length=512, description="The app's container image.")
    command: list[str] = Field(
        default_factory=list, max_length=64, description="The entrypoint, if not the image's."
    )
    args: list[str] = Field(
        default_factory=list, max_length=256, description="Arguments to the entrypoint."
    )
    port: int = Field(default=8080, ge=1, le=65535, description="The port the app listens on.")
    health_path: str = Field(
        default="/health",
        pattern=r"^/.*",
        max_length=256,
        description="The path that answers healthyStatusCode once the app can take sessions.",
    )
    healthy_status_code: int = Field(
        default=200,
        ge=200,
        le=399,
        description=(
            "The status the health path answers when healthy (go-livepeer's "
            "healthy_status_code). The kubelet's probe accepts any 2xx or 3xx."
        ),
    )
    mode: AppMode = Field(
        default=AppMode.PERSISTENT,
        description="persistent: sessions reserved and stopped. single-shot: one call each.",
    )
    capacity: int = Field(
        default=1, ge=1, le=MAX_CAPACITY, description="Sessions or calls one replica takes at once."
    )
    metadata: str | None = Field(
        default=None,
        max_length=METADATA_BYTES,
        description="Public text clients see in discovery (at most 1024 bytes of UTF-8).",
    )
    version: str | None = Field(
        default=None, max_length=128, description="The app's version, shown in discovery."
    )
    proxy: bool = Field(
        default=False,
        description="The app asks the orchestrator for proxy URLs (go-livepeer's `proxy`).",
    )
    pricing: AppPricingChoice | None = Field(
        default=None,
        description="What a session costs. Omitted: the Pricing objects in this namespace decide.",
    )
    register_with: list[ExternalOrchestrator] = Field(
        default_factory=list,
        max_length=8,
        description="External go-livepeer orchestrators each Ready replica registers with.",
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_fits(cls, text: str | None) -> str | None:
        if text is not None and len(text.encode()) > METADATA_BYTES:
            raise ValueError(
                f"metadata is {len(text.encode())} bytes of UTF-8; at most {METADATA_BYTES}"
            )
        if text is not None and "\ufffd" in text:
            raise ValueError("metadata holds U+FFFD, the mark of text that was not valid UTF-8")
        return text

    @model_validator(mode="after")
    def _own_pods(self) -> Self:
        if self.gpu.share_group is not None:
            raise ValueError(
                "a LiveRunner app runs in its own pods: gpu.shareGroup is for AIModels"
            )
        return self


class AdvertisedPrice(KubeModel):
    """The app's price as discovery advertises it (live-runner-wire.md 8)."""

    wei: str = Field(pattern=r"^[0-9]+$", max_length=40, description="Wei per unit.")
    unit: str = Field(
        description="seconds, 720p-pixel-seconds (a pixel of nominal 720p30) or fixed.",
        json_schema_extra={"enum": ["seconds", "720p-pixel-seconds", "fixed"]},
    )
    usd_per_eth: DecimalString | None = Field(
        default=None, description="The ETH/USD rate a USD price was converted at."
    )
    feed: str | None = Field(
        default=None, max_length=42, description="The Chainlink aggregator the rate came from."
    )
    round_id: str | None = Field(
        default=None, pattern=r"^[0-9]+$", max_length=30, description="The feed's round read."
    )
    read_at: datetime | None = Field(default=None, description="When the feed was read.")


class Registration(KubeModel):
    """The replicas registered with one external orchestrator."""

    orchestrator: str = Field(max_length=512, description="Its URL, as registerWith names it.")
    registered: int = Field(default=0, ge=0, description="Replicas registered and kept alive.")
    last_heartbeat: datetime | None = Field(
        default=None, description="When a heartbeat last succeeded."
    )
    last_error: str | None = Field(
        default=None, max_length=1024, description="Why the last failing request failed."
    )


class LiveRunnerStatus(AIModelStatus):
    registrations: list[Registration] = Field(
        default_factory=list, description="Per external orchestrator in registerWith."
    )
    price: AdvertisedPrice | None = Field(
        default=None,
        description="The price in wei clients are offered; absent while none can be computed "
        "(a USD price before the first ETH/USD reading, or under 1 wei).",
    )


class LiveRunner(KubeResource):
    """A container served as a paid Livepeer Live Runner app, kept warm on GPUs by a policy."""

    KIND: ClassVar[str] = "LiveRunner"
    PLURAL: ClassVar[str] = "liverunners"

    kind: str = Field(default="LiveRunner", description="LiveRunner.")
    spec: LiveRunnerSpec = Field(description="The app, its price and how to keep it warm.")
    status: LiveRunnerStatus | None = Field(
        default=None, description="What the operator observed: an AIModel's status, and the price."
    )
