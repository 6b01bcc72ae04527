"""The listener: one port for gRPC and HTTP, TLS with ALPN h2 + http/1.1, or h2c behind an
ingress that terminates TLS (gateway-wire 1.1). The ASGI app needs HTTP/2 with response
trailers (unary gRPC) and HTTP/1.1 on the same socket. Two servers give it: uvicorn with
zttp (the default: about a third less CPU per job, hack/bench/proxy.py) and hypercorn
(`--server hypercorn`); one config serves both the same way. On uvicorn, HTTP/1.1 jobs are
parsed and answered by http1.py, which leaves every other request to uvicorn.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import ipaddress
import logging
import os
import shutil
import signal
import ssl
import tempfile
import threading
from collections.abc import Awaitable, Callable, Generator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubepeer.proxy import http1

log = logging.getLogger("kubepeer.proxy.server")

CERT_DAYS = 365
SERVERS = ("uvicorn", "hypercorn")  # the first is the default (hack/bench/proxy.py)


def self_signed(host: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM): ECDSA P-256, one year, the public host as SAN, as go-livepeer
    makes when no certificate is given (gateways skip verification)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kubepeer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def hypercorn_config(
    bind: str,
    public_url: str,
    *,
    plaintext: bool = False,
    cert: Path | None = None,
    key: Path | None = None,
    graceful_seconds: float = 60.0,
) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [bind]
    config.alpn_protocols = ["h2", "http/1.1"]
    config.graceful_timeout = graceful_seconds
    config.keep_alive_timeout = 600  # go-livepeer's idle timeout is 10 min
    # A gateway sends every job over one HTTP/2 connection, and Go's server ends none for
    # its number of requests: hypercorn's default (1000) would close it with jobs in flight.
    config.keep_alive_max_requests = 2**62
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # our JSON lines, not its own
    config.h2_max_concurrent_streams = 1000
    if plaintext:
        return config  # hypercorn speaks h2c (prior knowledge) and HTTP/1.1 here
    if cert is None or key is None:
        host = urlsplit(public_url).hostname or "localhost"
        cert_pem, key_pem = self_signed(host)
        folder = Path(tempfile.mkdtemp(prefix="kubepeer-proxy-tls-", dir=memory_dir()))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the key dies with us
        cert, key = folder / "cert.pem", folder / "key.pem"
        cert.write_bytes(cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
    config.certfile, config.keyfile = str(cert), str(key)
    return config


async def serve(
    app: Callable[..., Awaitable[None]],
    config: Any,
    server: str = SERVERS[0],
    reload_seconds: float = 0.0,
) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting and let jobs in flight finish.
    `reload_seconds` > 0 (uvicorn): check the certificate files that often and serve a
    renewed certificate (cert-manager rewrites its Secret) to every new connection."""
    if server == "uvicorn":
        with stop_signals_handled():
            served = uvicorn_server(app, config, getattr(app, "lean_jobs", None))
            reloader = None
            if reload_seconds > 0 and config.certfile:
                cert, key = Path(config.certfile), Path(config.keyfile)
                loaded = _read_pair(cert, key)  # before load(): a change after it is seen
                served.config.load()  # public: builds the SSLContext that serve() then uses
                reloader = asyncio.create_task(keep_certificate_current(
                    served.config.ssl, cert, key, reload_seconds, loaded))  # fmt: skip
                reloader.add_done_callback(_reloading_stopped)
            try:
                await served.serve()
            finally:
                if reloader is not None:
                    reloader.cancel()
        return
    from hypercorn.asyncio import serve as hypercorn_serve

    if reload_seconds > 0 and config.certfile:
        log.warning("--server hypercorn reads the TLS certificate at start only: a renewed "
                    "one is served after a restart")  # fmt: skip

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def memory_dir() -> str | None:
    """Where a private key may be written for a moment: /dev/shm (memory) when the
    container has it, so that no copy of a key ever reaches the node's disk; else the
    default temporary folder."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _read_pair(cert: Path, key: Path) -> tuple[bytes, bytes] | None:
    try:
        return cert.read_bytes(), key.read_bytes()
    except OSError:
        return None


def load_pair(context: ssl.SSLContext, pair: tuple[bytes, bytes]) -> None:
    """Load a certificate and key read earlier into `context`, only if they belong together:
    OpenSSL replaces a context's certificate before it checks the key, so a bad pair loaded
    straight in would leave the context serving no working certificate at all."""
    with tempfile.TemporaryDirectory(prefix="kubepeer-tls-", dir=memory_dir()) as folder:
        cert, key = Path(folder) / "tls.crt", Path(folder) / "tls.key"
        cert.write_bytes(pair[0])
        key.touch(mode=0o600)
        key.write_bytes(pair[1])
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)  # raises if not
        context.load_cert_chain(cert, key)


def _reloading_stopped(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("TLS certificate reloading stopped: %r", task.exception())


async def keep_certificate_current(
    context: ssl.SSLContext,
    cert: Path,
    key: Path,
    every: float,
    loaded: tuple[bytes, bytes] | None = None,
) -> None:
    """Serve the certificate and key again whenever their files change (cert-manager
    renewing its Secret), to new connections. A pair that does not load (a new certificate
    whose key has not arrived yet) is logged and the old one kept; the next check retries."""
    seen = refused = loaded if loaded is not None else _read_pair(cert, key)
    while True:
        await asyncio.sleep(every)
        pair = _read_pair(cert, key)
        if pair is None or pair in (seen, refused):
            continue
        try:
            load_pair(context, pair)
        except (ssl.SSLError, OSError) as exc:
            refused = pair  # said once; a change to either file is tried again
            log.error("renewed TLS certificate not loaded, still serving the old one: %s", exc)
            continue
        seen = pair
        log.info("serving the renewed TLS certificate", extra={"cert": str(cert)})


def uvicorn_server(
    app: Callable[..., Awaitable[None]],
    hypercorn: Any,
    lean_jobs: tuple[Iterable[str], int, http1.Handler, float] | None = None,
) -> Any:
    """The same listener on uvicorn with zttp (HTTP/1.1 and HTTP/2 with trailers, ALPN
    h2 + http/1.1 over TLS, h2c by preface sniffing in plaintext): the cert, bind and
    timeouts are taken from the hypercorn config so both servers serve the same thing.
    `lean_jobs`: (paths, body limit, handler, read timeout) of the POSTs http1.py serves on
    HTTP/1.1."""
    try:
        import uvicorn
        import zttp  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"--server uvicorn needs uvicorn and zttp installed: {exc}") from None

    host, _, port = hypercorn.bind[0].rpartition(":")
    config = uvicorn.Config(
        app,
        host=host.strip("[]"),
        port=int(port),
        # Our listener (http1.py) gives HTTP/2 to zttp's protocol itself; without it, zttp's
        # own dispatcher does (http2=True).
        http=http1.listener(*lean_jobs) if lean_jobs is not None else "zttp",
        http2=lean_jobs is None,
        loop="none",  # ours: uvloop when installed
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_keep_alive=int(hypercorn.keep_alive_timeout),
        timeout_graceful_shutdown=int(hypercorn.graceful_timeout),
        ssl_certfile=hypercorn.certfile,
        ssl_keyfile=hypercorn.keyfile,
        server_header=False,
        proxy_headers=False,  # nothing here reads the client's address: skip the rewrite
    )

    return uvicorn.Server(config)


@contextlib.contextmanager
def stop_signals_handled() -> Generator[None, None, None]:
    """SIGTERM and SIGINT answered by a handler that does nothing while the server runs.

    uvicorn stops gracefully on them, restores the handlers it found, then raises the signal
    again: with the default handlers that would kill the process before the proxy's own
    cleanup (the last demand records). With these, the signal is noted and ignored, and the
    process ends once its cleanup has run. (Signals are the main thread's only.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
