"""A paid batch job costs the proxy two Redis round trips, counted on the wire.

The proxy reaches a real Redis through a TCP relay that counts, per connection, each time
the client speaks after the server has: one round trip, however many commands it pipelines.
A paid job's are its credit (one script: the price offered, the nonces, the balance) and,
before its reply, one pipeline with its fee and its result files. The chain view and the
sender's facts are held in memory (`ChainFacts`), read once a second off the jobs' path:
here once an hour, so that nothing else shares the window. The connections counted are
those that carried the credit script, so the live video's and the probes' clients (their
own connections) are not in the count either.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

import pytest

from kubepeer.contracts.earnings import parse_hours
from kubepeer.livepeer.capabilities import Pipeline
from kubepeer.payments.ledger import balance_key
from kubepeer.proxy.units import billed_units
from kubepeer_dev.gateway_sim import Gateway, fee, ticket_ev
from tests.proxies import (
    SD,
    T2I,
    ProxyServer,
    models_json,
    start_proxy,
    stop_proxy,
)
from tests.support import wait_for

pytestmark = pytest.mark.redis
pytest_plugins = ["tests.proxies"]  # its chain_facts fixture

JOBS = 20


@dataclass
class _Turns:
    """One relayed connection: round trips so far, and whether it carried the credit."""

    round_trips: int = 0
    credits: bool = False
    server_spoke: bool = True  # (a connection opens with the client speaking)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RoundTripRelay:
    """A TCP relay to Redis that counts round trips per connection."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        self.connections: list[_Turns] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.redis_port))
            turns = _Turns()
            self.connections.append(turns)
            threading.Thread(target=self._pump, args=(client, server, turns, True),
                             daemon=True).start()  # fmt: skip
            threading.Thread(target=self._pump, args=(server, client, turns, False),
                             daemon=True).start()  # fmt: skip

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, turns: _Turns, asks: bool) -> None:
        try:
            while data := source.recv(1 << 20):
                with turns.lock:
                    if asks:
                        if turns.server_spoke:
                            turns.round_trips += 1
                            turns.server_spoke = False
                        turns.credits = turns.credits or b"EVALSHA" in data.upper()
                    else:
                        turns.server_spoke = True
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def job_round_trips(self) -> int:
        return sum(c.round_trips for c in self.connections if c.credits)

    def close(self) -> None:
        self.listener.close()


@dataclass
class _Relayed:
    url: str  # what start_proxy reads of a RedisServer


@pytest.fixture(scope="module")
def relayed(tmp_path_factory, redis_server, sd_runner, chain_facts):
    relay = RoundTripRelay(redis_server.port)
    server = start_proxy(
        tmp_path_factory.mktemp("proxy"), _Relayed(relay.url), models=models_json(),
        endpoints={"runner-fleet": [sd_runner.url]},
        # No timer of the proxy's own on Redis while the jobs are counted (its pooled
        # connections carried the credit script too): the chain view, live leases, in-flight
        # demand expiries (every --demand-ttl / 3) and Live Runner metering (every half
        # --live-payment-interval) stay put.
        args=["--chain-refresh", "3600", "--live-lease-seconds", "36000", "--demand-ttl", "3600",
              "--live-payment-interval", "36000"],
    )  # fmt: skip
    yield server, relay
    stop_proxy(server)
    relay.close()


def test_a_paid_job_costs_two_redis_round_trips(relayed, redis_server):
    proxy, relay = relayed
    proxy: ProxyServer
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)  # (discovery: the sender's facts now in memory)
    with proxy.http() as client:
        first = client.post("/text-to-image", json=T2I,
                            headers=gateway.headers(info, 27, SD, tickets=50))  # fmt: skip
        assert first.status_code == 200, first.text
        balance = int(redis_server.client().get(balance_key(gateway.address, f"27_{SD}")))
        before = relay.job_round_trips()
        urls = []
        for _ in range(JOBS):
            response = client.post("/text-to-image", json=T2I,
                                   headers=gateway.headers(info, 27, SD, tickets=1))  # fmt: skip
            assert response.status_code == 200, response.text
            urls += [image["url"] for image in response.json()["images"]]
        round_trips = relay.job_round_trips() - before
        # The reply's media are result URLs (the gateway sent Livepeer-AI-Worker): the files
        # were written in each job's second round trip, before its reply.
        assert len(urls) == JOBS
        for url in urls:
            assert client.get(url).status_code == 200, url
    assert round_trips == 2 * JOBS, round_trips
    # Each job was credited one ticket's EV and debited its fee: both reached the ledger.
    # (A ticket's EV is whole wei plus a fraction the ledger carries: `ticket_ev` floors it.)
    after = int(redis_server.client().get(balance_key(gateway.address, f"27_{SD}")))
    debited = balance + JOBS * ticket_ev(info) - after
    fees = JOBS * fee(billed_units(Pipeline.TEXT_TO_IMAGE, T2I), info)
    assert fees - JOBS <= debited <= fees, (debited, fees)


def test_each_served_job_s_fee_is_in_its_model_s_earnings_records(relayed, redis_server):
    """contracts/earnings.py against the ledger: the hour's earnings of the model are the
    fees the ledger was debited (the tickets' expected value that paid them), job by job,
    written on the pipeline that carries the fee (the test above counts its round trips)."""
    proxy, _ = relayed
    redis = redis_server.client()
    for key in redis.scan_iter("kubepeer:earnings:test:*"):
        redis.delete(key)
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    jobs = 5
    ledger = balance_key(gateway.address, f"27_{SD}")
    with proxy.http() as client:
        first = client.post("/text-to-image", json=T2I,
                            headers=gateway.headers(info, 27, SD, tickets=50))  # fmt: skip
        assert first.status_code == 200, first.text
        credited_once = int(redis.get(ledger))
        for _ in range(jobs - 1):
            response = client.post("/text-to-image", json=T2I,
                                   headers=gateway.headers(info, 27, SD, tickets=0))  # fmt: skip
            assert response.status_code == 200, response.text
    debited = credited_once - int(redis.get(ledger))  # the last four jobs' fees, exactly
    [key] = wait_for(lambda: list(redis.scan_iter("kubepeer:earnings:test:*")), timeout=10,
                     what="the earnings records")  # fmt: skip
    hours = wait_for(lambda: (h := parse_hours(redis.hgetall(key)))
                     and sum(r.jobs for r in h.values()) == jobs and h, timeout=10,
                     what=f"{jobs} jobs in the earnings records")  # fmt: skip
    earned = sum(r.earned_wei for r in hours.values())
    assert debited == (jobs - 1) * fee(billed_units(Pipeline.TEXT_TO_IMAGE, T2I), info)
    assert earned == debited * jobs // (jobs - 1)  # the first job's fee too, the same price
    assert sum(r.cold_waits + r.refused for r in hours.values()) == 0  # an Always model
    assert key.decode().startswith("kubepeer:earnings:test:")
