// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// A stand-in for Livepeer's RoundsManager: tests set the round and its block hash.
contract TestRoundsManager {
    uint256 public currentRound;
    mapping(uint256 => bytes32) public blockHashForRound;

    function setRound(uint256 round, bytes32 blockHash) external {
        currentRound = round;
        blockHashForRound[round] = blockHash;
    }
}

/// A TicketBroker with the same ABI and the same checks as Livepeer's on Arbitrum, for tests
/// on a dev chain. Winning face values are paid in ETH to the recipient, from the sender's
/// deposit first and then its reserve.
contract TestTicketBroker {
    struct Ticket {
        address recipient;
        address sender;
        uint256 faceValue;
        uint256 winProb;
        uint256 senderNonce;
        bytes32 recipientRandHash;
        bytes auxData;
    }

    struct Sender {
        uint256 deposit;
        uint256 withdrawRound;
    }

    struct ReserveInfo {
        uint256 fundsRemaining;
        uint256 claimedInCurrentRound;
    }

    uint256 public constant ticketValidityPeriod = 2;
    uint256 public constant unlockPeriod = 2;

    TestRoundsManager public immutable roundsManager;
    mapping(bytes32 => bool) public usedTickets;
    mapping(address => Sender) internal senders;
    mapping(address => uint256) internal reserves;

    event WinningTicketRedeemed(
        address indexed sender,
        address indexed recipient,
        uint256 faceValue,
        uint256 winProb,
        uint256 senderNonce,
        uint256 recipientRand,
        bytes auxData
    );
    event WinningTicketTransfer(address indexed sender, address indexed recipient, uint256 amount);

    constructor(TestRoundsManager rounds) {
        roundsManager = rounds;
    }

    function fundDepositAndReserve(uint256 depositAmount, uint256 reserveAmount) external payable {
        require(msg.value == depositAmount + reserveAmount, "msg.value does not equal sum of deposit amount and reserve amount");
        senders[msg.sender].deposit += depositAmount;
        reserves[msg.sender] += reserveAmount;
    }

    function unlock() external {
        senders[msg.sender].withdrawRound = roundsManager.currentRound() + unlockPeriod;
    }

    function getSenderInfo(address addr) external view returns (Sender memory sender, ReserveInfo memory reserve) {
        sender = senders[addr];
        reserve = ReserveInfo(reserves[addr], 0);
    }

    function getTicketHash(Ticket memory ticket) public pure returns (bytes32) {
        return keccak256(
            abi.encodePacked(
                ticket.recipient,
                ticket.sender,
                ticket.faceValue,
                ticket.winProb,
                ticket.senderNonce,
                ticket.recipientRandHash,
                ticket.auxData
            )
        );
    }

    function isWinningTicket(bytes memory sig, uint256 recipientRand, uint256 winProb) public pure returns (bool) {
        return uint256(keccak256(abi.encodePacked(sig, recipientRand))) < winProb;
    }

    function recoverSigner(bytes32 ticketHash, bytes memory sig) public pure returns (address) {
        require(sig.length == 65, "invalid signature length");
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(sig, 32))
            s := mload(add(sig, 64))
            v := byte(0, mload(add(sig, 96)))
        }
        bytes32 prefixed = keccak256(abi.encodePacked("\x19Ethereum Signed Message:\n32", ticketHash));
        return ecrecover(prefixed, v, r, s);
    }

    function redeemWinningTicket(Ticket memory ticket, bytes memory sig, uint256 recipientRand) public {
        bytes32 ticketHash = getTicketHash(ticket);
        require(ticket.recipient != address(0), "ticket recipient is null address");
        require(ticket.sender != address(0), "ticket sender is null address");
        _checkCreationRound(ticket.auxData);
        require(keccak256(abi.encodePacked(recipientRand)) == ticket.recipientRandHash, "recipientRand does not match recipientRandHash");
        require(!usedTickets[ticketHash], "ticket already used");
        require(recoverSigner(ticketHash, sig) == ticket.sender, "invalid signature over ticket hash");
        require(isWinningTicket(sig, recipientRand, ticket.winProb), "ticket did not win");

        usedTickets[ticketHash] = true;

        Sender storage sender = senders[ticket.sender];
        uint256 reserve = reserves[ticket.sender];
        require(sender.deposit > 0 || reserve > 0, "sender deposit and reserve are zero");
        uint256 fromDeposit = ticket.faceValue <= sender.deposit ? ticket.faceValue : sender.deposit;
        sender.deposit -= fromDeposit;
        uint256 fromReserve = ticket.faceValue - fromDeposit;
        if (fromReserve > reserve) {
            fromReserve = reserve;
        }
        reserves[ticket.sender] = reserve - fromReserve;

        uint256 amount = fromDeposit + fromReserve;
        (bool paid, ) = payable(ticket.recipient).call{value: amount}("");
        require(paid, "payment to recipient failed");
        emit WinningTicketTransfer(ticket.sender, ticket.recipient, amount);
        emit WinningTicketRedeemed(ticket.sender, ticket.recipient, ticket.faceValue, ticket.winProb, ticket.senderNonce, recipientRand, ticket.auxData);
    }

    /// Redeems each ticket on its own: one failure does not revert the others.
    function batchRedeemWinningTickets(Ticket[] memory tickets, bytes[] memory sigs, uint256[] memory recipientRands) public {
        for (uint256 i = 0; i < tickets.length; i++) {
            (bool ok, ) = address(this).call(abi.encodeWithSelector(this.redeemWinningTicket.selector, tickets[i], sigs[i], recipientRands[i]));
            ok; // a failed ticket is skipped, as on the real TicketBroker
        }
    }

    function _checkCreationRound(bytes memory auxData) internal view {
        require(auxData.length == 64, "invalid length for ticket auxData: must be 64 bytes");
        uint256 creationRound;
        bytes32 creationRoundBlockHash;
        assembly {
            creationRound := mload(add(auxData, 32))
            creationRoundBlockHash := mload(add(auxData, 64))
        }
        bytes32 blockHash = roundsManager.blockHashForRound(creationRound);
        require(blockHash != bytes32(0), "ticket creationRound does not have a block hash");
        require(creationRoundBlockHash == blockHash, "ticket creationRound block hash invalid");
        require(creationRound + ticketValidityPeriod > roundsManager.currentRound(), "ticket is expired");
    }
}
