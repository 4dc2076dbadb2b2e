"""The transfer protocol's pure core: codecs, chunk sets, names, and a sender and receiver
session driven against each other in memory (loss of the receiver's state, repeats, refusals)."""

from __future__ import annotations

import hashlib
import random

import pytest

from lu2k.apps import transfer_proto as tp
from lu2k.errors import LocalProtocolError, RemoteProtocolError


def test_codecs_round_trip() -> None:
    msgs: list[tp.Message] = [
        tp.Offer(7, "dir/ünï.txt", 10**12, -5, 0o755, tp.DEFAULT_CHUNK, tp.Entry.FILE),
        tp.Accept(7, ((0, 3), (10, 1)), False),
        tp.Accept(7, (), True),
        tp.End(7, 42, b"\x01" * 32),
        tp.Result(7, tp.Outcome.DISK_FULL, "no space"),
        tp.Abort(7, "bye"),
    ]
    for m in msgs:
        assert tp.decode(tp.encode(m)) == m
    d = tp.decode(tp.encode(tp.Data(9, 130816, b"\x02" * 32, b"abc")))
    assert isinstance(d, tp.Data) and d.offset == 130816 and bytes(d.payload) == b"abc"


@pytest.mark.parametrize("raw, what", [
    (b"short", "shorter"),
    (tp.HDR.pack(0xDEAD, 1, 1, 0, 1), "magic"),
    (tp.HDR.pack(tp.MAGIC, 1, 99, 0, 1), "version"),
    (tp.HDR.pack(tp.MAGIC, 77, 1, 0, 1), "unknown transfer message kind"),
    (tp.HDR.pack(tp.MAGIC, tp.Kind.OFFER, 1, 0, 1) + b"\0" * 5, "truncated"),
    (tp.HDR.pack(tp.MAGIC, tp.Kind.OFFER, 1, 0, 1) + tp.OFFER.pack(1, 0, 0, 0, 0, 0), "chunk size"),
    (tp.HDR.pack(tp.MAGIC, tp.Kind.OFFER, 1, 0, 1) + tp.OFFER.pack(1, 0, 0, 10, 9, 0), "entry kind"),
    (tp.HDR.pack(tp.MAGIC, tp.Kind.OFFER, 1, 0, 1) + tp.OFFER.pack(1, 0, 0, 10, 0, 50) + b"ab", "name truncated"),
    (tp.HDR.pack(tp.MAGIC, tp.Kind.ACCEPT, 1, 0, 1) + tp.ACCEPT.pack(0, 3), "ranges"),
    (tp.HDR.pack(tp.MAGIC, tp.Kind.RESULT, 1, 0, 1) + tp.RESULT.pack(200, 0), "unknown outcome"),
])
def test_bad_messages_say_what_is_wrong(raw: bytes, what: str) -> None:
    with pytest.raises(RemoteProtocolError, match=what):
        tp.decode(raw)


def test_ranges() -> None:
    assert tp.to_ranges({5, 1, 2, 3, 9}) == ((1, 3), (5, 1), (9, 1))
    assert tp.from_ranges(((1, 3), (9, 5)), 11) == {1, 2, 3, 9, 10}
    assert tp.chunk_count(0, 10) == 0 and tp.chunk_count(1, 10) == 1 and tp.chunk_count(20, 10) == 2


@pytest.mark.parametrize("name", ["", "/etc/passwd", "a/../b", "a//b", "./a", "x.lu2k-part", "d/.y.lu2k-state", "a\\b", "a\0b"])
def test_names_that_may_not_be_written(name: str) -> None:
    assert tp.check_name(name)


def test_good_names() -> None:
    assert tp.check_name("a/b c/ünï.txt") is None
    assert tp.check_name(".hidden") is None


