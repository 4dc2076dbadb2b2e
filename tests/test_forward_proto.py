"""The forward flow protocol's pure core: codecs, two flows driven against each other in memory
(reordering, windows, half-close, reset), the allow-list and the SOCKS5 parsing."""

from __future__ import annotations

import random

import pytest

from lu2k.apps import forward_proto as fp
from lu2k.errors import ConfigError, LocalProtocolError, RemoteProtocolError


def test_codec_round_trip() -> None:
    for m in (fp.Message(fp.Kind.OPEN, 5, 1 << 20, "host.example:22"), fp.Message(fp.Kind.OPENED, 5, 4096),
              fp.Message(fp.Kind.REFUSED, 5, 0, "connection refused"), fp.Message(fp.Kind.REFUSED, 5, fp.Refusal.NOT_ALLOWED, "no"),
              fp.Message(fp.Kind.WINDOW, 5, 77),
              fp.Message(fp.Kind.FIN, 5, 1000), fp.Message(fp.Kind.RST, 5, 0, "reset")):
        assert fp.decode(fp.encode(m)) == m
    d = fp.decode(fp.encode(fp.Message(fp.Kind.DATA, 5, 10, payload=b"xyz")))
    assert d.kind is fp.Kind.DATA and d.value == 10 and bytes(d.payload) == b"xyz"


@pytest.mark.parametrize("raw, what", [
    (b"x", "shorter"), (fp.HDR.pack(1, 1, 1, 0, 1), "magic"), (fp.HDR.pack(fp.MAGIC, 1, 2, 0, 1), "version"),
    (fp.HDR.pack(fp.MAGIC, 99, 1, 0, 1), "unknown"), (fp.HDR.pack(fp.MAGIC, fp.Kind.WINDOW, 1, 0, 1) + b"\0", "truncated"),
    (fp.HDR.pack(fp.MAGIC, fp.Kind.OPEN, 1, 0, 1) + fp.OPEN.pack(1, 30) + b"ab", "target truncated"),
])
def test_bad_messages(raw: bytes, what: str) -> None:
    with pytest.raises(RemoteProtocolError, match=what):
        fp.decode(raw)


def opened_pair(window: int = 1000) -> tuple[fp.Flow, fp.Flow]:
    a = fp.Flow(1, window, opener=True)
    b = fp.Flow(1, window, opener=False)
    m = fp.decode(a.open_message("t:1"))
    assert a.on_message(fp.decode(b.accept(m.value))) == []
    assert a.state is fp.FlowState.OPEN and b.state is fp.FlowState.OPEN
    return a, b


def test_bytes_arrive_in_order_despite_reordering_and_the_window_holds() -> None:
    a, b = opened_pair(window=1000)
    rnd = random.Random(3)
    data = rnd.randbytes(5000)
    got = bytearray()
    pos = 0
    while pos < len(data) or len(got) < len(data):
        batch = []
        while pos < len(data) and a.sendable():
            n = min(a.sendable(), rnd.randint(1, 300), len(data) - pos)
            batch.append(a.data(data[pos : pos + n]))
            pos += n
        assert a.sendable() == 0 or pos == len(data)
        rnd.shuffle(batch)  # lu2k does not keep order between messages
        for msg in batch:
            for piece in b.on_message(fp.decode(msg)):
                got += piece
                w = b.consumed(len(piece))
                if w is not None:
                    a.on_message(fp.decode(w))
        if not batch and pos < len(data):
            # the receiver's next WINDOW is due only after a quarter window: force one out
            w = fp.encode(fp.Message(fp.Kind.WINDOW, 1, b.consumed_in))
            a.on_message(fp.decode(w))
    assert bytes(got) == data
    assert b.held_bytes == 0


def test_sending_beyond_the_window_is_refused_both_ways() -> None:
    a, b = opened_pair(window=100)
    with pytest.raises(LocalProtocolError, match="window"):
        a.data(b"x" * 101)
    rogue = fp.encode(fp.Message(fp.Kind.DATA, 1, 50, payload=b"x" * 60))
    with pytest.raises(RemoteProtocolError, match="exceeds the window"):
        b.on_message(fp.decode(rogue))


def test_half_close_each_way_then_closed() -> None:
    a, b = opened_pair()
    b.on_message(fp.decode(a.data(b"request")))
    fin = fp.decode(a.fin())  # the client shut down its write half
    assert a.state is fp.FlowState.LOCAL_CLOSED
    b.on_message(fin)
    assert b.eof_in and b.state is fp.FlowState.REMOTE_CLOSED and b.can_send
    a.on_message(fp.decode(b.data(b"response")))
    a.on_message(fp.decode(b.fin()))
    assert a.closed and b.closed and a.eof_in


def test_fin_before_the_last_data_waits_for_it() -> None:
    a, b = opened_pair()
    d1, d2 = a.data(b"abc"), a.data(b"def")
    fin = a.fin()
    assert b.on_message(fp.decode(fin)) == [] and not b.eof_in
    assert b.on_message(fp.decode(d2)) == []
    assert b.on_message(fp.decode(d1)) == [b"abc", b"def"] and b.eof_in


def test_reset_either_way() -> None:
    a, b = opened_pair()
    b.on_message(fp.decode(a.rst("connection reset by client")))
    assert a.closed and b.closed and b.reason == "connection reset by client"
    assert b.on_message(fp.decode(fp.encode(fp.Message(fp.Kind.DATA, 1, 0, payload=b"late")))) == []


