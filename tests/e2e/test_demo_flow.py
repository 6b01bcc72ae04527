"""End to end, as a visitor runs it: `make demo`'s flow (kubepeer_dev.demo) with the Helm chart
installed on a real control plane, every chart pod a process run by the node agent, the
dev chain's strict TicketBroker, and a gateway speaking the real wire (kubepeer_dev.gateway_sim).

What is checked comes from the outside: the chain's own records (usedTickets, the
broker's WinningTicketRedeemed events), the PNG the gateway downloaded, the Deployment's
pods, and the ledger in the chart's Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis
from eth_utils import keccak
from PIL import Image
from web3 import Web3

from kubepeer.payments.ledger import WINNING_STREAM, balance_key, nonces_key
from kubepeer.payments.queue import State, TicketBook, WinningTicket
from kubepeer_dev.demo import fast_forward
from kubepeer_dev.gateway_sim import Gateway
from tests.conftest import ARTIFACTS, needs_root
from tests.support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.agent, pytest.mark.chain, pytest.mark.redis]


class Demo:
    """A demo brought up by kubepeer_dev.demo under its own cluster name and state dir."""

    def __init__(self, state: Path, name: str) -> None:
        self.state, self.name = state, name
        self.facts: dict = {}

    def command(self, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kubepeer_dev.demo", *args, "--name", self.name,
             "--state-dir", str(self.state)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def kubectl(self, *args: str) -> str:
        return subprocess.run(
            [str(Path(self.facts["bin_dir"]) / "kubectl"), "--kubeconfig",
             str(self.state / "kubeconfig"), "-n", "kubepeer", *args],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout  # fmt: skip

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args))

    def pods(self, component: str) -> list[dict]:
        selector = f"app.kubernetes.io/component={component}"
        return self.get("pods", "-l", selector)["items"]

    def redis(self) -> redis.Redis:
        [pod] = self.pods("redis")
        return redis.Redis(host=pod["status"]["podIP"], port=6379, socket_timeout=10)

    def w3(self) -> Web3:
        return Web3(Web3.HTTPProvider(self.facts["chain_url"]))

    def broker(self):
        abi = json.loads((self.state / "broker-abi.json").read_text())
        return self.w3().eth.contract(address=self.facts["broker"], abi=abi)

    def gateway(self, *args: str) -> subprocess.Popen[str]:
        """kubepeer_dev.gateway_sim in the agent node's netns, where the proxy's Service answers."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.facts["node_netns"], sys.executable,
             "-m", "kubepeer_dev.gateway_sim", "--orchestrator", self.facts["proxy_url"],
             "--key-file", str(self.state / "secrets" / "gateway.key"),
             "--out", str(self.state / "out-e2e"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    needs_root()
    state = tmp_path_factory.mktemp("demo") / "state"
    up = Demo(state, f"e2e-demo-{os.getpid()}")
    result = up.command("up")
    try:
        if result.returncode != 0:
            ARTIFACTS.mkdir(exist_ok=True)
            subprocess.run(["cp", "-r", str(state / "logs"), str(ARTIFACTS / "demo-logs")])
            pytest.fail(
                f"kubepeer_dev.demo up failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        up.facts = json.loads((state / "demo.json").read_text())
        up.stdout = result.stdout
        yield up
    finally:
        up.command("down", timeout=600)


def redeemed_on_chain(demo: Demo) -> Counter:
    """How often the broker paid out each ticket to us, by what identifies a ticket: its
    sender, nonce and recipientRand (a nonce restarts with each set of params)."""
    events = demo.broker().events.WinningTicketRedeemed().get_logs(from_block=0)
    return Counter(
        (e.args.sender, e.args.senderNonce, keccak(e.args.recipientRand.to_bytes(32, "big")))
        for e in events
        if e.args.recipient == demo.facts["orchestrator"]
    )


def key(ticket: WinningTicket) -> tuple[str, int, bytes]:
    t = ticket.ticket
    return Web3.to_checksum_address(t.sender), t.sender_nonce, t.recipient_rand_hash


def winning_tickets(demo: Demo) -> list[WinningTicket]:
    entries = demo.redis().xrange(WINNING_STREAM)
    return [WinningTicket.from_json(fields[b"ticket"]) for _, fields in entries]


def test_paid_jobs_are_served_and_the_image_is_saved(demo):
    jobs = demo.facts["jobs"]
    images = [j for j in jobs if j["pipeline"] == "text-to-image"]
    assert images
    assert all(j["status"] == 200 for j in jobs), jobs
    for job in images:
        with Image.open(job["output"]) as image:  # downloaded from the result URL
            assert image.format == "PNG"
            assert image.size == (64, 64)
    assert sum(j["tickets"] for j in jobs) > 0
    assert all(j["fee_wei"] > 0 for j in jobs)  # each job was charged units x price
    assert "Look around" in demo.stdout
    assert "kubectl -n kubepeer get aimodels" in demo.stdout


def test_the_on_demand_model_woke_for_its_job(demo):
    [caption] = [j for j in demo.facts["jobs"] if j["pipeline"] == "image-to-text"]
    assert caption["status"] == 200, caption
    assert caption["output"].strip(), caption
    assert demo.facts["image_to_text_replicas_before"] == 0  # asleep until the job came
    model = demo.get("aimodel", "image-to-text")
    assert model["status"]["readyReplicas"] == 1
    assert model["status"]["lastColdStartSeconds"] > 0
    assert demo.facts["cold_start_seconds"] == model["status"]["lastColdStartSeconds"]


def test_a_paid_live_runner_session_ran_through_the_gateway_sdk(demo):
    """The demo's step 7: the SDK reserved a session on the echo LiveRunner, paid its 402
    challenge through the remote signer and kept it funded; every request through it was
    answered. The chart's ledger shows the payments: credits on (payer, session id)."""
    session = demo.facts["live_session"]
    assert session["statuses"] == [200] * 4
    assert session["released"] is False  # funded to the end, closed by the client
    payer = Gateway.from_key_file(demo.state / "secrets" / "gateway.key").address
    credited = demo.redis().get(balance_key(payer, session["session_id"]))
    assert credited is not None  # the session's payments reached the ledger
    runner = demo.get("liverunner", "echo")
    assert runner["status"]["phase"] == "Ready"
    assert runner["status"]["price"]["wei"] == "800000000"  # 2.88e12 wei an hour, per second
    assert "Live Runner: a paid examples/echo session" in demo.stdout


def test_each_winning_ticket_is_redeemed_exactly_once_on_the_chain(demo):
    won = winning_tickets(demo)
    assert won, "no ticket won (win probability 1/2 over every ticket sent)"
    broker = demo.broker()
    redeemed = redeemed_on_chain(demo)
    for ticket in won:
        assert redeemed[key(ticket)] == 1, ticket
        assert broker.functions.usedTickets(ticket.hash).call()
    assert sum(redeemed.values()) == len(won)  # nothing redeemed that the ledger did not win
    book = TicketBook(demo.redis())
    records = [book.get(t.hash) for t in won]
    assert all(r.state is State.REDEEMED for r in records), records
    assert {r.tx_hash for r in records} == {r["tx"] for r in demo.facts["redeemed"]}


def test_killing_the_proxy_pod_mid_run_loses_no_accepted_payment(demo):
    [old] = demo.pods("proxy")
    gateway = demo.gateway("--text-to-image", "kubepeer-tiny/stable-diffusion", "--images", "6",
                           "--keep-going")  # fmt: skip
    first = gateway.stdout.readline()  # one job served: the run is under way
    assert json.loads(first)["status"] == 200, first + gateway.stderr.read()
    demo.kubectl("delete", "pod", old["metadata"]["name"], "--grace-period=0", "--force")
    rest, _ = gateway.communicate(timeout=600)
    during = [json.loads(first)] + [json.loads(line) for line in rest.splitlines() if line]

    def replaced() -> bool:
        pods = demo.pods("proxy")
        return [p["metadata"]["name"] for p in pods if p["metadata"]["name"] != old["metadata"][
            "name"] and any(c["type"] == "Ready" and c["status"] == "True"
                            for c in p["status"].get("conditions", []))]  # fmt: skip

    wait_for(replaced, timeout=240, what="the Deployment's new proxy pod Ready", every=2)
    after = demo.gateway("--text-to-image", "kubepeer-tiny/stable-diffusion", "--images", "2")
    out, err = after.communicate(timeout=600)
    assert after.returncode == 0, out + err  # served again, by the replacement
    jobs = during + [json.loads(line) for line in out.splitlines() if line]

    # Every payment a gateway saw accepted (its job answered) is in the ledger: each of
    # its nonces is recorded under its params' recipientRandHash.
    store = demo.redis()
    accepted = [j for j in jobs if j["status"] == 200]
    assert len(accepted) >= 3
    for job in accepted:
        recorded = store.smembers(nonces_key(bytes.fromhex(job["recipient_rand_hash"])))
        assert {str(n).encode() for n in job["nonces"]} <= recorded, job

    # ... and the chain agrees with the ledger: every winning ticket, including those the
    # killed pod accepted, is redeemed exactly once.
    fast_forward(demo.facts)

    def all_redeemed() -> bool:
        won = winning_tickets(demo)
        return all(demo.broker().functions.usedTickets(t.hash).call() for t in won)

    wait_for(all_redeemed, timeout=180, what="every winning ticket redeemed", every=2)
    redeemed = redeemed_on_chain(demo)
    won = winning_tickets(demo)
    assert all(redeemed[key(t)] == 1 for t in won)
    assert sum(redeemed.values()) == len(won)