class Pair:
    """A sender session and the receiver's session for one file, bytes in memory."""

    def __init__(self, data: bytes, chunk: int = 1000) -> None:
        self.data, self.chunk = data, chunk
        self.s = tp.SendSession(1, "f", len(data), 123, 0o644, tp.Entry.FILE, chunk)
        self.disk = bytearray(len(data))
        self.r: tp.RecvSession | None = None
        self.hasher = hashlib.sha256()

    def offer(self, held: set[int] | None = None) -> None:
        offer = tp.decode(self.s.offer())
        assert isinstance(offer, tp.Offer)
        if self.r is None or held is not None:
            self.r = tp.RecvSession(offer.sid, "peer", offer, held=set(held or ()))
        self.s.handle(tp.decode(self.r.accept()))

    def pump(self, lose: set[int] = frozenset(), corrupt: set[int] = frozenset(), limit: int | None = None) -> list[int]:
        assert self.r is not None
        sent = []
        while (nxt := self.s.next_chunk()) is not None:
            i, first, must = nxt
            piece = self.data[i * self.chunk : (i + 1) * self.chunk]
            if first:
                self.hasher.update(piece)
            if not must:
                continue
            self.s.chunk_posted(i)
            sent.append(i)
            if i in lose:
                self.s.chunk_failed(i, "link down", transient=True)
                return sent
            body = bytes(b ^ 0xFF for b in piece) if i in corrupt else piece
            msg = tp.decode(tp.encode(tp.Data(self.s.sid, i * self.chunk, hashlib.sha256(piece).digest(), body)))
            assert isinstance(msg, tp.Data)
            j = self.r.on_data(msg, hashlib.sha256(msg.payload).digest() == msg.sha)
            self.s.chunk_delivered(i)
            if j is not None:
                self.disk[j * self.chunk : j * self.chunk + len(body)] = body
                self.r.written(j)
            if limit is not None and len(sent) >= limit:
                return sent
        return sent

    def end(self) -> tp.Result:
        assert self.r is not None and self.s.ready_to_end()
        ready = self.r.on_end(tp.decode(self.s.end(self.hasher.digest())))  # type: ignore[arg-type]
        reply = self.r.verified(hashlib.sha256(self.disk).digest()) if ready else self.r.fail(tp.Outcome.ABORTED, "incomplete")
        res = tp.decode(reply)
        assert isinstance(res, tp.Result)
        self.s.handle(res)
        return res


def test_clean_transfer() -> None:
    p = Pair(random.Random(1).randbytes(10_500))
    p.offer()
    assert p.pump() == list(range(11))
    assert p.end().outcome is tp.Outcome.OK
    assert p.s.state is tp.SendState.DONE and bytes(p.disk) == p.data


def test_resume_sends_only_what_the_receiver_lacks() -> None:
    p = Pair(random.Random(2).randbytes(10_000))
    p.offer(held={0, 1, 2, 5})
    assert p.pump() == [3, 4, 6, 7, 8, 9]
    p.disk[0:3000] = p.data[0:3000]
    p.disk[5000:6000] = p.data[5000:6000]
    assert p.end().outcome is tp.Outcome.OK


def test_failure_mid_transfer_then_reoffer_repairs_the_gap() -> None:
    p = Pair(random.Random(3).randbytes(8000))
    p.offer()
    assert p.pump(lose={3}) == [0, 1, 2, 3]
    assert p.s.state is tp.SendState.SETTLING and p.s.settled()
    p.offer()  # the receiver still knows the session: it reports chunks 0-2
    assert p.pump() == [3, 4, 5, 6, 7]
    assert p.end().outcome is tp.Outcome.OK


def test_receiver_lost_its_session_then_resumes_from_disk_state() -> None:
    p = Pair(random.Random(4).randbytes(8000))
    p.offer()
    p.pump(limit=5)
    assert p.r is not None
    held = set(p.r.held)
    p.s.handle(tp.Result(p.s.sid, tp.Outcome.UNKNOWN_SESSION, "restarted"))
    assert p.s.state is tp.SendState.SETTLING and p.s.settled()
    p.offer(held=held)
    assert p.pump() == [5, 6, 7]
    assert p.end().outcome is tp.Outcome.OK


def test_corrupt_chunk_is_not_recorded_and_verification_catches_it() -> None:
    p = Pair(random.Random(5).randbytes(5000))
    p.offer()
    p.pump(corrupt={2})
    assert p.r is not None and p.r.bad_chunks == 1 and 2 not in p.r.held
    res = p.end()  # the receiver does not hold chunk 2: no verification possible
    assert res.outcome is tp.Outcome.ABORTED and p.s.state is tp.SendState.FAILED


def test_whole_file_mismatch_is_verify_failed() -> None:
    p = Pair(random.Random(6).randbytes(3000))
    p.offer()
    p.pump()
    p.disk[0] ^= 1  # the disk lied
    res = p.end()
    assert res.outcome is tp.Outcome.VERIFY_FAILED and p.s.outcome is tp.Outcome.VERIFY_FAILED


def test_refusal_and_late_duplicates() -> None:
    s = tp.SendSession(1, "f", 10, 0, 0o600)
    s.offer()
    s.handle(tp.Result(1, tp.Outcome.BUSY, "someone else"))
    assert s.finished and s.outcome is tp.Outcome.BUSY
    s.handle(tp.Accept(1, ()))  # late: ignored, counted
    assert s.ignored == 1 and s.state is tp.SendState.FAILED


