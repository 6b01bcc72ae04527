"""`kubepeer operator`: settings, clients and kopf, wired together."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kubepeer.controller.handlers import build_registry
from kubepeer.controller.kube import Kube
from kubepeer.controller.settings import OperatorSettings

log = logging.getLogger("kubepeer.operator")


def ensure_peering(kube: Kube, settings: OperatorSettings) -> None:
    """The peering object kopf replicas coordinate through; created once, shared by all."""
    body: dict[str, Any] = {
        "apiVersion": "kopf.dev/v1",
        "metadata": {"name": settings.peering_name},
    }
    targets = (
        [(ns, "KopfPeering", "kopfpeerings") for ns in settings.namespaces]
        if settings.namespaces
        else [(None, "ClusterKopfPeering", "clusterkopfpeerings")]
    )
    for namespace, kind, plural in targets:
        try:
            if namespace is None:
                kube.custom.create_cluster_custom_object(
                    "kopf.dev", "v1", plural, {**body, "kind": kind}
                )
            else:
                kube.custom.create_namespaced_custom_object(
                    "kopf.dev", "v1", namespace, plural, {**body, "kind": kind}
                )
        except ApiException as exc:
            if exc.status != 409:
                raise


def connect_redis(url: str | None) -> Any | None:
    if not url:
        log.warning("no redis_url: OnDemand models will not scale to zero on their own")
        return None
    import redis

    return redis.Redis.from_url(url)


def run_operator(overrides: dict[str, Any], liveness: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kopf reports every handler and timer run at INFO; ours log their decisions instead.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings = OperatorSettings(**overrides)
    kube = Kube.from_environment()
    if not settings.standalone:
        ensure_peering(kube, settings)
    registry = build_registry(settings, kube, connect_redis(settings.redis_url))
    log.info(
        "watching %s", ", ".join(settings.namespaces) if settings.namespaces else "all namespaces"
    )
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=settings.standalone,
            # A peering name makes kopf wait for peering even when standalone: give none then.
            peering_name=None if settings.standalone else settings.peering_name,
            priority=(
                settings.peering_priority
                if settings.peering_priority is not None
                else random.randint(1, 2**31 - 1)
            ),
            liveness_endpoint=liveness,
        )
    )
    return 0
