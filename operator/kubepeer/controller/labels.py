"""Labels, annotations and names that tie runners to AIModels: the contract the proxy reads."""

from __future__ import annotations

import hashlib

PART_OF = "app.kubernetes.io/part-of"
NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "app.kubernetes.io/managed-by"

RUNNER = "kubepeer.io/runner"  # the runner (Deployment/Service) a pod belongs to
AIMODEL = "kubepeer.io/aimodel"  # the AIModel a dedicated runner serves
SHARE_GROUP = "kubepeer.io/share-group"  # the share group a packed runner serves
PIPELINE = "kubepeer.io/pipeline"  # the pipeline of a dedicated runner
MODELS_ANNOTATION = "kubepeer.io/models"  # JSON: [{aimodel, pipeline, modelId, capacity}]

MODELS_CONFIGMAP = "kubepeer-models"  # per namespace: models.json (routes, prices), aiModels.json


def runner_name(aimodel: str | None = None, share_group: str | None = None) -> str:
    """The Deployment and Service name of a runner: DNS-1035, at most 63 characters."""
    base = f"runner-{aimodel}" if share_group is None else f"runner-group-{share_group}"
    if len(base) <= 63:
        return base
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    return f"{base[:54].rstrip('-')}-{digest}"


def common_labels(runner: str) -> dict[str, str]:
    return {
        PART_OF: "kubepeer",
        NAME: "kubepeer-runner",
        COMPONENT: "runner",
        MANAGED_BY: "kubepeer-operator",
        RUNNER: runner,
    }