def test_directory_entry_done_on_ok() -> None:
    s = tp.SendSession(1, "d", 0, 0, 0o755, tp.Entry.DIR)
    s.offer()
    s.handle(tp.Result(1, tp.Outcome.OK))
    assert s.state is tp.SendState.DONE


def test_events_out_of_order_are_local_errors() -> None:
    s = tp.SendSession(1, "f", 10, 0, 0o600)
    with pytest.raises(LocalProtocolError):
        s.end(b"\0" * 32)
    s.offer()
    s.chunk_posted(0)
    s.transient_failure("x", transient=True)
    with pytest.raises(LocalProtocolError, match="in flight"):
        s.offer()


def test_receiver_rejects_misaligned_or_wrong_sized_chunks() -> None:
    offer = tp.Offer(1, "f", 2500, 0, 0o600, 1000, tp.Entry.FILE)
    r = tp.RecvSession(1, "x", offer)
    with pytest.raises(RemoteProtocolError, match="boundary"):
        r.on_data(tp.Data(1, 10, b"", b"a"), True)
    with pytest.raises(RemoteProtocolError, match="expected 500"):
        r.on_data(tp.Data(1, 2000, b"", b"a" * 1000), True)
    with pytest.raises(RemoteProtocolError, match="END says"):
        r.on_end(tp.End(1, 9, b""))


def test_stream_reassembly_in_order_and_bounded() -> None:
    r = tp.StreamReassembly(limit=10)
    assert r.feed(3, b"def") == []
    assert r.feed(0, b"abc") == [b"abc", b"def"]
    with pytest.raises(RemoteProtocolError, match="repeats"):
        r.feed(0, b"abc")
    with pytest.raises(RemoteProtocolError, match="ahead"):
        r.feed(100, b"x" * 11)


def test_end_goes_out_with_data_in_flight_and_ok_concludes_even_while_settling() -> None:
    s = tp.SendSession(1, "f", 3000, 0, 0o600, chunk=1000)
    s.offer()
    s.handle(tp.Accept(1, ()))
    for _ in range(3):
        i, _first, _must = s.next_chunk()  # type: ignore[misc]
        s.chunk_posted(i)
    assert s.ready_to_end() and s.in_flight == {0, 1, 2}
    s.end(b"\0" * 32)
    s.chunk_delivered(0)
    s.chunk_failed(1, "link down", transient=True)  # after END: the session re-synchronises
    assert s.state is tp.SendState.SETTLING
    s.handle(tp.Result(1, tp.Outcome.OK))  # ... but the receiver had it all and verified
    assert s.state is tp.SendState.DONE and s.outcome is tp.Outcome.OK


# --- inline offers: a file of at most one chunk in its first offer ------------------------------


def test_inline_offer_round_trips_and_expands_to_offer_data_end() -> None:
    body = b"small file"
    sha = hashlib.sha256(body).digest()
    m = tp.decode(tp.encode(tp.Offer(5, "d/s.txt", len(body), 9, 0o600, tp.DEFAULT_CHUNK, tp.Entry.FILE, body, sha)))
    assert isinstance(m, tp.Offer) and bytes(m.inline or b"") == body and m.sha == sha
    offer, data, end = tp.expand(m)
    assert offer == tp.Offer(5, "d/s.txt", len(body), 9, 0o600, tp.DEFAULT_CHUNK, tp.Entry.FILE)  # plain
    assert isinstance(data, tp.Data) and data.offset == 0 and data.sha == sha and bytes(data.payload) == body
    assert end == tp.End(5, len(body), sha)
    empty = tp.decode(tp.encode(tp.Offer(6, "e", 0, 9, 0o600, tp.DEFAULT_CHUNK, tp.Entry.FILE, b"", hashlib.sha256().digest())))
    assert [type(x) for x in tp.expand(empty)] == [tp.Offer, tp.End]  # an empty file has no DATA
    plain = tp.Offer(7, "p", 10**9, 0, 0o644, tp.DEFAULT_CHUNK, tp.Entry.FILE)
    assert tp.expand(plain) == [plain] and tp.expand(tp.Abort(7, "x")) == [tp.Abort(7, "x")]


