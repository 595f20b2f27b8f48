"""Member identities and public bundles (pure: randomness and time are passed in).

A member holds three keys, each with one job:
- an Ed25519 *identity key*, which signs packet headers, statements and the other two keys;
- an X25519 *encryption key*, published in a statement signed by the identity key (so it can rotate without
  changing who the member is; valise never converts Ed25519 keys to X25519);
- an Ed25519 *TLS key* with a self-signed certificate, for mutual TLS with the broker. It is separate from the
  identity key so that no TLS handshake signature can ever be confused with a valise signature.

The public bundle (`ID.pub`) carries the id, the identity key, the signed encryption-key statement and the
certificate, all under one self-signature by the identity key. Loading a bundle verifies every signature.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.x509.oid import NameOID

from valise import encoding
from valise.crypto import sign
from valise.errors import BundleError, EncodingError, KeyFileError, MemberIdError, SignatureError

Random = Callable[[int], bytes]

MEMBER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
BUNDLE_MAX_SIZE = 8192
BUNDLE_VERSION = 1
# TLS certificates are pinned (the broker's by each node, each member's by the directory), so their validity
# dates protect nothing, and only ever refused good peers: a certificate made on a machine whose clock ran ahead
# was "not yet valid" to the other side, which could only say "bad certificate", and every one ran out after ten
# years. They start a day before they were made (clocks that far apart fail in plainer ways first) and carry
# RFC 5280's "no well-defined expiration date"; a member's removal, suspension or rotation is what ends one.
CERT_BACKDATE = dt.timedelta(days=1)
CERT_NO_EXPIRY = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)  # GeneralizedTime 99991231235959Z

BUNDLE_DOMAIN = sign.domain("bundle")
ENC_KEY_DOMAIN = sign.domain("enc-key")


def check_member_id(member_id: str) -> str:
    """Return `member_id` if it is 1-64 characters of [A-Za-z0-9._-], else raise MemberIdError."""
    if not isinstance(member_id, str) or not MEMBER_ID.fullmatch(member_id):
        shown = member_id if isinstance(member_id, str) and len(member_id) <= 80 else f"{str(member_id)[:80]}…"
        raise MemberIdError(f"member id {shown!r} is not valid", hint="use 1-64 characters of A-Z a-z 0-9 . _ -")
    return member_id


def enc_key_statement(member_id: str, enc_key: bytes, created: int) -> bytes:
    """The canonical bytes an identity key signs to publish an encryption key."""
    return encoding.pack({"id": member_id, "enc_key": enc_key, "created": created})


@dataclass(frozen=True, slots=True)
class PublicBundle:
    """What others know of a member: verified on load, immutable, carried as its exact bytes."""

    member_id: str
    sign_key: bytes
    enc_key: bytes
    enc_created: int
    enc_sig: bytes
    cert_der: bytes
    created: int
    raw: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicBundle:
        """Parse and verify a bundle: canonical form, self-signature, key statement, certificate."""
        try:
            outer = encoding.unpack_map(
                data, what="public bundle", max_size=BUNDLE_MAX_SIZE, fields={"body": bytes, "sig": bytes}
            )
            body = encoding.unpack_map(
                outer["body"],
                what="public bundle body",
                max_size=BUNDLE_MAX_SIZE,
                fields={
                    "v": int,
                    "id": str,
                    "sign_key": bytes,
                    "enc_key": bytes,
                    "enc_created": int,
                    "enc_sig": bytes,
                    "cert": bytes,
                    "created": int,
                },
            )
        except EncodingError as exc:
            raise BundleError(f"malformed public bundle: {exc.what}") from None
        if body["v"] != BUNDLE_VERSION:
            raise BundleError(f"public bundle version {body['v']} is not supported (expected {BUNDLE_VERSION})")
        try:
            member_id = check_member_id(body["id"])
        except MemberIdError as exc:
            raise BundleError(f"public bundle refused: {exc.what}") from None
        try:
            sign.verify(body["sign_key"], BUNDLE_DOMAIN, outer["body"], outer["sig"], what=f"bundle of {member_id}")
            sign.verify(
                body["sign_key"],
                ENC_KEY_DOMAIN,
                enc_key_statement(member_id, body["enc_key"], body["enc_created"]),
                body["enc_sig"],
                what=f"encryption key statement of {member_id}",
            )
        except SignatureError as exc:
            raise BundleError(f"public bundle refused: {exc.what}", hint="the file was altered or forged") from None
        if len(body["enc_key"]) != 32:
            raise BundleError(f"bundle of {member_id}: encryption key is not 32 bytes")
        check_certificate(body["cert"], member_id)
        return cls(
            member_id=member_id,
            sign_key=body["sign_key"],
            enc_key=body["enc_key"],
            enc_created=body["enc_created"],
            enc_sig=body["enc_sig"],
            cert_der=body["cert"],
            created=body["created"],
            raw=data,
        )

    @property
    def tls_public_key(self) -> bytes:
        """The raw Ed25519 key of the member's TLS certificate (what the broker pins for this id)."""
        cert = x509.load_der_x509_certificate(self.cert_der)
        return cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_certificate(cert_der: bytes, member_id: str) -> x509.Certificate:
    """A member certificate must be a self-signed Ed25519 certificate whose common name is the member id."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        key = cert.public_key()
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BundleError(f"certificate of {member_id} does not hold an Ed25519 key")
        key.verify(cert.signature, cert.tbs_certificate_bytes)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except BundleError:
        raise
    except Exception as exc:  # cryptography raises several types for malformed DER or a bad signature
        raise BundleError(f"certificate of {member_id} is not valid: {exc}") from None
    if len(names) != 1 or names[0].value != member_id:
        raise BundleError(f"certificate common name does not match member id {member_id!r}")
    return cert


@dataclass(frozen=True, slots=True)
class Identity:
    """A member's private keys and its public bundle."""

    member_id: str
    signing: sign.SigningKey
    enc_private: x25519.X25519PrivateKey
    tls_private: ed25519.Ed25519PrivateKey
    bundle: PublicBundle
    # Encryption keys this member moved from, newest first (identity.rotate): packets sealed to them still open.
    enc_previous: tuple[x25519.X25519PrivateKey, ...] = ()

    @property
    def tls_cert_pem(self) -> bytes:
        cert = x509.load_der_x509_certificate(self.bundle.cert_der)
        return cert.public_bytes(serialization.Encoding.PEM)

    def secrets(self) -> dict[str, Any]:
        """The private material to store at rest (see keyfiles.py)."""
        secrets: dict[str, Any] = {
            "id": self.member_id,
            "sign_seed": self.signing.seed,
            "enc_private": self.enc_private.private_bytes_raw(),
            "tls_private": self.tls_private.private_bytes_raw(),
            "bundle": self.bundle.raw,
        }
        if self.enc_previous:  # only then: a file without it stays what every earlier version reads
            secrets["enc_previous"] = [k.private_bytes_raw() for k in self.enc_previous]
        return secrets

    @classmethod
    def from_secrets(cls, secrets: dict[str, Any]) -> Identity:
        bundle = PublicBundle.from_bytes(secrets["bundle"])
        # The key constructors raise ValueError for other lengths: a damaged key file then stopped `valise open`,
        # `node run` and `broker serve` with a traceback (a fuzzing review). Say which key is wrong.
        for name in ("sign_seed", "enc_private", "tls_private"):
            if len(secrets[name]) != 32:
                size = len(secrets[name])
                raise KeyFileError(f"the key file of {bundle.member_id} is damaged: its {name} is {size} bytes, not 32")
        signing = sign.SigningKey(secrets["sign_seed"])
        enc_private = x25519.X25519PrivateKey.from_private_bytes(secrets["enc_private"])
        tls_private = ed25519.Ed25519PrivateKey.from_private_bytes(secrets["tls_private"])
        if signing.public != bundle.sign_key or enc_private.public_key().public_bytes_raw() != bundle.enc_key:
            raise BundleError(f"private keys of {bundle.member_id} do not match its public bundle")
        previous = secrets.get("enc_previous", [])
        if not all(isinstance(k, bytes) and len(k) == 32 for k in previous):
            raise BundleError(f"previous encryption keys of {bundle.member_id} are not 32-byte keys")
        kept = tuple(x25519.X25519PrivateKey.from_private_bytes(k) for k in previous)
        return cls(bundle.member_id, signing, enc_private, tls_private, bundle, kept)


