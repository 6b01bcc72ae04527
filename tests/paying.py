"""Paying Kubepeer on real servers: the orchestrator and gateway fixtures, and helpers to
pay, run the redeemer and check what the chain did. A pytest plugin of the chain tests
(`pytest_plugins = ["tests.paying"]`)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from kubepeer.livepeer import wire
from kubepeer.payments.gateway import sign_payment
from kubepeer.payments.ledger import WINNING_STREAM, Ledger, manifest_id
from kubepeer.payments.queue import State, TicketBook, WinningTicket
from kubepeer.payments.recipient import EXPIRATION_BLOCKS, RecipientSecret, ticket_params
from kubepeer.payments.redeemer import Redeemer, RedeemerSettings
from kubepeer.payments.rounds import ChainView
from kubepeer.payments.ticket import MAX_WIN_PROB
from kubepeer.payments.validator import PaymentContext, ValidPayment, check_payment
from kubepeer_dev.devchain import ETH, DevChain

MANIFEST = manifest_id(27, "org/model")
PRICE = Fraction(1000, 1)
PASSWORD = "correct horse battery staple"


@dataclass
class Orchestrator:
    """Our side: the recipient account (which also sends the redemptions), its secret, its
    ledger on a stream of its own, and a keystore the redeemer process unlocks."""

    account: LocalAccount
    secret: RecipientSecret
    ledger: Ledger
    keystore: Path
    password_file: Path
    redis_url: str

    @property
    def address(self) -> bytes:
        return bytes.fromhex(self.account.address[2:])


@pytest.fixture
def orchestrator(chain: DevChain, redis_server, tmp_path) -> Orchestrator:
    account = chain.new_account(10 * ETH)
    keystore = tmp_path / "keystore.json"
    keystore.write_text(json.dumps(Account.encrypt(account.key, PASSWORD)))
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    chain.set_active(account.address)  # only an active orchestrator claims from reserves
    ledger = Ledger(redis_server.client(), stream=f"{WINNING_STREAM}:{uuid.uuid4().hex}")
    return Orchestrator(
        account, RecipientSecret.generate(), ledger, keystore, password_file, redis_server.url
    )


@pytest.fixture
def gateway_factory(chain: DevChain) -> Callable[..., LocalAccount]:
    """Senders with the deposit and reserve a test asks for."""

    def make(deposit: int = 5 * ETH, reserve: int = 5 * ETH) -> LocalAccount:
        sender = chain.new_account(deposit + reserve + ETH)
        chain.fund_sender(sender, deposit=deposit, reserve=reserve)
        return sender

    return make


@pytest.fixture
def gateway(gateway_factory: Callable[..., LocalAccount]) -> LocalAccount:
    """A sender with a deposit and a reserve on the broker."""
    return gateway_factory()


_nonces = itertools.count(1)


def chain_view(chain: DevChain, address: str | None = None) -> ChainView:
    """The dev chain as the chain watcher would report it (its own block number is L1's)."""
    rounds = chain.rounds.functions
    last = rounds.lastInitializedRound().call()
    return ChainView(
        l1_block=chain.w3.eth.block_number,
        current_round=chain.current_round(),
        creation_round=last,
        creation_round_block_hash=bytes(rounds.blockHashForRound(last).call()),
        round_initialized=rounds.currentRoundInitialized().call(),
        active=address is None or chain.bonding.functions.isActiveTranscoder(address).call(),
    )


def pay(
    chain: DevChain, orch: Orchestrator, gateway: LocalAccount, tickets: int,
    win_prob: int = MAX_WIN_PROB // 2, face_value: int = ETH // 100,
) -> ValidPayment:  # fmt: skip
    """A gateway pays `tickets` tickets against fresh params; we validate them."""
    chain.start_round(chain.current_round() or 1)
    view = chain_view(chain)
    sender = bytes.fromhex(gateway.address[2:])
    params = ticket_params(
        orch.secret,
        orch.address,
        sender,
        face_value=face_value,
        win_prob=win_prob,
        expiration_block=view.l1_block + EXPIRATION_BLOCKS,
        price=PRICE,
        creation_round=view.creation_round,
        creation_round_block_hash=view.creation_round_block_hash,
    )
    nonces = [next(_nonces) for _ in range(tickets)]
    payment = sign_payment(params, gateway.key, sender, nonces)
    context = PaymentContext(orch.address, orch.secret, view, issued_prices=lambda _: {PRICE})
    valid = check_payment(wire.encode(payment), context)
    assert isinstance(valid, ValidPayment), valid
    return valid


def funds(chain: DevChain, orch: Orchestrator) -> tuple[int, int]:
    return chain.balance(orch.account.address), chain.fees_earned(orch.account.address)


def payments_process(
    chain: DevChain, orch: Orchestrator, *extra: str, failpoint: str | None = None,
    rpc_url: str | None = None,
) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """The command line and environment of `kubepeer payments` for this orchestrator."""
    env = {**os.environ, "KUBEPEER_RPC_URL": rpc_url or chain.url}
    if failpoint:
        env["KUBEPEER_FAILPOINT"] = failpoint
    command = [
        sys.executable, "-m", "kubepeer.cli", "payments", "--network", "dev",
        "--redis-url", orch.redis_url,
        "--controller", chain.controller.address, "--max-fee-per-gas", str(100 * 10**9),
        "--keystore", str(orch.keystore), "--password-file", str(orch.password_file),
        "--stream", orch.ledger.stream, *extra,
    ]  # fmt: skip
    return command, env


def run_redeemer(
    chain: DevChain, orch: Orchestrator, *extra: str, failpoint: str | None = None,
    rpc_url: str | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`kubepeer payments --once`: one pass over what is queued."""
    command, env = payments_process(chain, orch, "--once", *extra, failpoint=failpoint,
                                    rpc_url=rpc_url)  # fmt: skip
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def winners(payment: ValidPayment) -> list[WinningTicket]:
    return [WinningTicket.from_accepted(t) for t in payment.tickets if t.winning]


def assert_redeemed_exactly_once(chain, orch, tickets, before: tuple[int, int], nonce_before):
    """Each ticket used once, its face value credited to our fee pool by the broker
    (deposits cover them here) and recorded as paid, our ETH spent only on gas, and no
    transaction sent that did not redeem something."""
    balance_before, fees_before = before
    book = TicketBook(orch.ledger.redis)
    records = [book.get(t.hash) for t in tickets]
    assert all(r is not None and r.state is State.REDEEMED for r in records), records
    assert all(chain.broker.functions.usedTickets(t.hash).call() for t in tickets)
    transactions = {r.tx_hash for r in records}
    assert chain.w3.eth.get_transaction_count(orch.account.address) - nonce_before == len(
        transactions
    )
    receipts = [chain.w3.eth.get_transaction_receipt(h) for h in transactions]
    gas = sum(r["gasUsed"] * r["effectiveGasPrice"] for r in receipts)
    faces = sum(t.ticket.face_value for t in tickets)
    assert [r.amount_paid for r in records] == [t.ticket.face_value for t in tickets]
    assert chain.fees_earned(orch.account.address) - fees_before == faces
    assert chain.balance(orch.account.address) - balance_before == -gas
    events = chain.broker.events.WinningTicketRedeemed().get_logs(from_block=0)
    redeemed_nonces = [
        e.args.senderNonce for e in events if e.args.recipient == orch.account.address
    ]
    assert sorted(redeemed_nonces) == sorted(t.ticket.sender_nonce for t in tickets)


def redeemer(
    chain: DevChain,
    orch: Orchestrator,
    consumer: str = "redeemer-0",
    may_send: Callable[[], bool] = lambda: True,
    **settings: Any,
) -> Redeemer:
    """A redeemer in this process, for tests that act on the chain while it works."""
    w3 = Web3(Web3.HTTPProvider(chain.url, request_kwargs={"timeout": 30}))
    chosen = RedeemerSettings(
        stream=orch.ledger.stream, consumer=consumer, max_fee_per_gas=100 * 10**9, **settings
    )
    return Redeemer(
        orch.ledger.redis, w3, chain.broker.address, orch.account, chosen, may_send=may_send
    )


def queue_winners(chain: DevChain, orch: Orchestrator, gateway: LocalAccount, count: int,
                  face_value: int = ETH // 100) -> list[WinningTicket]:  # fmt: skip
    """`count` certain winners, credited, queued and past their params' expiration."""
    payment = pay(chain, orch, gateway, tickets=count, win_prob=MAX_WIN_PROB, face_value=face_value)
    orch.ledger.credit(payment, MANIFEST)
    chain.mine(EXPIRATION_BLOCKS + 1)
    return winners(payment)


@contextmanager
def relay_rpc(upstream: str, rewrite: Callable[[dict, dict], dict]) -> Iterator[str]:
    """A loopback JSON-RPC server in front of the real dev node that hands each request
    and the node's answer to `rewrite` and returns what it makes of them."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            forwarded = urllib.request.Request(
                upstream, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(forwarded, timeout=30) as reply:
                response = rewrite(json.loads(body), json.loads(reply.read()))
            payload = json.dumps(response).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
