"""Livepeer's TicketBroker on Arbitrum: addresses and the part of its ABI we call."""

from __future__ import annotations

from typing import Any

ARBITRUM_ONE_CHAIN_ID = 42161
ARBITRUM_TICKET_BROKER = "0xa8bB618B1520E284046F3dFc448851A1Ff26e41B"
ARBITRUM_CONTROLLER = "0xD8E8328501E9645d16Cf49539efC04f734606ee4"
ARBITRUM_ROUNDS_MANAGER = "0xdd6f56DcC28D3F5f27084381fE8Df634985cc39f"

_TICKET = {
    "name": "ticket",
    "type": "tuple",
    "components": [
        {"name": "recipient", "type": "address"},
        {"name": "sender", "type": "address"},
        {"name": "faceValue", "type": "uint256"},
        {"name": "winProb", "type": "uint256"},
        {"name": "senderNonce", "type": "uint256"},
        {"name": "recipientRandHash", "type": "bytes32"},
        {"name": "auxData", "type": "bytes"},
    ],
}

TICKET_BROKER_ABI: list[dict[str, Any]] = [
    {
        "name": "redeemWinningTicket",
        "type": "function",
        "stateMutability": "nonpayable",
        "inputs": [
            _TICKET,
            {"name": "sig", "type": "bytes"},
            {"name": "recipientRand", "type": "uint256"},
        ],
        "outputs": [],
    },
    {
        "name": "batchRedeemWinningTickets",
        "type": "function",
        "stateMutability": "nonpayable",
        "inputs": [
            {**_TICKET, "name": "tickets", "type": "tuple[]"},
            {"name": "sigs", "type": "bytes[]"},
            {"name": "recipientRands", "type": "uint256[]"},
        ],
        "outputs": [],
    },
    {
        "name": "usedTickets",
        "type": "function",
        "stateMutability": "view",
        "inputs": [{"name": "", "type": "bytes32"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "name": "getSenderInfo",
        "type": "function",
        "stateMutability": "view",
        "inputs": [{"name": "_sender", "type": "address"}],
        "outputs": [
            {
                "name": "sender",
                "type": "tuple",
                "components": [
                    {"name": "deposit", "type": "uint256"},
                    {"name": "withdrawRound", "type": "uint256"},
                ],
            },
            {
                "name": "reserve",
                "type": "tuple",
                "components": [
                    {"name": "fundsRemaining", "type": "uint256"},
                    {"name": "claimedInCurrentRound", "type": "uint256"},
                ],
            },
        ],
    },
]


def _view(name: str, inputs: list[str], output: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "function",
        "stateMutability": "view",
        "inputs": [{"name": f"arg{i}", "type": t} for i, t in enumerate(inputs)],
        "outputs": [{"name": "", "type": output}],
    }


def _event(name: str, fields: list[tuple[str, str, bool]]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "event",
        "anonymous": False,
        "inputs": [{"name": n, "type": t, "indexed": i} for n, t, i in fields],
    }


# What the redeemer reads back from a receipt: which ticket was redeemed, and what it paid.
TICKET_BROKER_EVENTS_ABI: list[dict[str, Any]] = [
    _event(
        "WinningTicketRedeemed",
        [
            ("sender", "address", True),
            ("recipient", "address", True),
            ("faceValue", "uint256", False),
            ("winProb", "uint256", False),
            ("senderNonce", "uint256", False),
            ("recipientRand", "uint256", False),
            ("auxData", "bytes", False),
        ],
    ),
    _event(
        "WinningTicketTransfer",
        [("sender", "address", True), ("recipient", "address", True), ("amount", "uint256", False)],
    ),
]
TICKET_BROKER_ABI.extend(TICKET_BROKER_EVENTS_ABI)
# What our share of a sender's reserve is now (0 unless we are active): the redeemer's
# estimate of what a ticket will actually pay.
TICKET_BROKER_ABI.append(_view("claimableReserve", ["address", "address"], "uint256"))

CONTROLLER_ABI: list[dict[str, Any]] = [
    _view("getContract", ["bytes32"], "address"),
    _view("paused", [], "bool"),
]

ROUNDS_MANAGER_ABI: list[dict[str, Any]] = [
    _view("currentRound", [], "uint256"),
    _view("currentRoundInitialized", [], "bool"),
    _view("lastInitializedRound", [], "uint256"),
    _view("blockHashForRound", ["uint256"], "bytes32"),
]

BONDING_MANAGER_ABI: list[dict[str, Any]] = [
    _view("isActiveTranscoder", ["address"], "bool"),
    {
        "name": "reward",
        "type": "function",
        "stateMutability": "nonpayable",
        "inputs": [],
        "outputs": [],
    },
]
