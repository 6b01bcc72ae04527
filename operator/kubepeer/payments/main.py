"""`kubepeer payments`: the redeemer process, wired from flags and Secrets."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from prometheus_client import start_http_server
from redis import Redis
from web3 import Web3

from kubepeer.livepeer.broker import ARBITRUM_ONE_CHAIN_ID, ARBITRUM_TICKET_BROKER
from kubepeer.payments.lease import Lease
from kubepeer.payments.ledger import WINNING_STREAM
from kubepeer.payments.redeemer import Redeemer, RedeemerSettings

log = logging.getLogger("kubepeer.payments")


@dataclass(frozen=True)
class PaymentsConfig:
    redis_url: str
    rpc_url: str
    keystore: Path
    password_file: Path
    network: str = "arbitrum-one"  # or "dev": any chain id, broker given explicitly
    broker: str | None = None
    consumer: str = "redeemer-0"
    stream: str = WINNING_STREAM
    max_gas_price: int = 100 * 10**9
    confirmations: int = 1
    once: bool = False
    metrics_port: int | None = None
    lease_namespace: str | None = None  # set in a cluster: one redeemer per recipient acts


def load_account(keystore: Path, password_file: Path):  # noqa: ANN201 - LocalAccount
    """The redeemer's key, from an encrypted keystore and a password file (both mounted
    from Kubernetes Secrets). Neither the key nor the password is ever logged."""
    password = password_file.read_text().rstrip("\n")
    key = Account.decrypt(json.loads(keystore.read_text()), password)
    return Account.from_key(key)


def leader_api() -> kube_client.CoordinationV1Api:
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return kube_client.CoordinationV1Api()


def run_payments(config: PaymentsConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    w3 = Web3(Web3.HTTPProvider(config.rpc_url, request_kwargs={"timeout": 30}))
    chain_id = w3.eth.chain_id
    if config.network == "arbitrum-one" and chain_id != ARBITRUM_ONE_CHAIN_ID:
        log.error("RPC %s is chain %d, not Arbitrum One (%d)", config.rpc_url, chain_id,
                  ARBITRUM_ONE_CHAIN_ID)  # fmt: skip
        return 2
    broker = config.broker or (ARBITRUM_TICKET_BROKER if config.network == "arbitrum-one" else None)
    if broker is None:
        log.error("--broker is required on network %s", config.network)
        return 2
    account = load_account(config.keystore, config.password_file)
    redeemer = Redeemer(
        Redis.from_url(config.redis_url),
        w3,
        Web3.to_checksum_address(broker),
        account,
        RedeemerSettings(
            consumer=config.consumer,
            stream=config.stream,
            max_gas_price=config.max_gas_price,
            confirmations=config.confirmations,
        ),
    )
    if config.metrics_port:
        start_http_server(config.metrics_port)
    lease = None
    if config.lease_namespace:
        lease = Lease(
            leader_api(),
            config.lease_namespace,
            f"kubepeer-redeemer-{account.address.lower()}",
            identity=f"{socket.gethostname()}-{os.getpid()}",
        )
    log.info("redeeming as %s on chain %d via broker %s", account.address, chain_id, broker)
    if config.once:
        if lease and not lease.try_acquire():
            log.info("another redeemer holds the lease; nothing to do")
            return 0
        redeemer.run_once()
        return 0
    backoff = 1.0
    while True:
        if lease and not lease.try_acquire():
            time.sleep(lease.duration / 3)
            continue
        try:
            redeemer.run_once(block_ms=5000)
            backoff = 1.0
        except (ConnectionError, TimeoutError, OSError) as exc:  # transient: retry
            log.warning("redeemer: %s; retrying in %.0fs", exc, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 60)
