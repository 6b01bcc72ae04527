"""Example Live Runner apps (issue 26, item 7), built into the runner image: any container
can be a paid Livepeer app, and these are the smallest ones worth paying for.

    kubepeer-app hello-world   single-shot HTTP: one JSON answer per call (price: fixed)
    kubepeer-app tokens        single-shot SSE: streams tokens as they are made
    kubepeer-app echo          persistent: trickle channels echoed, a WebSocket echoed

Each answers `GET /health` with 200 once it can take calls. The orchestrator sets four
`Livepeer-*` session headers on each call (live-runner-wire.md 5.1); hello-world shows
three of them back and never the session token.
"""
