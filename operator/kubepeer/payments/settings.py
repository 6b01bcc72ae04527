"""The payments process's settings: one object, from `KUBEPEER_*` env and the `kubepeer
payments` flags (flags win), each default written once (the redeemer's own where it has
one). The chain's URL is neither: it may hold an API key, so it comes from a Secret, as a
file (`--rpc-url-file`) or `KUBEPEER_RPC_URL` (main.load_rpc_url), never from a flag."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubepeer.livepeer.price_feed import ARBITRUM_ETH_USD
from kubepeer.payments.ledger import WINNING_STREAM
from kubepeer.payments.redeemer import RedeemerSettings


class PaymentsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBEPEER_", extra="forbid")

    redis_url: str = Field(
        description="the ledger's Redis: from a Secret through the env (KUBEPEER_REDIS_URL)"
    )
    rpc_url_file: Path | None = Field(
        default=None,
        description="file (a Secret) holding the JSON-RPC URL of Arbitrum or a dev chain; "
        "else $KUBEPEER_RPC_URL. Never a flag: providers put API keys in it",
    )
    keystore: Path = Field(description="the orchestrator's encrypted key (a Secret)")
    password_file: Path = Field(description="its password (a Secret)")
    network: Literal["arbitrum-one", "dev"] = Field(
        default="arbitrum-one", description="dev: any chain id, --controller given"
    )
    controller: str | None = Field(
        default=None, description="Livepeer Controller address (default: Arbitrum One's)"
    )
    consumer: str = Field(
        default=RedeemerSettings.consumer, description="this replica's stream consumer name"
    )
    stream: str = Field(default=WINNING_STREAM, description="Redis stream of winning tickets")
    max_fee_per_gas: int = Field(
        default=RedeemerSettings.max_fee_per_gas,
        ge=0,
        description="wei per gas, the EIP-1559 ceiling (1 gwei: for Arbitrum One)",
    )
    stuck_after: float = Field(
        default=RedeemerSettings.stuck_after,
        gt=0,
        description="seconds before an unmined transaction is replaced with higher fees",
    )
    confirmations: int = Field(
        default=RedeemerSettings.confirmations, ge=0, description="blocks before redeemed"
    )
    price_feed: str | None = Field(
        default=None,
        pattern=r"^0x[0-9a-fA-F]{40}$",
        description="Chainlink ETH/USD aggregator read each hour for Live Runner prices in USD "
        "(default on arbitrum-one: go-livepeer's, " + ARBITRUM_ETH_USD + "; none on dev)",
    )
    reward: bool = Field(default=False, description="call reward() once per round")
    once: bool = Field(default=False, description="handle what is queued, then exit")
    metrics_port: int | None = Field(
        default=None, description="serve Prometheus metrics on this port"
    )
    lease_namespace: str | None = Field(
        default=None, description="hold a Lease here, so that one redeemer replica acts"
    )
