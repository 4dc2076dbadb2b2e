"""``lu2k keygen``: site keys and certificates for the QUIC backend (and a network key).

* ``lu2k keygen site NAME --dir DIR [--san ADDR ...] [--ca-cert C --ca-key K]`` writes
  ``NAME.key`` (EC P-256, mode 0600) and ``NAME.crt``: self-signed, or signed by the given
  CA.  The subject alternative names are the addresses/hostnames peers connect to (the
  QUIC client checks them); NAME itself is always included as a DNS name.
* ``lu2k keygen ca NAME --dir DIR`` makes a small CA for a set of sites, so each site's
  ``ca`` option can be one file.
* ``lu2k keygen psk`` prints a random pre-shared network key for the ``key`` setting, as
  ``hex:`` + 64 hex digits (256 random bits; ``--bytes`` below 16, i.e. 128 bits, is refused:
  the hello's safety against offline guessing rests on the key being random and long, see
  docs/security.md).

The functions under the CLI (:func:`make_key`, :func:`make_certificate`) are what tests use.
Refuses to overwrite existing files unless ``--force``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from typing import Any

from ..errors import ConfigError

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - the quic extra brings cryptography
    x509 = None  # type: ignore[assignment]


def _need_cryptography() -> None:
    if x509 is None:
        raise ConfigError("lu2k keygen needs the 'cryptography' package: pip install 'lu2k[quic]'")


def make_key() -> Any:
    _need_cryptography()
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
    _need_cryptography()
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
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_pem(cert: Any) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: str, data: bytes, mode: int, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise ConfigError(f"{path} exists; use --force to overwrite it")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _load_ca(cert_path: str, key_path: str) -> tuple[Any, Any]:
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the CA: {e}", where=f"{cert_path} / {key_path}") from None
    return cert, key


def _cmd_site(args: argparse.Namespace) -> int:
    os.makedirs(args.dir, exist_ok=True)
    issuer_cert = issuer_key = None
    if bool(args.ca_cert) != bool(args.ca_key):
        raise ConfigError("--ca-cert and --ca-key go together")
    if args.ca_cert:
        issuer_cert, issuer_key = _load_ca(args.ca_cert, args.ca_key)
    key = make_key()
    cert = make_certificate(key, args.name, sans=args.san, days=args.days, issuer_cert=issuer_cert, issuer_key=issuer_key)
    key_path = os.path.join(args.dir, f"{args.name}.key")
    cert_path = os.path.join(args.dir, f"{args.name}.crt")
    _write(key_path, key_pem(key), 0o600, args.force)
    _write(cert_path, cert_pem(cert), 0o644, args.force)
    print(f"wrote {key_path} and {cert_path}")
    print("config (nets.<net>.options):")
    print(f"  cert: {cert_path}\n  key: {key_path}")
    if args.ca_cert:
        print(f"  ca: {args.ca_cert}")
    return 0


def _cmd_ca(args: argparse.Namespace) -> int:
    os.makedirs(args.dir, exist_ok=True)
    key = make_key()
    cert = make_certificate(key, args.name, days=args.days, is_ca=True)
    key_path = os.path.join(args.dir, f"{args.name}.key")
    cert_path = os.path.join(args.dir, f"{args.name}.crt")
    _write(key_path, key_pem(key), 0o600, args.force)
    _write(cert_path, cert_pem(cert), 0o644, args.force)
    print(f"wrote {key_path} and {cert_path}")
    return 0


MIN_PSK_BYTES = 16  # 128 bits


def make_psk(nbytes: int = 32) -> str:
    """A network key in the config's ``hex:`` form, from the OS's CSPRNG."""
    if nbytes < MIN_PSK_BYTES:
        raise ConfigError(f"a network key needs at least {MIN_PSK_BYTES} random bytes (128 bits), not {nbytes}", where="--bytes")
    return "hex:" + secrets.token_hex(nbytes)


def _cmd_psk(args: argparse.Namespace) -> int:
    print(make_psk(args.bytes))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("keygen", help="generate a site key/certificate, a CA, or a network key")
    sub = p.add_subparsers(dest="keygen_command", metavar="WHAT", required=True)

    site = sub.add_parser("site", help="a site's private key and certificate (for the quic backend)")
    site.add_argument("name", help="site name; also a DNS subject alternative name")
    site.add_argument("--dir", default=".", help="where to write NAME.key and NAME.crt (default: .)")
    site.add_argument("--san", action="append", default=[], metavar="ADDR",
                      help="an IP address or hostname peers use to reach this site (repeatable)")
    site.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    site.add_argument("--ca-cert", help="sign with this CA certificate (from 'lu2k keygen ca') instead of self-signing")
    site.add_argument("--ca-key", help="the CA's private key")
    site.add_argument("--force", action="store_true", help="overwrite existing files")
    site.set_defaults(func=_cmd_site)

    ca = sub.add_parser("ca", help="a CA that signs the sites of one deployment")
    ca.add_argument("name")
    ca.add_argument("--dir", default=".")
    ca.add_argument("--days", type=int, default=3650)
    ca.add_argument("--force", action="store_true")
    ca.set_defaults(func=_cmd_ca)

    psk = sub.add_parser("psk", help="print a random pre-shared network key (hex)")
    psk.add_argument("--bytes", type=int, default=32)
    psk.set_defaults(func=_cmd_psk)
