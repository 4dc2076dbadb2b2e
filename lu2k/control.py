"""The daemon's management socket (``lu2kctl`` talks to it).

One JSON object per line each way over a Unix stream socket: ``{"cmd": "peer show",
"args": {...}}`` -> ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
Handlers are registered by command name, so features add commands without touching the
transport.  A bad request gets an error reply; it never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from .errors import Lu2kError, NetworkError, NetworkTimeout, RemoteProtocolError

log = structlog.get_logger("lu2k.control")
MAX_REQUEST = 1 << 20

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        self._server: asyncio.base_events.Server | None = None

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    async def start(self) -> None:
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if p.exists():
            # A socket left by a dead daemon is removed; a live one means we are a duplicate.
            try:
                r, w = await asyncio.open_unix_connection(self.path)
                w.close()
                raise NetworkError(f"another lu2kd is already listening on {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                p.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=self.path, limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = await self._dispatch(line)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError
        except ValueError:
            return {"ok": False, "error": "request must be a JSON object with a 'cmd' string"}
        handler = self.handlers.get(req["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {req['cmd']!r} (known: {', '.join(sorted(self.handlers))})"}
        args = req.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": "'args' must be an object"}
        try:
            return {"ok": True, "result": await handler(args)}
        except Lu2kError as e:
            return {"ok": False, "error": str(e)}
        except (KeyError, TypeError, ValueError) as e:
            return {"ok": False, "error": f"bad arguments for {req['cmd']!r}: {e}"}


async def request(path: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Client side: one request; raises Lu2kError with the daemon's message on failure.

    Every failure is a :class:`~lu2k.errors.Lu2kError`: socket errors, a daemon that does not
    answer within ``timeout`` seconds, and a reply that is not the protocol's JSON object.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=64 << 20), timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NetworkError(f"lu2kd is not running (no control socket at {path}); start it with lu2kd or pass --socket") from None
    except PermissionError:
        raise NetworkError(f"no permission to open the control socket {path}") from None
    except TimeoutError:
        raise NetworkTimeout(f"lu2kd did not accept a control connection on {path} within {timeout:g} s") from None
    except OSError as e:
        raise NetworkError(f"cannot open the control socket {path}: {e.strerror or e}") from None
    try:
        writer.write(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        raise NetworkTimeout(f"lu2kd did not answer {cmd!r} within {timeout:g} s") from None
    except (OSError, ValueError) as e:  # ValueError: a reply line beyond the stream limit
        raise NetworkError(f"control connection to lu2kd failed: {e}") from None
    finally:
        writer.close()
    if not line:
        raise NetworkError("lu2kd closed the control connection without replying")
    try:
        reply = json.loads(line)
    except ValueError:
        raise RemoteProtocolError("lu2kd's reply is not JSON") from None
    if not isinstance(reply, dict):
        raise RemoteProtocolError("lu2kd's reply is not a JSON object")
    if not reply.get("ok"):
        raise Lu2kError(str(reply.get("error", "unknown error")))
    return reply.get("result")
