"""The proxy's memory of the chain view and senders' facts (proxy/chain_facts.py), on real
Redis: what a job reads without a round trip, what a refresh rereads, what it forgets."""

from __future__ import annotations

import asyncio

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from kubepeer.payments.rounds import ChainView
from kubepeer.payments.sender import SenderInfo
from kubepeer.payments.senders import (
    ASKED_FOR,
    SENDERS_ASKED,
    SENDERS_WANTED,
    save_facts,
    sender_key,
)
from kubepeer.payments.watcher import save_view
from kubepeer.proxy.chain_facts import ChainFacts

pytestmark = pytest.mark.redis

VIEW = ChainView(l1_block=5_000, current_round=10, creation_round=10,
                 creation_round_block_hash=b"\xab" * 32)  # fmt: skip
RICH = SenderInfo(deposit=10**21, withdraw_round=0, reserve=10**21, reserve_alloc=10**20)
POOR = SenderInfo(deposit=1, withdraw_round=0, reserve=1, reserve_alloc=1)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_what_a_job_reads_is_in_memory_and_a_refresh_keeps_it_true(redis_server):
    # A database of its own: the chain view and senders' keys are global, and the session's
    # database 0 holds other modules' (their proxies read the view this test deletes).
    url = redis_server.url.removesuffix("/0") + "/15"
    redis = Redis.from_url(url)
    redis.flushdb()
    met, unknown = b"\x01" * 20, b"\x02" * 20
    clock = Clock(1_000_000.0)
    save_view(redis, VIEW, now=clock.now)
    save_facts(redis, met, RICH)

    async def scenario() -> None:
        client = AsyncRedis.from_url(url)
        facts = ChainFacts(client, max_age=60, clock=clock)
        assert facts.view() is None  # nothing read yet
        await facts.refresh()
        assert facts.view() == VIEW
        # A sender is read once, then held; one with no facts is asked for, not held.
        assert facts.cached(met) is None
        assert await facts.sender(met) == RICH
        assert facts.cached(met) == RICH
        assert await facts.sender(unknown) is None
        assert redis.lrange(SENDERS_WANTED, 0, -1) == [unknown.hex().encode()]
        assert facts.cached(unknown) is None
        # A refresh rereads what it holds, marks it asked-for, and drops what is gone.
        save_facts(redis, met, POOR)
        await facts.refresh()
        assert facts.cached(met) == POOR
        assert redis.zscore(SENDERS_ASKED, met.hex()) == clock.now
        redis.delete(sender_key(met))
        await facts.refresh()
        assert facts.cached(met) is None
        # A sender nobody met for ASKED_FOR is forgotten, even with facts in Redis.
        save_facts(redis, met, RICH)
        assert await facts.sender(met) == RICH
        clock.now += ASKED_FOR + 1
        await facts.refresh()
        assert facts.cached(met) is None
        # The view's own age limit holds in memory too.
        assert facts.view() is None  # read at 1,000,000 s, now ASKED_FOR + 1 s later
        await client.aclose()

    asyncio.run(scenario())
