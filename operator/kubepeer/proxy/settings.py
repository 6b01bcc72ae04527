"""The proxy's settings: one object, from `KUBEPEER_*` env and the `kubepeer proxy` flags
(flags win). Every flag, its default and its help come from here (`kubepeer.flags`), and the
chart's defaults are checked against these by a test."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubepeer.proxy.chain_facts import REFRESH_SECONDS
from kubepeer.proxy.jobs import READ_IDLE_TIMEOUT, READ_TIMEOUT


class ProxySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBEPEER_", extra="forbid")

    # -- where it serves -----------------------------------------------------------------
    bind: str = Field(default="0.0.0.0:8935", description="host:port to listen on")
    public_url: str = Field(description="our service URI, as gateways dial it")
    namespace: str = Field(description="the namespace of the AIModels served")
    redis_url: str = Field(
        description="ledger, results, demand records: from a Secret through the env "
        "(KUBEPEER_REDIS_URL), since the URL may hold a password"
    )
    plaintext: bool = Field(default=False, description="h2c: TLS ends at the ingress")
    server: Literal["uvicorn", "hypercorn"] = Field(
        default="uvicorn", description="the HTTP server under the one port (hack/bench/proxy.py)"
    )
    tls_cert: Path | None = Field(
        default=None, description="certificate (a Secret); default: self-signed"
    )
    tls_key: Path | None = Field(default=None, description="its key (a Secret)")
    tls_reload: float = Field(
        default=60.0,
        ge=0,
        description="seconds between checks of --tls-cert and --tls-key for a renewed "
        "certificate, served to new connections without a restart (0: never)",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        description="serve Prometheus metrics on this port, never the gateway-facing one (0: off)",
    )
    # -- what it serves ------------------------------------------------------------------
    models_file: Path | None = Field(
        default=None,
        description="one models.json ({version, models}) instead of watching the operator's table",
    )
    apps_file: Path | None = Field(
        default=None,
        description="one apps.json ({version, apps}) instead of watching the operator's app "
        "table (LiveRunners)",
    )
    endpoints_file: Path | None = Field(
        default=None,
        description="static ready URLs per runner Service (JSON) instead of watching "
        "EndpointSlices",
    )
    livepeer_version: str = Field(
        default="0.9.1",
        description="the go-livepeer protocol version advertised (gateways compare it)",
    )
    wake: bool = Field(default=True, description="scale OnDemand models up when jobs come")
    # -- secrets, as files ---------------------------------------------------------------
    auth_secret_file: Path | None = Field(
        default=None, description="auth token HMAC key shared by replicas"
    )
    runner_token_file: Path | None = Field(
        default=None, description="the runners' AUTH_TOKEN (a Secret)"
    )
    # -- payments ------------------------------------------------------------------------
    payments: bool = Field(
        default=True, description="tickets on the TicketBroker; off: private mode, bearer token"
    )
    recipient: str | None = Field(
        default=None,
        description="our address (0x...): the ticket recipient; with --no-payments only "
        "advertised in discovery (default there: the zero address, as an offchain go-livepeer "
        "sends)",
    )
    recipient_secret_file: Path | None = Field(
        default=None, description="recipientRand secret (a Secret)"
    )
    orch_secret_file: Path | None = Field(
        default=None,
        description="the secret Live Runner apps outside the cluster register with (a Secret; "
        "go-livepeer's -orchSecret); none: dynamic registration is off",
    )
    runner_heartbeat_ttl: float = Field(
        default=20.0,
        gt=0,
        description="seconds a runner registered by heartbeat may go silent before it is "
        "removed and its sessions released (go-livepeer's 20 s)",
    )
    loopback_runners: bool = Field(
        default=False,
        description="let runners that register by heartbeat name this host's loopback "
        "addresses (one-machine setups and tests; link-local and metadata addresses never)",
    )
    bearer_token_file: Path | None = Field(
        default=None, description="private mode's token (a Secret)"
    )
    offchain_gateways: bool = Field(
        default=False,
        description="private mode: also admit jobs as an offchain go-livepeer does (an auth "
        "token from our discovery, no signature; the gateway SDK's offchain mode). Only where "
        "the network limits who reaches the proxy",
    )
    auto_adjust_price: bool = Field(
        default=True,
        description="raise quoted prices by the ticket redemption cost, as go-livepeer does",
    )
    gas_price: int = Field(
        default=10**7,
        ge=0,
        description="wei per gas a winning ticket's redemption is sized for (Arbitrum: ~0.01 gwei)",
    )
    evs_per_win: int = Field(
        default=100,
        ge=1,
        description="a winning ticket's face value in ticket EVs: tickets win with probability "
        "1/N (a dev chain's demo uses 2 to see winners after a few jobs)",
    )
    # -- limits and timers ---------------------------------------------------------------
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="largest job body")
    read_timeout: float = Field(
        default=READ_TIMEOUT,
        gt=0,
        description="seconds for a request's head and body to arrive whole, else 408 (Go's "
        "ReadTimeout); bodies over 1 MiB are read only once their credentials pass",
    )
    read_idle_timeout: float = Field(
        default=READ_IDLE_TIMEOUT,
        gt=0,
        description="seconds a job's body read by the ASGI server (over 1 MiB, chunked, "
        "HTTP/2) may send nothing, else 408",
    )
    max_queue: int = Field(default=8, ge=0, description="jobs waiting per model")
    queue_timeout: float = Field(
        default=10.0, gt=0, description="seconds a job waits for a slot, then 503"
    )
    hold_timeout: float = Field(
        default=900.0, gt=0, description="seconds a job is held while its model wakes"
    )
    demand_ttl: float = Field(
        default=60.0, gt=0, description="seconds a demand record outlives this proxy's last beat"
    )
    redis_timeout: float = Field(
        default=2.0,
        gt=0,
        description="seconds a Redis command may take before the job or discovery is refused "
        "(503, gRPC UNAVAILABLE) rather than held",
    )
    chain_refresh: float = Field(
        default=REFRESH_SECONDS,
        gt=0,
        description="seconds between reads of the chain view and senders' facts the payments "
        "process publishes (held in memory: jobs never read them)",
    )
    # -- live video and Live Runner apps --------------------------------------------------
    trickle_url_for_runner: str | None = Field(
        default=None,
        description="base URL runners and apps reach us at: trickle channels, session control "
        "(default: the public URL), as go-livepeer's -liveAITrickleHostForRunner and "
        "-liveRunnerAddr",
    )
    live_runner_proxy_url: str | None = Field(
        default=None,
        description="the template of generated proxy URLs, with one {proxy} as the last path "
        "segment or in the host (go-livepeer's -liveRunnerProxyUrl; default: "
        "<public URL>/run/{proxy})",
    )
    app_session_idle: float = Field(
        default=600.0,
        gt=0,
        description="seconds a free Live Runner session may go unused before it is released "
        "and its slot freed (a request in flight keeps it)",
    )
    live_payment_interval: float = Field(
        default=5.0,
        gt=0,
        description="seconds between a live stream's debits (go-livepeer's LivePaymentInterval)",
    )
    live_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="a live stream's watcher renews its lease this often x3; another replica "
        "adopts the stream once it lapses",
    )