def self_signed_certificate(member_id: str, key: ed25519.Ed25519PrivateKey, now: int, serial: int) -> bytes:
    """A self-signed Ed25519 certificate for mutual TLS, common name = member id (DER)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, member_id)])
    not_before = dt.datetime.fromtimestamp(now, dt.UTC) - CERT_BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(CERT_NO_EXPIRY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(_dns_safe(member_id))]), critical=False)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _dns_safe(member_id: str) -> str:
    # Member ids may contain '_' and '.', which are fine in a SAN dNSName for pinning purposes; lower-case it
    # because DNS names compare case-insensitively. Peers are pinned by key, never by name.
    return member_id.lower().strip(".") or "member"


def generate(member_id: str, random: Random, now: int) -> Identity:
    """Create a new member identity from `random` (32-byte draws) at time `now` (Unix seconds)."""
    check_member_id(member_id)
    signing = sign.SigningKey(random(32))
    enc_private = x25519.X25519PrivateKey.from_private_bytes(random(32))
    tls_private = ed25519.Ed25519PrivateKey.from_private_bytes(random(32))
    enc_key = enc_private.public_key().public_bytes_raw()
    serial = int.from_bytes(random(16), "big") >> 1 or 1  # positive, at most 127 bits (RFC 5280)
    bundle = _bundle(member_id, signing, enc_key, now, tls_private, serial, now)
    return Identity(member_id, signing, enc_private, tls_private, bundle)


def rotate(old: Identity, random: Random, now: int, *, new_encryption_key: bool = True) -> Identity:
    """The member's identity under new identity and TLS keys (a compromise, or routine rotation), for the operator's
    `member-rekey` record (policy.md); and, unless `new_encryption_key` is false, a new encryption key too, the
    replaced ones kept (`enc_previous`) to open what was sealed to them before senders' logs showed the new one.
    A kept encryption key is re-signed by the new identity key."""
    signing = sign.SigningKey(random(32))
    tls_private = ed25519.Ed25519PrivateKey.from_private_bytes(random(32))
    serial = int.from_bytes(random(16), "big") >> 1 or 1
    enc_private, enc_created, previous = old.enc_private, old.bundle.enc_created, old.enc_previous
    if new_encryption_key:
        enc_private = x25519.X25519PrivateKey.from_private_bytes(random(32))
        enc_created, previous = max(now, old.bundle.enc_created + 1), (old.enc_private, *old.enc_previous)
    enc_key = enc_private.public_key().public_bytes_raw()
    bundle = _bundle(old.member_id, signing, enc_key, enc_created, tls_private, serial, now)
    return Identity(old.member_id, signing, enc_private, tls_private, bundle, previous)


def _bundle(
    member_id: str,
    signing: sign.SigningKey,
    enc_key: bytes,
    enc_created: int,
    tls_private: ed25519.Ed25519PrivateKey,
    serial: int,
    now: int,
) -> PublicBundle:
    body = encoding.pack(
        {
            "v": BUNDLE_VERSION,
            "id": member_id,
            "sign_key": signing.public,
            "enc_key": enc_key,
            "enc_created": enc_created,
            "enc_sig": signing.sign(ENC_KEY_DOMAIN, enc_key_statement(member_id, enc_key, enc_created)),
            "cert": self_signed_certificate(member_id, tls_private, now, serial),
            "created": now,
        }
    )
    return PublicBundle.from_bytes(encoding.pack({"body": body, "sig": signing.sign(BUNDLE_DOMAIN, body)}))
