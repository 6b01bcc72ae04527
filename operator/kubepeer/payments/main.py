"""`kubepeer payments`: the chain watcher, the redeemer and reward calling, wired from flags
and Secrets.

The RPC URL (providers put API keys in it) comes from a file mounted from a Secret or from
`KUBEPEER_RPC_URL` (a secretKeyRef), never a flag, and every log line has it, its path,
query and credentials replaced by `[rpc-url]`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from eth_account import Account
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from prometheus_client import start_http_server
from redis import Redis
from web3 import Web3

from kubepeer.livepeer.broker import ARBITRUM_CONTROLLER, ARBITRUM_ONE_CHAIN_ID
from kubepeer.livepeer.price_feed import ARBITRUM_ETH_USD, FeedWatch
from kubepeer.payments.lease import Lease, LeaseKeeper
from kubepeer.payments.redeemer import (
    TRANSPORT_ERRORS,
    LeaseLost,
    Redeemer,
    RedeemerSettings,
)
from kubepeer.payments.reward import RewardCaller
from kubepeer.payments.senders import SenderWatch
from kubepeer.payments.settings import PaymentsSettings
from kubepeer.payments.watcher import ChainWatcher, contract_address

log = logging.getLogger("kubepeer.payments")

RPC_URL_ENV = "KUBEPEER_RPC_URL"


def load_account(keystore: Path, password_file: Path):  # noqa: ANN201 - LocalAccount
    """The redeemer's key, from an encrypted keystore and a password file (both mounted
    from Kubernetes Secrets). Neither the key nor the password is ever logged."""
    password = password_file.read_text().rstrip("\n")
    key = Account.decrypt(json.loads(keystore.read_text()), password)
    return Account.from_key(key)


def load_rpc_url(path: Path | None) -> str:
    url = path.read_text().strip() if path else os.environ.get(RPC_URL_ENV, "").strip()
    if not url:
        raise ValueError(
            f"no RPC URL: mount it from a Secret (--rpc-url-file) or set {RPC_URL_ENV}"
        )
    return url


def secret_parts(url: str) -> list[str]:
    """Every piece of an RPC URL that may carry a key, longest first."""
    parts = urlsplit(url)
    pieces = [url, parts.path if len(parts.path) > 1 else "", parts.query,
              parts.password or "", parts.username or ""]  # fmt: skip
    return sorted({p for p in pieces if p}, key=len, reverse=True)


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then blanks out the RPC URL's secrets (exception texts included:
    HTTP client errors quote the URL's path)."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "[rpc-url]")
        return text


def setup_logging(secrets: list[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", secrets)
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def leader_api() -> kube_client.CoordinationV1Api:
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return kube_client.CoordinationV1Api()


def run_payments(config: PaymentsSettings) -> int:
    try:
        rpc_url = load_rpc_url(config.rpc_url_file)
    except (OSError, ValueError) as exc:
        setup_logging([])
        log.error("%s", exc)
        return 2
    setup_logging(secret_parts(rpc_url))
    try:
        return _run(config, rpc_url)
    except Exception:
        log.exception("payments stopped")  # through the redacting formatter
        return 1


def _run(config: PaymentsSettings, rpc_url: str) -> int:
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    chain_id = w3.eth.chain_id
    arbitrum = config.network == "arbitrum-one"
    if arbitrum and chain_id != ARBITRUM_ONE_CHAIN_ID:
        log.error("the RPC is chain %d, not Arbitrum One (%d)", chain_id, ARBITRUM_ONE_CHAIN_ID)
        return 2
    controller = config.controller or (ARBITRUM_CONTROLLER if arbitrum else None)
    if controller is None:
        log.error("--controller is required on network %s", config.network)
        return 2
    controller = Web3.to_checksum_address(controller)
    account = load_account(config.keystore, config.password_file)
    # Well above the redeemer's 2 s wait for new entries, which a 5 s default could not hold
    # on a loaded machine.
    redis = Redis.from_url(config.redis_url, socket_timeout=30)
    keeper = None
    if config.lease_namespace:
        lease = Lease(
            leader_api(),
            config.lease_namespace,
            f"kubepeer-redeemer-{account.address.lower()}",
            identity=f"{socket.gethostname()}-{os.getpid()}",
        )
        keeper = LeaseKeeper(lease)
        keeper.renew()
        keeper.start()
    may_send = keeper.held if keeper else (lambda: True)
    watcher = ChainWatcher(w3, controller, account.address, arbitrum=arbitrum)
    if not config.once:  # senders' deposits and reserves for every proxy replica
        SenderWatch(
            Redis.from_url(config.redis_url, socket_timeout=30),
            ChainWatcher(Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30})),
                         controller, account.address, arbitrum=arbitrum).sender_info,
        ).start()  # fmt: skip
    broker = contract_address(w3, controller, "TicketBroker")
    settings = RedeemerSettings(
        consumer=config.consumer,
        stream=config.stream,
        max_fee_per_gas=config.max_fee_per_gas,
        stuck_after=config.stuck_after,
        confirmations=config.confirmations,
    )
    redeemer = Redeemer(
        redis, w3, broker, account, settings, l1_block=watcher.l1_block, may_send=may_send
    )
    rewards = None
    if config.reward:
        rewards = RewardCaller(
            redis, w3, contract_address(w3, controller, "BondingManager"), account,
            config.max_fee_per_gas, may_send=may_send,
        )  # fmt: skip
    feed_address = config.price_feed or (ARBITRUM_ETH_USD if arbitrum else None)
    feed = FeedWatch(w3, feed_address, redis) if feed_address else None
    if config.metrics_port:
        start_http_server(config.metrics_port)
    log.info("redeeming as %s on chain %d via broker %s", account.address, chain_id, broker)

    def one_pass(block_ms: int) -> None:
        view = watcher.publish(redis)  # every replica keeps the shared view fresh
        if feed is not None:  # ETH/USD for Live Runner prices, each hour
            feed.maybe_refresh()
        if not may_send():
            return
        if rewards is not None:
            rewards.maybe_reward(view)
        redeemer.run_once(block_ms=block_ms)

    if config.once:
        try:
            one_pass(0)
        except LeaseLost as exc:
            log.info("%s", exc)
        return 0
    backoff = 1.0
    while True:
        try:
            one_pass(2000)
            backoff = 1.0
            if not may_send():
                time.sleep(keeper.interval if keeper else 1.0)
        except LeaseLost as exc:
            log.warning("%s", exc)
        except Exception as exc:  # the RPC or Redis is away, or worse: back off, never crash
            transport = isinstance(exc, TRANSPORT_ERRORS)  # expected: no traceback
            log.warning("payments pass failed (%s); retrying in %.0fs", exc, backoff,
                        exc_info=not transport)  # fmt: skip
            time.sleep(backoff)
            backoff = min(backoff * 2, 60)
