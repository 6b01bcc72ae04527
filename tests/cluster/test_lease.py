"""The redeemer's Lease on the real API server: one holder at a time, taken over on expiry."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from kubepeer.payments.lease import Lease, LeaseKeeper
from tests.support import wait_for

pytestmark = pytest.mark.cluster


def test_one_holder_at_a_time_and_takeover_after_expiry(api, namespace):
    coordination = client.CoordinationV1Api(api)
    first = Lease(coordination, namespace, "redeemer-0xabc", "pod-a", duration_seconds=10)
    second = Lease(coordination, namespace, "redeemer-0xabc", "pod-b", duration_seconds=10)
    now = datetime.now(UTC)

    assert first.try_acquire(now)
    assert not second.try_acquire(now + timedelta(seconds=1))
    assert first.try_acquire(now + timedelta(seconds=5))  # renewal
    assert not second.try_acquire(now + timedelta(seconds=14))  # renewed at 5: held to 15

    assert second.try_acquire(now + timedelta(seconds=16))  # first stopped renewing
    assert not first.try_acquire(now + timedelta(seconds=17))
    lease = coordination.read_namespaced_lease("redeemer-0xabc", namespace)
    assert lease.spec.holder_identity == "pod-b"
    assert lease.spec.lease_transitions == 1


def test_the_keeper_renews_in_the_background_and_stops_sends_before_a_takeover(api, namespace):
    coordination = client.CoordinationV1Api(api)
    keeper = LeaseKeeper(Lease(coordination, namespace, "redeemer-0xdef", "pod-a", 6))
    standby = Lease(coordination, namespace, "redeemer-0xdef", "pod-b", 6)
    keeper.start()
    try:
        wait_for(keeper.held, timeout=10, what="the keeper to take the Lease")
        deadline = time.monotonic() + 14  # more than twice the Lease's duration
        while time.monotonic() < deadline:
            assert keeper.held()
            assert not standby.try_acquire()
            time.sleep(1)
    finally:
        keeper.stop()
    wait_for(lambda: not keeper.held(), timeout=10, what="held() to lapse")
    # Our sends stop (held() is False) while the Lease is still ours in the API server, so
    # no standby can be sending yet.
    assert not standby.try_acquire()
    wait_for(standby.try_acquire, timeout=20, what="the standby to take over")
