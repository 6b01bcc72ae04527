"""The revenue-aware warm policy's forecast and decision (kubepeer/controller/revenue.py), as
table tests: the numbers are worked by hand from the rule in the module's docstring."""

from __future__ import annotations

import math

import pytest

from kubepeer.controller.revenue import (
    Candidate,
    Forecast,
    Hour,
    decide,
    forecast,
    hourly,
    rank,
)

ETH = 10**18
NOW = 500_000  # hours since the epoch


def test_hours_count_earnings_jobs_cold_waits_and_refusals_apart():
    records = [
        (NOW * 3600 + 10, 5, False, False),
        (NOW * 3600 + 20, 7, True, False),  # waited on a cold start
        (NOW * 3600 + 30, 0, False, True),  # refused for capacity: earns nothing, not a job
        ((NOW + 1) * 3600, 11, False, False),
    ]
    assert hourly(records) == {
        NOW: Hour(earned_wei=12, jobs=2, cold_waits=1, refused=1),
        NOW + 1: Hour(earned_wei=11, jobs=1),
    }


@pytest.mark.parametrize(
    ("history", "recent", "expected"),
    [
        ({}, 0.5, Forecast(0, 0)),  # nothing on record
        ({NOW - 1: Hour(earned_wei=40, jobs=4)}, 0.5, Forecast(40, 4)),  # the last hour alone
        # the same hour of two past days (10 and 30: mean 20), the last hour 40, half each
        (
            {
                NOW - 24: Hour(earned_wei=10, jobs=1),
                NOW - 48: Hour(earned_wei=30, jobs=3),
                NOW - 1: Hour(earned_wei=40, jobs=4),
            },
            0.5,
            Forecast(30, 3),
        ),
        # all seasonal: a burst in the last hour does not count
        (
            {NOW - 24: Hour(earned_wei=10, jobs=1), NOW - 1: Hour(earned_wei=900, jobs=90)},
            0.0,
            Forecast(10, 1),
        ),
        # a day with no record is not a day of zero demand; refused jobs are demand
        ({NOW - 72: Hour(earned_wei=60, jobs=5, refused=1)}, 0.5, Forecast(30, 3)),
        # eight days back is past the window
        ({NOW - 8 * 24: Hour(earned_wei=60, jobs=6)}, 0.5, Forecast(0, 0)),
    ],
)
def test_the_forecast_blends_the_same_hour_of_past_days_with_the_last_hour(
    history, recent, expected
):
    assert forecast(history, NOW, recent=recent) == expected


def test_a_forecast_weight_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="recent must be within"):
        forecast({}, NOW, recent=1.5)


COST = 0.11 * ETH  # a GPU-hour


@pytest.mark.parametrize(
    ("earnings", "jobs", "cold_start", "patience", "warm", "idle"),
    [
        # earns more than its GPU costs, and a cold start (120 s) outlasts patience (30 s)
        (0.82 * ETH, 100, 120, 30, True, 600),
        # earns more, but gateways wait a cold start out: sleeping loses nothing
        (0.82 * ETH, 100, 20, 30, False, 600),
        # earns less than its GPU time: cold, and asleep as soon as its jobs stop (90 s)
        (0.05 * ETH, 100, 120, 30, False, 90),
        # exactly its cost: kept (a tie keeps what is warm)
        (0.11 * ETH, 100, 120, 30, True, 600),
        # no jobs expected: never warm, whatever it once earned
        (0.82 * ETH, 0, 120, 30, False, 600),
    ],
)
def test_a_model_is_kept_warm_while_a_cold_start_would_lose_more_than_sleeping_saves(
    earnings, jobs, cold_start, patience, warm, idle
):
    d = decide(
        Forecast(earnings, jobs),
        gpu_cost_wei_per_hour=COST,
        cold_start_seconds=cold_start,
        patience_seconds=patience,
        idle_timeout_seconds=600,
    )
    assert (d.warm, d.idle_timeout) == (warm, idle)
    asleep = math.exp(-jobs * 600 / 3600)
    assert d.saved_cold == pytest.approx(COST * asleep)
    assert d.lost_cold == pytest.approx(earnings * asleep if cold_start > patience else 0)


def test_the_decision_says_its_numbers():
    warm = decide(
        Forecast(0.82 * ETH, 100),
        gpu_cost_wei_per_hour=COST,
        cold_start_seconds=120,
        patience_seconds=30,
        idle_timeout_seconds=600,
    )
    assert warm.reason.startswith("kept warm: 0.82 ETH/h expected vs 0.11 ETH/h GPU cost")
    cold = decide(
        Forecast(0.05 * ETH, 100),
        gpu_cost_wei_per_hour=COST,
        cold_start_seconds=120,
        patience_seconds=30,
        idle_timeout_seconds=600,
    )
    assert cold.reason.startswith("on demand, idle 90s: 0.05 ETH/h expected vs 0.11 ETH/h")


@pytest.mark.parametrize(
    "field",
    ["gpu_cost_wei_per_hour", "cold_start_seconds", "patience_seconds", "idle_timeout_seconds"],
)
def test_a_negative_input_is_refused_by_name(field):
    args = {
        "gpu_cost_wei_per_hour": COST,
        "cold_start_seconds": 1,
        "patience_seconds": 1,
        "idle_timeout_seconds": 1,
        field: -1,
    }
    with pytest.raises(ValueError, match=f"{field} must not be negative, not -1"):
        decide(Forecast(1, 1), **args)


@pytest.mark.parametrize(
    ("candidates", "gpus", "kept", "preempted"),
    [
        # by earnings per GPU-hour: b's 0.5/GPU beats a's 0.4/GPU over two GPUs
        (
            [Candidate("a", 2, 0.8), Candidate("b", 1, 0.5), Candidate("c", 1, 0.1)],
            2,
            ["b", "c"],
            ["a"],
        ),
        (
            [Candidate("a", 2, 0.8), Candidate("b", 1, 0.5), Candidate("c", 1, 0.1)],
            3,
            ["b", "a"],
            ["c"],
        ),
        # a tie goes by name, so that the same numbers always give the same decision
        ([Candidate("y", 1, 0.3), Candidate("x", 1, 0.3)], 1, ["x"], ["y"]),
        ([], 4, [], []),
    ],
)
def test_when_gpus_are_scarce_the_least_earning_per_gpu_hour_go_first(
    candidates, gpus, kept, preempted
):
    assert rank(candidates, gpus) == (kept, preempted)
