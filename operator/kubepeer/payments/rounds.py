"""What the chain says now, as the chain watcher last saw it. Pure data.

Every proxy replica reads the same view from Redis (watcher.py writes it), so params are
issued and payments judged against one L1 block, one round and one block hash.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChainView:
    """What the chain watcher last saw (shared by every replica through Redis)."""

    l1_block: int  # on Arbitrum the L1 block as Arbitrum reports it, not eth_blockNumber
    current_round: int
    # What params are issued with now: the last initialized round and its block hash (the
    # current round once initialized, as go-livepeer does).
    creation_round: int
    creation_round_block_hash: bytes
    round_initialized: bool = True
    active: bool = True  # our address is in the active orchestrator set this round
    gas_price: int = 0  # wei per gas now: what a winning ticket's face value must cover
