"""The udt backend's own wire layer: the key-exchange preamble, AEAD over each UDT message,
and the key that authenticates UDT's control packets.  Pure.

UDT has no encryption, so the backend seals every UDT message (one lu2k frame, header and
payload) with an AEAD under per-connection keys.  Nor does UDT authenticate its packets
(ACK, NAK, shutdown, data headers, ...), which it acts on without lu2k seeing them: the
binding appends a counter and a MAC (:data:`PACKET_TRAILER_SIZE` bytes) to each under
:func:`packet_key` and drops forged and replayed ones (``_udt/packet_auth.h``).  Nothing
here touches a socket.

Preamble (first UDT message each way, plaintext, before any frame)::

    u8[8]  magic      b"LU2KUDT\\x02" (the last byte is this layer's version; 2: UDT
                      packets authenticated)
    u8     cipher     CIPHERS index the connector wants (the acceptor must agree)
    u8[3]  reserved   zero
    u8[32] salt       fresh random bytes from this side

Keys: ``HKDF-SHA256(ikm=network key, salt=salt_connector | salt_acceptor,
info=b"lu2k-udt v1 " + cipher name)`` gives 64 bytes: the connector->acceptor key, then the
acceptor->connector key.  Fresh salts from both ends make every connection's keys new even
if one side's randomness repeats, and a separate key per direction means the two
directions' nonces can never collide.

Nonce: a 96-bit little-endian count of the messages sent so far in that direction.  It is
not sent: UDT delivers messages reliably and in order, so the receiver knows it.  A message
that was dropped, replayed, reordered or altered therefore fails authentication and is a
:class:`~lu2k.errors.FrameError`.  The preamble is authenticated after the fact: a peer
without the network key derives different keys and its first frame fails to open (in
practice it does not get that far: without :func:`packet_key` its UDT handshake packets are
dropped as forged).

Packet key: ``HKDF-SHA256(ikm=network key, salt="", info=b"lu2k-udt packet mac v1")``, 16
bytes for SipHash-2-4.  It is per net, not per connection, so that it covers UDT's handshake
and everything before the preamble; replays are stopped by the counter in each packet.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, FrameError, HandshakeError, LocalProtocolError

PREAMBLE_MAGIC = b"LU2KUDT\x02"
PREAMBLE = struct.Struct("<8sB3x32s")
PREAMBLE_SIZE = PREAMBLE.size  # 44
SALT_SIZE = 32
TAG_SIZE = 16  # both AEADs append a 16-byte tag
MAX_MESSAGES = (1 << 64) - 1  # far beyond any connection's life; checked anyway

CIPHERS: tuple[str, ...] = ("aes-256-gcm", "chacha20-poly1305")
_AEAD: dict[str, type[AESGCM] | type[ChaCha20Poly1305]] = {"aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}


def check_cipher(name: str, where: str = "options.cipher") -> str:
    if name not in CIPHERS:
        raise ConfigError(f"unknown cipher {name!r} (choose from {', '.join(CIPHERS)})", where=where)
    return name


def new_salt() -> bytes:
    return os.urandom(SALT_SIZE)


def encode_preamble(cipher: str, salt: bytes) -> bytes:
    if len(salt) != SALT_SIZE:
        raise LocalProtocolError(f"salt must be {SALT_SIZE} bytes, got {len(salt)}")
    return PREAMBLE.pack(PREAMBLE_MAGIC, CIPHERS.index(check_cipher(cipher)), salt)


def decode_preamble(data: bytes | memoryview) -> tuple[str, bytes]:
    """(cipher, salt) from a peer's preamble; HandshakeError if it is not one."""
    if len(data) != PREAMBLE_SIZE:
        raise HandshakeError(f"UDT preamble of {len(data)} bytes, expected {PREAMBLE_SIZE} (not an lu2k udt peer?)")
    magic, cipher_index, salt = PREAMBLE.unpack(bytes(data))
    if magic[:7] != PREAMBLE_MAGIC[:7]:
        raise HandshakeError("UDT preamble with bad magic (not an lu2k udt peer)")
    if magic != PREAMBLE_MAGIC:
        raise HandshakeError(f"UDT preamble version {magic[7]} not supported (this side speaks {PREAMBLE_MAGIC[7]})")
    if cipher_index >= len(CIPHERS):
        raise HandshakeError(f"UDT preamble names unknown cipher #{cipher_index}")
    return CIPHERS[cipher_index], salt


def derive_keys(network_key: bytes, cipher: str, salt_connector: bytes, salt_acceptor: bytes) -> tuple[bytes, bytes]:
    """(connector->acceptor key, acceptor->connector key) for one connection."""
    if not network_key:
        raise ConfigError("the udt backend derives its AEAD keys from the network key, and none is set", where="key")
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=salt_connector + salt_acceptor, info=b"lu2k-udt v1 " + check_cipher(cipher).encode()
    ).derive(network_key)
    return okm[:32], okm[32:]


PACKET_KEY_SIZE = 16
PACKET_TRAILER_SIZE = 16  # appended to every UDT packet: u64 counter, u64 SipHash tag


def packet_key(network_key: bytes) -> bytes:
    """The key that authenticates a net's UDT control packets (see the module docstring)."""
    if not network_key:
        raise ConfigError("the udt backend derives its packet key from the network key, and none is set", where="key")
    return HKDF(algorithm=hashes.SHA256(), length=PACKET_KEY_SIZE, salt=None, info=b"lu2k-udt packet mac v1").derive(network_key)


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "little")


class Sealer:
    """Seals the messages of one direction, in order."""

    def __init__(self, cipher: str, key: bytes) -> None:
        self._aead = _AEAD[check_cipher(cipher)](key)
        self.count = 0

    def seal(self, header: bytes, payload: bytes | memoryview = b"") -> bytes:
        """One UDT message carrying ``header`` + ``payload``, encrypted and tagged."""
        if self.count >= MAX_MESSAGES:
            raise LocalProtocolError("AEAD message counter exhausted; reconnect")
        plain = header + payload if len(payload) else header
        out = self._aead.encrypt(_nonce(self.count), plain, None)
        self.count += 1
        return out


class Opener:
    """Opens the messages of one direction, in order; any failure is a FrameError."""

    def __init__(self, cipher: str, key: bytes, peer: str = "peer") -> None:
        self._aead = _AEAD[check_cipher(cipher)](key)
        self._peer = peer
        self.count = 0

    def open(self, message: bytes | memoryview) -> bytes:
        if len(message) < TAG_SIZE:
            raise FrameError(f"UDT message #{self.count} from {self._peer} is {len(message)} bytes, shorter than its tag")
        try:
            plain = self._aead.decrypt(_nonce(self.count), bytes(message), None)
        except InvalidTag:
            hint = " (the peer does not hold this network's key?)" if self.count == 0 else " (tampered, replayed or reordered)"
            raise FrameError(f"UDT message #{self.count} from {self._peer} failed authentication{hint}") from None
        self.count += 1
        return plain
