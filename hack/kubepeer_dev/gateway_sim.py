#!/usr/bin/env python3
"""A Livepeer AI gateway, as far as an orchestrator can tell: written from the facts in
gateway-wire.md (shared/reference), for `make demo` and the tests.

It speaks the real wire: GetOrchestrator over gRPC on the orchestrator's TLS port (any
certificate accepted, as go-livepeer's gateway does), `Livepeer-Segment` credentials
signed by the gateway's key, `Livepeer-Payment` tickets against the params it was given,
and the result fetched from the URL in the answer. It keeps its own balance per
(recipient, auth-token session), paying only the tickets a job needs beyond its credit
(go-livepeer's `newBalanceUpdate`).

    python -m kubepeer_dev.gateway_sim --orchestrator https://10.0.0.8:8935 \\
        --key-file gateway.key \\
        --out DIR --text-to-image MODEL --prompt "a lighthouse" --image-to-text MODEL

prints one JSON object per job on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak

from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.capabilities import CAPABILITY_IDS, Pipeline
from kubepeer.livepeer.wire import encode
from kubepeer.payments.gateway import sign_payment
from kubepeer.payments.recipient import TicketParams

# gateway-wire 1.4: the AI gateway asks for DefaultCapabilities() (0-12, 14, 26) + its cap.
GATEWAY_DEFAULT_CAPS = [*range(13), 14, 26]
MAX_WIN_PROB = 2**256 - 1


def personal_sign_keccak(account, message: bytes) -> bytes:  # noqa: ANN001
    """go-livepeer's gateway Sign: personal_sign over keccak256(message)."""
    return Account.sign_message(encode_defunct(primitive=keccak(message)), account.key).signature


@dataclass
class Orchestrator:
    """An orchestrator's service URI: gRPC and HTTPS on one TLS port."""

    url: str

    @property
    def target(self) -> str:
        return urlsplit(self.url).netloc

    def channel(self) -> grpc.Channel:
        """TLS that trusts whatever certificate the orchestrator shows (go-livepeer's
        InsecureSkipVerify): its own certificate becomes the root for this one dial."""
        host, port = self.target.rsplit(":", 1)
        pem = ssl.get_server_certificate((host, int(port)), timeout=10).encode()
        credentials = grpc.ssl_channel_credentials(root_certificates=pem)
        return grpc.secure_channel(
            self.target, credentials, options=[("grpc.ssl_target_name_override", _san(pem))]
        )

    def http(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=False, timeout=120, **kw)


