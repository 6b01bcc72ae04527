"""Live Runner prices in wei as go-livepeer advertises them (live-runner-wire.md 8): its
worked examples at ETH 3,000 USD, rounded down, and no price under 1 wei."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kubepeer.livepeer.price_feed import EthUsd, WeiPrice, to_wei

AT_3000 = EthUsd(answer=3000 * 10**8, decimals=8, round_id=1, updated_at=0, feed="0x0",
                 read_at=0.0)  # fmt: skip


@pytest.mark.parametrize(
    ("amount", "unit", "wei"),
    [
        ("3.50", "hour", WeiPrice(324_074_074_074, "seconds")),
        ("3.50", "720p", WeiPrice(11_721, "720p-pixel-seconds")),
        ("0.01", "fixed", WeiPrice(3_333_333_333_333, "fixed")),
    ],
)
def test_the_reference_examples(amount, unit, wei):
    assert to_wei(Decimal(amount), "USD", unit, AT_3000) == wei


def test_rounding_is_down_and_exact_for_any_decimals():
    # 1 USD an hour at 2,999.99999999 USD (8 decimals): 92,592,592,592.9 wei a second.
    rate = EthUsd(299_999_999_999, 8, 1, 0, "0x0", 0.0)
    assert to_wei(Decimal(1), "USD", "hour", rate) == WeiPrice(92_592_592_592, "seconds")
    same = EthUsd(2_999_999_999_990_000_000_000, 18, 1, 0, "0x0", 0.0)  # the rate in 18 dec.
    assert to_wei(Decimal(1), "USD", "hour", same) == to_wei(Decimal(1), "USD", "hour", rate)


def test_wei_prices_need_no_rate_and_none_under_one_wei():
    assert to_wei(Decimal(7200), "wei", "hour", None) == WeiPrice(2, "seconds")
    assert to_wei(Decimal(5), "wei", "fixed", None) == WeiPrice(5, "fixed")
    assert to_wei(Decimal(3599), "wei", "hour", None) is None  # 0.9997 wei a second
    assert to_wei(Decimal("1e-16"), "USD", "fixed", AT_3000) is None  # 0.03 wei
    assert to_wei(Decimal(1), "USD", "hour", None) is None  # no rate read yet
