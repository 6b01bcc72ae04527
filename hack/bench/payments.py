#!/usr/bin/env python3
"""Payment benchmarks, each printed against a baseline measured in the same run.

1. Tickets validated per second on one core (the proxy's hot path), against the bare
   cost of recovering one signature (libsecp256k1 alone), which validation cannot avoid.
2. Redemption gas per ticket, single `redeemWinningTicket` calls against one
   `batchRedeemWinningTickets`, on the Hardhat dev chain with our test TicketBroker.

Run: .venv/bin/python hack/bench/payments.py [--tickets 2000] [--redeem 8]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from coincurve import PublicKey
from eth_account import Account

from kubepeer.livepeer import wire
from kubepeer.payments.gateway import sign_payment
from kubepeer.payments.recipient import RecipientSecret, ticket_params
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.ticket import MAX_WIN_PROB, SIGNED_MESSAGE_PREFIX, keccak
from kubepeer.payments.validator import PaymentContext, ValidPayment, check_payment
from kubepeer_dev.devchain import ETH, DevChain

REPO = Path(__file__).resolve().parents[2]

PRICE = (1000, 1)


def context(
    recipient: bytes, secret: RecipientSecret, l1_block: int, round_number: int, round_hash: bytes
) -> PaymentContext:
    view = ChainView(l1_block=l1_block, current_round=round_number, creation_round=round_number,
                     creation_round_block_hash=round_hash)  # fmt: skip
    return PaymentContext(recipient, secret, view, issued_prices=lambda _: {Fraction(*PRICE)})


def validated(header: str, ctx: PaymentContext) -> ValidPayment:
    outcome = check_payment(header, ctx)
    assert isinstance(outcome, ValidPayment), outcome
    return outcome


def validation_rate(count: int, per_payment: int = 1) -> None:
    """`count` tickets, `per_payment` to a payment (1: the worst case, every ticket paying
    for its own header decoding and recipientRand)."""
    orch, gateway = Account.create(), Account.create()
    recipient, sender = bytes.fromhex(orch.address[2:]), bytes.fromhex(gateway.address[2:])
    secret = RecipientSecret.generate()
    params = ticket_params(
        secret, recipient, sender, face_value=10**16, win_prob=MAX_WIN_PROB // 100,
        expiration_block=1040, price=PRICE, creation_round=5,
        creation_round_block_hash=b"\x01" * 32,
    )  # fmt: skip
    ctx = context(recipient, secret, 1000, 5, b"\x01" * 32)
    headers = [
        wire.encode(sign_payment(params, gateway.key, sender, range(n, n + per_payment)))
        for n in range(0, count, per_payment)
    ]

    # From the raw header, as the proxy sees it: base64, protobuf, every check.
    start = time.process_time()
    for header in headers:
        validated(header, ctx)
    rate = len(headers) * per_payment / (time.process_time() - start)

    # The baseline is libsecp256k1's recovery alone, over a digest computed beforehand: the
    # floor no validation can go below, and none of our code in it.
    ticket = validated(headers[0], ctx).tickets[0].ticket
    sig = wire.decode_payment(headers[0]).ticket_sender_params[0].sig
    digest = keccak(SIGNED_MESSAGE_PREFIX + ticket.hash)
    recoverable = sig[:64] + bytes([sig[64] - 27])
    start = time.process_time()
    for _ in range(count):
        PublicKey.from_signature_and_message(recoverable, digest, hasher=None)
    recovered = count / (time.process_time() - start)

    print(f"validation, {per_payment} ticket(s) a payment: {rate:,.0f} tickets/s per CPU-second "
          f"(one core), from the raw header (baseline, bare signature recovery: "
          f"{recovered:,.0f}/s; ratio {rate / recovered:.2f}; target >= 5,000/s)")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redemption_gas(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        chain = DevChain.start(free_port(), Path(tmp) / "hardhat.log")
        try:
            orch = chain.new_account(10 * ETH)
            chain.set_active(orch.address)
            gateway = chain.new_account(20 * ETH)
            chain.fund_sender(gateway, deposit=5 * ETH, reserve=5 * ETH)
            block_hash = chain.start_round(1)
            secret = RecipientSecret.generate()
            recipient, sender = bytes.fromhex(orch.address[2:]), bytes.fromhex(gateway.address[2:])
            params = ticket_params(
                secret, recipient, sender, face_value=ETH // 1000, win_prob=MAX_WIN_PROB,
                expiration_block=chain.w3.eth.block_number + 40, price=PRICE,
                creation_round=1, creation_round_block_hash=block_hash,
            )  # fmt: skip
            payment = sign_payment(params, gateway.key, sender, range(2 * count))
            ctx = context(recipient, secret, chain.w3.eth.block_number, 1, block_hash)
            valid = validated(wire.encode(payment), ctx)

            def args(t):  # noqa: ANN001, ANN202
                return t.ticket.abi_tuple(), t.sig, t.recipient_rand

            single = [
                chain.transact(orch, chain.broker.functions.redeemWinningTicket(*args(t)))
                for t in valid.tickets[:count]
            ]
            per_single = sum(r["gasUsed"] for r in single) / count
            batch = [args(t) for t in valid.tickets[count:]]
            call = chain.broker.functions.batchRedeemWinningTickets(
                [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]
            )
            # A batch swallows a failing ticket, so gas estimation would happily starve the
            # last ones: give it what the singles needed, with room to spare.
            receipt = chain.transact(orch, call, gas=int(per_single * count * 1.5))
            per_batched = receipt["gasUsed"] / count
            redeemed = sum(
                chain.broker.functions.usedTickets(t.ticket.hash).call() for t in valid.tickets
            )
            assert redeemed == 2 * count, f"only {redeemed} of {2 * count} tickets redeemed"
            print(f"redemption gas: {per_single:,.0f} per ticket single, {per_batched:,.0f} per "
                  f"ticket in a batch of {count} "
                  f"(ratio batched/single {per_batched / per_single:.2f})")  # fmt: skip
        finally:
            chain.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=2000)
    parser.add_argument("--redeem", type=int, default=8)
    args = parser.parse_args()
    validation_rate(args.tickets, per_payment=1)
    validation_rate(args.tickets, per_payment=4)
    redemption_gas(args.redeem)


if __name__ == "__main__":
    main()
