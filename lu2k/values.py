"""The one set of validators for numbers, flags, modes, rates and keys read from operator input.

Pure.  Every number lu2k reads from a config file, a control request or a command line goes
through these, so the rules are the same everywhere:

* booleans are never numbers (YAML's ``yes`` is not ``1``);
* NaN and infinity are refused wherever a number is read (``nan`` compares false with every
  bound, so a range check alone lets it through);
* integers may be written as YAML integers, integral floats (``1e6``) or strings in C's
  notations (``"0x10"``, ``"0o17"``, ``"017"`` is refused as ambiguous);
* a file mode (``socket_mode``) is a YAML integer (``0660`` in YAML 1.1 is already octal) or
  an octal string (``"0660"``, ``"0o660"``, ``"660"``), as ``chmod`` reads it;
* rates are numbers in a caller-given unit or strings with a unit (``20mbit``, ``500kbit``,
  ``1gbit``, ``/s`` optional) -- the only rate-unit parser in lu2k;
* a pre-shared key is text or ``hex:...`` and must hold at least 128 bits (16 bytes).

Each validator comes in one form, raising :class:`~lu2k.errors.ConfigError` whose ``where``
is the caller's YAML path (or option name); :class:`Problems` collects those errors so a
whole document is checked in one pass and rejected with every problem listed.
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Callable
from typing import TypeVar

from .errors import ConfigError
from .inet import split_hostport

T = TypeVar("T")

MIN_KEY_BYTES = 16  # 128 bits
HIDDEN_KEY = "<hidden: export --secrets to include>"  # what ``export`` prints instead of a key


class Problems:
    """Errors collected during one pass over a document, each ``"<where>: <what>"``."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.items.append(f"{where}: {msg}")

    def check(self, fn: Callable[[], T]) -> T | None:
        """Run one validator; record its ConfigError (which names where) and return None."""
        try:
            return fn()
        except ConfigError as e:
            self.items.append(str(e))
            self.items.extend(e.errors)
            return None

    def raise_if_any(self, message: str, where: str) -> None:
        if self.items:
            raise ConfigError(f"{len(self.items)} error(s) {message}", where=where, errors=self.items)


def _span(lo: float | None, hi: float | None) -> str:
    return f"{'-inf' if lo is None else _g(lo)}..{'inf' if hi is None else _g(hi)}"


def _g(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def as_int(value: object, where: str, lo: int | None = None, hi: int | None = None, *, what: str = "an integer") -> int:
    """A whole number in ``lo..hi``."""
    v: int
    if isinstance(value, bool):
        raise ConfigError(f"expected {what}, got {value!r}", where=where)
    if isinstance(value, int):
        v = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ConfigError(f"expected {what}, got {value!r}", where=where)
        v = int(value)
    elif isinstance(value, str):
        try:
            v = int(value.strip(), 0)
        except ValueError:
            raise ConfigError(f"expected {what}, got {value!r}", where=where) from None
    else:
        raise ConfigError(f"expected {what}, got {value!r}", where=where)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"{v} out of range {_span(lo, hi)}", where=where)
    return v


def as_float(value: object, where: str, lo: float | None = None, hi: float | None = None, *, what: str = "a number") -> float:
    """A finite number in ``lo..hi``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"expected {what}, got {value!r}", where=where)
    try:
        v = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"expected {what}, got {value!r}", where=where) from None
    if not math.isfinite(v):
        raise ConfigError(f"expected a finite number, got {value!r}", where=where)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"{_g(v)} out of range {_span(lo, hi)}", where=where)
    return v


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def as_bool(value: object, where: str) -> bool:
    """``true``/``false`` (YAML), ``0``/``1``, or the strings yes/no/on/off/true/false/1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"expected a boolean (true/false, yes/no, 0/1), got {value!r}", where=where)


