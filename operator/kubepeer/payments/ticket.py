"""A probabilistic micropayment ticket: its fields, its hash, its signature. Pure.

The hash packs the fields exactly as the TicketBroker's `getTicketHash` does:
recipient (20) | sender (20) | faceValue (32) | winProb (32) | senderNonce (32) |
recipientRandHash (32) | auxData, with auxData = leftpad32(creationRound) |
creationRoundBlockHash (64 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from coincurve import PublicKey
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import to_checksum_address
from sha3 import keccak_256

MAX_WIN_PROB = 2**256 - 1
UINT256_LIMIT = 2**256
ZERO_ADDRESS = b"\x00" * 20
# secp256k1's group order. OpenZeppelin's ECDSA (the TicketBroker's) and go-ethereum refuse
# s above half of it: for every signature (r, s) the twin (r, n - s) recovers the same
# address, and only the low-s one is redeemable.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2
SIGNED_MESSAGE_PREFIX = b"\x19Ethereum Signed Message:\n32"  # personal_sign of 32 bytes


def keccak(data: bytes) -> bytes:
    """Ethereum's keccak256. The C binding directly: validation hashes four times a
    ticket, and eth_hash's pycryptodome backend costs ~8x more per call in Python glue."""
    return keccak_256(data).digest()


class BadSignature(ValueError):
    """A signature the TicketBroker would refuse; `reason` names which rule it breaks."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_signature_shape(sig: bytes) -> None:
    """Raise BadSignature unless `sig` is 65 bytes, low-s, with v 27 or 28."""
    if len(sig) != 65:
        raise BadSignature("signature-length", f"a ticket signature is 65 bytes, not {len(sig)}")
    if sig[64] not in (27, 28):
        raise BadSignature("signature-v", f"signature v is {sig[64]}, not 27 or 28")
    s = int.from_bytes(sig[32:64], "big")
    if s > SECP256K1_HALF_N:
        raise BadSignature("signature-high-s", "signature s is in the upper half (high-s)")


def uint256(value: int) -> bytes:
    return value.to_bytes(32, "big")


def minimal_bytes(value: int) -> bytes:
    """Big-endian bytes with no leading zeros (b'' for 0), as Go's big.Int.Bytes()."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def aux_data(creation_round: int, creation_round_block_hash: bytes) -> bytes:
    """leftpad32(creationRound) | creationRoundBlockHash: always 64 bytes, because the
    TicketBroker refuses any other length ('invalid length for ticket auxData')."""
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
    def expected_value(self) -> Fraction:
        """The ticket's worth in wei, exactly as go-livepeer's big.Rat holds it:
        faceValue x winProb / maxWinProb."""
        return Fraction(self.face_value * self.win_prob, MAX_WIN_PROB)

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
        """The address that made `sig` over this ticket, as the TicketBroker recovers it.

        Raises BadSignature for any signature the contract would refuse."""
        check_signature_shape(sig)
        # coincurve (libsecp256k1) directly: this is the proxy's hot path, and
        # eth_account's checks and conversions around the same call triple its cost.
        digest = keccak(SIGNED_MESSAGE_PREFIX + self.hash)
        try:
            public = PublicKey.from_signature_and_message(
                sig[:64] + bytes([sig[64] - 27]), digest, hasher=None
            )
        except ValueError as exc:  # r or s out of range, or no point on the curve
            raise BadSignature("signature-invalid", f"signature does not recover: {exc}") from None
        return _address_of(public.format(compressed=False))


@lru_cache(maxsize=4096)
def _address_of(uncompressed_public_key: bytes) -> bytes:
    """keccak of the key, last 20 bytes; cached, as a few gateways send every ticket."""
    return keccak(uncompressed_public_key[1:])[12:]


def recipient_rand_hash(recipient_rand: int) -> bytes:
    return keccak(uint256(recipient_rand))


def is_winning(sig: bytes, recipient_rand: int, win_prob: int) -> bool:
    """A ticket wins when keccak256(sig | leftpad32(recipientRand)) < winProb."""
    return int.from_bytes(keccak(sig + uint256(recipient_rand)), "big") < win_prob
