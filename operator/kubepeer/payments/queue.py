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
    tx_hash: str = ""
    tx_nonce: int = -1
    raw_tx: str = ""
    reason: str = ""
    updated: float = 0.0


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
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return TicketRecord(
            state=State(d["state"]),
            tx_hash=d.get("tx_hash", ""),
            tx_nonce=int(d.get("tx_nonce", -1)),
            raw_tx=d.get("raw_tx", ""),
            reason=d.get("reason", ""),
            updated=float(d.get("updated", 0)),
        )

    def put(self, ticket_hash: bytes, record: TicketRecord) -> None:
        fields = {k: str(v) for k, v in asdict(record).items()}
        fields["updated"] = str(time.time())
        self.redis.hset(record_key(ticket_hash), mapping=fields)
