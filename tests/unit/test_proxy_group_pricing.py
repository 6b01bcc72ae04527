"""Several AIModels serving one (pipeline, model id), and go-livepeer's AutoAdjustPrice.

Oracles: the gateway's compatibility rule (gateway-wire 1.4) and 3.2's price rule:
price x (1 + txCost / faceValue), truncated to 3 decimals; a zero price stays zero.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction

import pytest
from eth_account import Account
from redis.asyncio import Redis

from kubepeer.contracts.price_table import ModelPrice
from kubepeer.livepeer import net_pb2
from kubepeer.payments.recipient import REDEEM_GAS_L2, RecipientSecret, issue_ticket_params
from kubepeer.payments.rounds import ChainView
from kubepeer.proxy import discovery
from kubepeer.proxy.app import Proxy, ProxyConfig
from kubepeer.proxy.billing import Billing
from kubepeer.proxy.catalogue import Catalogue
from kubepeer.proxy.credentials import AuthSecret
from kubepeer.proxy.results import ResultStore
from kubepeer.proxy.routing import Router
from kubepeer_dev.gateway_sim import Gateway
from tests.gateway_rules import gateway_accepts
from tests.unit.test_proxy import SD, discovery_request, info_for, model


def two_serving_sd(price_a=Fraction(1), price_b=Fraction(1), capacity=1, on_demand=False):
    a = model("sd-a", capacity=capacity, price=ModelPrice(price_a), on_demand=on_demand)
    b = model("sd-b", capacity=capacity, price=ModelPrice(price_b), on_demand=on_demand)
    return a, b


# -- routing across AIModels ------------------------------------------------------------
def test_every_ready_replica_of_every_aimodel_serving_the_model_is_a_candidate():
    a, b = two_serving_sd()
    router = Router()
    router.set_endpoints({a.runner: ("http://a",), b.runner: ("http://b",)}, [a, b])
    first = router.choose([a, b])
    assert router.try_reserve(first) is not None
    second = router.choose([a, b])
    assert second != first  # the first's only slot is taken: the other AIModel's replica
    assert router.try_reserve(second) is not None
    assert router.free_slots(a) == router.free_slots(b) == 0


def test_the_least_busy_replica_wins_across_aimodels():
    a, b = two_serving_sd(capacity=4)
    router = Router()
    router.set_endpoints({a.runner: ("http://a",), b.runner: ("http://b",)}, [a, b])
    for _ in range(3):
        router.try_reserve(a)
    assert router.choose([a, b]) == b
    for _ in range(3):
        router.try_reserve(b)
    router.try_reserve(b)
    assert router.choose([a, b]) == a


def test_when_all_are_full_the_job_waits_on_the_ready_model_with_the_shortest_line():
    a, b = two_serving_sd()
    router = Router()
    router.set_endpoints({a.runner: ("http://a",), b.runner: ("http://b",)}, [a, b])
    router.try_reserve(a), router.try_reserve(b)

    async def line_up() -> None:
        waiting = asyncio.ensure_future(router.reserve(a, timeout=5))
        await asyncio.sleep(0)
        assert router.queued(a) == 1
        assert router.choose([a, b]) == b  # a has a line, b has none
        waiting.cancel()

    asyncio.run(line_up())


def test_with_no_replica_ready_an_on_demand_aimodel_is_chosen_to_wake():
    always = model("sd-always")
    cold = model("sd-cold", on_demand=True)
    router = Router()
    assert router.choose([always, cold]) == cold
    assert router.choose([always]) == always  # refused later: not ready, nothing to wake


def test_discovery_offers_the_group_warm_with_its_summed_capacity_and_highest_price():
    a, b = two_serving_sd(price_a=Fraction(2), price_b=Fraction(5), capacity=2)
    router = Router()
    router.set_endpoints({b.runner: ("http://b1", "http://b2")}, [a, b])  # only b is ready
    catalogue = Catalogue("ns", (a, b))

    def state(m):  # as the proxy reports a model: over every AIModel serving it
        group = catalogue.serving(m.pipeline, m.model_id)
        return discovery.ModelState(
            any(router.ready(x) for x in group),
            sum(router.free_slots(x) for x in group),
            router.group_utilization(group),
        )

    request = discovery_request(Account.create(), {27: SD})
    info = discovery.orchestrator_info(
        request, catalogue, state, transcoder="https://o:8935", address=b"\x22" * 20,
        version="0.9.1",
    ).info  # fmt: skip
    assert gateway_accepts(info, 27, SD)
    constraint = info.capabilities.constraints.per_capability[27].models[SD]
    assert constraint.warm
    assert constraint.capacity == 4
    assert (info.price_info.price_per_unit, info.price_info.pixels_per_unit) == (5, 1)
    bare = discovery.orchestrator_info(
        discovery_request(Account.create()), catalogue, state, transcoder="https://o:8935",
        address=b"\x22" * 20, version="0.9.1",
    ).info  # fmt: skip
    assert [(p.capability, p.constraint, p.price_per_unit) for p in bare.capabilities_prices] == [
        (27, SD, 5)
    ]
    assert [(h.pipeline, h.model_id) for h in bare.hardware] == [("text-to-image", SD)]


# -- AutoAdjustPrice ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("price", "share", "quoted"),
    [
        (Fraction(3), Fraction(1, 100), Fraction(303, 100)),  # 3.03
        (Fraction(1, 3), Fraction(1, 100), Fraction(336, 1000)),  # 0.33666.. truncated
        (Fraction(1, 4), Fraction(1, 100), Fraction(252, 1000)),  # 0.2525 truncated
        (Fraction(1, 2000), Fraction(1, 100), Fraction(0)),  # below 0.001 wei: free
        (Fraction(0), Fraction(1, 100), Fraction(0)),  # free stays free
        (Fraction(7, 2), Fraction(0), Fraction(7, 2)),  # no tx cost: only the truncation
    ],
)
def test_auto_adjusted_price_is_go_livepeers(price, share, quoted):
    assert discovery.auto_adjusted(price, share) == quoted


def test_discovery_quotes_the_adjusted_price_only_when_asked_to():
    catalogue = Catalogue("ns", (model(price=ModelPrice(Fraction(3))),))
    request = discovery_request(Account.create(), {27: SD})

    def state(m):
        return discovery.ModelState(True, 1, 0.0)

    def quoted(share):
        info = discovery.orchestrator_info(
            request, catalogue, state, transcoder="https://o:8935", address=b"\x22" * 20,
            version="0.9.1", tx_cost_share=share,
        ).info  # fmt: skip
        return info.price_info.price_per_unit, info.price_info.pixels_per_unit

    assert quoted(None) == (3, 1)
    assert quoted(Fraction(1, 100)) == (303, 100)
    assert info_for(catalogue, Router(), request).price_info.price_per_unit == 3


@pytest.mark.parametrize("gas_price", [10**7, 10**9, 10**11])
def test_the_tx_cost_share_is_redemption_gas_over_the_face_value_gateways_get(gas_price):
    secret, recipient = RecipientSecret(b"\x01" * 32), b"\x22" * 20
    billing = Billing(Redis(port=1), recipient, secret, gas_price=gas_price)  # never dialled
    chain = ChainView(l1_block=5_000, current_round=10, creation_round=10,
                      creation_round_block_hash=b"\xab" * 32)  # fmt: skip
    params = issue_ticket_params(
        secret, recipient, b"\x33" * 20, chain, price=(1, 1), gas_price=gas_price,
        ev=billing.ticket_ev,
    )  # fmt: skip
    # txCostMultiplier = faceValue / (redeemGas x gasPrice) (go-livepeer's recipient.go)
    assert billing.tx_cost_share() == Fraction(REDEEM_GAS_L2 * gas_price, params.face_value)


def test_a_jobs_credentials_check_does_no_work_per_served_model():
    """Issue 24: the job's SegData capabilities are checked against what we offer, built
    once per catalogue or endpoint change, not walked per job (1,000 models cost 6.4 ms a
    job). Counted in readiness lookups, one per served model per build."""
    models = tuple(model(aimodel=f"m{i}", model_id=f"org/model-{i}") for i in range(1000))
    catalogue = Catalogue("ns", models)
    router = Router()
    router.set_endpoints({"runner-m7": ("http://10.0.0.7:8000",)}, models)
    lookups = []
    ready = router.ready
    router.ready = lambda m: lookups.append(m) or ready(m)  # type: ignore[method-assign]
    secret = RecipientSecret(b"\x01" * 32)
    proxy = Proxy(
        ProxyConfig(public_url="https://o:8935"), catalogue=lambda: catalogue, router=router,
        auth_secret=AuthSecret.generate(), results=ResultStore(Redis(port=1)),
        billing=Billing(Redis(port=1), b"\x22" * 20, secret),  # never dialled here
    )  # fmt: skip
    gateway = Gateway()
    info = net_pb2.OrchestratorInfo()
    info.auth_token.CopyFrom(proxy.auth_secret.issue())
    jobs = [  # headers by lowercased name, as the server hands them over
        {name.lower(): value for name, value in
         gateway.headers(info, 27, f"org/model-{i}", tickets=0, price=(1, 1)).items()}
        for i in range(0, 1000, 10)
    ]  # fmt: skip
    for headers in jobs:
        assert proxy.check_credentials(headers).sender == gateway.address
    assert len(lookups) == 1000  # one build for 100 jobs
    assert proxy.offered().warm[27]["org/model-7"]
    assert not proxy.offered().warm[27]["org/model-8"]
    proxy.endpoints_changed()  # a replica came or went: warm flags are built again, once
    lookups.clear()
    for headers in jobs:
        proxy.check_credentials(headers)
    assert len(lookups) == 1000
