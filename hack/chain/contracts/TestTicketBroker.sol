// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// Livepeer's Controller, as far as the TicketBroker uses it: a registry of contracts by the
/// keccak256 of their name, and the protocol-wide pause switch.
contract TestController {
    address public owner;
    bool public paused;
    mapping(bytes32 => address) internal contracts;

    constructor() {
        owner = msg.sender;
    }

    modifier onlyOwner() {
        require(msg.sender == owner, "caller must be Controller owner");
        _;
    }

    function setContract(string calldata name, address addr) external onlyOwner {
        contracts[keccak256(bytes(name))] = addr;
    }

    function getContract(bytes32 id) external view returns (address) {
        return contracts[id];
    }

    function pause() external onlyOwner {
        paused = true;
    }

    function unpause() external onlyOwner {
        paused = false;
    }
}

/// Livepeer's RoundsManager, driven by hand: a test moves to a new round (not yet
/// initialized) and initializes it, which records the round's block hash.
contract TestRoundsManager {
    address public owner;
    uint256 public currentRound;
    uint256 public lastInitializedRound;
    mapping(uint256 => bytes32) public blockHashForRound;

    constructor() {
        owner = msg.sender;
    }

    function setCurrentRound(uint256 round) external {
        require(msg.sender == owner, "caller must be owner");
        currentRound = round;
    }

    function initializeRound(bytes32 blockHash) external {
        require(msg.sender == owner, "caller must be owner");
        require(lastInitializedRound != currentRound, "round already initialized");
        lastInitializedRound = currentRound;
        blockHashForRound[currentRound] = blockHash;
    }

    function currentRoundInitialized() public view returns (bool) {
        return lastInitializedRound == currentRound;
    }
}

/// Livepeer's BondingManager, as far as tickets and rewards touch it: the active set (whose
/// size divides a sender's reserve), each transcoder's fee pool credited by the TicketBroker,
/// and reward() once per round per active transcoder.
contract TestBondingManager {
    TestController public immutable controller;
    address public owner;
    mapping(address => bool) internal active;
    uint256 public activeCount;
    mapping(address => uint256) public feesEarned; // the fee pool, summed over rounds
    mapping(address => mapping(uint256 => uint256)) public feesForRound;
    mapping(address => uint256) public lastRewardRound;
    mapping(address => uint256) public rewardCalls;

    event Reward(address indexed transcoder, uint256 amount);

    constructor(TestController c) {
        controller = c;
        owner = msg.sender;
    }

    function _rounds() internal view returns (TestRoundsManager) {
        return TestRoundsManager(controller.getContract(keccak256("RoundsManager")));
    }

    function setActive(address transcoder, bool isActive) external {
        require(msg.sender == owner, "caller must be owner");
        if (active[transcoder] != isActive) {
            active[transcoder] = isActive;
            activeCount = isActive ? activeCount + 1 : activeCount - 1;
        }
    }

    function isActiveTranscoder(address transcoder) public view returns (bool) {
        return active[transcoder];
    }

    function getTranscoderPoolSize() external view returns (uint256) {
        return activeCount;
    }

    function updateTranscoderWithFees(address transcoder, uint256 fees, uint256 round) external {
        require(msg.sender == controller.getContract(keccak256("TicketBroker")), "caller must be TicketBroker");
        feesEarned[transcoder] += fees;
        feesForRound[transcoder][round] += fees;
    }

    function reward() external {
        require(!controller.paused(), "system is paused");
        TestRoundsManager rounds = _rounds();
        require(rounds.currentRoundInitialized(), "current round is not initialized");
        require(isActiveTranscoder(msg.sender), "caller must be an active transcoder");
        uint256 round = rounds.currentRound();
        require(lastRewardRound[msg.sender] != round, "caller has already called reward for the current round");
        lastRewardRound[msg.sender] = round;
        rewardCalls[msg.sender] += 1;
        emit Reward(msg.sender, 0);
    }
}