def _san(pem: bytes) -> str:
    """The name the certificate was made for (go-livepeer puts the service host there)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return cert.subject.rfc4514_string().removeprefix("CN=")
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else str(names.get_values_for_type(x509.IPAddress)[0])


def ticket_ev(info: net_pb2.OrchestratorInfo) -> int:
    tp = info.ticket_params
    face, prob = int.from_bytes(tp.face_value, "big"), int.from_bytes(tp.win_prob, "big")
    return face * prob // MAX_WIN_PROB


def fee(units: int, info: net_pb2.OrchestratorInfo) -> int:
    price = Fraction(info.price_info.price_per_unit, info.price_info.pixels_per_unit)
    return -(-units * price.numerator // price.denominator)


def get_orchestrator(orch, request: net_pb2.OrchestratorRequest) -> net_pb2.OrchestratorInfo:  # noqa: ANN001
    """One GetOrchestrator call on a fresh connection to `orch` (anything with `channel()`)."""
    with orch.channel() as channel:
        call = channel.unary_unary(
            "/net.Orchestrator/GetOrchestrator",
            request_serializer=net_pb2.OrchestratorRequest.SerializeToString,
            response_deserializer=net_pb2.OrchestratorInfo.FromString,
        )
        return call(request, timeout=10)


@dataclass
class Gateway:
    account: object = field(default_factory=Account.create)
    nonce: int = 0
    # Our side of the balance, per (recipient, auth-token session): what go-livepeer keeps.
    balances: dict[tuple[bytes, str], Fraction] = field(default_factory=dict)

    @classmethod
    def from_key_file(cls, path: Path) -> Gateway:
        return cls(Account.from_key(bytes.fromhex(path.read_text().strip().removeprefix("0x"))))

    @property
    def address(self) -> bytes:
        return bytes.fromhex(self.account.address[2:])

    def request(self, cap: int | None, model: str | None) -> net_pb2.OrchestratorRequest:
        request = net_pb2.OrchestratorRequest(
            address=self.address,
            sig=personal_sign_keccak(self.account, self.account.address.encode()),
        )
        if cap is not None:
            caps = request.capabilities
            caps.CopyFrom(self.capabilities(cap, model))
        return request

    @staticmethod
    def capabilities(cap: int, model: str) -> net_pb2.Capabilities:
        caps = net_pb2.Capabilities()
        words = [0] * 1
        for bit in [*GATEWAY_DEFAULT_CAPS, cap]:
            words[bit // 64] |= 1 << (bit % 64)
        caps.bitstring.extend(words)
        caps.constraints.per_capability[cap].models[model].warm = False
        return caps

    def discover(self, orch, cap: int | None, model: str | None) -> net_pb2.OrchestratorInfo:  # noqa: ANN001
        """GetOrchestrator on a fresh connection, as the gateway dials one per call."""
        return get_orchestrator(orch, self.request(cap, model))

    def headers(
        self, info: net_pb2.OrchestratorInfo, cap: int | None, model: str, tickets: int = 1,
        price: tuple[int, int] | None = None, manifest: str | None = None,
    ) -> dict[str, str]:  # fmt: skip
        """Livepeer-Segment, Livepeer-Payment and the AI worker Authorization (2.1); a live
        stream's interval payments name the orchestrator's `manifest` id (3.5). `cap` None:
        a Live Runner payment (live-runner-wire.md 7.3), a segment with no capabilities."""
        manifest = manifest or f"{cap}_{model}"
        seg = net_pb2.SegData(manifest_id=manifest.encode(), seq=0, hash=keccak(b""))
        if cap is not None:
            seg.capabilities.CopyFrom(self.capabilities(cap, model))
        seg.auth_token.CopyFrom(info.auth_token)
        flatten = seg.manifest_id + (0).to_bytes(32, "big") + seg.hash
        seg.sig = personal_sign_keccak(self.account, flatten)
        price = price or (info.price_info.price_per_unit, info.price_info.pixels_per_unit)
        tp = info.ticket_params
        params = TicketParams(
            recipient=tp.recipient,
            face_value=int.from_bytes(tp.face_value, "big"),
            win_prob=int.from_bytes(tp.win_prob, "big"),
            recipient_rand_hash=tp.recipient_rand_hash,
            seed=int.from_bytes(tp.seed, "big"),
            expiration_block=int.from_bytes(tp.expiration_block, "big"),
            price=Fraction(*price),
            creation_round=tp.expiration_params.creation_round,
            creation_round_block_hash=tp.expiration_params.creation_round_block_hash,
        )
        nonces = list(range(self.nonce + 1, self.nonce + 1 + tickets))
        self.nonce += tickets
        payment = sign_payment(params, self.account.key, self.address, nonces, price)
        if not tickets:
            payment = net_pb2.Payment(sender=self.address, expected_price=payment.expected_price)
        return {
            "Livepeer-Segment": encode(seg),
            "Livepeer-Payment": encode(payment),
            "Authorization": "Livepeer-AI-Worker-1.0",
        }

    # -- paying for a job, as go-livepeer's gateway does ---------------------------------------
    def tickets_for(self, info: net_pb2.OrchestratorInfo, units: int) -> int:
        """Tickets that bring our credit up to max(fee, EV) (go-livepeer: newBalanceUpdate)."""
        ev = ticket_ev(info)
        credit = self.balances.get(self._session(info), Fraction(0))
        need = max(Fraction(fee(units, info)), Fraction(ev)) - credit
        return max(0, math.ceil(need / ev)) if ev else 0

    def paid(self, info: net_pb2.OrchestratorInfo, tickets: int, charged: int | None) -> None:
        """After the job: tickets credited (the orchestrator accepted them), fee debited."""
        key = self._session(info)
        self.balances[key] = self.balances.get(key, Fraction(0)) + tickets * ticket_ev(info)
        if charged is not None:
            self.balances[key] -= charged

    @staticmethod
    def _session(info: net_pb2.OrchestratorInfo) -> tuple[bytes, str]:
        return info.ticket_params.recipient, info.auth_token.session_id


@dataclass
class JobReport:
    pipeline: str
    model: str
    status: int
    seconds: float  # discovery + job + result download, as a gateway waits
    discovery_seconds: float
    tickets: int
    fee_wei: int
    ticket_ev_wei: int
    win_prob: float
    # The tickets' nonces and the params' recipientRandHash (hex): the orchestrator records
    # the nonces it credited under that hash, which is how a test finds them in its ledger.
    nonces: list[int] = field(default_factory=list)
    recipient_rand_hash: str = ""
    output: str = ""  # a file written, or the text answered
    error: str = ""


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def run_job(
    gateway: Gateway, orch: Orchestrator, pipeline: str, model: str, units: int, *,
    json_body: dict | None = None, files: dict | None = None, data: dict | None = None,
) -> tuple[JobReport, httpx.Response | None, net_pb2.OrchestratorInfo | None]:  # fmt: skip
    """Discover, pay what the job needs, send it; the report says what it cost."""
    cap = CAPABILITY_IDS[Pipeline(pipeline)]
    start = time.monotonic()
    info = gateway.discover(orch, cap, model)
    discovered = time.monotonic() - start
    tickets = gateway.tickets_for(info, units)
    first_nonce = gateway.nonce + 1
    headers = gateway.headers(info, cap, model, tickets=tickets)
    # Jobs go to the `transcoder` URL of the reply (1.1), any certificate accepted.
    with httpx.Client(verify=False, timeout=900) as http:
        response = http.post(
            f"{info.transcoder.rstrip('/')}/{pipeline}",
            json=json_body, files=files, data=data, headers=headers,
        )  # fmt: skip
    ok = response.status_code == 200
    charged = fee(units, info) if ok else None
    if response.status_code in (200, 500):  # the payment was processed (2.2 steps 5-8)
        gateway.paid(info, tickets, charged)
    report = JobReport(
        pipeline=pipeline, model=model, status=response.status_code,
        seconds=time.monotonic() - start, discovery_seconds=discovered, tickets=tickets,
        fee_wei=charged or 0, ticket_ev_wei=ticket_ev(info),
        win_prob=int.from_bytes(info.ticket_params.win_prob, "big") / MAX_WIN_PROB,
        nonces=list(range(first_nonce, first_nonce + tickets)),
        recipient_rand_hash=info.ticket_params.recipient_rand_hash.hex(),
        error="" if ok else response.text.strip()[:500],
    )  # fmt: skip
    return report, response, info


def text_to_image(
    gateway: Gateway, orch: Orchestrator, model: str, prompt: str, out: Path,
    width: int = 64, height: int = 64,
) -> JobReport:  # fmt: skip
    """One image, fetched from the URL the orchestrator answers with and saved to `out`."""
    body = {"model_id": model, "prompt": prompt, "width": width, "height": height,
            "num_inference_steps": 2}  # fmt: skip
    report, response, _ = run_job(
        gateway, orch, "text-to-image", model, width * height, json_body=body
    )
    if report.status != 200:
        return report
    [image] = response.json()["images"]
    url = image["url"]
    if not url.startswith(("https://", "http://")):
        report.status, report.error = 0, f"expected a result URL, got {url[:60]!r}"
        return report
    with httpx.Client(verify=False, timeout=4) as http:  # one GET, 4 s (core/os.go)
        fetched = http.get(url)
    report.seconds = round(report.seconds + fetched.elapsed.total_seconds(), 3)
    if fetched.status_code != 200:
        report.status, report.error = fetched.status_code, f"GET {url}: {fetched.text[:200]}"
        return report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(fetched.content)
    report.output = str(out)
    return report


def image_to_text(
    gateway: Gateway, orch: Orchestrator, model: str, image: bytes, prompt: str = ""
) -> JobReport:
    from PIL import Image

    with Image.open(io.BytesIO(image)) as decoded:
        units = decoded.width * decoded.height
    report, response, _ = run_job(
        gateway, orch, "image-to-text", model, units,
        files={"image": ("image.png", image, "image/png")},
        data={"model_id": model, "prompt": prompt},
    )  # fmt: skip
    if report.status == 200:
        report.output = response.json()["text"]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orchestrator", required=True, help="its service URI, https://host:port")
    p.add_argument("--key-file", type=Path, required=True, help="the gateway's key (hex)")
    p.add_argument("--out", type=Path, required=True, help="where images are saved")
    p.add_argument("--text-to-image", metavar="MODEL", help="generate an image with MODEL")
    p.add_argument("--images", type=int, default=1, help="how many text-to-image jobs")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    p.add_argument("--image-to-text", metavar="MODEL", help="caption the last image with MODEL")
    p.add_argument(
        "--keep-going", action="store_true",
        help="report a job the orchestrator could not be reached for (status 0) and go on",
    )  # fmt: skip
    args = p.parse_args(argv)
    gateway = Gateway.from_key_file(args.key_file)
    orch = Orchestrator(args.orchestrator)
    image = png(64, 64)
    failed = False
    for i in range(args.images if args.text_to_image else 0):
        print(f"text-to-image {i + 1}/{args.images} ...", file=sys.stderr, flush=True)
        out = args.out / f"text-to-image-{i + 1}.png"
        try:
            report = text_to_image(gateway, orch, args.text_to_image, args.prompt, out)
        except (grpc.RpcError, httpx.HTTPError, OSError) as exc:
            if not args.keep_going:
                raise
            report = JobReport("text-to-image", args.text_to_image, 0, 0, 0, 0, 0, 0, 0,
                               error=f"{type(exc).__name__}: {exc}"[:500])  # fmt: skip
            time.sleep(1)  # a gateway backs off an orchestrator that did not answer
        print(json.dumps(asdict(report)), flush=True)
        failed |= report.status != 200
        if report.status == 200:
            image = out.read_bytes()
    if args.image_to_text:
        print("image-to-text ...", file=sys.stderr, flush=True)
        report = image_to_text(gateway, orch, args.image_to_text, image)
        print(json.dumps(asdict(report)), flush=True)
        failed |= report.status != 200
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
