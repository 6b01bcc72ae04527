"""The front proxy: what a Livepeer gateway believes is the orchestrator."""
