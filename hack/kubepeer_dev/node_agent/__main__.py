"""hack/node-agent — DEV AND TEST ONLY: run the pods bound to one Node as local processes.

    hack/node-agent --kubeconfig PATH --node NAME [--state-dir DIR] [--bin-dir DIR]
                    [--gpus N] [--gpu-product P] [--gpu-memory MIB] [--backoff-base S]
                    [--parent-pid PID]

Needs root (network namespaces, veth pairs, host routes) and the host routes that
`hack/cluster up` installs. Prints the path of its log index (JSON: namespace/pod ->
container -> log file) once it is watching.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from kubernetes import config

from kubepeer_dev.node_agent.agent import Agent, ca_pem_from_kubeconfig, node_manifest
from kubepeer_dev.node_agent.images import build_image, image_table
from kubepeer_dev.node_agent.pods import NodeSettings
from kubepeer_dev.node_agent.sandbox import NodeNet, create_node, destroy_node
from kubepeer_dev.node_agent.services import NodeServices

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("KUBEPEER_CACHE", Path.home() / ".cache" / "kubepeer"))


def local_images() -> Path:
    """The checkout built as the kubepeer images install it (hack/setup's uv, offline)."""
    uvs = sorted(CACHE.glob("tools/uv-*/bin/uv"))
    if not uvs:
        raise SystemExit(f"no uv under {CACHE}/tools: run `make setup`")
    try:
        return build_image(REPO, CACHE, uvs[-1])
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"building the local kubepeer image failed: {e.stderr}") from None


AGENT_RANGE = "10.244.0.0/16"  # hack/cluster's agent_pod_cidr


def node_network(state_dir: Path, node: str) -> NodeNet:
    """The node netns an earlier run made, if it still stands; else a new one."""
    saved = state_dir / "node-net.json"
    net = NodeNet.load(saved)
    if net is None or not net.alive():
        # Named after the node and the state dir: clusters side by side may reuse a name.
        net = create_node(f"{node}@{state_dir}", AGENT_RANGE)
        net.save(saved)
    return net


def stop_when_parent_dies(parent_pid: int, done: threading.Event) -> None:
    """Shut down as on SIGTERM once `parent_pid` is no longer our parent.

    A test session killed hard (SIGKILL, a CI job cancelled) runs no fixture teardown;
    without this its agent, the agent's pods, kube-proxy and CoreDNS would run on. The
    parent is compared, not probed, so a reused pid cannot keep us alive.
    """
    while not done.wait(1.0):
        if os.getppid() != parent_pid:
            logging.warning("parent process %d is gone: shutting down", parent_pid)
            done.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hack/node-agent", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True, type=Path)
    p.add_argument("--node", required=True)
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-product", default="NVIDIA-A10G")
    p.add_argument("--gpu-memory", type=int, default=24576, help="MiB")
    p.add_argument("--backoff-base", type=float, default=10.0, help="restart back-off start (s)")
    p.add_argument(
        "--bin-dir",
        type=Path,
        help="where kube-proxy and coredns are (hack/cluster bin); without: no Services, no DNS",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        help="shut down when this process (the one starting the agent) exits, even by SIGKILL",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print(
            "hack/node-agent: needs root (network namespaces, veth pairs, host routes)",
            file=sys.stderr,
        )
        return 2
    state_dir = args.state_dir or Path.home() / ".cache" / "kubepeer" / "node-agent" / args.node
    state_dir.mkdir(parents=True, exist_ok=True)
    ca, port = ca_pem_from_kubeconfig(args.kubeconfig)
    net = node_network(state_dir, args.node)
    services = None
    if args.bin_dir and all((args.bin_dir / b).is_file() for b in ("kube-proxy", "coredns")):
        services = NodeServices(args.bin_dir, args.kubeconfig, net, state_dir)
    else:
        logging.warning("no kube-proxy/coredns in --bin-dir: pods get no Services and no DNS")
    settings = NodeSettings(
        node=args.node,
        state_dir=state_dir,
        net=net,
        api_port=port,
        ca_pem=ca,
        images=image_table(local_images()),
        backoff_base=args.backoff_base,
        cluster_dns=services is not None,
    )
    api = config.new_client_from_config(config_file=str(args.kubeconfig))
    manifest = node_manifest(args.node, settings, args.gpus, args.gpu_product, args.gpu_memory)
    agent = Agent(api, settings, manifest)
    agent.adopt()
    agent.register()
    if services:
        services.adopt()
        services.start(args.node)
    threading.Thread(target=agent.heartbeat, name="heartbeat", daemon=True).start()
    watcher = threading.Thread(target=agent.watch_pods, name="watch", daemon=True)
    watcher.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    if args.parent_pid is not None:
        threading.Thread(
            target=stop_when_parent_dies, args=(args.parent_pid, done), name="parent", daemon=True
        ).start()
    print(f"node-agent: node {args.node} watching; log index {state_dir / 'logs.json'}", flush=True)
    done.wait()
    agent.shutdown()
    if services:
        services.stop()
    destroy_node(settings.net)
    (state_dir / "node-net.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
