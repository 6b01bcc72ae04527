"""A certificate a verifying client accepts (issue 26, item 6): remote signers fetch
/discovery with a certificate-verifying client, and go-livepeer verifies trickle
certificates when live runners are on. The proxy serves the certificate it is given (the
chart's TLS Secret, cert-manager's or the user's), and a renewed one without a restart.

The CA here is made by the test; the client trusts it and nothing else.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.proxies import models_json, start_proxy, stop_proxy
from tests.support import wait_for

pytestmark = pytest.mark.redis

RELOAD = 0.3  # seconds between the proxy's checks of its certificate files


class Authority:
    """A certificate authority that exists only for this test."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Kubepeer test CA")])
        self.cert = (
            _builder(name, name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, host: str = "127.0.0.1") -> tuple[x509.Certificate, bytes, bytes]:
        """A server certificate for `host`: (cert, cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
        cert = (
            _builder(subject, self.cert.subject, key.public_key())
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert, cert.public_bytes(serialization.Encoding.PEM), key_pem


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=not ca,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def trusting_only(ca: Authority) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.load_default_certs = None  # type: ignore[method-assign]  # nothing else, ever
    return context


def served_serial(port: int) -> int:
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def write_secret(folder: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """As the kubelet updates a Secret volume: each file replaced whole, never half written
    (here one after the other, so the proxy may see a new cert with the old key)."""
    for name, data in (("tls.crt", cert_pem), ("tls.key", key_pem)):
        staged = folder / f".{name}.new"
        staged.write_bytes(data)
        os.replace(staged, folder / name)


@pytest.fixture
def secret(tmp_path) -> tuple[Authority, Path, x509.Certificate]:
    ca = Authority()
    folder = tmp_path / "tls"
    folder.mkdir()
    cert, cert_pem, key_pem = ca.issue()
    write_secret(folder, cert_pem, key_pem)
    return ca, folder, cert


def test_a_client_trusting_only_the_ca_accepts_the_proxy_and_a_renewed_certificate(
    tmp_path, redis_server, secret
):
    ca, folder, first = secret
    proxy = start_proxy(
        tmp_path / "proxy", redis_server, models=models_json(), endpoints={},
        args=["--tls-cert", str(folder / "tls.crt"), "--tls-key", str(folder / "tls.key"),
              "--tls-reload", str(RELOAD)],
    )  # fmt: skip
    url = f"https://127.0.0.1:{proxy.port}/healthz"
    try:
        for http2 in (False, True):  # one port: HTTP/1.1 and HTTP/2 (ALPN) alike
            with httpx.Client(verify=trusting_only(ca), http2=http2) as client:
                answer = client.get(url)
            assert answer.status_code == 200
            assert answer.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url)  # the system's trust store does not know the test CA
        assert served_serial(proxy.port) == first.serial_number

        # A certificate whose key is not there yet (or never comes) is not served...
        stray = ca.issue()
        write_secret(folder, stray[1], ca.issue()[2])
        wait_for(lambda: "renewed TLS certificate not loaded" in proxy.log.read_text(),
                 timeout=10, what="the mismatched pair to be refused")  # fmt: skip
        assert served_serial(proxy.port) == first.serial_number
        # ...and the renewed pair is, to new connections, with no restart.
        renewed, cert_pem, key_pem = ca.issue()
        write_secret(folder, cert_pem, key_pem)
        wait_for(lambda: served_serial(proxy.port) == renewed.serial_number, timeout=10,
                 what="the renewed certificate to be served")  # fmt: skip
        with httpx.Client(verify=trusting_only(ca)) as client:
            assert client.get(url).status_code == 200
        assert proxy.process.poll() is None
    finally:
        stop_proxy(proxy)
