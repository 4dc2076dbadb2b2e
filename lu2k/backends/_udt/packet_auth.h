// lu2k's authentication of UDT packets -- the pure part.
//
// No sockets, no clock: datagrams come in as iovecs, verdicts go out.  The libudt glue
// (udtcore.cpp) runs it on every packet libudt sends or receives; the Python type
// _udtcore.PacketAuth runs it on bytes for tests; benchmarks/udt_packet_auth_micro.py times
// it.
//
// Why.  UDT 4 authenticates nothing, and acts on its packets without lu2k seeing them.  An
// on-path attacker who reads socket ids and sequence numbers off the wire (no key needed)
// can drop a few data packets and forge an ACK for them: the sender frees the data, the
// receiver waits for it for ever, and the connection is stuck while its keep-alives say it
// is fine.  A forged shutdown closes the connection; a forged NAK makes the sender resend up
// to a whole flight (a 32-byte packet buys kilobytes: an amplifier); a forged drop request
// deletes a message; a data packet with a forged header (a sequence number ahead, other
// message boundaries) confuses UDT's reassembly until the connection stalls.  The payload of
// a data packet needs no more than it has: each UDT message is one lu2k frame sealed with
// the connection's AEAD (udt_proto), so an altered payload fails to open and closes the
// connection, counted as a bad frame -- tcp's contract.
//
// What.  Every packet on a keyed channel carries a trailer.  A packet whose trailer is
// missing or wrong is dropped before libudt sees it and counted as forged; one whose counter
// was already seen, or is older than the window, is dropped and counted as replayed.
//
// Trailer, appended to the packet:
//
//   u64 counter   big-endian.  Strictly increasing per (channel, peer address, destination
//                 socket id); each such stream starts at a fresh block of 2^32 values, so a
//                 stream that is forgotten and started again never repeats a value.
//   u64 tag       SipHash-2-4(key, covered | counter), little-endian, where covered is
//                   control packet: the 16-byte header and the control information;
//                   data packet:    the 16-byte header and the payload's length (u32 BE),
//                 the header as sent (it names the destination socket).  Data payloads are
//                 left to the AEAD: hashing them would cost about a microsecond a packet.
//
// Key: 128 bits from the network key (udt_proto.packet_key).  Every daemon of the net holds
// it, so protection starts with the first handshake packet: there is no unauthenticated
// interval before a per-connection key exists and no switch-over to race.  (The per-message
// AEAD keys come from the same network key and public salts, so no one who lacks this key
// holds those.)  Cross-connection replay is stopped by the header: it names the destination
// socket, and a socket's window is its own.
//
// Replay window: per local socket (the destination id of what arrives), the highest counter
// accepted and a bitmap of the kWindow before it (RFC 6479's ring of words), so packets the
// network reorders are still taken.  A datagram the path duplicates (or one FEC rebuilt that
// then arrives late) counts as replayed too: indistinguishable, and dropped either way.
// Connection requests to a listener (destination socket 0) are authenticated but have no
// window: the listener has no socket for them yet, and a replayed request only makes it
// answer, or start a handshake that the preamble then fails (what an on-path attacker gets
// by delaying the original).