@pytest.mark.parametrize("offer_fields, content, what", [
    ((3, 0, 0o644, 100, tp.Entry.FILE, 1), b"abcd", "4 bytes for a file of 3"),  # length differs from the size
    ((200, 0, 0o644, 100, tp.Entry.FILE, 1), b"x" * 200, "at most one chunk"),  # more than one chunk
    ((0, 0, 0o755, 100, tp.Entry.DIR, 1), b"", "entry kind 1"),  # a directory has no content
])
def test_bad_inline_offers_say_what_is_wrong(offer_fields: tuple[int, ...], content: bytes, what: str) -> None:
    raw = tp.HDR.pack(tp.MAGIC, tp.Kind.OFFER_INLINE, 1, 0, 1) + tp.OFFER.pack(*offer_fields) + b"n" + bytes(32) + content
    with pytest.raises(RemoteProtocolError, match=what):
        tp.decode(raw)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        tp.decode(tp.HDR.pack(tp.MAGIC, tp.Kind.OFFER_INLINE, 1, 0, 1) + tp.OFFER.pack(3, 0, 0o644, 100, 0, 1) + b"n" + bytes(8))


def test_a_small_file_goes_inline_once_and_ok_concludes_it() -> None:
    body = b"x" * 1000
    s = tp.SendSession(1, "f", len(body), 0, 0o644, tp.Entry.FILE, 1000)
    assert s.inline_eligible
    offer = tp.decode(s.offer_inline(body, hashlib.sha256(body).digest()))
    assert isinstance(offer, tp.Offer) and offer.inline is not None
    assert s.state is tp.SendState.ENDED and s.end_sent and not s.inline_eligible
    s.handle(tp.Accept(1, ()))  # an ACCEPT (a receiver answering the plain OFFER part) changes nothing
    assert s.state is tp.SendState.ENDED and s.ignored == 1
    # The receiver had lost the session: settle and re-offer -- plainly, which any receiver answers.
    s.handle(tp.Result(1, tp.Outcome.UNKNOWN_SESSION))
    assert s.state is tp.SendState.SETTLING and s.settled() and not s.inline_eligible
    assert isinstance(tp.decode(s.offer()), tp.Offer) and s.state is tp.SendState.OFFERED
    s.handle(tp.Accept(1, ()))  # it holds nothing: the one chunk goes again, as DATA (already read and hashed)
    assert s.next_chunk() == (0, False, True) and s.next_chunk() is None
    s.chunk_posted(0)
    assert s.ready_to_end()
    s.chunk_delivered(0)
    s.end(hashlib.sha256(body).digest())
    s.handle(tp.Result(1, tp.Outcome.OK))
    assert s.state is tp.SendState.DONE and s.outcome is tp.Outcome.OK


def test_what_may_go_inline() -> None:
    def session(size: int, name: str = "f", entry: tp.Entry = tp.Entry.FILE) -> tp.SendSession:
        return tp.SendSession(1, name, size, 0, 0o644, entry)

    assert session(0).inline_eligible and session(tp.DEFAULT_CHUNK - 1).inline_eligible
    assert not session(tp.DEFAULT_CHUNK + 1).inline_eligible  # two chunks
    assert not session(tp.DEFAULT_CHUNK - 10, name="n" * 20).inline_eligible  # bytes and name over INLINE_MAX
    assert not session(0, entry=tp.Entry.DIR).inline_eligible and not session(0, entry=tp.Entry.STREAM).inline_eligible
    big = session(tp.DEFAULT_CHUNK + 1)
    with pytest.raises(LocalProtocolError, match="not a first offer"):
        big.offer_inline(b"", b"")
    small = session(3)
    with pytest.raises(LocalProtocolError, match="2 bytes inline for a file of 3"):
        small.offer_inline(b"ab", bytes(32))


def test_receiver_takes_an_inline_offer_as_offer_data_end_and_an_existing_file_is_only_verified() -> None:
    body = b"hello, satellite"
    sha = hashlib.sha256(body).digest()
    offer, data, end = tp.expand(tp.Offer(3, "f", len(body), 0, 0o644, 1000, tp.Entry.FILE, body, sha))
    assert isinstance(offer, tp.Offer) and isinstance(data, tp.Data) and isinstance(end, tp.End)
    r = tp.RecvSession(3, "peer", offer)
    assert r.on_data(data, True) == 0 and not r.written(0)  # written; END not seen yet
    assert r.on_end(end)  # now ready to verify
    assert tp.decode(r.verified(sha)) == tp.Result(3, tp.Outcome.OK)
    # The same file already in place (same name, size and mtime): nothing is written, the hash decides.
    again = tp.RecvSession(4, "peer", offer, existing=True)
    with pytest.raises(RemoteProtocolError, match="not a chunk boundary"):  # still checked, though nothing is written
        again.on_data(tp.Data(4, 7, sha, body), True)
    assert again.on_data(data, True) is None and again.on_end(end)
    assert tp.decode(again.verified(hashlib.sha256(b"other content, same size").digest())).outcome is tp.Outcome.EXISTS_DIFFERS  # type: ignore[union-attr]
