"""Kubepeer's development tooling (hack/pyproject.toml): what the tests, `make demo` and the
benchmarks share, and nothing an image ships.

- `node_agent`: a kubelet stand-in that runs pods as local processes (`hack/node-agent`)
- `devchain`: a hardhat JSON-RPC node with the strict TicketBroker
- `gateway_sim`, `remote_signer`: a gateway that speaks the real wire, and a payer for the SDK
- `tiny_models`: random-weight models from configs, in the Hugging Face cache layout
- `demo`: `make demo`
- `live_clips`, `trickle_oracle`: live video segments, and a trickle server from the wire pages
- `bench`: what the benchmarks in hack/bench share
"""
