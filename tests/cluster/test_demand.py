"""Demand records on a real redis-server: expiry, and the claim that cannot lose a job."""

from __future__ import annotations

import pytest

from kubepeer.contracts.demand import claim_idle, job_alive, job_finished, job_started, read_demand

pytestmark = pytest.mark.redis


@pytest.fixture
def redis(redis_server):
    client = redis_server.client()
    client.flushdb()
    return client


def test_a_job_counts_until_its_expiry_unless_refreshed(redis):
    job_started(redis, "ns", "m", "job", now=100.0, ttl=60)
    assert read_demand(redis, "ns", "m", now=159.0).in_flight == 1
    assert read_demand(redis, "ns", "m", now=161.0).in_flight == 0  # its proxy died
    job_alive(redis, "ns", "m", "job", now=150.0, ttl=60)
    assert read_demand(redis, "ns", "m", now=200.0).in_flight == 1  # refreshed: still running
    job_finished(redis, "ns", "m", "job", now=205.0)
    demand = read_demand(redis, "ns", "m", now=206.0)
    assert (demand.in_flight, demand.last_request) == (0, 205.0)


def test_refreshing_a_finished_job_does_not_revive_it(redis):
    job_started(redis, "ns", "m", "job", now=100.0)
    job_finished(redis, "ns", "m", "job", now=101.0)
    job_alive(redis, "ns", "m", "job", now=102.0)  # a late refresh from the proxy
    assert read_demand(redis, "ns", "m", now=103.0).in_flight == 0


def test_claiming_idle_fails_while_a_job_runs_or_after_a_recent_request(redis):
    job_started(redis, "ns", "m", "job", now=100.0, ttl=60)
    assert not claim_idle(redis, "ns", "m", idle_since=130.0, now=140.0)  # in flight
    job_finished(redis, "ns", "m", "job", now=120.0)
    assert not claim_idle(redis, "ns", "m", idle_since=110.0, now=140.0)  # request after 110
    assert claim_idle(redis, "ns", "m", idle_since=125.0, now=140.0)


def test_a_job_after_the_claim_is_told_to_wake_the_model(redis):
    assert claim_idle(redis, "ns", "m", idle_since=50.0, now=100.0)
    assert job_started(redis, "ns", "m", "job", now=101.0) is True  # must wake it
    assert job_started(redis, "ns", "m", "job-2", now=102.0) is False  # awake already
    assert not claim_idle(redis, "ns", "m", idle_since=150.0, now=160.0)  # jobs in flight
