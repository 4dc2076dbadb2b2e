"""lnetctl's show output, built from what lu2kd reports.  Pure: dicts in, dicts and text out.

``lu2kctl net show``, ``peer show``, ``route show``, ``stats show``, ``ping`` and ``discover``
print YAML with the keys ``lnetctl`` prints (Lustre's ``liblnetconfig.c``:
``lustre_lnet_show_net``, ``lustre_lnet_show_peer``, ``lustre_lnet_show_route``,
``lustre_lnet_show_stats``, ``infra_ping_nid``), so ``yaml.safe_load`` of lu2kctl's output
gives the structure a script written for lnetctl expects.  Detail levels follow lnetctl's
``-v [LEVEL]``: 0 prints the identity and state, 1 adds statistics and tunables, 2 adds
health figures, 3 adds the peer state.  What lu2k knows beyond lnetctl's keys goes under a
``lu2k`` key of the same item (from ``-v``), which lnetctl's readers ignore.

Counters lu2k does not keep are left out rather than printed as zero; docs/user/cli.md lists
them.  The loopback net (``lo``, ``0@lo``) is listed first, as lnetctl does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

# lu2k peer connection states -> lnetctl's peer NI state
_PEER_NI_STATE = {"up": "up", "connecting": "down", "idle": "NA"}


def net_show(nets: Iterable[Mapping[str, Any]], peers: Iterable[Mapping[str, Any]], detail: int = 0,
             net: str | None = None) -> dict[str, Any]:
    """``lnetctl net show [--net NET] [-v LEVEL]`` from ``describe_nets`` and ``describe_peers``."""
    per_net: dict[str, dict[str, int]] = {}
    for p in peers:
        s = per_net.setdefault(str(p.get("net", "")), {"send_count": 0, "drop_count": 0})
        s["send_count"] += int(p.get("delivered", 0)) + int(p.get("failed", 0))
        s["drop_count"] += int(p.get("failed", 0))
    out: list[dict[str, Any]] = []
    if net in (None, "lo"):
        lo: dict[str, Any] = {"nid": "0@lo", "status": "up"}
        if detail:
            lo["tunables"] = {"peer_timeout": 0, "peer_credits": 0, "peer_buffer_credits": 0, "credits": 0}
        out.append({"net type": "lo", "local NI(s)": [lo]})
    for n in nets:
        if net is not None and n["net"] != net:
            continue
        ni: dict[str, Any] = {"nid": n["nid"], "status": n.get("status", "up")}
        if n.get("interfaces"):
            ni["interfaces"] = {i: name for i, name in enumerate(n["interfaces"])}
        if detail >= 1:
            stats = dict(n.get("statistics") or per_net.get(n["net"], {"send_count": 0, "drop_count": 0}))
            ni["statistics"] = {k: stats[k] for k in ("send_count", "recv_count", "drop_count") if k in stats}
            tun = n.get("tunables", {})
            ni["tunables"] = {"peer_timeout": tun.get("peer_timeout"), "peer_credits": tun.get("peer_credits"),
                              "peer_buffer_credits": tun.get("peer_buffer_credits", 0), "credits": tun.get("credits")}
            ni["lu2k"] = _drop_none({
                "backend": n.get("backend"), "listen": n.get("listen"), "max_message_size": n.get("max_message_size"),
                "tx_credits": (n.get("credits") or {}).get("tx"), "min_tx_credits": (n.get("credits") or {}).get("min_tx"),
                "profile": n.get("profile") or None, "derived from profile": n.get("derived") or None,
                "backend settings": n.get("backend_settings") or None,
            })
        if detail >= 2 and n.get("health") is not None:
            ni["health stats"] = {"health value": n["health"]}
        out.append({"net type": n["net"], "local NI(s)": [_drop_none(ni)]})
    return {"net": out}


def peer_show(peers: Iterable[Mapping[str, Any]], detail: int = 0) -> dict[str, Any]:
    """``lnetctl peer show [--nid NID] [-v LEVEL]`` from ``describe_peers``: the rails of a
    multi-rail peer are the ``peer ni`` entries of one item, as lnetctl shows them."""
    out = []
    items: dict[str, dict[str, Any]] = {}
    for p in peers:
        ni: dict[str, Any] = {"nid": p["nid"], "state": _PEER_NI_STATE.get(str(p.get("state")), "NA")}
        if detail >= 1:
            ni.update({
                "max_ni_tx_credits": p.get("max_tx_credits"),
                "available_tx_credits": p.get("tx_credits"),
                "min_tx_credits": p.get("min_tx_credits"),
                "tx_q_num_of_buf": p.get("queued"),
                "statistics": {"send_count": int(p.get("delivered", 0)) + int(p.get("failed", 0)), "drop_count": int(p.get("failed", 0))},
            })
            if detail >= 2:
                ni["health stats"] = {"health value": p.get("health")}
            ni["lu2k"] = _drop_none({
                "state": p.get("state"), "in_flight": p.get("in_flight"), "delivered": p.get("delivered"), "failed": p.get("failed"),
                "rerouted_away": p.get("rerouted_away") or None, "last_error": p.get("last_error") or None, "connections": p.get("connections") or None,
                "rail": p.get("rail"),
            })
        rail = p.get("rail") or {}
        prim = str(rail.get("primary") or p["nid"])
        item = items.get(prim)
        if item is None:
            item = items[prim] = {"primary nid": prim, "Multi-Rail": bool(rail)}
            if detail >= 3:
                item["peer state"] = 0
            item["peer ni"] = []
            out.append(item)
        if detail >= 3 and p.get("state") == "up":
            item["peer state"] = 1
        item["peer ni"].append(_drop_none(ni))
    return {"peer": out}


def route_show(routes: Iterable[Mapping[str, Any]], detail: int = 0) -> dict[str, Any]:
    """``lnetctl route show [-v]`` from ``describe_routes``."""
    out = []
    for r in routes:
        item: dict[str, Any] = {"net": r["net"], "gateway": r["gateway"]}
        if detail:
            health = r.get("health")
            item.update({"hop": r.get("hop", -1), "priority": r.get("priority", 0),
                         "state": "up" if health is None or health > 0 else "down",
                         "type": "multi-hop" if (r.get("hop") or -1) > 1 else "single-hop"})
            if health is not None:
                item["lu2k"] = {"health": health}
        out.append(item)
    return {"route": out}


def stats_show(stats: Mapping[str, Any], peers: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """``lnetctl stats show`` from ``describe_stats`` (and peers, for messages held and failed)."""
    peers = list(peers)
    mapped = {
        "msgs_alloc": sum(int(p.get("queued", 0)) + int(p.get("in_flight", 0)) for p in peers),
        "errors": sum(int(p.get("failed", 0)) for p in peers) + int(stats.get("bad_frames", 0)),
        "send_count": stats.get("msgs_sent", 0),
        "recv_count": stats.get("msgs_received", 0),
        "route_count": stats.get("msgs_forwarded", 0),
        "drop_count": stats.get("duplicates", 0),
        "send_length": stats.get("bytes_sent", 0),
        "recv_length": stats.get("bytes_received", 0),
    }
    return {"statistics": {**mapped, "lu2k": dict(sorted(stats.items()))}}


def ping_result(res: Mapping[str, Any], detail: int = 0) -> dict[str, Any]:
    """One item of lnetctl's ``ping:`` sequence, from the daemon's ping answer.

    An LNet node's answer (a kernel node on a socklnd LAN) says which NID is its primary, whether
    it is Multi-Rail (its ping features) and each NI's status.  lnetctl lists peer NIs without a
    status, so the statuses go under ``lu2k: ni status`` (in ``net show``'s words), the only key
    lu2kctl adds.  An lu2k peer is Multi-Rail when it lists more than one NID.
    """
    nis = res.get("peer_nis") or [res["nid"]]
    status: Mapping[str, str] = res.get("peer_ni_status") or {}
    multi_rail = bool(res["multi_rail"]) if "multi_rail" in res else len(nis) > 1
    item: dict[str, Any] = {"primary nid": res.get("primary_nid") or res["nid"], "Multi-Rail": multi_rail,
                            "peer ni": [{"nid": n} for n in nis]}
    item["lu2k"] = _drop_none({"rtt_ms": res.get("rtt_ms"), "via": res.get("via") if res.get("via") != res["nid"] else None,
                               "local": res.get("local") or None, "incarnation": res.get("incarnation") if detail else None,
                               "features": res.get("features"), "ni status": dict(status) or None,
                               "seqno": res.get("seqno") if detail else None})
    return item


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


# --- YAML in lnetctl's layout (cYAML_print_tree) -------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z0-9_./@:\-\[\]()+ ,]*$")


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[repr(v)]
        text = repr(v)
        if "e" in text and "." not in text:  # YAML 1.1 reads a float only with a dot: 5e-324 -> 5.0e-324
            mantissa, _, exponent = text.partition("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    s = str(v)
    # Plain only when YAML reads it back as this same string; otherwise double-quoted (JSON is valid YAML).
    if s and s == s.strip() and _PLAIN.match(s) and not s.startswith(("- ", "[")) and ": " not in s:
        try:
            if yaml.safe_load(s) == s:
                return s
        except yaml.YAMLError:
            pass
    return _quote(s)


def _quote(s: str) -> str:
    """A YAML double-quoted scalar: printable characters as they are, everything else escaped."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif o == 0x09 or 0x20 <= o <= 0x7E or (0xA0 <= o <= 0xD7FF and o not in (0x2028, 0x2029)) or (0xE000 <= o <= 0xFFFD and o != 0xFEFF) or o >= 0x10000:
            out.append(ch)
        elif o <= 0xFF:
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}")
    return '"' + "".join(out) + '"'


