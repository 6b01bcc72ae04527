"""The chain watcher: what the chain says now, read once and shared with every replica.

It reads the L1 block number (on Arbitrum from the `l1BlockNumber` field Arbitrum adds to
its blocks: `eth_blockNumber` there is the L2 block, which runs ~40x faster, while ticket
expiration blocks and rounds count L1 blocks), the RoundsManager's current round, whether it
is initialized, the last initialized round and its block hash, and whether our address is
in the BondingManager's active set, and the gas price ticket face values must cover. It
writes that `ChainView` to Redis, where the proxy replicas and the redeemer read it. It also
reads senders' deposits and reserves when asked (`sender_info`, served by senders.py).
Contracts are found through the Controller, as Livepeer's own contracts find each other.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from eth_utils import keccak
from web3 import Web3

from kubepeer.livepeer.broker import (
    BONDING_MANAGER_ABI,
    CONTROLLER_ABI,
    ROUNDS_MANAGER_ABI,
    TICKET_BROKER_ABI,
)
from kubepeer.payments.ledger import PREFIX
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.sender import SenderInfo

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

CHAIN_VIEW_KEY = f"{PREFIX}:chain"
ZERO_HASH = b"\x00" * 32


def contract_address(w3: Web3, controller: str, name: str) -> str:
    """Where the Controller says `name` lives (its registry is keyed by keccak256(name))."""
    registry = w3.eth.contract(address=controller, abi=CONTROLLER_ABI)
    return registry.functions.getContract(keccak(text=name)).call()


class ChainWatcher:
    def __init__(self, w3: Web3, controller: str, recipient: str, arbitrum: bool) -> None:
        self.w3, self.recipient, self.arbitrum = w3, recipient, arbitrum
        self.rounds = w3.eth.contract(
            address=contract_address(w3, controller, "RoundsManager"), abi=ROUNDS_MANAGER_ABI
        )
        self.bonding = w3.eth.contract(
            address=contract_address(w3, controller, "BondingManager"), abi=BONDING_MANAGER_ABI
        )
        self.broker = w3.eth.contract(
            address=contract_address(w3, controller, "TicketBroker"), abi=TICKET_BROKER_ABI
        )

    def l1_block(self) -> int:
        if not self.arbitrum:
            return self.w3.eth.block_number  # a dev chain is its own L1
        block = self.w3.provider.make_request("eth_getBlockByNumber", ["latest", False])
        if "error" in block or "l1BlockNumber" not in (block.get("result") or {}):
            raise RuntimeError(f"the RPC's latest block has no l1BlockNumber: {block}")
        return int(block["result"]["l1BlockNumber"], 16)

    def read(self) -> ChainView:
        rounds = self.rounds.functions
        current = rounds.currentRound().call()
        creation = rounds.lastInitializedRound().call()
        block_hash = bytes(rounds.blockHashForRound(creation).call())
        if block_hash == ZERO_HASH and creation > 0:
            # Some Arbitrum L1 blocks came with zero hashes; go-livepeer then issues params
            # for the round before, whose hash the broker still accepts.
            creation -= 1
            block_hash = bytes(rounds.blockHashForRound(creation).call())
        return ChainView(
            l1_block=self.l1_block(),
            current_round=current,
            creation_round=creation,
            creation_round_block_hash=block_hash,
            round_initialized=rounds.currentRoundInitialized().call(),
            active=self.bonding.functions.isActiveTranscoder(self.recipient).call(),
            gas_price=self.w3.eth.gas_price,
        )

    def sender_info(self, sender: bytes) -> SenderInfo:
        """What the broker says of `sender`, and our allocation of its reserve."""
        address = Web3.to_checksum_address(sender)
        broker = self.broker.functions
        (deposit, withdraw_round), (funds, _) = broker.getSenderInfo(address).call()
        alloc = broker.claimableReserve(address, self.recipient).call()
        return SenderInfo(deposit=deposit, withdraw_round=withdraw_round, reserve=funds,
                          reserve_alloc=alloc)  # fmt: skip

    def publish(self, redis: Redis) -> ChainView:
        view = self.read()
        save_view(redis, view)
        return view


def save_view(redis: Redis, view: ChainView, now: float | None = None) -> None:
    fields = asdict(view)
    fields["creation_round_block_hash"] = view.creation_round_block_hash.hex()
    fields["seen_at"] = time.time() if now is None else now
    redis.set(CHAIN_VIEW_KEY, json.dumps(fields))


def load_view(redis: Redis, max_age: float = 60.0, now: float | None = None) -> ChainView | None:
    """The watcher's last view, or None when there is none or it is older than `max_age`
    seconds (a stalled watcher must not let params be issued against an old block)."""
    return parse_view(redis.get(CHAIN_VIEW_KEY), max_age, now)


def parse_view(raw: bytes | None, max_age: float = 60.0,
               now: float | None = None) -> ChainView | None:  # fmt: skip
    """`load_view` of the value read at CHAIN_VIEW_KEY."""
    if raw is None:
        return None
    fields = json.loads(raw)
    seen_at = fields.pop("seen_at")
    if (time.time() if now is None else now) - seen_at > max_age:
        return None
    fields["creation_round_block_hash"] = bytes.fromhex(fields["creation_round_block_hash"])
    return ChainView(**fields)
