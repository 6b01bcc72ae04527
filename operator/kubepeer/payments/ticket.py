"""A probabilistic micropayment ticket: its fields, its hash, its signature. Pure.

The hash packs the fields exactly as the TicketBroker's `getTicketHash` does:
recipient (20) | sender (20) | faceValue (32) | winProb (32) | senderNonce (32) |
recipientRandHash (32) | auxData, with auxData = leftpad32(creationRound) |
creationRoundBlockHash, or empty when both are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak, to_checksum_address

MAX_WIN_PROB = 2**256 - 1
ZERO_ADDRESS = b"\x00" * 20


def uint256(value: int) -> bytes:
    return value.to_bytes(32, "big")


def minimal_bytes(value: int) -> bytes:
    """Big-endian bytes with no leading zeros (b'' for 0), as Go's big.Int.Bytes()."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def aux_data(creation_round: int, creation_round_block_hash: bytes) -> bytes:
    """leftpad32(creationRound) | creationRoundBlockHash; empty when both are zero."""
    if creation_round == 0 and not any(creation_round_block_hash):
        return b""
    return uint256(creation_round) + creation_round_block_hash


@dataclass(frozen=True)
class Ticket:
    recipient: bytes  # 20 bytes
    sender: bytes  # 20 bytes
    face_value: int  # wei
    win_prob: int  # out of MAX_WIN_PROB
    sender_nonce: int
    recipient_rand_hash: bytes  # 32 bytes
    creation_round: int = 0
    creation_round_block_hash: bytes = b"\x00" * 32

    @property
    def aux_data(self) -> bytes:
        return aux_data(self.creation_round, self.creation_round_block_hash)

    @property
    def hash(self) -> bytes:
        return keccak(
            self.recipient
            + self.sender
            + uint256(self.face_value)
            + uint256(self.win_prob)
            + uint256(self.sender_nonce)
            + self.recipient_rand_hash
            + self.aux_data
        )

    @property
    def expected_value(self) -> int:
        """The ticket's worth in wei, rounded down: faceValue x winProb / maxWinProb."""
        return self.face_value * self.win_prob // MAX_WIN_PROB

    def abi_tuple(self) -> tuple:
        """The ticket as the TicketBroker's `Ticket` struct argument."""
        return (
            to_checksum_address(self.recipient),
            to_checksum_address(self.sender),
            self.face_value,
            self.win_prob,
            self.sender_nonce,
            self.recipient_rand_hash,
            self.aux_data,
        )

    def sign(self, private_key: bytes) -> bytes:
        """The sender's signature: personal_sign over the ticket hash (v is 27 or 28)."""
        signed = Account.sign_message(encode_defunct(primitive=self.hash), private_key)
        return signed.signature

    def signer(self, sig: bytes) -> bytes:
        """The address that made `sig` over this ticket (raises ValueError if malformed)."""
        if len(sig) != 65 or sig[64] not in (27, 28):
            raise ValueError("a ticket signature is 65 bytes ending in v = 27 or 28")
        address = Account.recover_message(encode_defunct(primitive=self.hash), signature=sig)
        return bytes.fromhex(address[2:])


def recipient_rand_hash(recipient_rand: int) -> bytes:
    return keccak(uint256(recipient_rand))


def is_winning(sig: bytes, recipient_rand: int, win_prob: int) -> bool:
    """A ticket wins when keccak256(sig | leftpad32(recipientRand)) < winProb."""
    return int.from_bytes(keccak(sig + uint256(recipient_rand)), "big") < win_prob
