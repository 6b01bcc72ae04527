"""ETH/USD from a feed that answers as Chainlink's aggregators do, on a real dev chain
(live-runner-wire.md 8): read each hour, published in Redis for the operator and the proxy,
tried again 30 s doubling on failure, and `kubepeer payments` publishes it."""

from __future__ import annotations

from fractions import Fraction

import pytest

from kubepeer.livepeer.price_feed import (
    ETH_USD_KEY,
    FeedWatch,
    NoRate,
    published,
    read_eth_usd,
)
from tests.paying import run_redeemer

pytestmark = [pytest.mark.chain, pytest.mark.redis]
pytest_plugins = ["tests.paying"]

HOUR = 3600.0


@pytest.fixture
def feed(chain):
    chain.set_eth_usd(3000 * 10**8)  # each test starts at 3,000 USD, whatever ran before
    return chain.price_feed.address


def test_the_feed_is_read_as_chainlinks_and_refuses_a_non_price(chain, feed):
    reading = read_eth_usd(chain.w3, feed, now=1.0)
    assert (reading.rate, reading.decimals, reading.feed) == (Fraction(3000), 8, feed)
    assert reading.updated_at == chain.w3.eth.get_block("latest")["timestamp"]
    chain.set_eth_usd(0)
    with pytest.raises(NoRate, match="answered 0"):
        read_eth_usd(chain.w3, feed)


def test_the_reading_is_published_once_an_hour(chain, feed, redis_server):
    redis = redis_server.client()
    redis.delete(ETH_USD_KEY)
    watch = FeedWatch(chain.w3, feed, redis)
    start = 1000 * HOUR + 10
    first = watch.maybe_refresh(now=start)
    assert first is not None
    assert published(redis) == first
    chain.set_eth_usd(3500 * 10**8)
    assert watch.maybe_refresh(now=start + 1800) is None  # the same UTC hour: not read again
    assert published(redis).rate == 3000
    later = watch.maybe_refresh(now=start - 10 + HOUR)  # the next whole hour
    assert later is not None
    assert (later.rate, later.round_id) == (3500, first.round_id + 1)
    assert published(redis) == later


def test_a_failing_feed_is_tried_again_30_s_doubling_then_left_for_the_hour(chain, redis_server):
    not_a_feed = chain.new_account().address  # no contract there: every read fails
    watch = FeedWatch(chain.w3, not_a_feed, redis_server.client())
    start = 2000 * HOUR
    tried = []
    for second in range(0, 900):
        before = watch.failures
        watch.maybe_refresh(now=start + second)
        if watch.failures != before or (before and watch.failures == 0):
            tried.append(second)
    assert tried == [0, 30, 90, 210, 450]  # 5 tries, 30, 60, 120, 240 s apart
    assert watch.hour == int(start // HOUR)  # then nothing before the next hour


def test_kubepeer_payments_publishes_the_rate(chain, orchestrator, feed):
    orchestrator.ledger.redis.delete(ETH_USD_KEY)
    result = run_redeemer(chain, orchestrator, "--price-feed", feed)
    assert result.returncode == 0, result.stderr
    reading = published(orchestrator.ledger.redis)
    assert reading is not None
    assert (reading.rate, reading.feed) == (3000, feed)
