"""The sender's side: is a gateway good for the tickets it sends? Pure, over on-chain facts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SenderInfo:
    """What the TicketBroker's getSenderInfo says of a sender, in wei."""

    deposit: int
    withdraw_round: int  # non-zero: the sender is unlocking its funds
    reserve: int

    @property
    def unlocking(self) -> bool:
        return self.withdraw_round != 0


class SenderUnfit(ValueError):
    """A sender that cannot be trusted to cover its tickets, and why."""


def check_sender(info: SenderInfo, face_value: int, deposit_multiplier: int = 1) -> None:
    if info.unlocking:
        raise SenderUnfit("sender is unlocking its deposit and reserve")
    if info.reserve <= 0:
        raise SenderUnfit("sender has no reserve")
    if info.deposit <= 0:
        raise SenderUnfit("sender has no deposit")
    if face_value * deposit_multiplier > info.deposit:
        raise SenderUnfit(
            f"ticket face value {face_value} wei exceeds what the sender's deposit of "
            f"{info.deposit} wei covers"
        )


def max_float(info: SenderInfo, pending_winning_face_values: int, recipients: int = 1) -> int:
    """What a sender can still be trusted for: its reserve share minus unredeemed winners."""
    return max(0, info.reserve // max(1, recipients) - pending_winning_face_values)
