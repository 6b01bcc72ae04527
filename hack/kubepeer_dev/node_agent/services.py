"""The node's Service and DNS plumbing: kube-proxy and CoreDNS inside the node netns.

Both are the upstream programs, built by `hack/cluster build` (kube-proxy from the same
pinned Kubernetes module as the control plane, CoreDNS with its kubernetes plugin). They
run in the node's netns, so kube-proxy's iptables rules and CoreDNS's port 53 belong to
this node only. Pods resolve through CoreDNS on the node gateway address (.1), written
to /etc/netns/<pod netns>/resolv.conf, which `ip netns exec` puts over /etc/resolv.conf.
Names outside the cluster domain get NXDOMAIN: no query leaves the machine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import yaml

from kubepeer_dev.node_agent.pods import kill_group, process_start_ticks
from kubepeer_dev.node_agent.sandbox import CLUSTER_DOMAIN, NodeNet

log = logging.getLogger("node-agent")


def node_kubeconfig(admin: Path, net: NodeNet, dest: Path) -> Path:
    """The admin kubeconfig, pointed at the API server as the node netns reaches it."""
    doc = yaml.safe_load(admin.read_text())
    for entry in doc["clusters"]:
        cluster = entry["cluster"]
        port = cluster["server"].rsplit(":", 1)[1].strip("/")
        cluster["server"] = f"https://{net.host_ip}:{port}"
        cluster["tls-server-name"] = "localhost"  # the certificate names localhost
    for section, keys in (
        ("clusters", ("certificate-authority",)),
        ("users", ("client-certificate", "client-key")),
    ):
        for entry in doc[section]:
            body = entry["cluster" if section == "clusters" else "user"]
            for key in keys:
                if key in body and not os.path.isabs(body[key]):
                    body[key] = str((admin.parent / body[key]).resolve())
    dest.write_text(yaml.safe_dump(doc))
    dest.chmod(0o600)
    return dest


def corefile(net: NodeNet, kubeconfig: Path) -> str:
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {net.gateway}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa
    }}
    cache 5
}}
.:53 {{
    bind {net.gateway}
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


class NodeServices:
    """Starts kube-proxy and CoreDNS in the node netns; records their pids for adopt()."""

    def __init__(
        self, bin_dir: Path, admin_kubeconfig: Path, net: NodeNet, state_dir: Path
    ) -> None:
        self.bin_dir = bin_dir
        self.admin = admin_kubeconfig
        self.net = net
        self.dir = state_dir / "node"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def adopt(self) -> None:
        """Kill the kube-proxy and CoreDNS an earlier (killed) agent left running."""
        saved = self.dir / "pids.json"
        if saved.exists():
            for name, p in json.loads(saved.read_text()).items():
                if process_start_ticks(p["pid"]) == p["ticks"]:
                    log.info("adopt: killing %s (pid %d) left by an earlier agent", name, p["pid"])
                    kill_group(p["pid"], signal.SIGKILL)
            saved.unlink()

    def start(self, node: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        kc = node_kubeconfig(self.admin, self.net, self.dir / "kubeconfig")
        (self.dir / "Corefile").write_text(corefile(self.net, kc))
        self._spawn(
            "kube-proxy",
            [str(self.bin_dir / "kube-proxy"), f"--kubeconfig={kc}", f"--hostname-override={node}",
             "--proxy-mode=iptables", f"--cluster-cidr={self.net.cidr}",
             # Global conntrack sysctls are the machine's, not this node's: leave them alone.
             "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
             "--conntrack-tcp-timeout-close-wait=0", "--iptables-localhost-nodeports=false",
             f"--healthz-bind-address={self.net.gateway}:10256",
             f"--metrics-bind-address={self.net.gateway}:10249"],
        )  # fmt: skip
        self._spawn("coredns", [str(self.bin_dir / "coredns"), "-conf", str(self.dir / "Corefile")])

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.dir / f"{name}.log").open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [*self.net.exec_prefix(), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        pids = {
            n: {"pid": p.pid, "ticks": process_start_ticks(p.pid)}
            for n, p in self.processes.items()
        }
        (self.dir / "pids.json").write_text(json.dumps(pids))
        log.info("node: started %s (pid %d)", name, self.processes[name].pid)

    def check(self) -> None:
        for name, p in self.processes.items():
            if p.poll() is not None:
                log.error(
                    "node: %s exited %s; see %s", name, p.returncode, self.dir / f"{name}.log"
                )

    def stop(self) -> None:
        for p in self.processes.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.processes.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        (self.dir / "pids.json").unlink(missing_ok=True)
