"""One redeemer at a time per recipient: a Kubernetes Lease, held while renewed.

Two redeemers could never double-pay (the contract's usedTickets and the shared ticket
book see to that), but both would waste gas racing; the Lease keeps one acting.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubernetes import client
from kubernetes.client.exceptions import ApiException


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
