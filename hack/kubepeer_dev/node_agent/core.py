"""The node agent's pure core: what a kubelet decides, as functions over plain data.

No I/O here: env resolution, mount-path rewriting, probe bookkeeping, restart back-off
and the pod status a set of container states adds up to. The edges (netns, processes,
the API server) live in the other modules of this package.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Kubelet's container restart back-off: 10 s doubling to 5 min.
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 300.0


class PodSpecError(ValueError):
    """The pod asks for something this agent cannot give; the message names the field."""


# --- env ---------------------------------------------------------------------------------

Lookup = Callable[[str, str, bool], str | None]  # (object name, key, optional) -> value


@dataclass(frozen=True)
class EnvSources:
    """What env resolution may read: the pod's facts and its namespace's objects."""

    pod: Mapping[str, Any]
    pod_ip: str
    host_ip: str
    secret: Callable[[str], Mapping[str, str] | None]  # name -> decoded data, None if absent
    config_map: Callable[[str], Mapping[str, str] | None]


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubelet's $(VAR) expansion: known names expand, unknown stay, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, value)


def field_ref(src: EnvSources, path: str) -> str:
    meta = src.pod.get("metadata", {})
    spec = src.pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": src.pod_ip,
        "status.hostIP": src.host_ip,
    }
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    raise PodSpecError(f"fieldRef.fieldPath '{path}' is not supported by the node agent")


def resolve_env(container: Mapping[str, Any], src: EnvSources) -> dict[str, str]:
    """The container's environment as a kubelet builds it: envFrom first, then env."""
    env: dict[str, str] = {}
    for ref in container.get("envFrom") or []:
        prefix = ref.get("prefix", "")
        if "secretRef" in ref:
            kind, r, data = "Secret", ref["secretRef"], src.secret(ref["secretRef"]["name"])
        elif "configMapRef" in ref:
            kind, r = "ConfigMap", ref["configMapRef"]
            data = src.config_map(r["name"])
        else:
            continue
        if data is None:
            if r.get("optional"):
                continue
            raise PodSpecError(f"envFrom: {kind} '{r['name']}' not found")
        env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        frm = var["valueFrom"]
        if "fieldRef" in frm:
            env[name] = field_ref(src, frm["fieldRef"]["fieldPath"])
            continue
        if "secretKeyRef" in frm:
            kind, ref = "Secret", frm["secretKeyRef"]
            data = src.secret(ref["name"])
        elif "configMapKeyRef" in frm:
            kind, ref = "ConfigMap", frm["configMapKeyRef"]
            data = src.config_map(ref["name"])
        else:
            raise PodSpecError(
                f"env[{name}].valueFrom: only fieldRef, secretKeyRef, configMapKeyRef"
            )
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                continue
            what = f"{kind} '{ref['name']}'" + ("" if data is None else f" key '{ref['key']}'")
            raise PodSpecError(f"env[{name}]: {what} not found")
        env[name] = data[ref["key"]]
    return env


# --- mounts ------------------------------------------------------------------------------


def mount_table(container: Mapping[str, Any], volume_dirs: Mapping[str, str]) -> dict[str, str]:
    """Container mountPath -> host path, from the container's volumeMounts."""
    table: dict[str, str] = {}
    for mount in container.get("volumeMounts") or []:
        host = volume_dirs.get(mount["name"])
        if host is None:
            raise PodSpecError(f"volumeMounts[{mount['name']}]: no such volume in the pod")
        if sub := mount.get("subPath"):
            host = f"{host.rstrip('/')}/{sub}"
        table[mount["mountPath"].rstrip("/") or "/"] = host
    return table


def container_argv(argv: Sequence[str], from_image: int, env: Mapping[str, str],
                   mounts: Mapping[str, str]) -> list[str]:  # fmt: skip
    """What runs: the first `from_image` words are the image's entrypoint, a path on this
    host that stays as it is (a cache under /tmp is not the pod's /tmp); the pod spec's own
    words get $(VAR) expansion, as a kubelet does, and then the mount rewriting."""
    spec_words = [rewrite_path(expand(word, env), mounts) for word in argv[from_image:]]
    return [*argv[:from_image], *spec_words]


