// The dev chain the payment tests run against: `hardhat node`, automining, chain id 31337.
module.exports = {
  networks: {
    hardhat: { chainId: 31337, mining: { auto: true }, accounts: { count: 2 } },
  },
};
