"""A real Ethereum JSON-RPC dev node (Hardhat's, from npm) with our test TicketBroker on it.

Used by the chain tests and by `make demo` (hack/kubepeer_dev/demo.py).

Hardhat's node is a full EVM with automining; the contracts are compiled from
hack/chain/contracts by solc-js: a Controller (registry and pause switch), a RoundsManager
and a BondingManager driven by the tests, a TicketBroker as strict as Livepeer's, and an
ETH/USD price feed that answers as Chainlink's aggregators do.
Accounts are made fresh per test and funded with `hardhat_setBalance`, so no well-known
private key is relied on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract

CHAIN_DIR = Path(__file__).resolve().parents[1] / "chain"  # hack/chain
CACHE = Path(os.environ.get("KUBEPEER_CACHE", Path.home() / ".cache" / "kubepeer"))
ETH = 10**18


def compile_contracts() -> dict[str, dict]:
    """ABIs and bytecode by contract name, compiled by solc-js once per source (cached:
    compiling takes tens of seconds on a busy machine)."""
    digest = hashlib.sha256()
    for path in sorted([*CHAIN_DIR.glob("contracts/*.sol"), CHAIN_DIR / "compile.js",
                        CHAIN_DIR / "package-lock.json"]):  # fmt: skip
        digest.update(path.name.encode() + path.read_bytes())
    cache = CACHE / "chain-artifacts" / f"{digest.hexdigest()[:16]}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    out = subprocess.run(
        ["node", "compile.js"], cwd=CHAIN_DIR, capture_output=True, text=True, check=True
    )
    artifacts = json.loads(out.stdout)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(out.stdout)
    partial.replace(cache)
    return artifacts


class DevChain:
    controller: Contract
    broker: Contract
    rounds: Contract
    bonding: Contract
    deployer: LocalAccount
    price_feed: Contract

    def __init__(self, url: str, process: subprocess.Popen[bytes], w3: Web3) -> None:
        self.url, self.process, self.w3 = url, process, w3

    @classmethod
    def start(cls, port: int, log: Path, host: str = "127.0.0.1", detach: bool = False) -> DevChain:
        """`detach`: the node outlives this process (make demo), stopped by pid later."""
        process = subprocess.Popen(
            [str(CHAIN_DIR / "node_modules" / ".bin" / "hardhat"), "node",
             "--hostname", host, "--port", str(port)],
            cwd=CHAIN_DIR,
            env={**os.environ, "HARDHAT_DISABLE_TELEMETRY_PROMPT": "true"},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )  # fmt: skip
        url = f"http://{host}:{port}"
        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))

        def answering() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"hardhat node exited:\n{log.read_text()}")
            try:
                return w3.eth.chain_id == 31337
            except Exception:
                return False

        deadline = time.monotonic() + 60
        while not answering():
            if time.monotonic() > deadline:
                process.terminate()
                raise RuntimeError(f"the hardhat node did not answer in 60 s; see {log}")
            time.sleep(0.2)
        chain = cls(url, process, w3)
        chain.deployer = chain.new_account(100 * ETH)
        artifacts = compile_contracts()
        controller = chain.controller = chain.deploy(artifacts["TestController"])
        chain.rounds = chain.deploy(artifacts["TestRoundsManager"])
        chain.bonding = chain.deploy(artifacts["TestBondingManager"], controller.address)
        chain.broker = chain.deploy(artifacts["TestTicketBroker"], controller.address)
        # ETH/USD as Chainlink's aggregator answers it (8 decimals), at 3,000 USD.
        chain.price_feed = chain.deploy(artifacts["TestPriceFeed"], 8, "ETH / USD", 3000 * 10**8)
        for name, contract in (("RoundsManager", chain.rounds), ("BondingManager", chain.bonding),
                               ("TicketBroker", chain.broker)):  # fmt: skip
            chain.transact(chain.deployer, controller.functions.setContract(name, contract.address))
        return chain

    def set_eth_usd(self, answer: int) -> None:
        """A new round of the ETH/USD feed (in its 8 decimals: 3000 USD is 3000 * 10**8)."""
        # A fixed limit: hardhat's estimate for rewriting the same answer falls short.
        self.transact(self.deployer, self.price_feed.functions.setAnswer(answer), gas=100_000)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def new_account(self, balance: int = 0) -> LocalAccount:
        account = Account.create()
        if balance:
            self.w3.provider.make_request("hardhat_setBalance", [account.address, hex(balance)])
        return account

    def balance(self, address: str) -> int:
        return self.w3.eth.get_balance(address)

    def transact(
        self, account: LocalAccount, call: Any, value: int = 0, gas: int | None = None
    ) -> dict:
        fields = {
            "from": account.address,
            "nonce": self.w3.eth.get_transaction_count(account.address),
            "value": value,
            "chainId": 31337,
        }
        if gas is not None:  # estimates fall short when inner calls may fail silently
            fields["gas"] = gas
        tx = call.build_transaction(fields)
        signed = account.sign_transaction(tx)
        tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
        assert receipt.status == 1, receipt
        return receipt

    def deploy(self, artifact: dict, *args: object) -> Contract:
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        receipt = self.transact(self.deployer, factory.constructor(*args))
        return self.w3.eth.contract(address=receipt.contractAddress, abi=artifact["abi"])

    def start_round(self, number: int) -> bytes:
        """Make `number` the current, initialized round; its block hash is the latest block's."""
        if self.current_round() != number:
            self.begin_round(number)
        if self.rounds.functions.currentRoundInitialized().call():
            return bytes(self.rounds.functions.blockHashForRound(number).call())
        return self.initialize_round()

    def begin_round(self, number: int) -> None:
        """Move to round `number` without initializing it (as when no one has called
        initializeRound yet)."""
        self.transact(self.deployer, self.rounds.functions.setCurrentRound(number))

    def initialize_round(self) -> bytes:
        block_hash = bytes(self.w3.eth.get_block("latest").hash)
        self.transact(self.deployer, self.rounds.functions.initializeRound(block_hash))
        return block_hash

    def current_round(self) -> int:
        return self.rounds.functions.currentRound().call()

    def set_paused(self, paused: bool) -> None:
        switch = self.controller.functions.pause if paused else self.controller.functions.unpause
        self.transact(self.deployer, switch())

    def set_active(self, address: str, active: bool = True) -> None:
        """Put an orchestrator in (or out of) the active set; only active ones may claim
        from a sender's reserve, each up to its share."""
        self.transact(self.deployer, self.bonding.functions.setActive(address, active))

    def fees_earned(self, address: str) -> int:
        """The recipient's fee pool: where the broker credits winning tickets."""
        return self.bonding.functions.feesEarned(address).call()

    def fund_sender(self, sender: LocalAccount, deposit: int, reserve: int) -> None:
        call = self.broker.functions.fundDepositAndReserve(deposit, reserve)
        self.transact(sender, call, value=deposit + reserve)

    def mine(self, blocks: int = 1) -> None:
        self.w3.provider.make_request("hardhat_mine", [hex(blocks)])

    def set_gas_price(self, wei: int) -> None:
        self.w3.provider.make_request("hardhat_setNextBlockBaseFeePerGas", [hex(wei)])
        self.mine()
