"""The `kubepeer` command: one entry point for every control-plane process and tool."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kubepeer import __version__
from kubepeer.api.crd import stale_crds, write_crds

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
        }.items()
        if value is not None
    }
    return run_operator(overrides, liveness=args.liveness)


def _rbac(args: argparse.Namespace) -> int:
    import yaml

    from kubepeer.controller.rbac import operator_rbac
    from kubepeer.controller.settings import OperatorSettings

    print(yaml.safe_dump_all(operator_rbac(OperatorSettings(), args.namespace), sort_keys=False))
    return 0


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
    op.add_argument("--status-interval", type=float, help="seconds between status refreshes")
    op.add_argument("--redis-url", help="Redis with the proxy's demand records")
    op.add_argument("--proxy-url", help="the proxy's URL, for aiModels.json")
    op.add_argument("--runner-image", help="default runner image")
    op.add_argument(
        "--liveness", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz"
    )
    op.set_defaults(run=_operator)

    rbac = commands.add_parser("rbac", help="print the operator's least-privilege RBAC as YAML")
    rbac.add_argument("--namespace", default="kubepeer-system", help="the operator's namespace")
    rbac.set_defaults(run=_rbac)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