def test_refusal_reaches_the_opener() -> None:
    a = fp.Flow(1, 100, opener=True)
    b = fp.Flow(1, 100, opener=False)
    a.on_message(fp.decode(b.refuse("10.0.0.5:22: Connection refused", fp.Refusal.CONNECTION_REFUSED)))
    assert a.closed and a.reason == "10.0.0.5:22: Connection refused" and a.refusal is fp.Refusal.CONNECTION_REFUSED
    assert fp.SOCKS_REPLY[fp.SOCKS_REPLY_FOR[a.refusal]] == 5


def test_refusal_cause_from_a_peer_that_does_not_say_or_says_something_unknown() -> None:
    for detail in (0, 999):
        raw = fp.HDR.pack(fp.MAGIC, fp.Kind.REFUSED, fp.VERSION, detail, 1) + fp.TEXT.pack(2) + b"no"
        a = fp.Flow(1, 100, opener=True)
        a.on_message(fp.decode(raw))
        assert a.refusal is fp.Refusal.FAILURE and fp.SOCKS_REPLY_FOR[a.refusal] == "failure"


def test_every_refusal_has_a_socks_reply() -> None:
    assert set(fp.SOCKS_REPLY_FOR) == set(fp.Refusal)
    assert all(code in fp.SOCKS_REPLY for code in fp.SOCKS_REPLY_FOR.values())


def test_protocol_violations() -> None:
    a, b = opened_pair()
    with pytest.raises(RemoteProtocolError, match="unexpected OPENED"):
        a.on_message(fp.Message(fp.Kind.OPENED, 1, 5))
    with pytest.raises(RemoteProtocolError, match="acknowledges"):
        a.on_message(fp.Message(fp.Kind.WINDOW, 1, 5))
    c = fp.Flow(2, 100, opener=False)
    with pytest.raises(RemoteProtocolError, match="before the flow was opened"):
        c.on_message(fp.Message(fp.Kind.DATA, 2, 0, payload=b"x"))
    b.on_message(fp.decode(a.data(b"abc")))
    with pytest.raises(RemoteProtocolError, match="repeats"):
        b.on_message(fp.Message(fp.Kind.DATA, 1, 0, payload=b"abc"))


def test_allow_rules() -> None:
    rules = [fp.parse_allow(t) for t in ("10.0.0.5:22", "192.168.0.0/16:80-443", "files.example:*", "[::1]:8080")]
    assert fp.allowed(rules, "10.0.0.5", ["10.0.0.5"], 22)
    assert not fp.allowed(rules, "10.0.0.5", ["10.0.0.5"], 23)
    assert fp.allowed(rules, "web", ["192.168.3.4"], 443)
    assert not fp.allowed(rules, "web", ["192.168.3.4", "8.8.8.8"], 443)  # every address must be inside
    assert fp.allowed(rules, "FILES.example", ["1.2.3.4"], 9999)
    assert fp.allowed(rules, "::1", ["::1"], 8080)
    assert [str(r) for r in rules] == ["10.0.0.5:22", "192.168.0.0/16:80-443", "files.example:*", "[::1]:8080"]


@pytest.mark.parametrize("text", ["nohost", ":22", "h:0", "h:70000", "h:9-3", "h:x", "10.0.0.0/33:22", "[::1:22"])
def test_bad_allow_rules(text: str) -> None:
    with pytest.raises(ConfigError, match="--allow"):
        fp.parse_allow(text)


def test_hostport() -> None:
    assert fp.parse_hostport("a.b:80") == ("a.b", 80)
    assert fp.parse_hostport("[fe80::1]:22") == ("fe80::1", 22)
    assert fp.parse_hostport("127.0.0.1:0", any_port=True) == ("127.0.0.1", 0)
    for bad in ("a.b", "a.b:0", "a:99999", "[::1]"):
        with pytest.raises(ConfigError):
            fp.parse_hostport(bad)


def test_socks5_parsing() -> None:
    assert fp.socks_greeting_reply(b"\x05\x01\x00") == (b"\x05\x00", True)
    assert fp.socks_greeting_reply(b"\x05\x01\x02") == (b"\x05\xff", False)  # only user/password offered
    v4 = b"\x05\x01\x00\x01" + bytes([10, 0, 0, 5]) + (22).to_bytes(2, "big")
    assert fp.socks_request_length(v4[:5]) == 10 and fp.socks_parse_request(v4) == ("10.0.0.5", 22)
    name = b"\x05\x01\x00\x03\x0bexample.org" + (443).to_bytes(2, "big")
    assert fp.socks_request_length(name[:5]) == len(name) and fp.socks_parse_request(name) == ("example.org", 443)
    assert fp.socks_parse_request(b"\x05\x02\x00\x01" + bytes(6)) == "command"  # BIND
    assert fp.socks_parse_request(b"\x05\x01\x00\x07" + bytes(6)) == "address_type"
    assert fp.socks_reply("refused")[1] == 5


def test_could_allow_spares_dns_for_names_no_rule_admits() -> None:
    names = [fp.parse_allow("files.example:22")]
    assert fp.could_allow(names, "files.example", 22) and not fp.could_allow(names, "other.example", 22)
    assert not fp.could_allow(names, "files.example", 23)
    nets = [fp.parse_allow("10.0.0.0/8:22")]
    assert fp.could_allow(nets, "anything.example", 22)  # must resolve to know
    assert fp.could_allow(nets, "10.1.2.3", 22) and not fp.could_allow(nets, "192.168.1.1", 22)
