"""Winning tickets on their way to the chain: what is queued, and each one's durable state.

A ticket's state lives in Redis under `kubepeer:ticket:{hash}` and moves
pending -> submitted (with the signed transaction, its hash and nonce) -> redeemed | failed.
It is written *before* the step it describes, so a redeemer killed at any point finds,
on restart, enough to finish the job without losing the ticket or paying gas twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from kubepeer.payments.ticket import Ticket

if TYPE_CHECKING:
    from redis import Redis

    from kubepeer.payments.validator import AcceptedTicket


@dataclass(frozen=True)
class WinningTicket:
    """Everything `redeemWinningTicket` needs, serialisable to the stream."""

    ticket: Ticket
    sig: bytes
    recipient_rand: int
    expiration_block: int

    @classmethod
    def from_accepted(cls, accepted: AcceptedTicket) -> WinningTicket:
        return cls(
            ticket=accepted.ticket,
            sig=accepted.sig,
            recipient_rand=accepted.recipient_rand,
            expiration_block=accepted.expiration_block,
        )

    @property
    def hash(self) -> bytes:
        return self.ticket.hash

    def to_json(self) -> str:
        t = self.ticket
        return json.dumps(
            {
                "recipient": t.recipient.hex(),
                "sender": t.sender.hex(),
                "faceValue": str(t.face_value),
                "winProb": str(t.win_prob),
                "senderNonce": t.sender_nonce,
                "recipientRandHash": t.recipient_rand_hash.hex(),
                "creationRound": t.creation_round,
                "creationRoundBlockHash": t.creation_round_block_hash.hex(),
                "sig": self.sig.hex(),
                "recipientRand": str(self.recipient_rand),
                "expirationBlock": self.expiration_block,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> WinningTicket:
        d = json.loads(text)
        return cls(
            ticket=Ticket(
                recipient=bytes.fromhex(d["recipient"]),
                sender=bytes.fromhex(d["sender"]),
                face_value=int(d["faceValue"]),
                win_prob=int(d["winProb"]),
                sender_nonce=int(d["senderNonce"]),
                recipient_rand_hash=bytes.fromhex(d["recipientRandHash"]),
                creation_round=int(d["creationRound"]),
                creation_round_block_hash=bytes.fromhex(d["creationRoundBlockHash"]),
            ),
            sig=bytes.fromhex(d["sig"]),
            recipient_rand=int(d["recipientRand"]),
            expiration_block=int(d["expirationBlock"]),
        )


class State(StrEnum):
    PENDING = "pending"
    SUBMITTED = "submitted"
    REDEEMED = "redeemed"
    FAILED = "failed"


@dataclass(frozen=True)
class TicketRecord:
    state: State
    # While submitted: every transaction signed for it at `tx_nonce` (a stuck one is
    # replaced at the same nonce with higher fees, and any of them may be the one mined),
    # the latest one's raw bytes and fees, and the tickets sharing it (a batch).
    tx_hashes: tuple[str, ...] = ()
    tx_nonce: int = -1
    raw_tx: str = ""
    max_fee: int = 0
    priority_fee: int = 0
    gas: int = 0
    batch: tuple[str, ...] = ()
    amount_paid: int = 0  # wei, from the broker's WinningTicketTransfer event
    reason: str = ""
    attempts: int = 0  # sends that did not redeem it, and unexpected errors
    updated: float = 0.0

    @property
    def tx_hash(self) -> str:
        return self.tx_hashes[-1] if self.tx_hashes else ""


_LISTS = ("tx_hashes", "batch")
_INTS = ("tx_nonce", "max_fee", "priority_fee", "gas", "amount_paid", "attempts")


def record_key(ticket_hash: bytes) -> str:
    return f"kubepeer:ticket:0x{ticket_hash.hex()}"


class TicketBook:
    """The durable state of every winning ticket, in Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def get(self, ticket_hash: bytes) -> TicketRecord | None:
        raw = self.redis.hgetall(record_key(ticket_hash))
        if not raw:
            return None
        d: dict = {k.decode(): v.decode() for k, v in raw.items()}
        fields = {name: d[name] for name in ("raw_tx", "reason") if name in d}
        fields.update({name: tuple(json.loads(d[name])) for name in _LISTS if name in d})
        fields.update({name: int(d[name]) for name in _INTS if name in d})
        return TicketRecord(state=State(d["state"]), updated=float(d.get("updated", 0)), **fields)

    def put(self, ticket_hash: bytes, record: TicketRecord) -> None:
        fields = {k: str(v) for k, v in asdict(record).items() if k not in _LISTS}
        fields.update({name: json.dumps(list(getattr(record, name))) for name in _LISTS})
        fields["updated"] = str(time.time())
        self.redis.hset(record_key(ticket_hash), mapping=fields)
