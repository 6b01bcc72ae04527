"""The proxy under attack, on real servers: a real proxy process, a real runner, real Redis
(and the dev chain where the sender's funds matter). Each test is an attack that once
worked; keep them green.

- free jobs: a price quoted for nothing (or for another model) paying for a priced job;
- senders with no money on the TicketBroker;
- a decompression bomb in the billing size check;
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from PIL import Image

from gateway_sim import Gateway
from kubepeer.payments.ledger import balance_key
from proxies import (
    RUNNER_TOKEN,
    SD,
    FreshChainView,
    ProxyServer,
    RunnerProcess,
    models_json,
    start_proxy,
    start_runner,
    stop,
    stop_proxy,
)

pytestmark = pytest.mark.redis

T2I = {"prompt": "a cat", "height": 32, "width": 48, "num_inference_steps": 1, "seed": 3,
       "model_id": SD}  # fmt: skip
BLIP = "kubepeer-tiny/blip"


@pytest.fixture(scope="module")
def runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    models = [{"pipeline": "text-to-image", "model_id": SD}]
    env = {"MODELS": json.dumps(models), "MODEL_DIR": str(tiny_models), "AUTH_TOKEN": RUNNER_TOKEN}
    process = start_runner(env, tmp_path_factory.mktemp("runner") / "runner.log")
    yield process
    stop(process)


@pytest.fixture(scope="module")
def chain_facts(redis_server) -> Iterator[FreshChainView]:
    view = FreshChainView(redis_server.client())
    yield view
    view.stop.set()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, redis_server, runner, chain_facts) -> Iterator[ProxyServer]:
    server = start_proxy(
        tmp_path_factory.mktemp("proxy"), redis_server, models=models_json(),
        endpoints={"runner-fleet": [runner.url]},
    )  # fmt: skip
    yield server
    stop_proxy(server)


def post_t2i(proxy: ProxyServer, headers: dict[str, str]):
    with proxy.http() as client:
        return client.post("/text-to-image", json=T2I, headers=headers)


# -- 1. free jobs -------------------------------------------------------------------------------
@pytest.mark.parametrize("asked", [None, (27, "nobody/serves-this")], ids=["no-caps", "unserved"])
@pytest.mark.parametrize("tickets", [0, 1])
def test_a_price_quoted_for_something_else_never_pays_for_a_job(
    proxy, redis_server, asked, tickets
):
    """A discovery for no model (or one we do not serve) quotes 0/1 with params issued at
    0/1. Neither a ticketless payment at 0/1 nor tickets on those params may then pay for a
    priced text-to-image job: the price that counts is the job's own model's."""
    gateway = Gateway()
    info = gateway.discover(proxy, *(asked or (None, None)))
    assert (info.price_info.price_per_unit, info.price_info.pixels_per_unit) == (0, 1)
    # The job's credentials need an auth token; the payment claims the price quoted above.
    response = post_t2i(proxy, gateway.headers(info, 27, SD, tickets=tickets, price=(0, 1)))
    assert response.status_code == 400, response.text
    assert response.text == (
        "expected price 0 wei/unit was not offered to this sender for this job\n"
    )
    # Nothing credited, nothing served for free.
    assert redis_server.client().get(balance_key(gateway.address, f"27_{SD}")) is None


def test_the_jobs_own_price_still_pays(proxy):
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    assert info.price_info.price_per_unit > 0
    response = post_t2i(proxy, gateway.headers(info, 27, SD, tickets=50))
    assert response.status_code == 200, response.text


# -- 7. decompression bombs -----------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (the IHDR rewritten, CRC fixed)."""
    import struct
    import zlib

    raw = io.BytesIO()
    Image.new("RGB", (1, 1)).save(raw, "PNG")
    data = bytearray(raw.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("route", ["image-to-text", "image-to-image", "upscale",
                                   "segment-anything-2"])  # fmt: skip
def test_an_image_claiming_ten_billion_pixels_is_a_400_not_a_500(proxy, route):
    gateway = Gateway()
    info = gateway.discover(proxy, 27, SD)
    headers = gateway.headers(info, 27, SD, tickets=0)
    files = {"image": ("bomb.png", png_claiming(100_000, 100_000), "image/png")}
    with proxy.http() as client:
        response = client.post(f"/{route}", files=files, data={"model_id": BLIP},
                               headers=headers)  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.text.startswith("Unable to decode image"), response.text
