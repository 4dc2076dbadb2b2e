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

The key and certificate functions are the library's (:mod:`lu2k.certs`).
Refuses to overwrite existing files unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import secrets
from typing import Any

from ..certs import cert_pem, key_pem, load_pem_private_key, make_certificate, make_key, x509
from ..errors import ConfigError

__all__ = ["cert_pem", "key_pem", "make_certificate", "make_key", "register"]


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
            key = load_pem_private_key(f.read())
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