/// A TicketBroker with the same ABI, checks, revert strings, events and payout rules as
/// Livepeer's on Arbitrum: OpenZeppelin ECDSA (high-s refused), 64-byte auxData naming an
/// initialized round's block hash, ticket validity by round, the Controller's pause switch,
/// payment from the deposit then from the recipient's share of the reserve, credited to the
/// recipient's fee pool in the BondingManager (no ETH moves to the recipient).
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

    struct Reserve {
        uint256 funds;
        mapping(uint256 => uint256) claimedForRound;
        mapping(uint256 => mapping(address => uint256)) claimedByAddress;
    }

    uint256 public constant ticketValidityPeriod = 2;
    uint256 public constant unlockPeriod = 2;

    TestController public immutable controller;
    mapping(bytes32 => bool) public usedTickets;
    mapping(address => Sender) internal senders;
    mapping(address => Reserve) internal reserves;

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
    event ReserveClaimed(address indexed reserveHolder, address claimant, uint256 amount);

    constructor(TestController c) {
        controller = c;
    }

    modifier whenSystemNotPaused() {
        require(!controller.paused(), "system is paused");
        _;
    }

    modifier currentRoundInitialized() {
        require(roundsManager().currentRoundInitialized(), "current round is not initialized");
        _;
    }

    function roundsManager() internal view returns (TestRoundsManager) {
        return TestRoundsManager(controller.getContract(keccak256("RoundsManager")));
    }

    function bondingManager() internal view returns (TestBondingManager) {
        return TestBondingManager(controller.getContract(keccak256("BondingManager")));
    }

    function fundDepositAndReserve(uint256 depositAmount, uint256 reserveAmount)
        external
        payable
        whenSystemNotPaused
    {
        require(msg.value == depositAmount + reserveAmount, "msg.value does not equal sum of deposit amount and reserve amount");
        senders[msg.sender].deposit += depositAmount;
        reserves[msg.sender].funds += reserveAmount;
    }

    function unlock() external whenSystemNotPaused {
        Sender storage sender = senders[msg.sender];
        require(sender.deposit > 0 || reserves[msg.sender].funds > 0, "sender deposit and reserve are zero");
        require(sender.withdrawRound == 0, "unlock already initiated");
        sender.withdrawRound = roundsManager().currentRound() + unlockPeriod;
    }

    function getSenderInfo(address addr) external view returns (Sender memory sender, ReserveInfo memory reserve) {
        sender = senders[addr];
        Reserve storage r = reserves[addr];
        reserve = ReserveInfo(r.funds, r.claimedForRound[roundsManager().currentRound()]);
    }

    function claimableReserve(address reserveHolder, address claimant) public view returns (uint256) {
        TestBondingManager bonding = bondingManager();
        if (!bonding.isActiveTranscoder(claimant)) {
            return 0;
        }
        uint256 poolSize = bonding.getTranscoderPoolSize();
        if (poolSize == 0) {
            return 0;
        }
        Reserve storage r = reserves[reserveHolder];
        uint256 round = roundsManager().currentRound();
        return (r.funds + r.claimedForRound[round]) / poolSize - r.claimedByAddress[round][claimant];
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

    /// Test helper (internal on the real broker): the win rule.
    function isWinningTicket(bytes memory sig, uint256 recipientRand, uint256 winProb) public pure returns (bool) {
        return uint256(keccak256(abi.encodePacked(sig, recipientRand))) < winProb;
    }

    /// Test helper (internal on the real broker): who signed a ticket hash, by OpenZeppelin's
    /// ECDSA exactly as the real broker recovers it (reverts on high s or a bad v).
    function recoverSigner(bytes32 ticketHash, bytes memory sig) public pure returns (address) {
        require(sig.length == 65, "INVALID_SIGNATURE_LENGTH");
        return ECDSA.recover(ECDSA.toEthSignedMessageHash(ticketHash), sig);
    }

    function redeemWinningTicket(Ticket memory ticket, bytes memory sig, uint256 recipientRand)
        public
        whenSystemNotPaused
        currentRoundInitialized
    {
        bytes32 ticketHash = getTicketHash(ticket);
        require(ticket.recipient != address(0), "ticket recipient is null address");
        require(ticket.sender != address(0), "ticket sender is null address");
        uint256 creationRound = _requireValidAuxData(ticket.auxData);
        require(keccak256(abi.encodePacked(recipientRand)) == ticket.recipientRandHash, "recipientRand does not match recipientRandHash");
        require(!usedTickets[ticketHash], "ticket is used");
        require(recoverSigner(ticketHash, sig) == ticket.sender, "invalid signature over ticket hash");
        require(isWinningTicket(sig, recipientRand, ticket.winProb), "ticket did not win");

        Sender storage sender = senders[ticket.sender];
        uint256 round = roundsManager().currentRound();
        require(sender.withdrawRound == 0 || round < sender.withdrawRound, "sender is unlocked");
        require(sender.deposit > 0 || reserves[ticket.sender].funds > 0, "sender deposit and reserve are zero");

        usedTickets[ticketHash] = true;

        uint256 amount;
        if (ticket.faceValue > sender.deposit) {
            amount = sender.deposit + _claimFromReserve(ticket.sender, ticket.recipient, ticket.faceValue - sender.deposit);
            sender.deposit = 0;
        } else {
            amount = ticket.faceValue;
            sender.deposit -= ticket.faceValue;
        }
        if (amount > 0) {
            bondingManager().updateTranscoderWithFees(ticket.recipient, amount, creationRound);
            emit WinningTicketTransfer(ticket.sender, ticket.recipient, amount);
        }
        emit WinningTicketRedeemed(ticket.sender, ticket.recipient, ticket.faceValue, ticket.winProb, ticket.senderNonce, recipientRand, ticket.auxData);
    }

    /// Redeems each ticket on its own: one failure does not revert the others.
    function batchRedeemWinningTickets(Ticket[] memory tickets, bytes[] memory sigs, uint256[] memory recipientRands)
        public
        whenSystemNotPaused
        currentRoundInitialized
    {
        for (uint256 i = 0; i < tickets.length; i++) {
            (bool ok, ) = address(this).call(
                abi.encodeWithSignature(
                    "redeemWinningTicket((address,address,uint256,uint256,uint256,bytes32,bytes),bytes,uint256)",
                    tickets[i],
                    sigs[i],
                    recipientRands[i]
                )
            );
            ok; // a failed ticket is skipped, as on the real TicketBroker
        }
    }

    function _claimFromReserve(address holder, address claimant, uint256 wanted) internal returns (uint256) {
        uint256 claimable = claimableReserve(holder, claimant);
        uint256 claim = wanted > claimable ? claimable : wanted;
        if (claim > 0) {
            uint256 round = roundsManager().currentRound();
            Reserve storage r = reserves[holder];
            r.claimedForRound[round] += claim;
            r.claimedByAddress[round][claimant] += claim;
            r.funds -= claim;
            emit ReserveClaimed(holder, claimant, claim);
        }
        return claim;
    }

    function _requireValidAuxData(bytes memory auxData) internal view returns (uint256 creationRound) {
        require(auxData.length == 64, "invalid length for ticket auxData: must be 64 bytes");
        bytes32 creationRoundBlockHash;
        assembly {
            creationRound := mload(add(auxData, 32))
            creationRoundBlockHash := mload(add(auxData, 64))
        }
        TestRoundsManager rounds = roundsManager();
        bytes32 blockHash = rounds.blockHashForRound(creationRound);
        require(blockHash != bytes32(0), "ticket creationRound does not have a block hash");
        require(creationRoundBlockHash == blockHash, "ticket creationRoundBlockHash invalid for creationRound");
        require(creationRound + ticketValidityPeriod > rounds.currentRound(), "ticket is expired");
    }
}
