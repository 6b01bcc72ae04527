"""The node's network: one netns for the node, one netns per pod.

    host (root netns) --veth--> node netns --veth per pod--> pod netns (eth0)

The node netns plays the machine a kubelet would run on: it forwards between pods (the
host itself never forwards), and kube-proxy and the DNS server run there, so their
rules and ports belong to this node alone and two test clusters side by side do not
meet. The node owns a /24 from hack/cluster's agent range: .1 is the pods' gateway (and
the DNS address), .254 is the host as the node sees it (the API server answers there).
The host routes the /24 to the node's veth; hack/cluster's blackhole route for the whole
range catches every address no node holds, so nothing leaves the machine. Every route
carries hack/cluster's route protocol number, so `hack/cluster down` removes strays.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

ROUTE_PROTO = "77"  # hack/cluster's route_proto
LOCK = Path("/run/kubepeer-node-agent.lock")  # address allocation, across agents
CLUSTER_DOMAIN = "cluster.local"


class SandboxError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise SandboxError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:11]


@dataclass(frozen=True)
class NodeNet:
    netns: str
    host_veth: str
    cidr: str  # this node's /24
    gateway: str  # .1: the pods' default gateway and DNS address, in the node netns
    host_ip: str  # .254: the host, where the API server answers

    @classmethod
    def load(cls, path: Path) -> NodeNet | None:
        return cls(**json.loads(path.read_text())) if path.exists() else None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    def alive(self) -> bool:
        return (Path("/run/netns") / self.netns).exists() and bool(
            ip("route", "show", self.cidr, "dev", self.host_veth, check=False)
        )

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


def _routes(netns: str | None = None) -> list[dict]:
    args = ("-n", netns) if netns else ()
    return json.loads(ip(*args, "-j", "-4", "route", "show") or "[]")


def create_node(node: str, agent_range: str) -> NodeNet:
    """The node netns and its /24: the lowest /24 of the range no other node routes."""
    netns, veth = f"kpn-{_short(node)}", f"kpn{_short(node)}"
    subnets = ipaddress.IPv4Network(agent_range).subnets(new_prefix=24)
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        destroy_node_names(netns, veth)
        used = {r.get("dst") for r in _routes()}
        # .0/24 holds nothing: hack/cluster's blackhole covers the range, start at .1.0
        cidr = next((s for s in list(subnets)[1:] if str(s) not in used), None)
        if cidr is None:
            raise SandboxError(f"no free /24 left in {agent_range}")
        hosts = list(cidr.hosts())
        gw, host_ip = str(hosts[0]), str(hosts[-1])
        ip("netns", "add", netns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "host0", "netns", netns)
        ip("addr", "add", f"{host_ip}/32", "dev", veth)
        ip("link", "set", veth, "up")
        ip("route", "replace", str(cidr), "dev", veth, "src", host_ip, "proto", ROUTE_PROTO)
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "link", "set", "host0", "up")
        ip("-n", netns, "addr", "add", f"{gw}/32", "dev", "lo")  # answers on any pod link
        ip("-n", netns, "route", "add", host_ip, "dev", "host0", "scope", "link")
        ip("-n", netns, "route", "add", "default", "via", host_ip, "dev", "host0")
        # Forwarding between pods, and proxy ARP so the host reaches pods on-link.
        for setting in ("net.ipv4.ip_forward=1", "net.ipv4.conf.host0.proxy_arp=1"):
            subprocess.run([*("ip", "netns", "exec", netns), "sysctl", "-qw", setting], check=True)
    return NodeNet(netns=netns, host_veth=veth, cidr=str(cidr), gateway=gw, host_ip=host_ip)


def destroy_node_names(netns: str, veth: str) -> None:
    ip("link", "del", veth, check=False)
    ip("netns", "del", netns, check=False)


def destroy_node(net: NodeNet) -> None:
    destroy_node_names(net.netns, net.host_veth)


@dataclass(frozen=True)
class Sandbox:
    netns: str
    node_veth: str  # the pod's veth end in the node netns
    pod_ip: str
    gateway: str
    host_ip: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Sandbox:
        return cls(**json.loads(text))

    def exec_prefix(self) -> list[str]:
        """Run inside the pod's netns (ip netns exec also applies /etc/netns/<netns>/
        files over /etc: resolv.conf)."""
        return ["ip", "netns", "exec", self.netns]


def create(pod_uid: str, node: NodeNet) -> Sandbox:
    digest = _short(pod_uid)
    netns, veth = f"kp-{digest}", f"kp{digest}"
    net = ipaddress.IPv4Network(node.cidr)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        destroy_names(netns, veth, node.netns)  # a half-made sandbox from a crash
        used = {r.get("dst") for r in _routes(node.netns)} | {node.gateway, node.host_ip}
        addr = next((str(a) for a in net.hosts() if str(a) not in used), None)
        if addr is None:
            raise SandboxError(f"no free address left in {node.cidr}")
        ip("netns", "add", netns)
        ip(
            "-n",
            node.netns,
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        )
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{addr}/32", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "route", "add", node.gateway, "dev", "eth0", "scope", "link")
        ip("-n", netns, "route", "add", "default", "via", node.gateway, "dev", "eth0")
        ip("-n", node.netns, "link", "set", veth, "up")
        # The /32 claims the address (allocation reads these routes); proxy ARP lets the
        # node answer for the gateway, which it holds on lo.
        ip("-n", node.netns, "route", "replace", f"{addr}/32", "dev", veth, "src", node.gateway)
        subprocess.run(
            [*node.exec_prefix(), "sysctl", "-qw", f"net.ipv4.conf.{veth}.proxy_arp=1"],
            check=True,
        )
    return Sandbox(
        netns=netns, node_veth=veth, pod_ip=addr, gateway=node.gateway, host_ip=node.host_ip
    )


def alive(sandbox: Sandbox, node: NodeNet) -> bool:
    return (Path("/run/netns") / sandbox.netns).exists() and bool(
        ip("-n", node.netns, "route", "show", f"{sandbox.pod_ip}/32", check=False)
    )


def destroy_names(netns: str, veth: str, node_netns: str) -> None:
    ip("-n", node_netns, "link", "del", veth, check=False)  # takes the /32 route with it
    ip("netns", "del", netns, check=False)
    resolv = Path("/etc/netns") / netns
    if resolv.is_dir():
        for f in resolv.iterdir():
            f.unlink()
        resolv.rmdir()


def destroy(sandbox: Sandbox, node: NodeNet) -> None:
    destroy_names(sandbox.netns, sandbox.node_veth, node.netns)


def write_resolv_conf(sandbox: Sandbox, text: str) -> None:
    d = Path("/etc/netns") / sandbox.netns
    d.mkdir(parents=True, exist_ok=True)
    (d / "resolv.conf").write_text(text)


def resolv_conf(namespace: str, net: NodeNet) -> str:
    """A pod's resolver: CoreDNS on the node gateway, Kubernetes' search path."""
    d = CLUSTER_DOMAIN
    return f"nameserver {net.gateway}\nsearch {namespace}.svc.{d} svc.{d} {d}\noptions ndots:5\n"
