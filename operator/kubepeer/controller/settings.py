"""Operator settings: one object, from env (KUBEPEER_*) and the `kubepeer operator` flags."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubepeer import __version__
from kubepeer.livepeer.capabilities import Pipeline

FIELD_MANAGER = "kubepeer-operator"
DEFAULT_RUNNER_IMAGE = f"ghcr.io/kubepeer/runner:{__version__}"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBEPEER_", env_nested_delimiter="__")

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty watches the whole cluster."
    )
    runner_image: str = Field(
        default=DEFAULT_RUNNER_IMAGE, description="Runner image for pipelines not listed below."
    )
    runner_images: dict[Pipeline, str] = Field(
        default_factory=dict, description="Runner image per pipeline, overriding runner_image."
    )
    warm_priority_class: str = Field(
        default="kubepeer-warm", description="PriorityClass of Always runners."
    )
    cold_priority_class: str = Field(
        default="kubepeer-cold",
        description="PriorityClass of OnDemand runners: lower, so warm models preempt them.",
    )
    warm_priority: int = Field(default=1000, description="Value of the warm PriorityClass.")
    cold_priority: int = Field(default=100, description="Value of the cold PriorityClass.")

    runner_port: int = Field(default=8000, description="Port the runner serves on.")
    model_dir: str = Field(default="/models", description="Where runners find model weights.")
    auth_secret: str = Field(
        default="kubepeer-runner-auth",
        description="Secret (one per namespace) holding the runners' AUTH_TOKEN.",
    )
    # Probes: big models take minutes to load and must not be killed while they do.
    startup_timeout_seconds: int = Field(
        default=900, ge=60, description="How long a runner may take to load before it is killed."
    )
    probe_period_seconds: int = Field(default=5, ge=1, description="Probe period.")
    liveness_failure_threshold: int = Field(default=3, ge=1, description="Failed /health in a row.")

    # The Revenue warm policy (kubepeer/controller/revenue.py).
    gpu_price_eth_per_hour: float = Field(
        default=0.0006,
        ge=0,
        description=(
            "What an hour of one GPU costs, in ETH (0.0006: about $2 at $3,000 an ETH): a "
            "Revenue model is kept warm while its expected earnings beat it."
        ),
    )
    gpu_prices_eth_per_hour: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Per GPU product (the node label nvidia.com/gpu.product), in ETH an hour; a model "
            "pinned to products (gpu.products) is costed at the first listed here."
        ),
    )
    gateway_patience_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long a gateway waits for a job before it tries another orchestrator.",
    )
    revenue_interval_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How often Revenue models are decided again (earnings are hourly).",
    )

    status_interval_seconds: float = Field(
        default=5.0,
        gt=0,
        description=(
            "How often idle OnDemand models and failed reconciles are rechecked. Status "
            "follows the watches, not this clock."
        ),
    )
    nodes_fixed: bool = Field(
        default=False,
        description=(
            "The cluster never adds nodes (no autoscaler): a model no existing node can take "
            "is Failed. Otherwise it is Pending, since a GPU pool may scale up from zero."
        ),
    )
    orchestrator_secrets: list[str] = Field(
        default_factory=lambda: ["kubepeer-orchestrator"],
        description="Secrets a LiveRunner's registerWith may name: the only Secrets the "
        "operator may read (RBAC resourceNames).",
    )
    workers: int = Field(default=16, ge=1, description="Threads running handlers' API calls.")
    redis_url: str | None = Field(
        default=None,
        description="Redis the proxy records demand in; needed to scale OnDemand models to zero.",
    )
    proxy_url: str = Field(
        default="http://kubepeer-proxy:8000",
        description="URL go-livepeer reaches the proxy at (aiModels.json `url`).",
    )
    peering_name: str = Field(default="kubepeer", description="kopf peering object name.")
    peering_priority: int | None = Field(
        default=None,
        description=(
            "kopf peering priority; the highest acts, the others pause. Default: random, "
            "because replicas of equal priority would all pause."
        ),
    )
    standalone: bool = Field(default=False, description="Run without peering (one replica only).")

    def image_for(self, pipeline: Pipeline) -> str:
        return self.runner_images.get(pipeline, self.runner_image)
