"""Senders judged by what the TicketBroker holds for them, as go-livepeer's orchestrator judges
them (pm/sendermonitor.go, pm/recipient.go), on real servers: the dev chain, the payments
process (its sender watch reads the broker), real Redis and a real proxy process.

- a sender with no reserve gets no ticket params: "insufficient sender reserve";
- a sender's face value is capped by our allocation of its reserve (its max float);
- a sender whose deposit and reserve unlock by the round after the last initialized one has
  its tickets refused: "deposit and reserve for sender ... is set to unlock soon".
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import grpc
import pytest
from web3 import Web3

from kubepeer.payments.ledger import balance_key
from kubepeer.payments.sender import SenderInfo
from kubepeer.payments.senders import (
    ASKED_FOR,
    REFRESH_SECONDS,
    SENDERS_ASKED,
    SenderWatch,
    save_facts,
    sender_key,
)
from kubepeer.payments.watcher import load_view
from kubepeer_dev.devchain import ETH
from kubepeer_dev.gateway_sim import Gateway
from tests.paying import payments_process
from tests.proxies import SD, models_json, start_proxy, stop_proxy
from tests.support import wait_for

pytestmark = [pytest.mark.chain, pytest.mark.redis]
pytest_plugins = ["tests.paying"]

T2I = {"prompt": "a cat", "height": 32, "width": 32, "model_id": SD}


@pytest.fixture
def stack(chain, orchestrator, redis_server, tmp_path) -> Iterator:
    """The payments process (chain watcher, sender watch) and a proxy paid to our address,
    its one runner endpoint a closed port: every case here ends before a runner call."""
    chain.start_round(chain.current_round() or 1)
    command, env = payments_process(chain, orchestrator)
    log = (tmp_path / "payments.log").open("wb")
    payments = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    proxy = None
    try:

        def watched() -> bool:  # this chain's view (another test's stand-in may linger)
            view = load_view(redis_server.client())
            return view is not None and abs(view.l1_block - chain.w3.eth.block_number) <= 5

        # The proxy after the view: it reads the view at start, then every --chain-refresh.
        wait_for(watched, timeout=60, what="the payments process's view of the dev chain")
        proxy = start_proxy(tmp_path / "proxy", redis_server, models=models_json(),
                            endpoints={"runner-fleet": ["http://127.0.0.1:9"]},
                            recipient=orchestrator.address)  # fmt: skip
        yield proxy
    finally:
        if proxy is not None:
            stop_proxy(proxy)
        payments.terminate()
        payments.wait(timeout=30)


def discover(proxy, gateway: Gateway):
    return gateway.discover(proxy, 27, SD)


def refused_discovery(proxy, gateway: Gateway) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        discover(proxy, gateway)
    assert refused.value.code() == grpc.StatusCode.UNKNOWN
    return refused.value.details()


def test_a_sender_with_nothing_on_the_broker_gets_no_ticket_params(stack, chain, redis_server):
    unfunded = Gateway()
    assert refused_discovery(stack, unfunded).startswith("insufficient sender reserve")
    no_reserve = Gateway(chain.new_account(2 * ETH))
    chain.fund_sender(no_reserve.account, deposit=ETH, reserve=0)
    assert refused_discovery(stack, no_reserve).startswith("insufficient sender reserve")
    # Nothing was offered, so nothing can be paid or credited.
    for gateway in (unfunded, no_reserve):
        assert redis_server.client().get(balance_key(gateway.address, f"27_{SD}")) is None


def test_the_face_value_is_capped_by_our_share_of_the_senders_reserve(stack, chain, orchestrator):
    small = Gateway(chain.new_account(2 * ETH))
    chain.fund_sender(small.account, deposit=ETH, reserve=ETH // 1000)
    rich = Gateway(chain.new_account(20 * ETH))
    chain.fund_sender(rich.account, deposit=5 * ETH, reserve=5 * ETH)
    broker = chain.broker.functions
    us = orchestrator.account.address
    alloc = broker.claimableReserve(small.account.address, us).call()
    default_face = int.from_bytes(discover(stack, rich).ticket_params.face_value, "big")
    assert alloc < default_face, "the small reserve must be below the default face value"
    face = int.from_bytes(discover(stack, small).ticket_params.face_value, "big")
    assert face == alloc  # go-livepeer: faceValue = min(default, maxFloat)


def test_tickets_from_a_sender_about_to_unlock_are_refused(stack, chain, redis_server):
    leaving = Gateway(chain.new_account(20 * ETH))
    chain.fund_sender(leaving.account, deposit=5 * ETH, reserve=5 * ETH)
    chain.transact(leaving.account, chain.broker.functions.unlock())
    # Its unlock ends two rounds on; one round later it ends by the round after this one.
    now = chain.current_round()
    chain.start_round(now + 1)
    info = wait_for(
        lambda: (i := discover(stack, leaving)).ticket_params.expiration_params.creation_round
        == now + 1 and i, timeout=30, what="params from the next round",
    )  # fmt: skip
    with stack.http() as client:
        response = client.post("/text-to-image", json=T2I,
                               headers=leaving.headers(info, 27, SD, tickets=3))  # fmt: skip
    checksummed = Web3.to_checksum_address(leaving.address)
    assert (response.status_code, response.text) == (
        400, f"deposit and reserve for sender {checksummed} is set to unlock soon\n"
    )  # fmt: skip
    assert redis_server.client().get(balance_key(leaving.address, f"27_{SD}")) is None


def test_the_sender_watch_rereads_stale_facts_and_forgets_senders_nobody_asks_about(
    redis_server,
):
    """The cache policy alone (its chain read counted, not made): facts older than
    REFRESH_SECONDS or gone are read again; a sender not asked about for ASKED_FOR is no
    longer refreshed; fresh facts are left alone."""
    redis = redis_server.client()
    now = 1_000_000.0
    fresh, stale, gone, forgotten = (bytes([n]) * 20 for n in (1, 2, 3, 4))
    info = SenderInfo(deposit=1, withdraw_round=0, reserve=1, reserve_alloc=1)
    redis.delete(SENDERS_ASKED)
    redis.zadd(SENDERS_ASKED, {s.hex(): now for s in (fresh, stale, gone)})
    redis.zadd(SENDERS_ASKED, {forgotten.hex(): now - ASKED_FOR - 1})
    save_facts(redis, fresh, info, now=now - 1)
    save_facts(redis, stale, info, now=now - REFRESH_SECONDS)
    redis.delete(sender_key(gone))
    read: list[bytes] = []
    SenderWatch(redis, lambda s: read.append(s) or info).refresh_stale(now=now)
    assert sorted(read) == sorted([stale, gone])
    assert [m.decode() for m in redis.zrange(SENDERS_ASKED, 0, -1)] == sorted(
        s.hex() for s in (fresh, stale, gone)
    )
