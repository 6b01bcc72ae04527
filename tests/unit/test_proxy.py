"""The proxy's pure core, checked against gateway-wire.md's facts (not against itself)."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import struct
import wave
from fractions import Fraction

import av
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak
from PIL import Image

from kubepeer.contracts.price_table import ModelPrice, ServedModel, Surge
from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.capabilities import Pipeline
from kubepeer.proxy import discovery, grpc_unary
from kubepeer.proxy.catalogue import Catalogue, parse_catalogue
from kubepeer.proxy.credentials import (
    AuthSecret,
    CredentialsRefused,
    check_segment,
    discovery_signed,
)
from kubepeer.proxy.endpoints import EndpointTable
from kubepeer.proxy.jobs import runner_error
from kubepeer.proxy.main import orchestrator_address
from kubepeer.proxy.results import gateway_fields, shape_reply
from kubepeer.proxy.routing import NoCapacity, Router
from kubepeer.proxy.settings import ProxySettings
from kubepeer.proxy.units import UnitsError, billed_units
from tests.gateway_rules import gateway_accepts

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SD = "kubepeer-tiny/stable-diffusion"


# -- the gateway's side, written from gateway-wire.md ------------------------------------
def gateway_sign(account, message: bytes) -> bytes:
    """core/broadcaster.go:Sign = Eth.Sign(keccak256(msg)), Eth.Sign = personal_sign."""
    return Account.sign_message(encode_defunct(primitive=keccak(message)), account.key).signature


def discovery_request(account, caps: dict[int, str] | None = None):
    request = net_pb2.OrchestratorRequest(
        address=bytes.fromhex(account.address[2:]),
        sig=gateway_sign(account, account.address.encode()),  # the EIP-55 string
    )
    if caps is not None:
        request.capabilities.SetInParent()
        for cap, model in caps.items():
            request.capabilities.constraints.per_capability[cap].models[model].warm = False
    return request


def model(aimodel="sd", pipeline=Pipeline.TEXT_TO_IMAGE, model_id=SD, capacity=2, price=None,
          on_demand=False, runner=None) -> ServedModel:  # fmt: skip
    return ServedModel(
        aimodel=aimodel,
        pipeline=pipeline,
        model_id=model_id,
        runner=runner or f"runner-{aimodel}",
        port=8000,
        capacity=capacity,
        on_demand=on_demand,
        max_replicas=2,
        price=price if price is not None else ModelPrice(Fraction(3, 7)),
    )


def info_for(catalogue, router, request, address=b"\x22" * 20):
    def state(m):
        return discovery.ModelState(router.ready(m), router.free_slots(m), router.utilization(m))

    return discovery.orchestrator_info(
        request, catalogue, state, transcoder="https://o.example:8935", address=address,
        version="0.9.1",
    ).info  # fmt: skip


# -- gRPC framing ------------------------------------------------------------------------
def test_a_grpc_frame_is_flag_length_message():
    assert grpc_unary.frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert grpc_unary.unframe(b"\x00\x00\x00\x00\x03abc") == b"abc"


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"\x01\x00\x00\x00\x01a", grpc_unary.UNIMPLEMENTED), (b"\x00\x00\x00\x00\x05ab",
     grpc_unary.INVALID_ARGUMENT), (b"\x00", grpc_unary.INVALID_ARGUMENT)],
)  # fmt: skip
def test_bad_grpc_frames_are_refused_with_a_status(body, code):
    with pytest.raises(grpc_unary.GrpcError) as refused:
        grpc_unary.unframe(body)
    assert refused.value.code == code


def test_grpc_message_is_percent_encoded():
    assert grpc_unary.encode_grpc_message("50% off: é") == "50%25 off: %C3%A9"


# -- the discovery signature -------------------------------------------------------------
def test_a_gateway_signed_request_verifies():
    assert discovery_signed(discovery_request(Account.create()))


def test_a_request_signed_by_another_key_does_not():
    gateway, other = Account.create(), Account.create()
    request = discovery_request(gateway)
    request.sig = gateway_sign(other, gateway.address.encode())
    assert not discovery_signed(request)


def test_a_lowercase_address_signature_does_not_verify():
    """go-livepeer signs addr.Hex(), the checksummed form; a lowercase string is another message."""
    gateway = Account.create()
    request = discovery_request(gateway)
    request.sig = gateway_sign(gateway, gateway.address.lower().encode())
    assert not discovery_signed(request)


def test_a_high_s_signature_is_refused_though_it_recovers_the_same_key():
    request = discovery_request(Account.create())
    r, s, v = request.sig[:32], int.from_bytes(request.sig[32:64], "big"), request.sig[64]
    request.sig = r + (N - s).to_bytes(32, "big") + bytes([55 - v])  # 27 <-> 28
    assert not discovery_signed(request)


@pytest.mark.parametrize("v", [0, 1, 29])
def test_v_other_than_27_or_28_is_refused(v):
    request = discovery_request(Account.create())
    request.sig = request.sig[:64] + bytes([v])
    assert not discovery_signed(request)


# -- what discovery answers ---------------------------------------------------------------
def test_a_served_model_passes_the_gateways_compatibility_rule():
    router = Router()
    catalogue = Catalogue("ns", (model(),))
    info = info_for(catalogue, router, discovery_request(Account.create(), {27: SD}))
    assert gateway_accepts(info, 27, SD, min_version=(0, 9, 0))
    assert not gateway_accepts(info, 27, "other/model")
    assert not gateway_accepts(info, 28, SD)


@pytest.mark.parametrize(
    ("payments", "offchain", "recipient", "address"),
    [(True, False, "0x" + "ab" * 20, b"\xab" * 20),  # the ticket recipient
     (False, False, None, bytes(20)),  # private: go-livepeer's offchain zero address
     (False, True, None, bytes(20)),  # offchain gateways admitted
     (False, True, "0x" + "CD" * 20, b"\xcd" * 20)],  # private, an address configured
    ids=["payments", "private", "offchain-gateways", "private-with-address"],
)  # fmt: skip
def test_discovery_sends_a_20_byte_address_a_default_gateway_does_not_blocklist(
    payments, offchain, recipient, address
):
    """gateway-wire 1.5: a default -orchBlocklist is [""], matched against hex(address), so an
    empty address drops us from every go-livepeer gateway with default flags."""
    args = ProxySettings(bind="", public_url="https://o.example:8935", namespace="ns",
                     redis_url="redis://127.0.0.1:1", payments=payments,
                     offchain_gateways=offchain, recipient=recipient)  # fmt: skip
    assert orchestrator_address(args) == address
    request = discovery_request(Account.create(), {27: SD})
    info = info_for(Catalogue("ns", (model(),)), Router(), request, address=address)
    assert len(info.address) == 20
    assert gateway_accepts(info, 27, SD)
    assert not gateway_accepts(info, 27, SD, blocklist=("0x" + address.hex(),))


def test_an_empty_address_is_what_a_default_gateway_blocklists():
    """The rule itself, so the check above cannot pass for the wrong reason."""
    info = info_for(Catalogue("ns", (model(),)), Router(),
                    discovery_request(Account.create(), {27: SD}), address=b"")  # fmt: skip
    assert not gateway_accepts(info, 27, SD)
    assert gateway_accepts(info, 27, SD, blocklist=("0xdeadbeef",))


@pytest.mark.parametrize("bad", ["0x1234", "0x" + "zz" * 20, "ab" * 21, "0x" + "ab" * 20 + " "])
def test_a_bad_recipient_address_stops_the_proxy_naming_the_flag_and_value(bad):
    args = ProxySettings(bind="", public_url="https://o:1", namespace="ns", redis_url="redis://x",
                     payments=False, recipient=bad)  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        orchestrator_address(args)
    assert str(stopped.value).startswith(f"--recipient: {bad!r} is not an Ethereum address")


def test_price_info_is_the_requested_models_reduced_price_and_capabilities_prices_absent():
    catalogue = Catalogue("ns", (model(price=ModelPrice(Fraction(6, 14))),))
    info = info_for(catalogue, Router(), discovery_request(Account.create(), {27: SD}))
    assert (info.price_info.price_per_unit, info.price_info.pixels_per_unit) == (3, 7)
    assert not info.capabilities_prices
    assert not info.hardware


def test_a_gateway_with_its_own_price_is_quoted_it():
    gateway = Account.create()
    address = bytes.fromhex(gateway.address[2:])
    price = ModelPrice(Fraction(5), gateways={address: Fraction(2)})
    info = info_for(
        Catalogue("ns", (model(price=price),)), Router(), discovery_request(gateway, {27: SD})
    )
    assert (info.price_info.price_per_unit, info.price_info.pixels_per_unit) == (2, 1)


def test_a_request_without_capabilities_gets_capabilities_prices_and_hardware():
    catalogue = Catalogue("ns", (model(price=ModelPrice(Fraction(7, 2))),))
    info = info_for(catalogue, Router(), discovery_request(Account.create()))
    [entry] = info.capabilities_prices
    # GetCapabilitiesPrices: floor(price per pixel), pixelsPerUnit 1, model as constraint
    assert (entry.price_per_unit, entry.pixels_per_unit, entry.capability, entry.constraint) == (
        3, 1, 27, SD)  # fmt: skip
    assert [(h.pipeline, h.model_id) for h in info.hardware] == [("text-to-image", SD)]


def test_warm_and_capacity_follow_ready_replicas_and_free_slots():
    served = model(capacity=2)
    router = Router()
    catalogue = Catalogue("ns", (served,))
    request = discovery_request(Account.create(), {27: SD})
    cold = info_for(catalogue, router, request).capabilities.constraints.per_capability[27]
    assert (cold.models[SD].warm, cold.models[SD].capacity) == (False, 0)
    router.set_endpoints({"runner-sd": ("http://a", "http://b")}, [served])
    assert router.try_reserve(served) is not None
    warm = info_for(catalogue, router, request).capabilities.constraints.per_capability[27]
    assert (warm.models[SD].warm, warm.models[SD].capacity) == (True, 3)


def test_live_video_is_advertised_with_free_streams_and_streams_in_use():
    live = model(aimodel="live", pipeline=Pipeline.LIVE_VIDEO_TO_VIDEO, model_id="noop")

    def state(m):  # one runner with capacity 2, one stream on it
        return discovery.ModelState(ready=True, free_slots=1, utilization=0.5, in_use=1)

    info = discovery.orchestrator_info(
        discovery_request(Account.create()), Catalogue("ns", (live,)), state,
        transcoder="https://o.example:8935", address=b"\x22" * 20, version="0.9.1",
    ).info  # fmt: skip
    assert info.capabilities.bitstring[0] >> 35 & 1
    constraint = info.capabilities.constraints.per_capability[35].models["noop"]
    assert (constraint.warm, constraint.capacity, constraint.capacity_in_use) == (True, 1, 1)


@pytest.mark.parametrize(
    ("free", "asks", "ignore", "capped"),
    [(0, {35: "noop"}, False, True), (1, {35: "noop"}, False, False),
     (0, {35: "noop"}, True, False), (0, {27: SD}, False, False),
     (5, {35: "unknown"}, False, True)],
)  # fmt: skip
def test_discovery_refuses_a_live_request_only_when_no_asked_live_model_is_free(
    free, asks, ignore, capped
):
    """checkLiveVideoToVideoCapacity (gateway-wire 1.2 step 4)."""
    live = model(aimodel="live", pipeline=Pipeline.LIVE_VIDEO_TO_VIDEO, model_id="noop")
    request = discovery_request(Account.create(), asks)
    request.ignore_capacity_check = ignore

    def state(m):
        return discovery.ModelState(ready=True, free_slots=free, utilization=0.0)

    assert discovery.live_capped(request, Catalogue("ns", (live, model())), state) is capped


def test_surge_raises_the_price_as_slots_fill():
    served = model(capacity=2, price=ModelPrice(Fraction(10), surge=Surge(0.5, 3.0)))
    router = Router()
    router.set_endpoints({"runner-sd": ("http://a",)}, [served])
    catalogue = Catalogue("ns", (served,))
    request = discovery_request(Account.create(), {27: SD})
    assert info_for(catalogue, router, request).price_info.price_per_unit == 10
    router.try_reserve(served)
    router.try_reserve(served)
    assert info_for(catalogue, router, request).price_info.price_per_unit == 30


def test_an_unknown_capability_is_left_out_of_the_price():
    catalogue = Catalogue("ns", (model(),))
    info = info_for(catalogue, Router(), discovery_request(Account.create(), {99: "x/y"}))
    assert info.price_info.price_per_unit == 0
    assert not gateway_accepts(info, 99, "x/y")


def test_models_json_prices_are_exact_and_errors_name_the_entry():
    document = {"version": 1, "models": [{
        "aimodel": "sd", "pipeline": "text-to-image", "modelId": SD, "capability": 27,
        "runner": "runner-sd", "port": 8000, "capacity": 1, "warm": "OnDemand",
        "maxReplicas": 1, "price": {"weiPerUnit": "1/3", "gateways": {"0x" + "ab" * 20: "2"},
                                    "surge": None}}]}  # fmt: skip
    [served] = parse_catalogue(document, "ns").models
    assert served.price.wei_per_unit == Fraction(1, 3)
    assert served.on_demand
    assert served.price.gateways == {b"\xab" * 20: Fraction(2)}
    document["models"][0]["price"]["weiPerUnit"] = "a lot"
    with pytest.raises(ValueError, match=r"models\[0\] \(sd\).price.weiPerUnit: 'a lot'"):
        parse_catalogue(document, "ns")


# -- auth token and segment credentials ----------------------------------------------------
def signed_segment(account, secret, caps, now=1000.0):
    seg = net_pb2.SegData(manifest_id=b"27_" + SD.encode(), seq=0, hash=keccak(b""))
    seg.capabilities.CopyFrom(caps)
    seg.auth_token.CopyFrom(secret.issue(now))
    flatten = seg.manifest_id + (0).to_bytes(32, "big") + seg.hash  # core/streamdata.go:Flatten
    seg.sig = gateway_sign(account, flatten)
    return seg


def test_segment_credentials_in_go_livepeers_order():
    gateway, secret = Account.create(), AuthSecret.generate()
    sender = bytes.fromhex(gateway.address[2:])
    seg = signed_segment(gateway, secret, net_pb2.Capabilities())
    assert check_segment(seg, sender, secret, True, now=1001).session_id
    cases = [
        (Account.create(), True, None, "ErrSegSig"),
        (gateway, False, None, "incompatible capabilities"),
        (gateway, True, "no token", "missing auth token"),
        (gateway, True, "tamper", "invalid auth token"),
        (gateway, True, "late", "expired auth token"),
    ]
    for signer, compatible, change, text in cases:
        seg = signed_segment(gateway, secret, net_pb2.Capabilities())
        now = 1001.0
        if change == "tamper":
            seg.auth_token.token = bytes(32)
        elif change == "late":
            now = 1000 + 31 * 60
        elif change == "no token":
            seg.ClearField("auth_token")  # the signature does not cover the token
        who = bytes.fromhex(signer.address[2:])
        with pytest.raises(CredentialsRefused, match=text):
            check_segment(seg, who, secret, compatible, now=now)


def test_auth_tokens_from_one_secret_verify_on_every_replica():
    key = b"k" * 32
    token = AuthSecret(key).issue(now=0)
    assert AuthSecret(key).token(token.session_id, token.expiration) == token.token
    assert AuthSecret(b"j" * 32).token(token.session_id, token.expiration) != token.token


# -- billed units (gateway-wire 3.3) --------------------------------------------------------
def png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(seconds: float, rate=16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(struct.pack("<h", 0) * int(seconds * rate))
    return buffer.getvalue()


def test_billed_units_per_pipeline():
    assert billed_units(Pipeline.TEXT_TO_IMAGE, {"prompt": "x"}) == 512 * 512
    t2i = {"height": 64, "width": 48, "num_images_per_prompt": 3}
    assert billed_units(Pipeline.TEXT_TO_IMAGE, t2i) == 64 * 48 * 3
    assert billed_units(Pipeline.IMAGE_TO_IMAGE, {"image": png(40, 30)}) == 1200
    assert billed_units(Pipeline.UPSCALE, {"image": png(8, 4)}) == 32
    assert billed_units(Pipeline.IMAGE_TO_VIDEO, {}) == 576 * 1024 * 25
    assert billed_units(Pipeline.IMAGE_TO_VIDEO, {"height": "32", "width": "48"}) == 32 * 48 * 25
    assert billed_units(Pipeline.AUDIO_TO_TEXT, {"audio": wav(2.7)}) == 2000  # whole seconds
    assert billed_units(Pipeline.LLM, {"max_tokens": 256}) == 256
    assert billed_units(Pipeline.TEXT_TO_SPEECH, {"text": "héllo"}) == 5000


@pytest.mark.parametrize(
    ("pipeline", "fields", "text"),
    [(Pipeline.LLM, {"messages": []}, "MaxTokens not specified"),
     (Pipeline.AUDIO_TO_TEXT, {"audio": wav(0.5)}, "Unable to calculate duration"),
     (Pipeline.AUDIO_TO_TEXT, {"audio": b"not audio"}, "Unable to calculate duration"),
     (Pipeline.IMAGE_TO_IMAGE, {"image": b"not an image"}, "Unable to decode image")],
)  # fmt: skip
def test_jobs_that_cannot_be_priced_are_400s(pipeline, fields, text):
    with pytest.raises(UnitsError, match=text):
        billed_units(pipeline, fields)


# -- routing ----------------------------------------------------------------------------
def test_least_in_flight_under_capacity():
    served = model(capacity=2)
    router = Router()
    router.set_endpoints({"runner-sd": ("http://a", "http://b")}, [served])
    picks = [router.try_reserve(served).url for _ in range(4)]
    assert sorted(picks) == ["http://a", "http://a", "http://b", "http://b"]
    assert picks[0] != picks[1]
    assert router.try_reserve(served) is None
    assert router.free_slots(served) == 0


def test_waiters_are_served_in_arrival_order_and_time_out():
    served = model(capacity=1)

    async def scenario():
        router = Router(max_queue=2)
        router.set_endpoints({"runner-sd": ("http://a",)}, [served])
        first = router.try_reserve(served)
        order = []

        async def wait(name):
            slot = await router.reserve(served, timeout=5)
            order.append(name)
            await asyncio.sleep(0.01)
            router.release(slot, served)

        waiting = [asyncio.create_task(wait(n)) for n in ("one", "two")]
        await asyncio.sleep(0.01)
        with pytest.raises(NoCapacity):  # the queue holds two
            await router.reserve(served, timeout=5)
        assert router.try_reserve(served) is None  # no jumping the queue
        router.release(first, served)
        await asyncio.gather(*waiting)
        assert order == ["one", "two"]
        held = router.try_reserve(served)
        with pytest.raises(NoCapacity):
            await router.reserve(served, timeout=0.05)
        router.release(held, served)
        assert router.queued(served) == 0
        assert router.in_flight(served) == 0

    asyncio.run(scenario())


def test_a_hold_waits_for_the_first_ready_replica():
    served = model(capacity=1, on_demand=True)

    async def scenario():
        router = Router(max_queue=0)
        with pytest.raises(NoCapacity):  # not held: no replica means no capacity
            await router.reserve(served, timeout=1)
        holds = [asyncio.create_task(router.reserve(served, timeout=5, hold=True)) for _ in "ab"]
        await asyncio.sleep(0.01)
        router.set_endpoints({"runner-sd": ("http://a",)}, [served])
        first = await holds[0]
        assert not holds[1].done()
        router.release(first, served)
        assert (await holds[1]).url == "http://a"

    asyncio.run(scenario())


def test_a_retry_excludes_the_failed_replica():
    served = model(capacity=1)
    router = Router()
    router.set_endpoints({"runner-sd": ("http://a", "http://b")}, [served])
    assert router.try_reserve(served, exclude=["http://a"]).url == "http://b"


# -- the EndpointSlice table ----------------------------------------------------------------
def endpoint_slice(name, service, endpoints, port=8000):
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": port}],
        "endpoints": [
            {"addresses": [ip], "conditions": {} if ready is None else {"ready": ready}}
            for ip, ready in endpoints
        ],
    }


def test_endpoint_table_keeps_ready_addresses_per_service():
    table = EndpointTable()
    first = endpoint_slice("s-1", "runner-sd", [("10.0.0.1", True), ("10.0.0.2", False)])
    changed = table.apply("ADDED", first)
    assert changed == {"runner-sd"}
    assert table.urls("runner-sd") == ("http://10.0.0.1:8000",)
    table.apply("ADDED", endpoint_slice("s-2", "runner-sd", [("10.0.0.3", None)]))
    assert table.urls("runner-sd") == ("http://10.0.0.1:8000", "http://10.0.0.3:8000")
    assert (
        table.apply("MODIFIED", endpoint_slice("s-2", "runner-sd", [("10.0.0.3", None)])) == set()
    )
    table.apply("DELETED", endpoint_slice("s-1", "runner-sd", []))
    assert table.urls("runner-sd") == ("http://10.0.0.3:8000",)
    assert table.replace([]) == {"runner-sd"}
    assert table.snapshot() == {}


# -- results (gateway-wire 2.3) --------------------------------------------------------------
def data_url(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'{"detail": {"msg": "height must be a multiple of 8"}}',
            "height must be a multiple of 8",
        ),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b"upstream went away\n", "upstream went away"),
        (b"bad \xff bytes", "bad \ufffd bytes"),
    ],
    ids=["ai-runner", "plain-detail", "text", "not-utf8"],
)
def test_a_runner_error_is_reported_as_go_livepeer_reports_it(raw, message):
    """gateway-wire 2.2, step 7: `<pipeline> container returned <status>: <msg>`, ai-runner's
    errors being {"detail": {"msg": ...}}; any other body is passed on as text, whatever its
    bytes (one that was not UTF-8 raised, and the gateway got a bare 500)."""
    assert runner_error(Pipeline.TEXT_TO_IMAGE, 400, raw) == (
        f"text-to-image container returned 400: {message}"
    )


def test_only_fields_the_gateway_knows_are_sent():
    body = {"images": [{"url": "u", "seed": 1, "nsfw": False, "extra": 2}], "timings": {}}
    assert gateway_fields(Pipeline.TEXT_TO_IMAGE, body) == {
        "images": [{"url": "u", "seed": 1, "nsfw": False}]
    }


def test_image_to_video_frames_become_one_playable_h264_mp4():
    frames = [{"url": data_url(png(48, 32)), "seed": 9, "nsfw": False} for _ in range(5)]
    stored = {}

    def store(kind, data):
        stored["kind"], stored["data"] = kind, data
        return "https://o/stream/r/x.mp4"

    reply = shape_reply(Pipeline.IMAGE_TO_VIDEO, {"frames": [frames]},
                        {"width": "48", "height": "32", "fps": "5"}, store)  # fmt: skip
    assert reply == {"images": [{"url": "https://o/stream/r/x.mp4", "seed": 9, "nsfw": False}]}
    assert stored["kind"] == "video/mp4"
    with av.open(io.BytesIO(stored["data"])) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        decoded = list(container.decode(video))
    assert len(decoded) == 5
    assert {(f.width, f.height) for f in decoded} == {(48, 32)}
    assert math.isclose(float(video.average_rate), 5)


def test_a_repeated_header_reads_as_its_first_value_as_go_and_starlette_read_it():
    """Go's http.Header.Get returns the first value; so does starlette's Headers.get, which
    the ASGI route read before the lean path's header map replaced it."""
    from starlette.datastructures import Headers

    from kubepeer.proxy.app import header_map

    raw = [(b"authorization", b"Bearer first"), (b"content-type", b"application/json"),
           (b"authorization", b"Bearer second")]  # fmt: skip
    assert header_map(raw)["authorization"] == Headers(raw=raw)["authorization"]
    assert header_map(raw) == {"authorization": "Bearer first", "content-type": "application/json"}


def test_job_lines_are_the_json_log_lines_of_the_proxy_and_follow_the_loggers_level():
    import json
    import logging

    from kubepeer.proxy.main import JobLines, JsonLogFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("kubepeer.test-job-lines")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for fee in (10**30, 7):  # past 64 bits (a fee in wei can be), and a small one
        fields = {"request_id": "r1", "pipeline": "llm", "units": 3, "fee_wei": fee}
        logger.setLevel(logging.INFO)
        logger.info("job served", extra=fields)
        JobLines(handler, logger)("job served", fields)
        logger.setLevel(logging.WARNING)
        JobLines(handler, logger)("job refused", fields)
        via_logging, direct = [json.loads(line) for line in stream.getvalue().splitlines()]
        stream.seek(0)
        stream.truncate()
        assert abs(direct.pop("time") - via_logging.pop("time")) < 5
        assert direct == via_logging == {"level": "info", "logger": "kubepeer.test-job-lines",
                                         "message": "job served", **fields}  # fmt: skip
