"""Labels, annotations and names that tie runners to AIModels: what the operator writes and the
proxy reads."""

from __future__ import annotations

import hashlib
import re

PART_OF = "app.kubernetes.io/part-of"
NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kubepeer-operator"

RUNNER = "kubepeer.io/runner"  # the runner (Deployment/Service) a pod belongs to
AIMODEL = "kubepeer.io/aimodel"  # the AIModel a dedicated runner serves (label-safe form)
SHARE_GROUP = "kubepeer.io/share-group"  # the share group a packed runner serves
PIPELINE = "kubepeer.io/pipeline"  # the pipeline of a dedicated runner
TABLE = "kubepeer.io/table"  # on each table ConfigMap: "model" (AIModel) or "app" (LiveRunner)
MODELS_ANNOTATION = (
    "kubepeer.io/models"  # JSON on a runner Deployment: [{aimodel, pipeline, modelId}]
)
AIMODEL_ANNOTATION = "kubepeer.io/aimodel"  # the exact AIModel name, on its table ConfigMap
CONTENT_HASH = "kubepeer.io/content-hash"  # what the operator last wrote, to skip no-op writes
WOKEN_AT = "kubepeer.io/woken-at"  # written by the proxy with a wake-up: see demand.py
LIVE_RUNNER = "kubepeer.io/live-runner"  # a LiveRunner's Deployment name, on it and its pods
LIVE_RUNNER_ANNOTATION = "kubepeer.io/live-runner"  # the exact LiveRunner name, on its Deployment
RUNNER_COMPONENT, LIVE_RUNNER_COMPONENT = "runner", "live-runner"  # app.kubernetes.io/component

DEDICATED_PREFIX = "runner-"
GROUP_PREFIX = "group-"
LIVE_PREFIX = "live-"
TABLE_PREFIX = "kubepeer-model-"
APP_TABLE_PREFIX = "kubepeer-app-"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def bounded_name(prefix: str, name: str, limit: int = 63) -> str:
    """`prefix + name` when that is a DNS-1035 label within `limit` with no `--`;
    otherwise a readable stem, `--` and a hash of `name`.

    Only hashed names contain `--`, so a hashed name never equals a verbatim one, and
    two different names hash apart: any valid object name maps to a valid, distinct name.
    """
    verbatim = prefix + name
    if len(verbatim) <= limit and _DNS_LABEL.match(verbatim) and "--" not in verbatim:
        return verbatim
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    stem = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", verbatim.lower()))
    stem = stem[: limit - len(digest) - 2].rstrip("-")
    return f"{stem}--{digest}"


def runner_name(aimodel: str | None = None, share_group: str | None = None) -> str:
    """The Deployment and Service name of a runner. Dedicated runners start `runner-`,
    share groups `group-`: the two can never collide, whatever the names."""
    if share_group is not None:
        return bounded_name(GROUP_PREFIX, share_group)
    assert aimodel is not None
    return bounded_name(DEDICATED_PREFIX, aimodel)


def live_runner_name(live_runner: str) -> str:
    """The Deployment and Service name of a LiveRunner's app (`live-`: never a runner's)."""
    return bounded_name(LIVE_PREFIX, live_runner)


def table_name(aimodel: str) -> str:
    """The ConfigMap holding one AIModel's row of the price table."""
    return bounded_name(TABLE_PREFIX, aimodel, limit=253)


def app_table_name(live_runner: str) -> str:
    """The ConfigMap holding one LiveRunner's row of the app table (contracts/apps.py)."""
    return bounded_name(APP_TABLE_PREFIX, live_runner, limit=253)


def label_value(name: str) -> str:
    """An object name as a label value (at most 63 characters; dots are allowed)."""
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[:51].rstrip('-.')}-{digest}"


def _workload_labels(component: str, key: str, deployment: str) -> dict[str, str]:
    """What the operator puts on a workload's Deployment, Service and pods; `key` names the
    Deployment, and is the label its pods are selected by."""
    return {
        PART_OF: "kubepeer",
        NAME: f"kubepeer-{component}",
        COMPONENT: component,
        MANAGED_BY: MANAGER,
        key: deployment,
    }


def common_labels(runner: str) -> dict[str, str]:
    return _workload_labels(RUNNER_COMPONENT, RUNNER, runner)


def live_runner_labels(deployment: str) -> dict[str, str]:
    return _workload_labels(LIVE_RUNNER_COMPONENT, LIVE_RUNNER, deployment)
