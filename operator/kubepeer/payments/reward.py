"""Reward calling: the orchestrator's other on-chain duty, once per round.

An active orchestrator mints its round's inflation by calling the BondingManager's
`reward()` once per round, as go-livepeer's reward service does. The call goes out under
the redeemer's Lease and fee ceiling; the contract itself refuses a second call in a round,
and we ask it (a gas estimate) before sending, so a restart never pays for a refused one.
The round last rewarded, and a transaction on its way, are kept in Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from eth_account.signers.local import LocalAccount
from prometheus_client import Counter
from redis import Redis
from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted, TransactionNotFound

from kubepeer.livepeer.broker import BONDING_MANAGER_ABI
from kubepeer.payments.ledger import PREFIX
from kubepeer.payments.redeemer import Fees, LeaseLost, fees_for
from kubepeer.payments.rounds import ChainView

log = logging.getLogger(__name__)

REWARDS = Counter("kubepeer_reward_calls_total", "reward() transactions mined", ["outcome"])


class RewardCaller:
    def __init__(
        self,
        redis: Redis,
        w3: Web3,
        bonding_manager: str,
        account: LocalAccount,
        max_fee_per_gas: int,
        priority_fee: int = 0,
        may_send: Callable[[], bool] = lambda: True,
        receipt_timeout: float = 120.0,
    ) -> None:
        self.redis, self.w3, self.account = redis, w3, account
        self.bonding = w3.eth.contract(address=bonding_manager, abi=BONDING_MANAGER_ABI)
        self.max_fee_per_gas, self.priority_fee = max_fee_per_gas, priority_fee
        self.may_send, self.receipt_timeout = may_send, receipt_timeout
        self.key = f"{PREFIX}:reward:{account.address.lower()}"

    def rewarded_round(self) -> int:
        return int(self.redis.hget(self.key, "round") or 0)

    def maybe_reward(self, view: ChainView) -> bool:
        """Call reward() if this round needs it; True when a call was mined now."""
        if not (view.active and view.round_initialized):
            return False
        round_number = view.current_round
        if self.rewarded_round() >= round_number:
            return False
        pending = self.redis.hget(self.key, "pending_tx")
        if pending and int(self.redis.hget(self.key, "pending_round") or 0) == round_number:
            return self._finish(pending.decode(), round_number)
        call = self.bonding.functions.reward()
        try:
            gas = call.estimate_gas({"from": self.account.address})
        except ContractLogicError as exc:
            reason = str(exc.message or exc)
            if "already called reward" in reason:
                self.redis.hset(self.key, "round", round_number)
            else:
                log.info("reward for round %d not callable now: %s", round_number, reason)
            return False
        base = self.w3.eth.get_block("latest").get("baseFeePerGas", 0)
        fees: Fees | None = fees_for(base, self.max_fee_per_gas, self.priority_fee)
        if fees is None:
            log.info("reward for round %d waits: fees over the ceiling", round_number)
            return False
        tx = call.build_transaction(
            {
                "from": self.account.address,
                "nonce": self.w3.eth.get_transaction_count(self.account.address, "pending"),
                "gas": int(gas * 1.2),
                "maxFeePerGas": fees.max_fee,
                "maxPriorityFeePerGas": fees.priority_fee,
                "chainId": self.w3.eth.chain_id,
            }
        )
        signed = self.account.sign_transaction(tx)
        tx_hash = "0x" + bytes(signed.hash).hex()
        self.redis.hset(self.key, mapping={"pending_tx": tx_hash, "pending_round": round_number})
        if not self.may_send():
            raise LeaseLost("the Lease is no longer ours: not calling reward")
        self.w3.eth.send_raw_transaction(signed.raw_transaction)
        return self._finish(tx_hash, round_number)

    def _finish(self, tx_hash: str, round_number: int) -> bool:
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.receipt_timeout
            )
        except TimeExhausted:
            try:
                self.w3.eth.get_transaction(tx_hash)
            except TransactionNotFound:  # dropped: forget it, the next pass tries afresh
                self.redis.hdel(self.key, "pending_tx", "pending_round")
            return False
        self.redis.hdel(self.key, "pending_tx", "pending_round")
        if receipt["status"] != 1:
            REWARDS.labels("reverted").inc()
            log.warning("reward transaction %s for round %d reverted", tx_hash, round_number)
            return False
        self.redis.hset(self.key, "round", round_number)
        REWARDS.labels("mined").inc()
        log.info("called reward for round %d in %s", round_number, tx_hash)
        return True
