"""The `kubepeer` command: one entry point for every control-plane process and tool."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kubepeer import __version__
from kubepeer.api.crd import stale_crds, write_crds
from kubepeer.payments.ledger import WINNING_STREAM

Command = Callable[[argparse.Namespace], int]


def _version(_: argparse.Namespace) -> int:
    print(f"kubepeer {__version__}")
    return 0


def _crds(args: argparse.Namespace) -> int:
    if args.check:
        stale = stale_crds(args.out)
        if stale:
            print(
                f"{args.out}/ is stale ({', '.join(stale)}): run `kubepeer crds` and commit",
                file=sys.stderr,
            )
            return 1
        print(f"{args.out}/ is up to date")
        return 0
    for path in write_crds(args.out):
        print(f"wrote {path}")
    return 0


def _operator(args: argparse.Namespace) -> int:
    from kubepeer.controller.main import run_operator

    overrides = {
        key: value
        for key, value in {
            "namespaces": args.namespace or None,
            "standalone": args.standalone or None,
            "status_interval_seconds": args.status_interval,
            "redis_url": args.redis_url,
            "proxy_url": args.proxy_url,
            "runner_image": args.runner_image,
            "nodes_fixed": args.nodes_fixed or None,
        }.items()
        if value is not None
    }
    return run_operator(overrides, liveness=args.liveness)


def _rbac(args: argparse.Namespace) -> int:
    import yaml

    from kubepeer.controller.rbac import operator_rbac, proxy_rbac
    from kubepeer.controller.settings import OperatorSettings

    if args.proxy:
        print(yaml.safe_dump_all(proxy_rbac(args.namespace), sort_keys=False))
        return 0
    settings = OperatorSettings(namespaces=args.watch or [])
    print(yaml.safe_dump_all(operator_rbac(settings, args.namespace), sort_keys=False))
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from kubepeer.controller.kube import Kube

    released = Kube.from_environment().release_aimodels(args.namespace or [])
    print(f"released {released} AIModel(s): none holds a Kubepeer finalizer any more")
    return 0


def _ai_models_json(args: argparse.Namespace) -> int:
    import json

    from kubepeer.controller.kube import Kube

    entries = Kube.from_environment().ai_models_entries(args.namespace)
    print(json.dumps(entries, indent=1))
    return 0


def _protos(args: argparse.Namespace) -> int:
    from kubepeer.livepeer import protos

    if args.check:
        if not protos.is_current():
            print(f"{protos.GENERATED} is stale: run `kubepeer protos`", file=sys.stderr)
            return 1
        return 0
    print(f"wrote {protos.write()}")
    return 0


def _payments(args: argparse.Namespace) -> int:
    from kubepeer.payments.main import PaymentsConfig, run_payments

    return run_payments(
        PaymentsConfig(
            redis_url=args.redis_url,
            rpc_url_file=args.rpc_url_file,
            keystore=args.keystore,
            password_file=args.password_file,
            network=args.network,
            controller=args.controller,
            consumer=args.consumer,
            stream=args.stream,
            max_fee_per_gas=args.max_fee_per_gas,
            stuck_after=args.stuck_after,
            confirmations=args.confirmations,
            reward=args.reward,
            once=args.once,
            metrics_port=args.metrics_port,
            lease_namespace=args.lease_namespace,
        )
    )


def _proxy(args: argparse.Namespace) -> int:
    from kubepeer.proxy.main import ProxyArgs, run_proxy

    return run_proxy(
        ProxyArgs(
            bind=args.bind,
            public_url=args.public_url,
            namespace=args.namespace,
            models_file=args.models_file,
            redis_url=args.redis_url,
            endpoints_file=args.endpoints_file,
            plaintext=args.plaintext,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            auth_secret_file=args.auth_secret_file,
            recipient=args.recipient,
            recipient_secret_file=args.recipient_secret_file,
            payments=not args.no_payments,
            bearer_token_file=args.bearer_token_file,
            runner_token_file=args.runner_token_file,
            max_body_bytes=args.max_body_bytes,
            max_queue=args.max_queue,
            queue_timeout=args.queue_timeout,
            hold_timeout=args.hold_timeout,
            version=args.livepeer_version,
            wake=not args.no_wake,
            demand_ttl=args.demand_ttl,
            gas_price=args.gas_price,
            runner_trickle_url=args.trickle_url_for_runner,
            live_payment_interval=args.live_payment_interval,
            offchain_gateways=args.offchain_gateways,
            live_lease_seconds=args.live_lease_seconds,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubepeer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=_version)

    crds = commands.add_parser("crds", help="write the CRD YAML generated from the API models")
    crds.add_argument("--out", type=Path, default=Path("crds"), help="directory (default: crds)")
    crds.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the files are stale"
    )
    crds.set_defaults(run=_crds)

    op = commands.add_parser(
        "operator",
        help="run the operator (settings also from KUBEPEER_* env; flags win)",
    )
    op.add_argument(
        "--namespace", action="append", help="namespace to watch (repeat; default: all)"
    )
    op.add_argument("--standalone", action="store_true", help="no peering: a single replica")
    op.add_argument(
        "--status-interval", type=float, help="seconds between sweeps (idle models, retries)"
    )
    op.add_argument("--redis-url", help="Redis with the proxy's demand records")
    op.add_argument("--proxy-url", help="the proxy's URL, for aiModels.json")
    op.add_argument("--runner-image", help="default runner image")
    op.add_argument(
        "--nodes-fixed",
        action="store_true",
        help="the cluster never adds nodes: a model no node can take is Failed, not Pending",
    )
    op.add_argument(
        "--liveness", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz"
    )
    op.set_defaults(run=_operator)

    rbac = commands.add_parser("rbac", help="print the operator's least-privilege RBAC as YAML")
    rbac.add_argument("--namespace", default="kubepeer-system", help="the operator's namespace")
    rbac.add_argument(
        "--watch",
        action="append",
        help="a namespace the operator watches (repeat): Roles there only, no cluster-wide rules",
    )
    rbac.add_argument(
        "--proxy",
        action="store_true",
        help="the proxy's RBAC instead: a Role in --namespace, the namespace it serves",
    )
    rbac.set_defaults(run=_rbac)

    uninstall = commands.add_parser(
        "uninstall",
        help="remove Kubepeer's finalizer from every AIModel (run before removing the operator)",
    )
    uninstall.add_argument("--namespace", action="append", help="only these (default: all)")
    uninstall.set_defaults(run=_uninstall)

    table = commands.add_parser(
        "ai-models-json", help="print go-livepeer's aiModels.json for a namespace's AIModels"
    )
    table.add_argument("--namespace", "-n", required=True, help="the AIModels' namespace")
    table.set_defaults(run=_ai_models_json)

    pay = commands.add_parser("payments", help="redeem winning tickets on the TicketBroker")
    pay.add_argument("--redis-url", required=True, help="the ledger's Redis")
    pay.add_argument(
        "--rpc-url-file", type=Path,
        help="file (a Secret) holding the JSON-RPC URL of Arbitrum or a dev chain; "
        "default: $KUBEPEER_RPC_URL. Never a flag: providers put API keys in it",
    )  # fmt: skip
    pay.add_argument("--keystore", type=Path, required=True, help="encrypted key (a Secret)")
    pay.add_argument("--password-file", type=Path, required=True, help="its password (a Secret)")
    pay.add_argument("--network", choices=["arbitrum-one", "dev"], default="arbitrum-one")
    pay.add_argument("--controller", help="Livepeer Controller address (default: Arbitrum One's)")
    pay.add_argument("--consumer", default="redeemer-0", help="stream consumer name")
    pay.add_argument("--stream", default=WINNING_STREAM, help="Redis stream of winning tickets")
    pay.add_argument(
        "--max-fee-per-gas", type=int, default=10**9,
        help="wei per gas, the EIP-1559 ceiling (default 1 gwei, for Arbitrum One)",
    )  # fmt: skip
    pay.add_argument(
        "--stuck-after", type=float, default=30.0,
        help="seconds before an unmined transaction is replaced with higher fees",
    )  # fmt: skip
    pay.add_argument("--reward", action="store_true", help="call reward() once per round")
    pay.add_argument("--confirmations", type=int, default=1, help="blocks before redeemed")
    pay.add_argument("--once", action="store_true", help="handle what is queued, then exit")
    pay.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    pay.add_argument("--lease-namespace", help="hold a Lease here so one redeemer acts")
    pay.set_defaults(run=_payments)

    px = commands.add_parser(
        "proxy", help="serve gateways: discovery (gRPC) and jobs (HTTP) on one TLS port"
    )
    px.add_argument("--bind", default="0.0.0.0:8935", help="host:port to listen on")
    px.add_argument("--public-url", required=True, help="our service URI, as gateways dial it")
    px.add_argument("--namespace", required=True, help="the namespace of the AIModels served")
    px.add_argument(
        "--models-file", type=Path,
        help="one models.json ({version, models}) instead of watching the operator's table",
    )  # fmt: skip
    px.add_argument("--redis-url", required=True, help="ledger, results, demand records")
    px.add_argument(
        "--endpoints-file", type=Path,
        help="static ready URLs per runner Service (JSON) instead of watching EndpointSlices",
    )  # fmt: skip
    px.add_argument("--plaintext", action="store_true", help="h2c: TLS ends at the ingress")
    px.add_argument("--tls-cert", type=Path, help="certificate (a Secret); default: self-signed")
    px.add_argument("--tls-key", type=Path, help="its key (a Secret)")
    px.add_argument("--auth-secret-file", type=Path, help="auth token HMAC key shared by replicas")
    px.add_argument("--recipient", help="our ticket recipient address (0x...)")
    px.add_argument("--recipient-secret-file", type=Path, help="recipientRand secret (a Secret)")
    px.add_argument("--no-payments", action="store_true", help="private mode: bearer token only")
    px.add_argument("--bearer-token-file", type=Path, help="private mode's token (a Secret)")
    px.add_argument(
        "--offchain-gateways", action="store_true",
        help="private mode: also admit jobs as an offchain go-livepeer does (an auth token from "
        "our discovery, no signature; the gateway SDK's offchain mode). Only where the network "
        "limits who reaches the proxy",
    )  # fmt: skip
    px.add_argument("--runner-token-file", type=Path, help="the runners' AUTH_TOKEN (a Secret)")
    px.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    px.add_argument("--max-queue", type=int, default=8, help="jobs waiting per model")
    px.add_argument("--queue-timeout", type=float, default=10.0, help="seconds a job waits")
    px.add_argument("--hold-timeout", type=float, default=900.0, help="seconds held while waking")
    px.add_argument("--livepeer-version", default="0.9.1", help="protocol version advertised")
    px.add_argument("--no-wake", action="store_true", help="never scale OnDemand models up")
    px.add_argument(
        "--gas-price", type=int, default=10**7,
        help="wei per gas a winning ticket's redemption is sized for (Arbitrum: ~0.01 gwei)",
    )  # fmt: skip
    px.add_argument(
        "--demand-ttl", type=float, default=60.0,
        help="seconds a demand record outlives this proxy's last heartbeat",
    )  # fmt: skip
    px.add_argument(
        "--trickle-url-for-runner",
        help="base URL runners reach our trickle channels at (default: --public-url), "
        "as go-livepeer's -liveAITrickleHostForRunner",
    )  # fmt: skip
    px.add_argument(
        "--live-payment-interval", type=float, default=5.0,
        help="seconds between a live stream's debits (go-livepeer's LivePaymentInterval)",
    )  # fmt: skip
    px.add_argument(
        "--live-lease-seconds", type=float, default=30.0,
        help="a live stream's watcher renews its lease this often x3; another replica adopts "
        "the stream once it lapses",
    )  # fmt: skip
    px.set_defaults(run=_proxy)

    protos = commands.add_parser("protos", help="regenerate livepeer/net_pb2.py from net.proto")
    protos.add_argument("--check", action="store_true", help="exit 1 if net_pb2.py is stale")
    protos.set_defaults(run=_protos)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
