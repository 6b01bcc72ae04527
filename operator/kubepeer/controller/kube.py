"""The operator's few Kubernetes calls, kept apart from the logic that decides them."""

from __future__ import annotations

import json
import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from kubepeer.api import GROUP, VERSION
from kubepeer.contracts import labels as L
from kubepeer.controller.builders import build_auth_secret
from kubepeer.controller.settings import FIELD_MANAGER, OperatorSettings

log = logging.getLogger(__name__)
FINALIZER = "kubepeer.io/operator"  # put on AIModels by versions that ran per-object timers


class Kube:
    """A thin, synchronous view of the API server for the operator's handlers."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._dynamic: DynamicClient | None = None
        self._secret_made: set[str] = set()  # namespaces whose auth Secret exists

    @classmethod
    def from_environment(cls) -> Kube:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = 32  # one per worker thread, not urllib3's 4
        return cls(client.ApiClient(configuration))

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

    def delete_runner(self, namespace: str, name: str) -> None:
        for delete in (self.apps.delete_namespaced_deployment, self.core.delete_namespaced_service):
            try:
                delete(name, namespace, propagation_policy="Background")
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], plural: str = "aimodels"
    ) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status}
        )

    def scale(
        self,
        namespace: str,
        name: str,
        replicas: int,
        resource_version: str | None = None,
        plural: str = "aimodels",
    ) -> None:
        """Set spec.replicas of an AIModel (or a LiveRunner); with `resource_version`, only
        if the object is unchanged."""
        metadata = {"resourceVersion": resource_version} if resource_version else {}
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name,
            {"metadata": metadata, "spec": {"replicas": replicas}},
        )  # fmt: skip

    def post_event(self, body: dict[str, Any], reason: str, message: str) -> None:
        """A Normal Event on an AIModel or a LiveRunner, for decisions made outside kopf's
        handlers."""
        meta = body["metadata"]
        now = datetime.now(UTC)
        self.core.create_namespaced_event(
            meta["namespace"],
            {
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                    "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                },
                "reason": reason, "message": message, "type": "Normal",
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                "source": {"component": FIELD_MANAGER},
            },
        )  # fmt: skip

    def release_aimodels(self, namespaces: list[str]) -> int:
        """Drop the finalizer older Kubepeer versions put on AIModels (this one puts none),
        so AIModels and their namespaces can be deleted without the operator."""
        if namespaces:
            bodies = [
                item
                for ns in namespaces
                for item in self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, ns, "aimodels"
                )["items"]
            ]
        else:
            bodies = self.custom.list_cluster_custom_object(GROUP, VERSION, "aimodels")["items"]
        released = 0
        for body in bodies:
            meta = body["metadata"]
            finalizers = meta.get("finalizers") or []
            kept = [f for f in finalizers if f != FINALIZER]
            if kept == finalizers:
                continue
            patch = {"finalizers": kept or None, "resourceVersion": meta["resourceVersion"]}
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], "aimodels", meta["name"], {"metadata": patch}
            )
            released += 1
        return released

    def ai_models_entries(self, namespace: str) -> list[dict[str, Any]]:
        """go-livepeer's aiModels.json, gathered from the namespace's price-table rows."""
        found = self.core.list_namespaced_config_map(namespace, label_selector=f"{L.TABLE}=model")
        rows = sorted(found.items, key=lambda c: c.metadata.name)
        return [e for c in rows for e in json.loads((c.data or {}).get("aiModels.json", "[]"))]

    def ensure_auth_secret(self, namespace: str, settings: OperatorSettings) -> None:
        """Create the runners' AUTH_TOKEN Secret once; an existing one is never replaced,
        nor read: a 409 says it is there (the operator may create Secrets, never get them)."""
        if namespace in self._secret_made:
            return
        body = build_auth_secret(namespace, settings, secrets.token_urlsafe(32))
        try:
            self.core.create_namespaced_secret(namespace, body)
            log.info("created Secret %s/%s for runner auth", namespace, settings.auth_secret)
        except ApiException as exc:
            if exc.status != 409:  # 409: made earlier, or by another replica: it stands
                raise
        self._secret_made.add(namespace)
