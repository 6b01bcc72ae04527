"""The sender's side: is a gateway good for the tickets it sends? Pure, over on-chain facts.

As go-livepeer's orchestrator judges it (`pm/sendermonitor.go`, `pm/recipient.go`): the face
value of the params we issue is capped by the sender's max float (our share of its reserve),
and its tickets are refused once its deposit and reserve are about to unlock.
"""

from __future__ import annotations

from dataclasses import dataclass

# go-livepeer ignores what is pending redemption once the deposit covers it this many times.
MIN_DEPOSIT_PENDING_RATIO = 3


@dataclass(frozen=True)
class SenderInfo:
    """What the TicketBroker says of a sender, in wei: getSenderInfo, and our allocation of
    its reserve (claimableReserve(sender, us): (funds + claimed this round) / active pool
    size - what we claimed this round; 0 while we are not active)."""

    deposit: int
    withdraw_round: int  # non-zero: the sender is unlocking its funds
    reserve: int
    reserve_alloc: int = 0

    @property
    def unlocking(self) -> bool:
        return self.withdraw_round != 0


class SenderUnfit(ValueError):
    """A sender that cannot be trusted to cover its tickets, and why."""


def check_sender(
    info: SenderInfo, face_value: int, last_initialized_round: int, sender: str = "",
    deposit_multiplier: int = 1,
) -> None:  # fmt: skip
    """Tickets from this sender may be accepted. go-livepeer's ValidateSender refuses a
    sender whose unlock ends by the round after the last initialized one, in its words;
    the rest holds what the broker needs to pay a winner."""
    if info.unlocking and info.withdraw_round <= last_initialized_round + 1:
        raise SenderUnfit(f"deposit and reserve for sender {sender} is set to unlock soon")
    if info.reserve <= 0:
        raise SenderUnfit("sender has no reserve")
    if info.deposit <= 0:
        raise SenderUnfit("sender has no deposit")
    if face_value * deposit_multiplier > info.deposit:
        raise SenderUnfit(
            f"ticket face value {face_value} wei exceeds what the sender's deposit of "
            f"{info.deposit} wei covers"
        )


def max_float(info: SenderInfo, pending: int = 0) -> int:
    """What a sender can be trusted for in one ticket (go-livepeer's maxFloat): our reserve
    allocation, less the face value of its winners pending redemption unless its deposit
    covers them MIN_DEPOSIT_PENDING_RATIO times."""
    if pending > 0 and info.deposit >= MIN_DEPOSIT_PENDING_RATIO * pending:
        pending = 0
    return max(0, info.reserve_alloc - pending)
