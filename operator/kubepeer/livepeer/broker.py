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
