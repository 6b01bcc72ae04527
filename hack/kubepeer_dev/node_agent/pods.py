"""One worker thread per pod: sandbox, volumes, processes, probes, restarts, status.

Every container is a process group started inside the pod's network namespace through
`ip netns exec`, its stdout and stderr appended to one log file. The worker ticks a few
times a second: it reaps exits, runs the probes that are due and writes the pod status
when it changed. Its state on disk (sandbox, process ids) lets a restarted agent find
what an earlier one started (see agent.adopt).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kubepeer_dev.node_agent import sandbox as sb
from kubepeer_dev.node_agent.core import (
    ContainerView,
    EnvSources,
    PodSpecError,
    ProbeSpec,
    ProbeState,
    backoff_seconds,
    container_argv,
    mount_table,
    pod_status,
    resolve_env,
    rewrite_path,
    should_restart,
)
from kubepeer_dev.node_agent.images import LocalImage, command_for, image_repository
from kubepeer_dev.node_agent.volumes import materialise

log = logging.getLogger("node-agent")
TICK = 0.25
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where in-cluster config looks
BACKOFF_RESET_SECONDS = 600  # the kubelet forgets a back-off after 10 min without a crash


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api(Protocol):
    def secret(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def claim_path(self, namespace: str, name: str) -> str | None: ...
    def token(self, pod: dict[str, Any], audience: str | None, seconds: int) -> str: ...
    def patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None: ...
    def finish_delete(self, pod: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class NodeSettings:
    node: str
    state_dir: Path
    net: sb.NodeNet
    api_port: int
    ca_pem: str
    images: dict[str, LocalImage]
    backoff_base: float
    cluster_dns: bool = False  # CoreDNS runs on the node gateway


def process_start_ticks(pid: int) -> int | None:
    """The process start time from /proc (tells a reused pid from ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Container:
    spec: dict[str, Any]
    view: ContainerView
    process: subprocess.Popen[bytes] | None = None
    started_mono: float = 0.0
    restart_at: float = 0.0  # monotonic time of the next start attempt
    startup: ProbeState | None = None
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None
    next_probe: dict[str, float] = field(default_factory=dict)
    unrunnable: bool = False  # unmapped image: never started, like a failing pull
    killing_since: float | None = None  # liveness/startup failure: SIGTERM sent
    ran_before: bool = False  # so the next start is a restart
    crashes: int = 0  # restarts counted for back-off (reset after a long healthy run)


class PodWorker(threading.Thread):
    def __init__(self, pod: dict[str, Any], settings: NodeSettings, api: Api) -> None:
        self.uid = pod["metadata"]["uid"]
        super().__init__(name=f"pod-{pod['metadata']['name']}", daemon=True)
        self.pod = pod
        self.settings = settings
        self.api = api
        self.lock = threading.Lock()
        self.deleting = threading.Event()  # deletionTimestamp seen
        self.gone = threading.Event()  # object removed: stop at once
        self.stopping = threading.Event()  # agent shutting down: stop, keep nothing
        self.dir = settings.state_dir / "pods" / self.uid
        self.sandbox: sb.Sandbox | None = None
        self.containers: list[Container] = []
        self.last_status: dict[str, Any] | None = None
        self.start_time = pod.get("status", {}).get("startTime") or now_rfc3339()

    # --- fed by the agent's watch -------------------------------------------------------
    def update(self, pod: dict[str, Any]) -> None:
        with self.lock:
            self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    @property
    def ns(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    # --- lifecycle -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: worker failed", self.ns, self.name)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._setup_sandbox()
        self._setup_containers()
        while not (self.gone.is_set() or self.stopping.is_set()):
            if self.deleting.is_set():
                self._terminate_all(self._grace())
                self._push_status()
                self._teardown()
                self.api.finish_delete(self.pod)
                return
            for c in self.containers:
                try:
                    self._tick(c)
                except Exception as e:  # an API or OS error: show it, try again later
                    log.exception("pod %s/%s: %s", self.ns, self.name, c.spec["name"])
                    if c.process is None:
                        self._wait(c, "CreateContainerError", str(e))
                        c.restart_at = time.monotonic() + 2
            self._push_status()
            self.gone.wait(TICK)
        self._terminate_all(0 if self.gone.is_set() else 5)
        self._teardown()

    def _grace(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        return float(
            meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", 30))
        )

    def _setup_sandbox(self) -> None:
        saved = self.dir / "sandbox.json"
        if saved.exists():
            old = sb.Sandbox.from_json(saved.read_text())
            if sb.alive(old, self.settings.net):
                self.sandbox = old
        if self.sandbox is None:
            self.sandbox = sb.create(self.uid, self.settings.net)
            saved.write_text(self.sandbox.to_json())
        if self.settings.cluster_dns:
            sb.write_resolv_conf(self.sandbox, sb.resolv_conf(self.ns, self.settings.net))

    def _teardown(self) -> None:
        if self.sandbox:
            sb.destroy(self.sandbox, self.settings.net)
        (self.dir / "sandbox.json").unlink(missing_ok=True)
        (self.dir / "processes.json").unlink(missing_ok=True)

    def _setup_containers(self) -> None:
        previous = {
            s["name"]: s for s in (self.pod.get("status") or {}).get("containerStatuses") or []
        }
        for spec in self.pod["spec"]["containers"]:
            view = ContainerView(name=spec["name"], image=spec["image"])
            if old := previous.get(spec["name"]):
                # A restarted agent carries on the count and the last termination.
                view.restart_count = old.get("restartCount", 0)
                view.last_state = old.get("lastState") or {}
            ran = bool(old) and ("waiting" not in old.get("state", {}) or bool(view.last_state))
            c = Container(spec=spec, view=view, ran_before=ran, crashes=view.restart_count)
            ports = {p["name"]: p["containerPort"] for p in spec.get("ports") or [] if "name" in p}
            try:
                for kind in ("startup", "readiness", "liveness"):
                    if probe := spec.get(f"{kind}Probe"):
                        setattr(c, kind, ProbeState(ProbeSpec.from_wire(probe, ports)))
            except PodSpecError as e:
                self._wait(c, "CreateContainerConfigError", str(e))
                c.unrunnable = True
            if command_for(self.settings.images, spec["image"], None, None) is None:
                self._wait(
                    c,
                    "ErrImagePull",
                    f"image '{spec['image']}' is not in the node agent's image table "
                    f"(hack/kubepeer_dev/node_agent/images.py); it runs no image pulls",
                )
                c.unrunnable = True
            self.containers.append(c)

    @staticmethod
    def _wait(c: Container, reason: str, message: str) -> None:
        c.view.state = {"waiting": {"reason": reason, "message": message}}
        c.view.ready = False
        c.view.started = False

    # --- one container -------------------------------------------------------------------
    def _tick(self, c: Container) -> None:
        if c.unrunnable:
            return
        now = time.monotonic()
        if c.process is None:
            if now >= c.restart_at:
                self._start(c)
            return
        code = c.process.poll()
        if code is not None:
            self._exited(c, code)
            return
        if c.killing_since is not None:
            if now - c.killing_since > self._grace():
                kill_group(c.process.pid, signal.SIGKILL)
            return
        self._probe(c, now)

    def _start(self, c: Container) -> None:
        spec = c.spec
        assert self.sandbox is not None
        try:
            ns = self.ns
            volume_dirs = materialise(
                self.pod,
                self.dir,
                secret=lambda n: self.api.secret(ns, n),
                config_map=lambda n: self.api.config_map(ns, n),
                token=lambda aud, secs: self.api.token(self.pod, aud, secs),
                claim=lambda n: self.api.claim_path(ns, n),
            )
            mounts = mount_table(spec, volume_dirs)
            env = resolve_env(
                spec,
                EnvSources(
                    pod=self.pod,
                    pod_ip=self.sandbox.pod_ip,
                    host_ip=self.sandbox.host_ip,
                    secret=lambda n: self.api.secret(ns, n),
                    config_map=lambda n: self.api.config_map(ns, n),
                ),
            )
        except PodSpecError as e:
            self._wait(c, "CreateContainerConfigError", str(e))
            c.restart_at = time.monotonic() + 2
            return
        argv_env = command_for(
            self.settings.images, spec["image"], spec.get("command"), spec.get("args")
        )
        assert argv_env is not None
        argv, image_env = argv_env
        kubeconfig = self._write_kubeconfig()
        full_env = {
            **image_env,
            "HOSTNAME": self.name,
            "KUBECONFIG": str(kubeconfig),
            # The one mount mechanism: mountPath -> host directory, for code that needs it.
            "KUBEPEER_MOUNTS": json.dumps(mounts),
        }
        full_env.update({k: rewrite_path(v, mounts) for k, v in env.items()})
        from_image = (
            0
            if spec.get("command")
            else len(self.settings.images[image_repository(spec["image"])].entrypoint)
        )
        argv = container_argv(argv, from_image, env, mounts)
        if SA_DIR in mounts and self.settings.cluster_dns:
            argv = self._in_cluster(argv, mounts[SA_DIR], full_env)
        workdir = rewrite_path(spec.get("workingDir", ""), mounts) or str(self.dir)
        logfile = self.dir / f"{spec['name']}.log"
        with logfile.open("ab") as out:
            out.write(f"--- node-agent: start {now_rfc3339()} {argv}\n".encode())
            out.flush()
            c.process = subprocess.Popen(
                [*self.sandbox.exec_prefix(), *argv],
                env=full_env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach its children
            )
        if c.ran_before:
            c.view.restart_count += 1
        c.ran_before = True
        c.started_mono = time.monotonic()
        c.killing_since = None
        c.view.state = {"running": {"startedAt": now_rfc3339()}}
        c.view.started = c.startup is None
        c.view.ready = c.readiness is None and c.startup is None
        for kind in ("startup", "readiness", "liveness"):
            state: ProbeState | None = getattr(c, kind)
            if state:
                setattr(c, kind, ProbeState(state.spec))
                c.next_probe[kind] = c.started_mono + state.spec.initial_delay
        self._save_processes()
        log.info("pod %s/%s: started %s (pid %d)", self.ns, self.name, spec["name"], c.process.pid)

    @staticmethod
    def _in_cluster(argv: list[str], sa_dir: str, env: dict[str, str]) -> list[str]:
        """In-cluster config, the one real mount: the ServiceAccount files bind-mounted at
        their fixed path inside the mount namespace `ip netns exec` makes for the process
        (private to it), and the API server as the `kubernetes` Service by a name its
        certificate carries (kube-proxy and CoreDNS do the rest)."""
        Path(SA_DIR).mkdir(parents=True, exist_ok=True)  # the mount point, empty on the host
        env["KUBERNETES_SERVICE_HOST"] = "kubernetes.default.svc"
        env["KUBERNETES_SERVICE_PORT"] = "443"
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return ["sh", "-c", script, "sh", sa_dir, SA_DIR, *argv]

    def _exited(self, c: Container, code: int) -> None:
        kill_group(c.process.pid, signal.SIGKILL)  # stray children of the container
        started = c.view.state.get("running", {}).get("startedAt", now_rfc3339())
        reason = "Completed" if code == 0 else "Error"
        if code < 0:
            code, reason = 128 - code, "Error"
        terminated = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": now_rfc3339(),
        }
        c.process = None
        c.view.ready = False
        c.view.started = False
        c.view.last_state = {"terminated": terminated}
        log.info("pod %s/%s: %s exited %d", self.ns, self.name, c.spec["name"], code)
        if self.deleting.is_set() or not should_restart(
            self.pod["spec"].get("restartPolicy", "Always"), code
        ):
            c.view.state = {"terminated": terminated}
            c.unrunnable = True
            return
        if time.monotonic() - c.started_mono > BACKOFF_RESET_SECONDS:
            c.crashes = 0
        delay = backoff_seconds(c.crashes, self.settings.backoff_base)
        c.crashes += 1
        c.restart_at = time.monotonic() + delay
        if delay:
            self._wait(
                c,
                "CrashLoopBackOff",
                f"back-off {delay:.0f}s restarting failed container={c.spec['name']} "
                f"pod={self.name}",
            )
        else:
            c.view.state = {"terminated": terminated}

    # --- probes --------------------------------------------------------------------------
    def _probe(self, c: Container, now: float) -> None:
        order = ["startup"] if c.startup and not c.view.started else ["liveness", "readiness"]
        for kind in order:
            state: ProbeState | None = getattr(c, kind)
            if state is None or now < c.next_probe.get(kind, 0):
                continue
            c.next_probe[kind] = now + state.spec.period
            ok = self._http_ok(state.spec)
            state.record(ok)
            if kind == "startup" and state.passing:
                c.view.started = True
                c.view.ready = c.readiness is None
                now2 = time.monotonic()
                for k in ("liveness", "readiness"):
                    if getattr(c, k):
                        c.next_probe[k] = max(
                            now2, c.started_mono + getattr(c, k).spec.initial_delay
                        )
            elif kind in ("startup", "liveness") and state.failed:
                log.info(
                    "pod %s/%s: %s probe failed, restarting %s",
                    self.ns,
                    self.name,
                    kind,
                    c.spec["name"],
                )
                c.killing_since = time.monotonic()
                kill_group(c.process.pid, signal.SIGTERM)
                return
            elif kind == "readiness":
                c.view.ready = state.passing

    def _http_ok(self, spec: ProbeSpec) -> bool:
        assert self.sandbox is not None
        conn: http.client.HTTPConnection
        if spec.scheme == "HTTPS":
            # A kubelet's HTTPS probe does not verify the certificate (often self-signed).
            unverified = ssl._create_unverified_context()
            conn = http.client.HTTPSConnection(
                self.sandbox.pod_ip, spec.port, timeout=spec.timeout, context=unverified
            )
        else:
            conn = http.client.HTTPConnection(self.sandbox.pod_ip, spec.port, timeout=spec.timeout)
        try:
            conn.request("GET", spec.path, headers={"User-Agent": "kube-probe/node-agent"})
            return 200 <= conn.getresponse().status < 400
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    # --- termination ---------------------------------------------------------------------
    def _terminate_all(self, grace: float) -> None:
        running = [c for c in self.containers if c.process and c.process.poll() is None]
        for c in running:
            kill_group(c.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.process.poll() is None for c in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in self.containers:
            if c.process:
                kill_group(c.process.pid, signal.SIGKILL)
                code = c.process.wait()
                c.view.state = {
                    "terminated": {
                        "exitCode": 128 - code if code < 0 else code,
                        "reason": "Completed" if code == 0 else "Error",
                        "finishedAt": now_rfc3339(),
                    }
                }
                c.view.ready = False
                c.process = None
        self._save_processes()

    # --- status and files ----------------------------------------------------------------
    def _push_status(self) -> None:
        assert self.sandbox is not None
        with self.lock:
            conditions = (self.pod.get("status") or {}).get("conditions") or []
        status = pod_status(
            restart_policy=self.pod["spec"].get("restartPolicy", "Always"),
            views=[c.view for c in self.containers],
            pod_ip=self.sandbox.pod_ip,
            host_ip=self.sandbox.host_ip,
            start_time=self.start_time,
            now=now_rfc3339(),
            previous_conditions=conditions,
        )
        comparable = {k: v for k, v in status.items() if k != "conditions"}
        comparable["conditions"] = [(c["type"], c["status"]) for c in status["conditions"]]
        if comparable == self.last_status:
            return
        try:
            self.api.patch_status(self.pod, status)
            self.last_status = comparable
        except Exception as e:  # the object may be gone; the watch will tell
            log.warning("pod %s/%s: status not written: %s", self.ns, self.name, e)

    def _save_processes(self) -> None:
        procs = {
            c.spec["name"]: {"pid": c.process.pid, "ticks": process_start_ticks(c.process.pid)}
            for c in self.containers
            if c.process and c.process.poll() is None
        }
        meta = {"namespace": self.ns, "name": self.name, "uid": self.uid, "processes": procs}
        tmp = self.dir / "processes.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.dir / "processes.json")

    def _write_kubeconfig(self) -> Path:
        """A kubeconfig for the pod's ServiceAccount, usable from inside its netns."""
        assert self.sandbox is not None
        # Not rotated as a kubelet rotates projected tokens: ask for a day (the API server
        # may shorten it) so that a demo or a test session never outlives it.
        token = self.api.token(self.pod, None, 86400)
        path = self.dir / "kubeconfig"
        ca = self.dir / "ca.crt"
        ca.write_text(self.settings.ca_pem)
        server = f"https://{self.sandbox.host_ip}:{self.settings.api_port}"
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "cluster",
                    # The API server's certificate names localhost, not the gateway address.
                    "cluster": {
                        "server": server,
                        "certificate-authority": str(ca),
                        "tls-server-name": "localhost",
                    },
                }
            ],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "sa",
                    "context": {"cluster": "cluster", "user": "sa", "namespace": self.ns},
                }
            ],
            "current-context": "sa",
        }
        path.write_text(json.dumps(doc))
        path.chmod(0o600)
        return path

    def log_files(self) -> dict[str, str]:
        return {c.spec["name"]: str(self.dir / f"{c.spec['name']}.log") for c in self.containers}
