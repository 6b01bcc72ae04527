"""The chain watcher against the dev chain's contracts, and its Arbitrum path."""

from __future__ import annotations

import pytest
from web3 import Web3

from kubepeer.payments.watcher import ChainWatcher, load_view, save_view
from kubepeer_dev.devchain import DevChain
from tests.paying import relay_rpc

pytestmark = [pytest.mark.chain, pytest.mark.redis]


def watcher(chain: DevChain, address: str, url: str | None = None, arbitrum: bool = False):
    w3 = Web3(Web3.HTTPProvider(url)) if url else chain.w3
    return ChainWatcher(w3, chain.controller.address, address, arbitrum=arbitrum)


def test_the_view_is_what_the_contracts_say(chain, redis_server):
    me = chain.new_account()
    round_number = chain.current_round() + 1
    block_hash = chain.start_round(round_number)
    view = watcher(chain, me.address).read()
    assert view.l1_block == chain.w3.eth.block_number  # a dev chain is its own L1
    assert (view.current_round, view.creation_round) == (round_number, round_number)
    assert view.creation_round_block_hash == block_hash
    assert view.round_initialized
    assert not view.active
    assert view.gas_price == chain.w3.eth.gas_price > 0

    chain.set_active(me.address)
    chain.begin_round(round_number + 1)  # nobody has initialized it yet
    view = watcher(chain, me.address).publish(redis_server.client())
    assert view.active
    assert not view.round_initialized
    # Params keep carrying the last initialized round, which the broker still honours.
    assert (view.current_round, view.creation_round) == (round_number + 1, round_number)
    assert view.creation_round_block_hash == block_hash
    assert load_view(redis_server.client()) == view
    chain.initialize_round()


def test_a_round_with_a_zero_block_hash_falls_back_to_the_one_before(chain):
    """Some Arbitrum L1 blocks had zero hashes; go-livepeer then uses the previous round."""
    me = chain.new_account()
    previous = chain.current_round() + 1
    previous_hash = chain.start_round(previous)
    chain.begin_round(previous + 1)
    chain.transact(chain.deployer, chain.rounds.functions.initializeRound(b"\x00" * 32))
    view = watcher(chain, me.address).read()
    assert (view.current_round, view.creation_round) == (previous + 1, previous)
    assert view.creation_round_block_hash == previous_hash
    chain.start_round(previous + 2)  # leave the session's chain with a usable round


def test_a_stale_view_is_no_view(chain, redis_server):
    view = watcher(chain, chain.new_account().address).read()
    redis = redis_server.client()
    save_view(redis, view, now=1000.0)
    assert load_view(redis, max_age=60, now=1059.0) == view
    assert load_view(redis, max_age=60, now=1061.0) is None


def arbitrum_shaped_rpc(upstream: str, l1_block: int, l2_offset: int):
    """THE ONE FAKE in the payment tests, because Arbitrum cannot run on this machine: a
    loopback JSON-RPC server in front of the real dev node that answers as Arbitrum's RPC
    does, its block numbers the L2 chain's (here the dev block + `l2_offset`) and every block
    carrying `l1BlockNumber` (here `l1_block`). Contract calls pass through untouched."""

    def arbitrum(request: dict, response: dict) -> dict:
        result = response.get("result")
        if request["method"] == "eth_blockNumber":
            response["result"] = hex(int(result, 16) + l2_offset)
        elif request["method"] == "eth_getBlockByNumber" and result:
            result["number"] = hex(int(result["number"], 16) + l2_offset)
            result["l1BlockNumber"] = hex(l1_block)
        return response

    return relay_rpc(upstream, arbitrum)


def test_on_arbitrum_the_l1_block_comes_from_the_block_not_eth_block_number(chain):
    me = chain.new_account()
    chain.start_round(chain.current_round() or 1)
    with arbitrum_shaped_rpc(chain.url, l1_block=21_000_123, l2_offset=300_000_000) as url:
        arbitrum = watcher(chain, me.address, url=url, arbitrum=True)
        view = arbitrum.read()
        l2_block = Web3(Web3.HTTPProvider(url)).eth.block_number
    assert view.l1_block == 21_000_123
    assert l2_block > 300_000_000  # what the old code compared expiration blocks with
    assert view.current_round == chain.current_round()
