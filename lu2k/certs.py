"""Site keys and X.509 certificates for the QUIC backend (what ``lu2k keygen`` writes).

Library functions, so the CLI, the lab and tests share them: :func:`make_key` (EC P-256),
:func:`make_certificate` (self-signed, or signed by a CA; subject alternative names are the
addresses/hostnames peers connect to), :func:`key_pem`, :func:`cert_pem`.  Needs the
``cryptography`` package (the quic extra); without it they raise ConfigError saying so.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from .errors import ConfigError

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - the quic extra brings cryptography
    x509 = None  # type: ignore[assignment]


def load_pem_private_key(data: bytes) -> Any:
    need_cryptography()
    return serialization.load_pem_private_key(data, password=None)


def need_cryptography() -> None:
    if x509 is None:
        raise ConfigError("lu2k keygen needs the 'cryptography' package: pip install 'lu2k[quic]'")


def make_key() -> Any:
    need_cryptography()
    return ec.generate_private_key(ec.SECP256R1())


def _san_entries(names: list[str]) -> list[Any]:
    out: list[Any] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() for c in name):
                raise ConfigError(f"bad subject alternative name {name!r}", where="--san") from None
            out.append(x509.DNSName(name))
    return out


def make_certificate(
    key: Any, name: str, *, sans: list[str] | None = None, days: int = 3650, is_ca: bool = False,
    issuer_cert: Any = None, issuer_key: Any = None, not_before: datetime.datetime | None = None,
) -> Any:
    """An X.509 certificate for ``key``: self-signed, or by ``issuer_cert``/``issuer_key``."""
    need_cryptography()
    if days <= 0:
        raise ConfigError(f"validity must be positive, got {days} days", where="--days")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lu2k")])
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
    else:
        names = list(dict.fromkeys([name] + list(sans or [])))
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def key_pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem


def cert_pem(cert: Any) -> bytes:
    pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return pem


__all__ = ["cert_pem", "key_pem", "load_pem_private_key", "make_certificate", "make_key", "need_cryptography"]
