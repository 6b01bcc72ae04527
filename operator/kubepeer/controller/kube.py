"""The operator's few Kubernetes calls, kept apart from the logic that decides them."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from kubepeer.api import GROUP, VERSION
from kubepeer.controller import labels as L
from kubepeer.controller.builders import build_auth_secret
from kubepeer.controller.settings import FIELD_MANAGER, OperatorSettings

log = logging.getLogger(__name__)


class Kube:
    """A thin, synchronous view of the API server for the operator's handlers."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._dynamic: DynamicClient | None = None

    @classmethod
    def from_environment(cls) -> Kube:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.ApiClient())

    @property
    def dynamic(self) -> DynamicClient:
        if self._dynamic is None:
            self._dynamic = DynamicClient(self.api_client)
        return self._dynamic

    def apply(self, manifest: dict[str, Any]) -> None:
        """Server-side apply with the operator's field manager: a no-op when nothing changed."""
        resource = self.dynamic.resources.get(
            api_version=manifest["apiVersion"], kind=manifest["kind"]
        )
        metadata = manifest["metadata"]
        resource.server_side_apply(
            body=manifest,
            name=metadata["name"],
            namespace=metadata.get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )

    def namespace_terminating(self, namespace: str) -> bool:
        try:
            return self.core.read_namespace(namespace).status.phase == "Terminating"
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise

    def list_aimodels(self, namespace: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "aimodels")[
            "items"
        ]

    def list_pricings(self, namespace: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "pricings")[
            "items"
        ]

    def runner_deployments(self, namespace: str) -> list[str]:
        """Names of the runner Deployments the operator manages in a namespace."""
        found = self.apps.list_namespaced_deployment(
            namespace, label_selector=f"{L.MANAGED_BY}=kubepeer-operator,{L.RUNNER}"
        )
        return [d.metadata.name for d in found.items]

    def delete_runner(self, namespace: str, name: str) -> None:
        for delete in (self.apps.delete_namespaced_deployment, self.core.delete_namespaced_service):
            try:
                delete(name, namespace, propagation_policy="Background")
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            deployment = self.apps.read_namespaced_deployment(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self.api_client.sanitize_for_serialization(deployment)

    def runner_pods(self, namespace: str, runner: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{L.RUNNER}={runner}")
        return [self.api_client.sanitize_for_serialization(p) for p in pods.items]

    def scale_aimodel(self, namespace: str, name: str, replicas: int) -> None:
        self.custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, namespace, "aimodels", name, {"spec": {"replicas": replicas}}
        )

    def ensure_auth_secret(self, namespace: str, settings: OperatorSettings) -> None:
        """Create the runners' AUTH_TOKEN Secret once; an existing one is never replaced."""
        try:
            self.core.read_namespaced_secret(settings.auth_secret, namespace)
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        body = build_auth_secret(namespace, settings, secrets.token_urlsafe(32))
        try:
            self.core.create_namespaced_secret(namespace, body)
            log.info("created Secret %s/%s for runner auth", namespace, settings.auth_secret)
        except ApiException as exc:
            if exc.status != 409:  # another replica won the race: theirs stands
                raise