def _key(k: Any) -> str:
    return _scalar(k)


def _emit(value: Any, indent: int, lines: list[str], seq_indent: int) -> None:
    pad = " " * indent
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(v, Mapping) and v:
                lines.append(f"{pad}{_key(k)}:")
                _emit(v, indent + 4, lines, 2)
            elif isinstance(v, list) and v:
                lines.append(f"{pad}{_key(k)}:")
                _emit(v, indent + seq_indent, lines, 2)
            elif isinstance(v, (Mapping, list)):
                lines.append(f"{pad}{_key(k)}: {'{}' if isinstance(v, Mapping) else '[]'}")
            else:
                lines.append(f"{pad}{_key(k)}: {_scalar(v)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping) and item:
                sub: list[str] = []
                _emit(item, indent + 2, sub, 2)
                sub[0] = f"{pad}- " + sub[0][indent + 2:]
                lines.extend(sub)
            elif isinstance(item, list) and item:
                sub = []
                _emit(item, indent + 2, sub, 2)
                sub[0] = f"{pad}- " + sub[0][indent + 2:]
                lines.extend(sub)
            else:
                lines.append(f"{pad}- {_scalar(item) if not isinstance(item, (Mapping, list)) else ('{}' if isinstance(item, Mapping) else '[]')}")
    else:
        lines.append(f"{pad}{_scalar(value)}")


def dump(doc: Mapping[str, Any]) -> str:
    """YAML laid out as lnetctl prints it (4-space mappings, sequences under a top-level key at 4)."""
    lines: list[str] = []
    _emit(doc, 0, lines, 4)
    return "\n".join(lines) + "\n"
