"""Mutual TLS 1.3 with pinned self-signed Ed25519 certificates (an I/O edge; specs/wire.md, "Transport").

There is no certificate authority. The broker trusts exactly the certificates in its directory's member bundles,
and a node trusts exactly the broker certificate named in its config. OpenSSL is given those certificates as
trust anchors (with partial-chain verification, so a self-signed leaf may anchor itself), which makes it refuse
any other certificate during the handshake; after the handshake the peer's certificate is compared byte for
byte with the pinned one, so a name collision or an extra anchor can never stand in for the right key.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from valise.errors import Error

ALPN = "valise/1"


class TLSPeerError(Error):
    """The TLS peer presented no certificate, or one that is not the pinned one."""


def explain_failure(text: str) -> str:
    """`text` (an OpenSSL error as a member sees it), with what it usually means for a node and what to do: the
    bare alert names a certificate authority, which says nothing to someone who has never seen the code."""
    # Certificates made before their dates were relaxed (identity.CERT_BACKDATE) start 5 minutes before they
    # were made, by the clock of the machine that made them, and end ten years later.
    if "not yet valid" in text or "has expired" in text or "CERTIFICATE_EXPIRED" in text:
        return (
            f"{text}: a certificate's dates do not cover this machine's clock, or the broker's (is one of the "
            "clocks wrong? A member's certificate that old, or made on a machine whose clock ran ahead, is "
            "replaced with `valise keygen --rotate`)"
        )
    if any(alert in text for alert in ("ALERT_UNKNOWN_CA", "ALERT_CERTIFICATE_UNKNOWN", "ALERT_BAD_CERTIFICATE")):
        return (
            f"{text}: the broker does not accept this member's certificate (not admitted yet, removed or "
            "suspended, or keys other than the admitted ones; the operator admits with `valise broker member add`; "
            "or, for keys made by an earlier version, the broker's clock is behind the clock that made them)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"{text}: the broker's certificate is not the pinned one (the node's --broker-pub must be the file "
            "`valise broker info` gives as broker_pub)"
        )
    return text


def cert_fingerprint(cert_der: bytes) -> str:
    """SHA-256 of a DER certificate, hex: how certificates are named in logs and messages."""
    return hashlib.sha256(cert_der).hexdigest()


def _pem(cert_der: bytes) -> str:
    return x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM).decode()


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.set_alpn_protocols([ALPN])
    return ctx


def server_context(
    cert_file: Path, key_file: Path, member_certs: Iterable[bytes], password: bytes | None = None
) -> ssl.SSLContext:
    """A broker context that requires a client certificate from `member_certs` (DER)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0  # members never resume sessions: tickets would cost two encryptions per connection for nothing
    ctx.load_cert_chain(str(cert_file), str(key_file), password=password)
    pems = "".join(_pem(c) for c in member_certs)
    if pems:
        ctx.load_verify_locations(cadata=pems)
    return ctx


def client_context(
    cert_file: Path, key_file: Path, broker_cert: bytes, password: bytes | None = None
) -> ssl.SSLContext:
    """A node context that trusts only `broker_cert` (DER) and presents the member's certificate."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the broker is pinned by certificate, not by name
    ctx.load_cert_chain(str(cert_file), str(key_file), password=password)
    ctx.load_verify_locations(cadata=_pem(broker_cert))
    return ctx


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: Literal[True]) -> bytes | None: ...


def peer_certificate(stream: _HasPeerCert) -> bytes:
    """The DER certificate the peer presented in a completed handshake (trio.SSLStream or ssl objects)."""
    der = stream.getpeercert(binary_form=True)
    if not der:
        raise TLSPeerError("the TLS peer presented no certificate")
    return der


def check_alpn(selected: str | None, *, who: str) -> None:
    """wire.md: a connection on which `valise/1` was not selected is closed before any frame is read or sent."""
    if selected != ALPN:
        raise TLSPeerError(
            f"{who} did not negotiate the protocol {ALPN} (it selected {selected or 'none'})",
            hint="the address is not a valise broker, or one that speaks another version",
        )


def check_pinned(presented: bytes, pinned: bytes, *, who: str) -> None:
    if presented != pinned:
        raise TLSPeerError(
            f"{who} presented certificate {cert_fingerprint(presented)[:16]}…, "
            f"expected the pinned {cert_fingerprint(pinned)[:16]}…",
            hint="the peer's key changed or someone is impersonating it",
        )
