"""One redeemer at a time per recipient: a Kubernetes Lease, held while renewed.

Two redeemers could never double-pay (the contract's usedTickets and the shared ticket
book see to that), but both would waste gas racing; the Lease keeps one acting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


class Lease:
    def __init__(
        self,
        api: client.CoordinationV1Api,
        namespace: str,
        name: str,
        identity: str,
        duration_seconds: int = 15,
    ) -> None:
        self.api, self.namespace, self.name = api, namespace, name
        self.identity, self.duration = identity, duration_seconds

    def try_acquire(self, now: datetime | None = None) -> bool:
        """Take or renew the lease; False while someone else holds it."""
        now = now or datetime.now(UTC)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return self._create(now)
        spec = lease.spec
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        renewed = spec.renew_time or spec.acquire_time
        expired = (
            renewed is None
            or renewed + timedelta(seconds=spec.lease_duration_seconds or self.duration) < now
        )
        if held_by_other and not expired:
            return False
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = self.duration
        try:  # resourceVersion makes this a compare-and-swap: a racing taker gets 409
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _create(self, now: datetime) -> bool:
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                acquire_time=now,
                renew_time=now,
                lease_duration_seconds=self.duration,
                lease_transitions=0,
            ),
        )
        try:
            self.api.create_namespaced_lease(self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True


class LeaseKeeper:
    """Keeps renewing a Lease in a background thread, so a long batch never outlives it.

    `held()` is True only while the last successful renewal is recent enough that no
    standby can have taken the Lease over: the redeemer asks it before every send."""

    def __init__(self, lease: Lease, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease, self.clock = lease, clock
        self.interval = lease.duration / 3
        self._held_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.lease.duration)

    def held(self) -> bool:
        return self.clock() < self._held_until

    def renew(self) -> bool:
        started = self.clock()
        try:
            ok = self.lease.try_acquire()
        except Exception:  # the API server is away: we cannot know, so we do not hold it
            log.warning("renewing the Lease failed", exc_info=True)
            ok = False
        # Others count the Lease from its renewTime, which is no earlier than `started`;
        # stop a third of its duration early for clock skew and a slow send.
        self._held_until = started + self.lease.duration * 2 / 3 if ok else 0.0
        return ok

    def _run(self) -> None:
        while not self._stop.is_set():
            self.renew()
            self._stop.wait(self.interval)
