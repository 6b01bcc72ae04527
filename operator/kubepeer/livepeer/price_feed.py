"""ETH/USD from a Chainlink aggregator, and Live Runner prices in wei (live-runner-wire.md 8).

go-livepeer turns a Live Runner app's USD price into wei at the ETH/USD rate it reads from
Chainlink's aggregator on Arbitrum One (`latestRoundData` / 10^`decimals`), first on use and
then at each whole UTC hour, and advertises the result rounded down:

    hour   -> wei per second:               floor(P / 3600 x 1e18 / ETHUSD)
    720p   -> wei per pixel of 720p30 video: floor(P / (3600 x 1280 x 720 x 30) x 1e18 / ETHUSD)
    fixed  -> wei per session or call:       floor(P x 1e18 / ETHUSD)

A price under 1 wei is no price. The payments controller (which holds the RPC) reads the
feed and publishes the reading in Redis; the operator reads it from there (and the proxy
will, for the prices it offers Live Runner sessions).

    kubepeer:chain:eth-usd   hash: answer, decimals, round_id, updated_at, feed, read_at
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

log = logging.getLogger(__name__)

ARBITRUM_ETH_USD = "0x639Fe6ab55C921f74e7fac1ee960C0B6293ba612"  # go-livepeer's -priceFeedAddr
ETH_USD_KEY = "kubepeer:chain:eth-usd"
WEI_PER_ETH = 10**18
PIXELS_720P_PER_SECOND = 1280 * 720 * 30
RETRIES, FIRST_RETRY_SECONDS = 5, 30.0  # go-livepeer's watcher: 5 tries, 30 s doubling

# The part of Chainlink's AggregatorV3Interface that is read.
AGGREGATOR_ABI = [
    {"type": "function", "name": "decimals", "stateMutability": "view", "inputs": [],
     "outputs": [{"name": "", "type": "uint8"}]},
    {"type": "function", "name": "latestRoundData", "stateMutability": "view", "inputs": [],
     "outputs": [{"name": "roundId", "type": "uint80"}, {"name": "answer", "type": "int256"},
                 {"name": "startedAt", "type": "uint256"},
                 {"name": "updatedAt", "type": "uint256"},
                 {"name": "answeredInRound", "type": "uint80"}]},
]  # fmt: skip

# What each registered unit is advertised as, and how many of those make one priced unit.
ADVERTISED = {
    "hour": ("seconds", 3600),
    "720p": ("720p-pixel-seconds", 3600 * PIXELS_720P_PER_SECOND),
    "fixed": ("fixed", 1),
}


class NoRate(ValueError):
    """The feed gave no usable ETH/USD rate."""


@dataclass(frozen=True)
class EthUsd:
    """One reading of the feed."""

    answer: int
    decimals: int
    round_id: int
    updated_at: int  # the feed's own timestamp of the answer (unix seconds)
    feed: str  # the aggregator's address
    read_at: float  # when we read it (unix seconds)

    @property
    def rate(self) -> Fraction:
        """USD per ETH."""
        return Fraction(self.answer, 10**self.decimals)


@dataclass(frozen=True)
class WeiPrice:
    price: int  # wei per unit
    unit: str  # seconds, 720p-pixel-seconds or fixed


def to_wei(amount: Decimal, currency: str, unit: str, eth_usd: EthUsd | None) -> WeiPrice | None:
    """An app price as go-livepeer advertises it, in whole wei, rounded down; None when it
    is under 1 wei or is in USD with no rate read."""
    advertised, per = ADVERTISED[unit]
    wei = Fraction(amount) / per
    if currency == "USD":
        if eth_usd is None:
            return None
        wei = wei * WEI_PER_ETH / eth_usd.rate
    whole = wei.numerator // wei.denominator
    return WeiPrice(whole, advertised) if whole >= 1 else None


def read_eth_usd(w3: Any, feed: str, now: float | None = None) -> EthUsd:
    """The aggregator's latest answer. Raises NoRate for an answer that is not a price."""
    aggregator = w3.eth.contract(address=w3.to_checksum_address(feed), abi=AGGREGATOR_ABI)
    decimals = int(aggregator.functions.decimals().call())
    round_id, answer, _, updated_at, _ = aggregator.functions.latestRoundData().call()
    if answer <= 0:
        raise NoRate(f"the ETH/USD feed at {feed} answered {answer}")
    return EthUsd(int(answer), decimals, int(round_id), int(updated_at), feed,
                  time.time() if now is None else now)  # fmt: skip


def publish(redis: Any, reading: EthUsd) -> None:
    redis.hset(ETH_USD_KEY, mapping={
        "answer": str(reading.answer), "decimals": reading.decimals,
        "round_id": str(reading.round_id), "updated_at": reading.updated_at,
        "feed": reading.feed, "read_at": repr(reading.read_at),
    })  # fmt: skip


def published(redis: Any) -> EthUsd | None:
    """The last reading the payments controller published, or None."""
    return reading_from(redis.hgetall(ETH_USD_KEY))


def reading_from(fields: dict[bytes, bytes] | None) -> EthUsd | None:
    """A published reading from its Redis hash's fields (as HGETALL gives them), or None."""
    raw = {k.decode(): v.decode() for k, v in (fields or {}).items()}
    try:
        return EthUsd(int(raw["answer"]), int(raw["decimals"]), int(raw["round_id"]),
                      int(raw["updated_at"]), raw["feed"], float(raw["read_at"]))  # fmt: skip
    except (KeyError, ValueError):
        return None


class FeedWatch:
    """Reads the feed when due and publishes it: at the first pass, then once in each new
    UTC hour; a failed read is tried again 30, 60, 120, 240 s later, then not before the
    next hour (go-livepeer's price feed watcher)."""

    def __init__(self, w3: Any, feed: str, redis: Any) -> None:
        self.w3, self.feed, self.redis = w3, feed, redis
        self.hour: int | None = None  # the UTC hour of the last good reading
        self.failures = 0
        self.next_try = 0.0

    def maybe_refresh(self, now: float | None = None) -> EthUsd | None:
        now = time.time() if now is None else now
        hour = int(now // 3600)
        if hour == self.hour or now < self.next_try:
            return None
        try:
            reading = read_eth_usd(self.w3, self.feed, now)
            publish(self.redis, reading)
        except Exception as exc:  # the RPC, the feed or Redis: tried again, never fatal
            self.failures += 1
            if self.failures >= RETRIES:
                self.hour, self.failures = hour, 0  # gave up for this hour
                log.error("ETH/USD feed %s: %d reads failed, next in the next hour: %s",
                          self.feed, RETRIES, exc)  # fmt: skip
            else:
                self.next_try = now + FIRST_RETRY_SECONDS * 2 ** (self.failures - 1)
                log.warning("ETH/USD feed %s: read failed, again in %.0f s: %s",
                            self.feed, self.next_try - now, exc)  # fmt: skip
            return None
        self.hour, self.failures, self.next_try = hour, 0, 0.0
        at = datetime.datetime.fromtimestamp(reading.updated_at, datetime.UTC).isoformat()
        log.info("ETH/USD %s from %s (round %d, answered %s)", float(reading.rate), self.feed,
                 reading.round_id, at)  # fmt: skip
        return reading