def rewrite_path(value: str, table: Mapping[str, str]) -> str:
    """The one mount mechanism: a value that is a mountPath, or lies under one, is rewritten
    to the host directory behind it (longest mountPath first)."""
    for mount in sorted(table, key=len, reverse=True):
        if value == mount or value.startswith(mount + "/"):
            return table[mount] + value[len(mount) :]
    return value


# --- probes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSpec:
    path: str
    port: int
    scheme: str = "HTTP"
    initial_delay: float = 0
    period: float = 10
    timeout: float = 1
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def from_wire(cls, probe: Mapping[str, Any], ports: Mapping[str, int]) -> ProbeSpec:
        http = probe.get("httpGet")
        if not http:
            raise PodSpecError("only httpGet probes are supported by the node agent")
        port = http.get("port")
        if isinstance(port, str) and not port.isdigit():
            if port not in ports:
                raise PodSpecError(f"probe port '{port}' is not a named container port")
            port = ports[port]
        return cls(
            path=http.get("path", "/"),
            port=int(port),
            scheme=http.get("scheme", "HTTP"),
            initial_delay=probe.get("initialDelaySeconds", 0),
            period=probe.get("periodSeconds", 10),
            timeout=probe.get("timeoutSeconds", 1),
            success_threshold=probe.get("successThreshold", 1),
            failure_threshold=probe.get("failureThreshold", 3),
        )


@dataclass
class ProbeState:
    """Consecutive results against the thresholds, as the kubelet's prober counts them."""

    spec: ProbeSpec
    successes: int = 0
    failures: int = 0
    passing: bool = False

    def record(self, ok: bool) -> bool:
        """Record one result; True when the verdict (passing) changed."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            verdict = self.passing or self.successes >= self.spec.success_threshold
        else:
            self.successes, self.failures = 0, self.failures + 1
            verdict = self.passing and self.failures < self.spec.failure_threshold
        changed = verdict != self.passing
        self.passing = verdict
        return changed

    @property
    def failed(self) -> bool:
        return self.failures >= self.spec.failure_threshold


def backoff_seconds(restarts: int, base: float = BACKOFF_BASE_SECONDS) -> float:
    """Delay before restart number `restarts + 1`: none for the first, then base doubling."""
    if restarts <= 0:
        return 0.0
    return min(base * 2 ** (restarts - 1), BACKOFF_MAX_SECONDS)


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


# --- status ------------------------------------------------------------------------------


@dataclass
class ContainerView:
    """What the agent knows of one container, enough to write its containerStatus."""

    name: str
    image: str
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    restart_count: int = 0
    ready: bool = False
    started: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "state": self.state,
            "lastState": self.last_state,
            "restartCount": self.restart_count,
            "ready": self.ready,
            "started": self.started,
        }


def pod_phase(restart_policy: str, views: list[ContainerView]) -> str:
    running = [v for v in views if "running" in v.state]
    terminated = [v.state["terminated"] for v in views if "terminated" in v.state]
    if running:
        return "Running"
    if terminated and len(terminated) == len(views) and restart_policy != "Always":
        if all(t["exitCode"] == 0 for t in terminated):
            return "Succeeded"
        if restart_policy == "Never":
            return "Failed"
    if any(v.restart_count for v in views):
        return "Running"  # between restarts a kubelet keeps the pod Running
    return "Pending"


def _condition(kind: str, ok: bool, now: str, previous: Mapping[str, Any]) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(kind, {})
    since = old.get("lastTransitionTime") if old.get("status") == status else now
    return {"type": kind, "status": status, "lastTransitionTime": since or now}


def pod_status(
    *,
    restart_policy: str,
    views: list[ContainerView],
    pod_ip: str,
    host_ip: str,
    start_time: str,
    now: str,
    previous_conditions: list[Mapping[str, Any]],
) -> dict[str, Any]:
    """The status subresource for this pod, conditions keeping their transition times."""
    prev = {c["type"]: c for c in previous_conditions}
    ready = bool(views) and all(v.ready for v in views)
    status: dict[str, Any] = {
        "phase": pod_phase(restart_policy, views),
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "conditions": [
            _condition("PodReadyToStartContainers", bool(pod_ip), now, prev),
            _condition("Initialized", True, now, prev),
            _condition("ContainersReady", ready, now, prev),
            _condition("Ready", ready, now, prev),
            _condition("PodScheduled", True, now, prev),
        ],
        "containerStatuses": [v.to_wire() for v in views],
    }
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return status
