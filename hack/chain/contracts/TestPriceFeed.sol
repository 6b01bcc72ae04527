// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// A price feed that answers as Chainlink's aggregators do (AggregatorV3Interface:
/// `decimals`, `description`, `version`, `latestRoundData`), for the dev chain. go-livepeer
/// reads ETH/USD this way to turn Live Runner prices in USD into wei; on Arbitrum One it is
/// Chainlink's ETH/USD aggregator. The owner sets each new answer as a new round.
contract TestPriceFeed {
    address public owner;
    uint8 public immutable decimals;
    string public description;
    uint256 public constant version = 4;

    uint80 internal roundId;
    int256 internal answer;
    uint256 internal updatedAt;

    constructor(uint8 decimals_, string memory description_, int256 answer_) {
        owner = msg.sender;
        decimals = decimals_;
        description = description_;
        _set(answer_);
    }

    function setAnswer(int256 answer_) external {
        require(msg.sender == owner, "only the owner sets the answer");
        _set(answer_);
    }

    function latestRoundData()
        external
        view
        returns (uint80, int256, uint256, uint256, uint80)
    {
        return (roundId, answer, updatedAt, updatedAt, roundId);
    }

    function _set(int256 answer_) internal {
        roundId += 1;
        answer = answer_;
        updatedAt = block.timestamp;
    }
}