def as_mode(value: object, where: str, hi: int = 0o777) -> int:
    """A permission mode: a YAML integer, or an octal string (``"0660"``, ``"0o660"``, ``"660"``)."""
    if isinstance(value, str):
        text = value.strip().lower()
        text = text[2:] if text.startswith("0o") else text
        if not text or any(c not in "01234567" for c in text):
            raise ConfigError(f"expected an octal mode like 0660, got {value!r}", where=where)
        v = int(text, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        v = value
    else:
        raise ConfigError(f"expected an octal mode like 0660, got {value!r}", where=where)
    if not 0 <= v <= hi:
        raise ConfigError(f"mode {v:#o} out of range 0..{hi:#o}", where=where)
    return v


def as_str(value: object, where: str, *, what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"expected {what}, got {value!r}", where=where)
    return value


def as_port(value: object, where: str, *, allow_zero: bool = True) -> int:
    """A TCP/UDP port; 0 (allowed by default) asks the OS for one."""
    return as_int(value, where, 0 if allow_zero else 1, 65535, what="a port number")


def as_address(value: object, where: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` (zone only on a link-local address), port 1..65535;
    see :func:`lu2k.inet.split_hostport`."""
    return split_hostport(value, where)


# --- rates -------------------------------------------------------------------------------------

_RATE_UNITS = {
    "bit": 1.0, "bps": 1.0,
    "kbit": 1e3, "kbps": 1e3, "k": 1e3,
    "mbit": 1e6, "mbps": 1e6, "m": 1e6,
    "gbit": 1e9, "gbps": 1e9, "g": 1e9,
}
_RATE = re.compile(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)")
_UNLIMITED = ("unlimited", "none", "inf")


def parse_rate(value: object, where: str, *, number_unit: float = 1.0, allow_unlimited: bool = False,
               unit_required: bool = False) -> float:
    """A rate in bits per second.

    A number is in ``number_unit`` bits/s (1e6 where a bare number means Mbit/s); a string
    carries its unit (``20mbit``, ``500kbit``, ``1gbit``, ``20mbit/s``; a bare number in a
    string is in ``number_unit`` too).  ``allow_unlimited`` lets ``0``/``unlimited``/``none``
    mean "no cap" (returned as 0.0); otherwise the rate must be positive.  ``unit_required``
    refuses a string without a unit (on a command line ``20`` is ambiguous; ``0`` stays).
    """
    if isinstance(value, str):
        text = value.strip().lower().replace("/s", "")
        if allow_unlimited and text in _UNLIMITED:
            return 0.0
        m = _RATE.fullmatch(text)
        if m is None or m.group(2) not in _RATE_UNITS and m.group(2) != "" or (unit_required and not m.group(2) and float(m.group(1)) != 0):
            raise ConfigError(f"bad rate {value!r}: expected a number with a unit (e.g. 20mbit, 500kbit, 1gbit)", where=where)
        bps = float(m.group(1)) * (_RATE_UNITS[m.group(2)] if m.group(2) else number_unit)
    else:
        bps = as_float(value, where, 0.0, what="a rate") * number_unit
    if not math.isfinite(bps):
        raise ConfigError(f"rate {value!r} is not finite", where=where)
    if bps < 0 or (bps == 0 and not allow_unlimited):
        raise ConfigError(f"rate must be positive, got {value!r}", where=where)
    return bps


def format_rate(bps: float) -> str:
    """The inverse of :func:`parse_rate` for display (``20mbit``; 0 is ``unlimited``)."""
    if bps <= 0:
        return "unlimited"
    if bps >= 1e9:
        return f"{bps / 1e9:g}gbit"
    if bps >= 1e6:
        return f"{bps / 1e6:g}mbit"
    return f"{bps / 1e3:g}kbit"


# --- keys ----------------------------------------------------------------------------------------


def parse_key(value: object, where: str) -> bytes:
    """A network's pre-shared key: text (its UTF-8 bytes) or ``hex:<hex digits>``; at least
    :data:`MIN_KEY_BYTES` bytes, and not the placeholder ``export`` prints in its place."""
    if isinstance(value, bytes):
        key = value
    elif isinstance(value, str):
        if value.strip() == HIDDEN_KEY or value.startswith("<hidden"):
            raise ConfigError("this is the placeholder 'export' prints, not a key (export --secrets includes the key)", where=where)
        if value.startswith("hex:"):
            try:
                key = binascii.unhexlify(value[4:].strip())
            except (binascii.Error, ValueError):
                raise ConfigError("hex: key is not valid hex", where=where) from None
        else:
            if not value.strip():
                raise ConfigError("the key is blank", where=where)
            key = value.encode()
    else:
        raise ConfigError(f"expected a key string (text or hex:...), got {type(value).__name__}", where=where)
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"key has {len(key)} byte(s); at least {MIN_KEY_BYTES} (128 bits) are needed (make one with: lu2k keygen)",
            where=where,
        )
    return key


__all__ = [
    "HIDDEN_KEY", "MIN_KEY_BYTES", "Problems", "as_address", "as_bool", "as_float", "as_int", "as_mode", "as_port",
    "as_str", "format_rate", "parse_key", "parse_rate",
]
