#!/usr/bin/env python3
"""A remote signer for Live Runner clients, as far as the official gateway SDK can tell:
written from live-runner-wire.md 7.7 (go-livepeer's `server/remote_signer.go`), for tests
and the demo. It holds the payer's key and signs what the SDK asks for:

- `POST /sign-orchestrator-info` -> `{"address", "signature"}`: the payer's address, and its
  signature over it (what discovery requests carry);
- `POST /generate-live-payment` with `{"orchestrator": <base64 OrchestratorInfo from a 402
  challenge>, "type": "live" | "lv2v" | "fixed", "ManifestID", "maxPrice"?, "state"?}` ->
  `{"payment", "segCreds", "state"}`: tickets for what the next stretch costs at the
  challenge's price (the first payment covers 10 s for `live`, 60 s of 720p30 pixels for
  `lv2v`, one unit for `fixed`; later ones the time since the last), and the segment
  credentials naming the manifest and the challenge's auth token. A price over `maxPrice`
  answers 481, as go-livepeer's signer does.

    python -m kubepeer_dev.remote_signer --key-file payer.key --port 9000

Tickets are made by `gateway_sim.Gateway` (this repo's gateway, whose tickets the payments
tests check against the TicketBroker's rules).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import threading
import time
from decimal import Decimal
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubepeer.livepeer import net_pb2
from kubepeer_dev.gateway_sim import Gateway, personal_sign_keccak, ticket_ev

PIXELS_PER_SECOND = 1280 * 720 * 30
FIRST_SECONDS = {"live": 10, "lv2v": 60}  # what a session's first payment covers
UNITS_PER_SECOND = {"live": 1, "lv2v": PIXELS_PER_SECOND}
OVER_MAX_PRICE = 481


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Signer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.lock = threading.Lock()  # one nonce sequence

    def orchestrator_info_sig(self) -> dict[str, str]:
        address = self.gateway.account.address
        sig = personal_sign_keccak(self.gateway.account, address.encode())
        return {"address": address, "signature": "0x" + sig.hex()}

    def live_payment(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        try:
            info = net_pb2.OrchestratorInfo.FromString(base64.b64decode(request["orchestrator"]))
            kind, manifest = request["type"], request["ManifestID"]
        except (KeyError, TypeError, ValueError) as exc:
            raise Refusal(400, f"bad request: {exc}") from None
        if kind not in ("live", "lv2v", "fixed"):
            raise Refusal(400, f"unknown payment type {kind!r}")
        price = Fraction(info.price_info.price_per_unit, info.price_info.pixels_per_unit or 1)
        ceiling = (request.get("maxPrice") or {}).get("price")
        if ceiling is not None and price > Fraction(Decimal(str(ceiling))):
            raise Refusal(OVER_MAX_PRICE, f"price {price} is over the ceiling {ceiling}")
        state = request.get("state") or {}
        if kind == "fixed":
            units = 1
        elif "last" in state:
            units = math.ceil((now - float(state["last"])) * UNITS_PER_SECOND[kind])
        else:
            units = FIRST_SECONDS[kind] * UNITS_PER_SECOND[kind]
        ev = ticket_ev(info)
        owed = units * price
        tickets = max(1, math.ceil(owed / ev)) if ev else 0
        with self.lock:
            headers = self.gateway.headers(info, None, "", tickets=tickets, manifest=manifest)
        return {
            "payment": headers["Livepeer-Payment"],
            "segCreds": headers["Livepeer-Segment"],
            "state": {"last": now, "manifest": manifest, "tickets": tickets},
        }


def serve(signer: Signer, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/sign-orchestrator-info":
                    self._answer(200, signer.orchestrator_info_sig())
                elif self.path == "/generate-live-payment":
                    self._answer(200, signer.live_payment(body, time.time()))
                else:
                    self._answer(404, {"error": f"no route {self.path}"})
            except Refusal as exc:
                self._answer(exc.status, {"error": str(exc)})
            except json.JSONDecodeError as exc:
                self._answer(400, {"error": f"invalid JSON: {exc}"})

        def _answer(self, status: int, value: Any) -> None:
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None: ...

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key-file", type=Path, required=True, help="the payer's private key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    gateway = Gateway.from_key_file(args.key_file)
    server = serve(Signer(gateway), args.host, args.port)
    where = f"http://{args.host}:{server.server_address[1]}"
    print(f"remote signer for {gateway.account.address} on {where}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