#ifndef LU2K_PACKET_AUTH_H
#define LU2K_PACKET_AUTH_H

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace packet_auth {

constexpr size_t kHeader = 16;       // UDT's packet header
constexpr size_t kTrailer = 16;      // counter + tag
constexpr uint64_t kWindowWords = 16;  // the replay bitmap: 1024 bits
constexpr uint64_t kWindow = (kWindowWords - 1) * 64;  // counters below the highest still accepted once
constexpr size_t kMaxSockets = 1 << 16;   // replay windows kept (only key holders create them)
constexpr size_t kMaxStreams = 1 << 16;   // outgoing counters kept per channel

struct Key {
    uint64_t k0 = 0, k1 = 0;
    static Key from_bytes(const uint8_t* b) {  // 16 bytes, little-endian halves (SipHash's convention)
        Key k;
        std::memcpy(&k.k0, b, 8);
        std::memcpy(&k.k1, b + 8, 8);
        return k;
    }
};

static inline uint64_t rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

// SipHash-2-4 (Aumasson & Bernstein), fed in pieces.  Little-endian host assumed (x86-64,
// aarch64): words are loaded with memcpy.
class SipHash {
public:
    explicit SipHash(const Key& k)
        : v0_(0x736f6d6570736575ULL ^ k.k0), v1_(0x646f72616e646f6dULL ^ k.k1),
          v2_(0x6c7967656e657261ULL ^ k.k0), v3_(0x7465646279746573ULL ^ k.k1) {}

    void update(const uint8_t* p, size_t n) {
        total_ += n;
        while (n > 0 && fill_ > 0) {  // top up a partial word first
            pending_ |= uint64_t(*p++) << (8 * fill_);
            --n;
            if (++fill_ == 8) {
                compress(pending_);
                pending_ = 0;
                fill_ = 0;
            }
        }
        for (; n >= 8; n -= 8, p += 8) {
            uint64_t m;
            std::memcpy(&m, p, 8);
            compress(m);
        }
        for (; n > 0; --n) pending_ |= uint64_t(*p++) << (8 * fill_++);
    }

    uint64_t final() {
        compress(pending_ | (uint64_t(total_ & 0xff) << 56));
        v2_ ^= 0xff;
        for (int i = 0; i < 4; ++i) round();
        return v0_ ^ v1_ ^ v2_ ^ v3_;
    }

private:
    void round() {
        v0_ += v1_; v1_ = rotl(v1_, 13); v1_ ^= v0_; v0_ = rotl(v0_, 32);
        v2_ += v3_; v3_ = rotl(v3_, 16); v3_ ^= v2_;
        v0_ += v3_; v3_ = rotl(v3_, 21); v3_ ^= v0_;
        v2_ += v1_; v1_ = rotl(v1_, 17); v1_ ^= v2_; v2_ = rotl(v2_, 32);
    }
    void compress(uint64_t m) {
        v3_ ^= m;
        round();
        round();
        v0_ ^= m;
    }

    uint64_t v0_, v1_, v2_, v3_;
    uint64_t pending_ = 0;
    size_t fill_ = 0;
    uint64_t total_ = 0;
};

// The highest counter accepted and which of the kWindow before it were seen: a ring of
// words indexed by counter / 64, cleared as the highest moves on (RFC 6479).
class ReplayWindow {
public:
    enum Check { kFresh, kSeen };

    Check check(uint64_t c) const {
        if (!started_ || c > highest_) return kFresh;
        if (highest_ - c >= kWindow) return kSeen;  // too old to tell: treated as a replay
        return (ring_[(c >> 6) % kWindowWords] >> (c & 63)) & 1 ? kSeen : kFresh;
    }

    void accept(uint64_t c) {
        if (!started_) {
            ring_[(c >> 6) % kWindowWords] = 0;
        } else if (c > highest_) {
            // The words the highest moves into are cleared: what they held is out of the window.
            uint64_t to = c >> 6, from = std::max((highest_ >> 6) + 1, to >= kWindowWords ? to - kWindowWords + 1 : 0);
            for (uint64_t w = from; w <= to; ++w) ring_[w % kWindowWords] = 0;
        }
        if (!started_ || c > highest_) {
            highest_ = c;
            started_ = true;
        }
        ring_[(c >> 6) % kWindowWords] |= uint64_t(1) << (c & 63);
    }

private:
    bool started_ = false;
    uint64_t highest_ = 0;
    uint64_t ring_[kWindowWords] = {};
};

struct Counts {
    uint64_t authenticated = 0;  // packets whose trailer checked out
    uint64_t forged = 0;         // packets without a valid trailer on a keyed channel
    uint64_t replayed = 0;       // valid trailers whose counter was already used (or too old)
};

enum class Verdict {
    kPass,           // a channel without a key: hand it to libudt as it is
    kAuthenticated,  // hand it over without its trailer
    kForged,         // drop
    kReplayed,       // drop
};

static inline bool is_control(uint8_t first_byte) { return first_byte & 0x80; }

static inline uint32_t load_be32(const uint8_t* p) {
    return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

// Copy [offset, offset + n) of the bytes scattered over iov into out.
static inline void gather(const iovec* iov, size_t iovlen, size_t offset, size_t n, uint8_t* out) {
    for (size_t i = 0; i < iovlen && n > 0; ++i) {
        size_t len = iov[i].iov_len;
        if (offset >= len) {
            offset -= len;
            continue;
        }
        size_t take = std::min(len - offset, n);
        std::memcpy(out, static_cast<const uint8_t*>(iov[i].iov_base) + offset, take);
        out += take;
        n -= take;
        offset = 0;
    }
}

// The tag of a packet of n bytes scattered over iov (the header in iov[0]), without trailer.
static inline uint64_t tag_of(const Key& key, const iovec* iov, size_t iovlen, size_t n, const uint8_t counter[8]) {
    SipHash h(key);
    const uint8_t* header = static_cast<const uint8_t*>(iov[0].iov_base);
    if (is_control(header[0])) {
        for (size_t i = 0; i < iovlen && n > 0; ++i) {
            size_t take = std::min(iov[i].iov_len, n);
            h.update(static_cast<const uint8_t*>(iov[i].iov_base), take);
            n -= take;
        }
    } else {
        uint32_t payload = uint32_t(n - kHeader);
        uint8_t length[4] = {uint8_t(payload >> 24), uint8_t(payload >> 16), uint8_t(payload >> 8), uint8_t(payload)};
        h.update(header, kHeader);
        h.update(length, 4);
    }
    h.update(counter, 8);
    return h.final();
}

// One process's UDP channels and sockets, as libudt uses them.  Thread-safe: libudt sends
// and receives on its own threads (and sends from the caller's on close).  Sending takes
// channels_mu_, receiving takes it briefly and then sockets_mu_.
class PacketGuard {
public:
    // The channel on UDP socket `fd` authenticates with `key`; nullptr: plain UDT.
    void key_channel(int fd, const Key* key) {
        std::lock_guard<std::mutex> g(channels_mu_);
        if (key == nullptr) {
            channels_.erase(fd);
            return;
        }
        Channel& ch = channels_[fd];
        ch.key = *key;
        ch.streams.clear();
    }

    void forget_channel(int fd) {
        std::lock_guard<std::mutex> g(channels_mu_);
        channels_.erase(fd);
    }

    void forget_socket(int32_t id) {
        std::lock_guard<std::mutex> g(sockets_mu_);
        sockets_.erase(id);
    }

    // An outgoing packet (header first, as libudt lays it out) to `to`.  True, with
    // `trailer` filled, if it must be sent with the trailer appended.
    bool seal(int fd, const sockaddr* to, socklen_t tolen, const iovec* iov, size_t iovlen, uint8_t trailer[kTrailer]) {
        if (iovlen == 0 || iov[0].iov_len < kHeader) return false;
        const uint8_t* header = static_cast<const uint8_t*>(iov[0].iov_base);
        int32_t dest = int32_t(load_be32(header + 12));
        Key key;
        uint64_t counter;
        {
            std::lock_guard<std::mutex> g(channels_mu_);
            auto it = channels_.find(fd);
            if (it == channels_.end()) return false;
            key = it->second.key;
            counter = next_counter(it->second, stream_of(dest, to, tolen));
        }
        size_t n = 0;
        for (size_t i = 0; i < iovlen; ++i) n += iov[i].iov_len;
        for (int i = 0; i < 8; ++i) trailer[i] = uint8_t(counter >> (56 - 8 * i));
        uint64_t tag = tag_of(key, iov, iovlen, n, trailer);
        std::memcpy(trailer + 8, &tag, 8);
        return true;
    }

    // An incoming datagram of n bytes over iov: what to do with it.
    Verdict open(int fd, const iovec* iov, size_t iovlen, size_t n) {
        Key key;
        {
            std::lock_guard<std::mutex> g(channels_mu_);
            auto it = channels_.find(fd);
            if (it == channels_.end()) return Verdict::kPass;
            key = it->second.key;
        }
        if (n < kHeader || iov[0].iov_len < kHeader) {
            // A runt: it would leave part of libudt's header buffer as the last packet left it.
            std::lock_guard<std::mutex> g(sockets_mu_);
            ++totals_.forged;
            return Verdict::kForged;
        }
        int32_t dest = int32_t(load_be32(static_cast<const uint8_t*>(iov[0].iov_base) + 12));
        bool intact = n >= kHeader + kTrailer;
        uint8_t trailer[kTrailer];
        if (intact) {
            gather(iov, iovlen, n - kTrailer, kTrailer, trailer);
            uint64_t tag = tag_of(key, iov, iovlen, n - kTrailer, trailer), received;
            std::memcpy(&received, trailer + 8, 8);
            intact = (tag ^ received) == 0;  // one comparison of the whole tag: no timing to learn from
        }
        std::lock_guard<std::mutex> g(sockets_mu_);
        auto sock = sockets_.find(dest);
        if (!intact) {
            ++totals_.forged;
            if (sock != sockets_.end()) ++sock->second.counts.forged;
            return Verdict::kForged;
        }
        uint64_t counter = 0;
        for (int i = 0; i < 8; ++i) counter = (counter << 8) | trailer[i];
        if (dest != 0) {
            if (sock == sockets_.end()) {
                // Only key holders get here; a process with this many sockets lets one go.
                if (sockets_.size() >= kMaxSockets) sockets_.erase(sockets_.begin());
                sock = sockets_.emplace(dest, Socket()).first;
            }
            if (sock->second.window.check(counter) == ReplayWindow::kSeen) {
                ++totals_.replayed;
                ++sock->second.counts.replayed;
                return Verdict::kReplayed;
            }
            sock->second.window.accept(counter);
            ++sock->second.counts.authenticated;
        }
        ++totals_.authenticated;
        return Verdict::kAuthenticated;
    }

    // A datagram of n bytes read into libudt's header and data buffers (iov[0], iov[1]) and
    // kTrailer spare bytes after them (iov[2]), so that a packet that fills libudt's buffer
    // still has room for its trailer.  Returns the length to hand libudt, or -1 to drop the
    // datagram; *cut is set when a packet overran libudt's buffers and was cut where
    // libudt's own read would have cut it.
    long deliver(int fd, const iovec iov[3], size_t n, bool* cut) {
        Verdict v = open(fd, iov, 3, n);
        if (v == Verdict::kForged || v == Verdict::kReplayed) return -1;
        size_t len = v == Verdict::kAuthenticated ? n - kTrailer : n;
        size_t room = iov[0].iov_len + iov[1].iov_len;
        *cut = len > room;
        return long(std::min(len, room));
    }

    std::vector<int32_t> socket_ids() const {
        std::lock_guard<std::mutex> g(sockets_mu_);
        std::vector<int32_t> ids;
        ids.reserve(sockets_.size());
        for (const auto& entry : sockets_) ids.push_back(entry.first);
        return ids;
    }

    Counts totals() const {
        std::lock_guard<std::mutex> g(sockets_mu_);
        return totals_;
    }

    Counts socket_counts(int32_t id) const {
        std::lock_guard<std::mutex> g(sockets_mu_);
        auto it = sockets_.find(id);
        return it == sockets_.end() ? Counts() : it->second.counts;
    }

private:
    // An outgoing counter stream: one destination socket at one peer address.
    struct Stream {
        int32_t dest;
        uint16_t family, port;
        uint8_t addr[16];
        bool operator==(const Stream& o) const {
            return dest == o.dest && family == o.family && port == o.port && std::memcmp(addr, o.addr, 16) == 0;
        }
    };
    struct StreamHash {
        size_t operator()(const Stream& s) const {
            uint64_t a, b;
            std::memcpy(&a, s.addr, 8);
            std::memcpy(&b, s.addr + 8, 8);
            return std::hash<uint64_t>()(a ^ (b * 0x9e3779b97f4a7c15ULL) ^ (uint64_t(uint32_t(s.dest)) << 20) ^
                                         (uint64_t(s.port) << 4) ^ s.family);
        }
    };
    struct Channel {
        Key key;
        std::unordered_map<Stream, uint64_t, StreamHash> streams;  // -> last counter used
    };
    struct Socket {
        ReplayWindow window;
        Counts counts;
    };

    static Stream stream_of(int32_t dest, const sockaddr* to, socklen_t tolen) {
        Stream s{};
        s.dest = dest;
        if (to != nullptr && to->sa_family == AF_INET && tolen >= socklen_t(sizeof(sockaddr_in))) {
            const sockaddr_in* a = reinterpret_cast<const sockaddr_in*>(to);
            s.family = AF_INET;
            s.port = a->sin_port;
            std::memcpy(s.addr, &a->sin_addr, 4);
        } else if (to != nullptr && to->sa_family == AF_INET6 && tolen >= socklen_t(sizeof(sockaddr_in6))) {
            const sockaddr_in6* a = reinterpret_cast<const sockaddr_in6*>(to);
            s.family = AF_INET6;
            s.port = a->sin6_port;
            std::memcpy(s.addr, &a->sin6_addr, 16);
        }
        return s;
    }

    // With channels_mu_ held.  A new stream starts a new block, above every block handed out before.
    uint64_t next_counter(Channel& ch, const Stream& s) {
        auto it = ch.streams.find(s);
        if (it == ch.streams.end()) {
            if (ch.streams.size() >= kMaxStreams) ch.streams.erase(ch.streams.begin());
            it = ch.streams.emplace(s, ++next_block_ << 32).first;
        } else if (((it->second + 1) & 0xffffffffULL) == 0) {
            it->second = ++next_block_ << 32;  // a stream that used up its block moves on to a new one
        } else {
            ++it->second;
        }
        return it->second;
    }

    mutable std::mutex channels_mu_;
    std::unordered_map<int, Channel> channels_;
    uint64_t next_block_ = 0;
    mutable std::mutex sockets_mu_;
    std::unordered_map<int32_t, Socket> sockets_;
    Counts totals_;
};

}  // namespace packet_auth

#endif  // LU2K_PACKET_AUTH_H
