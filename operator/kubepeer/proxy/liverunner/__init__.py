"""The proxy as the orchestrator of Live Runner apps (live-runner-wire.md): the app table,
sessions in Redis, the reverse proxy, and the routes that tie them."""
