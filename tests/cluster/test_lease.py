"""The redeemer's Lease on the real API server: one holder at a time, taken over on expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from kubepeer.payments.lease import Lease

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
