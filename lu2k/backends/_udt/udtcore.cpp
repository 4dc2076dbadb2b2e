// lu2k.backends._udtcore -- lu2k's own binding of Debian's libudt (UDT 4.11).
//
// It owns libudt in the process (one copy of the library, one UDT::startup), and is
// deliberately small: the socket calls lu2k's udt backend needs, each one that can wait
// (a blocking call, or one taking a libudt lock) made with the GIL released; UDT::perfmon as a dict; UDT epoll; and lu2k's congestion control
// (rate_law.h) plugged in through UDT's CCC mechanism, with its parameters carried by the
// CCC factory so that sockets accepted from a listener inherit them.
//
// Packet authentication (packet_auth.h): libudt is linked in statically with its UDP I/O
// wrapped (ld --wrap=sendmsg,recvmsg,bind,close; see setup.py), so every datagram it sends or
// receives passes through this module first.  A socket given a key with set_packet_key
// before bind/connect keys the UDP channel libudt opens for it; its packets then carry a
// counter and a MAC, and forged or replayed ones are dropped and counted before libudt
// parses them.
//
// Errors: every UDT failure raises _udtcore.UDTError(code, message) where code
// is UDT's major*1000+minor (e.g. 1001 "connection setup failure: no server", 2001
// "connection broken").  The Python backend translates these into lu2k.errors once.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>

#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include <udt/udt.h>
#include <udt/ccc.h>

#include "packet_auth.h"
#include "rate_law.h"

// Every libudt call that may take one of its locks runs with the GIL released: a connect or
// close in another thread can hold such a lock for seconds (a rendezvous connect up to 30 s),
// and waiting for it with the GIL held would stop every Python thread in the process.
template <class Call>
static auto without_gil(Call call) -> decltype(call()) {
    PyThreadState* saved = PyEval_SaveThread();
    auto result = call();
    PyEval_RestoreThread(saved);
    return result;
}

static PyObject* UDTErrorType = nullptr;

static PyObject* raise_udt(const char* what) {
    UDT::ERRORINFO& e = UDT::getlasterror();
    int code = e.getErrorCode();
    std::string msg = std::string(what) + ": " + e.getErrorMessage();
    PyObject* args = Py_BuildValue("(is)", code, msg.c_str());
    if (args) {
        PyErr_SetObject(UDTErrorType, args);
        Py_DECREF(args);
    }
    e.clear();
    return nullptr;
}

static uint64_t monotonic_us() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return uint64_t(ts.tv_sec) * 1000000ULL + uint64_t(ts.tv_nsec) / 1000ULL;
}

// --- addresses ------------------------------------------------------------------------------

static bool make_addr(const char* host, int port, sockaddr_storage* ss, int* len) {
    std::memset(ss, 0, sizeof(*ss));
    if (port < 0 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "port %d outside 0..65535", port);
        return false;
    }
    sockaddr_in* a4 = reinterpret_cast<sockaddr_in*>(ss);
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons(uint16_t(port));
        *len = sizeof(sockaddr_in);
        return true;
    }
    // IPv6, with an optional zone for link-local addresses: "fe80::1%eth0" or "fe80::1%2".
    std::string text(host), zone;
    size_t pct = text.find('%');
    if (pct != std::string::npos) {
        zone = text.substr(pct + 1);
        text.resize(pct);
    }
    sockaddr_in6* a6 = reinterpret_cast<sockaddr_in6*>(ss);
    if (inet_pton(AF_INET6, text.c_str(), &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(uint16_t(port));
        if (!zone.empty()) {
            unsigned idx = if_nametoindex(zone.c_str());
            if (idx == 0) {
                char* end = nullptr;
                unsigned long n = std::strtoul(zone.c_str(), &end, 10);
                if (end == zone.c_str() || *end != '\0' || n == 0 || n > 0xffffffffUL) {
                    PyErr_Format(PyExc_ValueError, "'%s': no interface '%s' for the zone", host, zone.c_str());
                    return false;
                }
                idx = unsigned(n);
            }
            a6->sin6_scope_id = idx;
        }
        *len = sizeof(sockaddr_in6);
        return true;
    }
    PyErr_Format(PyExc_ValueError, "'%s' is not a numeric IPv4/IPv6 address", host);
    return false;
}

static PyObject* addr_tuple(const sockaddr_storage* ss) {
    char buf[INET6_ADDRSTRLEN] = {0};
    if (ss->ss_family == AF_INET6) {
        const sockaddr_in6* a6 = reinterpret_cast<const sockaddr_in6*>(ss);
        inet_ntop(AF_INET6, &a6->sin6_addr, buf, sizeof(buf));
        return Py_BuildValue("(si)", buf, ntohs(a6->sin6_port));
    }
    const sockaddr_in* a4 = reinterpret_cast<const sockaddr_in*>(ss);
    inet_ntop(AF_INET, &a4->sin_addr, buf, sizeof(buf));
    return Py_BuildValue("(si)", buf, ntohs(a4->sin_port));
}

// --- lu2k's congestion control as a UDT CCC ----------------------------------------------------

// Why the receiver re-sends NAKs.  libudt 4.11 reports a loss once; its periodic NAK is
// commented out ("rely on the sender's EXP for retransmission").  So when a retransmission
// is lost too -- at 1-2 % random loss on a busy GEO link, several times a minute -- the
// hole is repaired only by the sender's EXP timeout, which re-queues *every* unacknowledged
// packet (two to four BDPs) and calls onTimeout.  That, not the rate control, is what
// sinks UDT on lossy long links.  Lu2kRateCC on the receiving side therefore keeps its own
// list of missing sequence numbers (from onPktReceived) and, when one is still missing
// 1.25 RTT + 30 ms after it was last reported, sends a standard UDT NAK for it through
// CCC::sendCustomMsg.  The sender's libudt handles it like any NAK.
//
// Why a tail probe, and why a thread (the lab's stall at 267 of 300 messages).  Both repairs
// above need a packet to trigger them, and a quiet direction has none.  When the *last*
// packets of a burst are lost (or the last retransmission of a hole), the receiver never
// learns they exist, and the sender's EXP -- the only other repair -- never fires: libudt
// arms it from the last packet heard from the peer, and the idle peer sends a keep-alive
// every one of *its* RTOs.  Once the sender's RTO has backed off past the peer's (one
// timeout is enough) the keep-alives reset its EXP clock forever: the connection is alive,
// the data is stuck, and lu2k's ACKs in that direction never arrive.  So the sender side
// of Lu2kRateCC, when nothing it sent has been acknowledged for an RTO, sends a probe (a
// UDT user-defined control message, type 0x7FFF) naming the range [first unacknowledged,
// highest sent at least a round trip ago]; the receiver NAKs whatever of that range it
// lacks.  Neither side gets any UDT callback while stalled, so a thread of this module
// ("ticker", every 10 ms) drives both the probes and the receiver's repeated NAKs.

// Layout twin of libudt's CPacket (udt/packet.h).  libudt exports CCC::sendCustomMsg(CPacket&)
// but none of CPacket's own methods, so the packet is built here, member for member, the
// way CPacket's constructor and pack() do (Itanium ABI: a reference member is a pointer).
struct PacketTwin {
    int32_t* seq;
    int32_t* msg;
    int32_t* timestamp;
    int32_t* id;
    char** data;
    uint32_t header[4];
    iovec vec[2];
    int32_t pad;

    PacketTwin(uint32_t* control, size_t words)
        : seq(reinterpret_cast<int32_t*>(&header[0])), msg(reinterpret_cast<int32_t*>(&header[1])),
          timestamp(reinterpret_cast<int32_t*>(&header[2])), id(reinterpret_cast<int32_t*>(&header[3])),
          data(reinterpret_cast<char**>(&vec[1].iov_base)), pad(0) {
        header[0] = 0x80000000u | (3u << 16);  // control packet, type 3: loss report (NAK)
        header[1] = header[2] = header[3] = 0;
        vec[0].iov_base = header;
        vec[0].iov_len = sizeof(header);
        vec[1].iov_base = control;  // loss list, host order; libudt converts on send
        vec[1].iov_len = words * 4;
    }
};
static_assert(sizeof(PacketTwin) == sizeof(CPacket), "CPacket layout differs from this libudt's");

static inline int32_t seq_cmp(int32_t a, int32_t b) {
    return (std::abs(a - b) < 0x3FFFFFFF) ? (a - b) : (b - a);
}
static inline int32_t seq_inc(int32_t s) { return s == 0x7FFFFFFF ? 0 : s + 1; }

// What cc_state() reports.  It lives apart from the CCC object, which libudt deletes on its
// own threads when a connection ends: Python finds it through g_snapshots by the CCC's
// address and holds it by shared_ptr, so it never touches a CCC that may be gone.
struct CcSnapshot {
    std::mutex mu;
    double rate_bps = 0, min_rtt_us = 0, srtt_us = 0, loss = 0, bw_bps = 0, target_bps = 0, rto_us = 0;
    int64_t backoffs = 0, timeouts = 0, renaks = 0, missing = 0, consecutive_timeouts = 0;
    int64_t probes = 0, probes_answered = 0;
    uint64_t last_feedback_us = 0;  // CLOCK_MONOTONIC of the last ACK or NAK from the peer
    bool probing = false, settled = false;
};
static std::mutex g_snapshots_mu;
static std::unordered_map<const void*, std::shared_ptr<CcSnapshot>> g_snapshots;

class Lu2kRateCC : public CCC {
public:
    explicit Lu2kRateCC(const RateParams& p, double cwnd_pkts)
        : law_(p), cwnd_pkts_(cwnd_pkts), snap_(std::make_shared<CcSnapshot>()) {
        publish();
        std::lock_guard<std::mutex> g(g_snapshots_mu);
        g_snapshots[this] = snap_;
    }

    ~Lu2kRateCC() override {
        std::lock_guard<std::mutex> g(g_snapshots_mu);
        g_snapshots.erase(this);
    }

    void init() override {
        std::lock_guard<std::mutex> g(mu_);
        // The flight window is UDT's receiver-advertised flow window that matters; the
        // congestion window only has to be out of the way (rate control paces instead).
        m_dCWndSize = cwnd_pkts_ > 0 ? cwnd_pkts_ : m_dMaxCWndSize;
        m_dPktSndPeriod = law_.period_us(m_iMSS);
        setRTO(int(law_.rto_us()));
    }

    void onACK(int32_t ack) override {
        std::lock_guard<std::mutex> g(mu_);
        last_feedback_us_ = monotonic_us();
        if (!tx_started_ || seq_cmp(ack, ack_seq_) > 0) {
            ack_seq_ = ack;
            progress_us_ = last_feedback_us_;
        }
        law_.on_sent(sent_.exchange(0));
        double bw_bps = double(m_iBandwidth) * m_iMSS * 8.0;
        double arrival_bps = double(m_iRcvRate) * m_iMSS * 8.0;
        law_.on_ack(monotonic_us(), double(m_iRTT), bw_bps, arrival_bps);
        m_dPktSndPeriod = law_.period_us(m_iMSS);
        setRTO(int(law_.rto_us()));
        publish();
    }

    void onLoss(const int32_t* list, int size) override {
        // UDT's loss list: a value with the top bit set starts a range ending at the next one.
        int64_t n = 0;
        for (int i = 0; i < size; ++i) {
            if ((list[i] & 0x80000000) && i + 1 < size) {
                int32_t lo = list[i] & 0x7FFFFFFF, hi = list[i + 1];
                int32_t span = hi >= lo ? hi - lo : hi - lo + 0x7FFFFFFF + 1;
                n += int64_t(span) + 1;
                ++i;
            } else {
                ++n;
            }
        }
        std::lock_guard<std::mutex> g(mu_);
        last_feedback_us_ = monotonic_us();
        law_.on_loss(n);
        publish();
    }

    void onTimeout() override {
        std::lock_guard<std::mutex> g(mu_);
        law_.on_timeout();
        m_dPktSndPeriod = law_.period_us(m_iMSS);
        setRTO(int(law_.rto_us()));
        publish();
    }

    void onPktSent(const CPacket* pkt) override {
        sent_.fetch_add(1, std::memory_order_relaxed);
        int32_t seq = pkt->m_iSeqNo;
        std::lock_guard<std::mutex> g(mu_);
        if (!tx_started_) {
            tx_started_ = true;
            snd_max_ = seq;
            ack_seq_ = seq;  // nothing acknowledged yet: the first packet is the first unacked
            progress_us_ = monotonic_us();
            return;
        }
        if (seq_cmp(seq, snd_max_) > 0) {
            // Sending again after everything was acknowledged starts a fresh wait for an ACK.
            if (seq_cmp(ack_seq_, snd_max_) > 0) progress_us_ = monotonic_us();
            snd_max_ = seq;
        }
    }

    void onPktReceived(const CPacket* pkt) override {
        int32_t seq = pkt->m_iSeqNo;
        uint64_t now = monotonic_us();
        std::lock_guard<std::mutex> g(mu_);
        if (!rx_started_) {
            rx_started_ = true;
            rx_max_ = seq;
            return;
        }
        int32_t ahead = seq_cmp(seq, rx_max_);
        if (ahead > 0) {
            // libudt NAKs this gap itself right now; remember when, to chase it later.
            if (ahead > 1 && ahead < kMaxGap)
                for (int32_t s = seq_inc(rx_max_); s != seq && missing_.size() < kMaxMissing; s = seq_inc(s))
                    missing_[s] = now;
            rx_max_ = seq;
        } else {
            missing_.erase(seq);  // a retransmission (or a late one) filled its hole
        }
    }

    // A probe from the sending side: [from, to] was sent; NAK what of it never arrived.
    void processCustomMsg(const CPacket* pkt) override {
        const PacketTwin* t = reinterpret_cast<const PacketTwin*>(pkt);
        if (((t->header[0] >> 16) & 0x7FFF) != 0x7FFF || t->vec[1].iov_len < 12) return;
        const uint32_t* w = reinterpret_cast<const uint32_t*>(t->vec[1].iov_base);
        if (w[0] != kProbeMagic) return;
        int32_t from = int32_t(w[1] & 0x7FFFFFFF), to = int32_t(w[2] & 0x7FFFFFFF);
        if (seq_cmp(from, to) > 0 || seq_cmp(to, from) >= kMaxGap) return;
        std::vector<uint32_t> nak;
        {
            std::lock_guard<std::mutex> g(mu_);
            uint64_t now = monotonic_us();
            for (auto& entry : missing_) {
                if (nak.size() + 2 >= nak_words()) break;
                if (seq_cmp(entry.first, from) >= 0 && seq_cmp(entry.first, to) <= 0) {
                    nak.push_back(uint32_t(entry.first));
                    entry.second = now;
                }
            }
            // The tail: everything past the highest sequence number seen (or all of it, if
            // nothing arrived at all) -- one range.
            int32_t lo = rx_started_ && seq_cmp(rx_max_, from) >= 0 ? seq_inc(rx_max_) : from;
            if (seq_cmp(lo, to) <= 0) {
                if (lo == to) {
                    nak.push_back(uint32_t(lo));
                } else {
                    nak.push_back(uint32_t(lo) | 0x80000000u);
                    nak.push_back(uint32_t(to));
                }
            }
            ++probes_answered_;
            renaks_ += int64_t(nak.size());
            publish();
        }
        if (!nak.empty()) {
            PacketTwin out(nak.data(), nak.size());
            sendCustomMsg(*reinterpret_cast<CPacket*>(&out));
        }
    }

    // Called every ~10 ms by the ticker thread (never by libudt): repeated NAKs for holes
    // still open, and the tail probe when nothing sent has been acknowledged for an RTO.
    void tick(uint64_t now) {
        std::vector<uint32_t> renak;
        uint32_t probe[3] = {kProbeMagic, 0, 0};
        bool send_probe = false;
        {
            std::lock_guard<std::mutex> g(mu_);
            double rtt = std::max(double(m_iRTT), law_.params().rtt_hint_us);
            if (!missing_.empty()) {
                uint64_t wait = uint64_t(1.25 * rtt + 30000);
                for (auto& entry : missing_) {
                    if (now - entry.second >= wait) {
                        renak.push_back(uint32_t(entry.first));
                        entry.second = now;
                        if (renak.size() >= nak_words()) break;
                    }
                }
                renaks_ += int64_t(renak.size());
            }
            if (tx_started_) {
                // What was sent at least a round trip ago: the probe never names a packet
                // that may still be on its way.
                if (now - mark_us_ >= uint64_t(rtt)) {
                    old_mark_seq_ = mark_seq_;
                    old_mark_valid_ = mark_valid_;
                    mark_seq_ = snd_max_;
                    mark_valid_ = true;
                    mark_us_ = now;
                }
                // The base RTO, not the backed-off one: this is the repair that must not
                // wait behind the peer's keep-alives.
                double rto = law_.base_rto_us();
                bool outstanding = seq_cmp(ack_seq_, snd_max_) <= 0;
                if (outstanding && old_mark_valid_ && seq_cmp(old_mark_seq_, ack_seq_) >= 0 &&
                    double(now - progress_us_) >= rto && double(now - last_probe_us_) >= rto) {
                    probe[1] = uint32_t(ack_seq_);
                    probe[2] = uint32_t(old_mark_seq_);
                    send_probe = true;
                    last_probe_us_ = now;
                    ++probes_;
                }
            }
            if (!renak.empty() || send_probe) publish();
        }
        if (!renak.empty()) {
            PacketTwin nak(renak.data(), renak.size());
            sendCustomMsg(*reinterpret_cast<CPacket*>(&nak));
        }
        if (send_probe) {
            PacketTwin msg(probe, 3);
            msg.header[0] = 0x80000000u | (0x7FFFu << 16);  // user-defined control message
            sendCustomMsg(*reinterpret_cast<CPacket*>(&msg));
        }
    }

private:
    void publish() {  // with mu_ held (or from the constructor)
        std::lock_guard<std::mutex> g(snap_->mu);
        CcSnapshot& s = *snap_;
        s.rate_bps = law_.rate_bps();
        s.min_rtt_us = law_.min_rtt_us();
        s.srtt_us = law_.srtt_us();
        s.loss = law_.last_loss_fraction();
        s.bw_bps = law_.bw_estimate_bps();
        s.target_bps = law_.params().target_bps;
        s.rto_us = law_.rto_us();
        s.backoffs = law_.backoffs();
        s.timeouts = law_.timeouts();
        s.renaks = renaks_;
        s.probes = probes_;
        s.probes_answered = probes_answered_;
        s.consecutive_timeouts = law_.consecutive_timeouts();
        s.last_feedback_us = last_feedback_us_;
        s.missing = int64_t(missing_.size());
        s.probing = law_.probing();
        s.settled = law_.settled();
    }

    std::mutex mu_;  // onACK/onLoss come from UDT's receive thread, state_dict from Python
    RateLaw law_;
    double cwnd_pkts_;
    std::atomic<int64_t> sent_{0};  // onPktSent runs on UDT's send thread
    std::shared_ptr<CcSnapshot> snap_;
    uint64_t last_feedback_us_ = monotonic_us();
    // receiver side: sequence numbers still missing -> when last reported
    static constexpr size_t kMaxMissing = 65536;
    static constexpr int32_t kMaxGap = 1 << 20;
    static constexpr size_t kNakWords = 350;  // fits one 1500-byte packet
    // ... and at smaller packet sizes, after IP/UDP (libudt's mss counts 28 bytes for them
    // whatever the family: lu2k.inet.udt_mss_for) and UDT's header (lu2k gives libudt an mss
    // that leaves room for packet_auth's trailer).
    size_t nak_words() const {
        int room = m_iMSS - 28 - int(packet_auth::kHeader);
        return std::min(kNakWords, size_t(std::max(room, 64)) / 4);
    }
    bool rx_started_ = false;
    int32_t rx_max_ = 0;
    int64_t renaks_ = 0;
    std::unordered_map<int32_t, uint64_t> missing_;
    // sender side: the tail probe
    static constexpr uint32_t kProbeMagic = 0x6c75326bu;  // "lu2k"
    bool tx_started_ = false;
    int32_t snd_max_ = 0;          // highest sequence number sent
    int32_t ack_seq_ = 0;          // first sequence number not acknowledged
    uint64_t progress_us_ = 0;     // when ack_seq_ last moved (or sending resumed from idle)
    uint64_t last_probe_us_ = 0;
    int32_t mark_seq_ = 0, old_mark_seq_ = 0;  // snd_max_ sampled once per RTT
    bool mark_valid_ = false, old_mark_valid_ = false;
    uint64_t mark_us_ = 0;
    int64_t probes_ = 0, probes_answered_ = 0;
};

// --- the ticker: repairs that no packet triggers ------------------------------------------------
//
// Connected sockets are registered by id (connect/accept) and dropped at close or once libudt
// no longer knows them.  Every 10 ms the thread asks libudt for each socket's CCC and, if it
// is a Lu2kRateCC, runs its tick().  Lifetime: getsockopt(UDT_CC) fails once a socket is
// CLOSED, and libudt deletes the CUDT (and with it the CCC) only a second or more after
// that, so the CCC found is alive for the microseconds tick() takes.  g_snapshots_mu is
// held only to check that the pointer is one of ours, never across tick(): sendCustomMsg
// takes libudt's control lock, under which libudt deletes CCCs (whose destructor takes
// g_snapshots_mu).
// Immortal on purpose: the detached ticker thread may still be waiting on the condition
// variable when the process exits, and destroying a condition variable with a waiter blocks
// forever in glibc (pthread_cond_destroy), so a static one would hang every exit.
static std::mutex& g_conns_mu = *new std::mutex;
static std::condition_variable& g_conns_cv = *new std::condition_variable;
static std::set<UDTSOCKET>& g_conns = *new std::set<UDTSOCKET>;
static bool g_ticker_started = false;

static void forget_dead_windows();

static void ticker_main() {
    std::vector<UDTSOCKET> socks, gone;
    for (unsigned tick = 1;; ++tick) {
        if (tick % 1000 == 0) forget_dead_windows();
        {
            std::unique_lock<std::mutex> lk(g_conns_mu);
            for (UDTSOCKET u : gone) g_conns.erase(u);
            gone.clear();
            g_conns_cv.wait(lk, [] { return !g_conns.empty(); });
            socks.assign(g_conns.begin(), g_conns.end());
        }
        uint64_t now = monotonic_us();
        for (UDTSOCKET u : socks) {
            CCC* cc = nullptr;
            int len = sizeof(cc);
            if (UDT::getsockopt(u, 0, UDT_CC, &cc, &len) == UDT::ERROR || cc == nullptr) {
                gone.push_back(u);
                continue;
            }
            bool ours;
            {
                std::lock_guard<std::mutex> g(g_snapshots_mu);
                ours = g_snapshots.count(static_cast<const void*>(static_cast<Lu2kRateCC*>(cc))) != 0;
            }
            if (ours) static_cast<Lu2kRateCC*>(cc)->tick(now);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
}

static void register_conn(UDTSOCKET u) {
    std::lock_guard<std::mutex> g(g_conns_mu);
    g_conns.insert(u);
    if (!g_ticker_started) {
        // Lives as long as the process (libudt is never cleaned up either); idle while no
        // connection is registered.
        std::thread(ticker_main).detach();
        g_ticker_started = true;
    }
    g_conns_cv.notify_one();
}

static void unregister_conn(UDTSOCKET u) {
    std::lock_guard<std::mutex> g(g_conns_mu);
    g_conns.erase(u);
}

class Lu2kRateFactory : public CCCVirtualFactory {
public:
    Lu2kRateFactory(const RateParams& p, double cwnd) : p_(p), cwnd_(cwnd) {}
    CCC* create() override { return new Lu2kRateCC(p_, cwnd_); }
    CCCVirtualFactory* clone() override { return new Lu2kRateFactory(p_, cwnd_); }

private:
    RateParams p_;
    double cwnd_;
};

// Keyword parsing shared by set_cc and RateLaw().
static bool parse_params(PyObject* kwargs, RateParams* p, double* cwnd) {
    if (!kwargs) return true;
    struct { const char* name; double* field; } doubles[] = {
        {"target_bps", &p->target_bps}, {"start_bps", &p->start_bps}, {"min_bps", &p->min_bps},
        {"max_bps", &p->max_bps}, {"rtt_slack", &p->rtt_slack}, {"rtt_slack_min_us", &p->rtt_slack_min_us},
        {"heavy_loss", &p->heavy_loss}, {"backoff", &p->backoff}, {"recover", &p->recover},
        {"probe_gain", &p->probe_gain}, {"min_interval_us", &p->min_interval_us},
        {"rtt_window_us", &p->rtt_window_us}, {"drain", &p->drain}, {"rtt_hint_us", &p->rtt_hint_us},
        {"min_rto_us", &p->min_rto_us}, {"cwnd_pkts", cwnd},
    };
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(kwargs, &pos, &key, &value)) {
        const char* k = PyUnicode_AsUTF8(key);
        if (!k) return false;
        bool found = false;
        if (std::strcmp(k, "inflation_intervals") == 0) {
            long v = PyLong_AsLong(value);
            if (v == -1 && PyErr_Occurred()) return false;
            if (v < 1) {
                PyErr_SetString(PyExc_ValueError, "inflation_intervals must be >= 1");
                return false;
            }
            p->inflation_intervals = int(v);
            continue;
        }
        for (auto& d : doubles) {
            if (std::strcmp(k, d.name) == 0) {
                double v = PyFloat_AsDouble(value);
                if (v == -1.0 && PyErr_Occurred()) return false;
                if (v < 0) {
                    PyErr_Format(PyExc_ValueError, "congestion control parameter %s must be >= 0, got %g", k, v);
                    return false;
                }
                *d.field = v;
                found = true;
                break;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_ValueError, "unknown congestion control parameter %s", k);
            return false;
        }
    }
    if (p->backoff <= 0 || p->backoff >= 1) {
        PyErr_Format(PyExc_ValueError, "backoff must be in (0, 1), got %g", p->backoff);
        return false;
    }
    if (p->probe_gain < 1) {
        PyErr_Format(PyExc_ValueError, "probe_gain must be >= 1, got %g", p->probe_gain);
        return false;
    }
    return true;
}

// --- packet authentication: libudt's UDP I/O, wrapped ----------------------------------------
//
// setup.py links libudt statically with --wrap=sendmsg,recvmsg,bind,close, so libudt's calls
// land here and __real_* are libc's.  Which channel (UDP socket) has which key is learnt at
// bind time: py_bind and py_connect name the key of the UDT socket they work on in a
// thread-local, and libudt opens the channel for that socket (socket, bind) on the same
// thread.  A channel nobody named a key for is plain UDT.  Accepted sockets share their
// listener's channel, and with it its key.

static packet_auth::PacketGuard g_guard;
static std::mutex g_socket_keys_mu;
static std::unordered_map<UDTSOCKET, packet_auth::Key> g_socket_keys;  // set_packet_key, until close
static thread_local bool t_channel_keyed = false;
static thread_local packet_auth::Key t_channel_key;

extern "C" {
ssize_t __real_sendmsg(int fd, const struct msghdr* msg, int flags);
ssize_t __real_recvmsg(int fd, struct msghdr* msg, int flags);
int __real_bind(int fd, const struct sockaddr* addr, socklen_t len);
int __real_close(int fd);

ssize_t __wrap_sendmsg(int fd, const struct msghdr* msg, int flags) {
    constexpr size_t kMaxIov = 4;  // libudt sends header + data: 2
    uint8_t trailer[packet_auth::kTrailer];
    if (msg->msg_iovlen > kMaxIov ||
        !g_guard.seal(fd, static_cast<const sockaddr*>(msg->msg_name), msg->msg_namelen, msg->msg_iov, msg->msg_iovlen, trailer))
        return __real_sendmsg(fd, msg, flags);
    iovec iov[kMaxIov + 1];
    std::memcpy(iov, msg->msg_iov, msg->msg_iovlen * sizeof(iovec));
    iov[msg->msg_iovlen] = {trailer, sizeof(trailer)};
    msghdr out = *msg;
    out.msg_iov = iov;
    out.msg_iovlen = msg->msg_iovlen + 1;
    ssize_t r = __real_sendmsg(fd, &out, flags);
    return r >= ssize_t(sizeof(trailer)) ? r - ssize_t(sizeof(trailer)) : r;
}

ssize_t __wrap_recvmsg(int fd, struct msghdr* msg, int flags) {
    if (msg->msg_iovlen != 2) return __real_recvmsg(fd, msg, flags);  // not a libudt packet read
    uint8_t spare[packet_auth::kTrailer];
    iovec iov[3] = {msg->msg_iov[0], msg->msg_iov[1], {spare, sizeof(spare)}};
    msghdr in = *msg;
    in.msg_iov = iov;
    in.msg_iovlen = 3;
    ssize_t n = __real_recvmsg(fd, &in, flags);
    msg->msg_namelen = in.msg_namelen;
    msg->msg_flags = in.msg_flags;
    if (n <= 0) return n;
    bool cut;
    long len = g_guard.deliver(fd, iov, size_t(n), &cut);
    if (len < 0) {  // forged or replayed: as if nothing had arrived (libudt polls again)
        errno = EAGAIN;
        return -1;
    }
    if (cut) msg->msg_flags |= MSG_TRUNC;
    return ssize_t(len);
}

int __wrap_bind(int fd, const struct sockaddr* addr, socklen_t len) {
    int r = __real_bind(fd, addr, len);
    if (r == 0) g_guard.key_channel(fd, t_channel_keyed ? &t_channel_key : nullptr);
    return r;
}

// libudt closes a channel's UDP socket (CChannel::close) before it stops the channel's receive
// worker (~CRcvQueue joins it, with libudt's global lock held).  Released at once, the number
// could be taken by another socket of this process -- blocking, with no timeout -- before the
// worker's next recvmsg, which would then wait in that socket for good, and libudt with it
// (seen: every later UDT::socket() and close() waiting on the global lock).  So a datagram
// socket's number is kept: an unbound AF_UNIX datagram socket, non-blocking, takes its place
// (dup2 swaps them at once), where a recvmsg fails with EAGAIN and a sendmsg to an IP address
// fails; a thread of its own closes that placeholder a few seconds later, when the worker --
// joined right after the close -- is long gone.
static constexpr auto kPlaceholderFor = std::chrono::seconds(3);

int __wrap_close(int fd) {
    g_guard.forget_channel(fd);
    int type = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_DGRAM) {
        int placeholder = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (placeholder >= 0) {
            int r = dup2(placeholder, fd);  // closes the channel's socket; fd now names the placeholder
            __real_close(placeholder);
            if (r >= 0) {
                try {
                    std::thread([fd] {
                        std::this_thread::sleep_for(kPlaceholderFor);
                        __real_close(fd);
                    }).detach();
                    return 0;
                } catch (const std::system_error&) {  // no thread to be had: close it now
                }
            }
        }
    }
    return __real_close(fd);
}
}


// For the duration of a bind or connect: the key of the channel libudt may open for `u`.
class ChannelKeyScope {
public:
    explicit ChannelKeyScope(UDTSOCKET u) {
        std::lock_guard<std::mutex> g(g_socket_keys_mu);
        auto it = g_socket_keys.find(u);
        t_channel_keyed = it != g_socket_keys.end();
        if (t_channel_keyed) t_channel_key = it->second;
    }
    ~ChannelKeyScope() { t_channel_keyed = false; }
};

static void forget_socket(UDTSOCKET u) {
    {
        std::lock_guard<std::mutex> g(g_socket_keys_mu);
        g_socket_keys.erase(u);
    }
    g_guard.forget_socket(u);
}

// Replay windows of sockets libudt no longer knows (a peer's last packets after our close
// make new ones); called by the ticker every ten seconds or so.
static void forget_dead_windows() {
    for (int32_t id : g_guard.socket_ids())
        if (UDT::getsockstate(id) == NONEXIST) g_guard.forget_socket(id);
}

// set_packet_key(u, key): 16 bytes; u's channel authenticates its packets with it.
static PyObject* py_set_packet_key(PyObject*, PyObject* args) {
    int u;
    Py_buffer key;
    if (!PyArg_ParseTuple(args, "iy*", &u, &key)) return nullptr;
    if (key.len != 16) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "a packet key is 16 bytes, got %zd", key.len);
        return nullptr;
    }
    packet_auth::Key k = packet_auth::Key::from_bytes(static_cast<const uint8_t*>(key.buf));
    PyBuffer_Release(&key);
    if (without_gil([&] { return UDT::getsockstate(u); }) == NONEXIST) {
        PyErr_Format(PyExc_ValueError, "no UDT socket %d", u);
        return nullptr;
    }
    std::lock_guard<std::mutex> g(g_socket_keys_mu);
    g_socket_keys[u] = k;
    Py_RETURN_NONE;
}

static PyObject* counts_dict(const packet_auth::Counts& c) {
    return Py_BuildValue("{s:K,s:K,s:K}", "authenticated", (unsigned long long)c.authenticated, "forged",
                         (unsigned long long)c.forged, "replayed", (unsigned long long)c.replayed);
}

// packet_auth_stats(u) -> {authenticated, forged, replayed}: packets addressed to u.
static PyObject* py_packet_auth_stats(PyObject*, PyObject* args) {
    int u;
    if (!PyArg_ParseTuple(args, "i", &u)) return nullptr;
    return counts_dict(g_guard.socket_counts(u));
}

// packet_auth_totals() -> {authenticated, forged, replayed}: every keyed channel of the process.
static PyObject* py_packet_auth_totals(PyObject*, PyObject*) { return counts_dict(g_guard.totals()); }

// --- socket calls -------------------------------------------------------------------------------

static PyObject* py_socket(PyObject*, PyObject* args) {
    int family = AF_INET, stream = 0;
    if (!PyArg_ParseTuple(args, "|ip", &family, &stream)) return nullptr;
    if (family != AF_INET && family != AF_INET6) {
        PyErr_Format(PyExc_ValueError, "address family %d is neither AF_INET nor AF_INET6", family);
        return nullptr;
    }
    UDTSOCKET u = without_gil([&] { return UDT::socket(family, stream ? SOCK_STREAM : SOCK_DGRAM, 0); });
    if (u == UDT::INVALID_SOCK) return raise_udt("socket");
    return PyLong_FromLong(u);
}

static PyObject* py_bind(PyObject*, PyObject* args) {
    int u, port;
    const char* host;
    if (!PyArg_ParseTuple(args, "isi", &u, &host, &port)) return nullptr;
    sockaddr_storage ss;
    int len;
    if (!make_addr(host, port, &ss, &len)) return nullptr;
    int r;
    {
        ChannelKeyScope keyed(u);
        Py_BEGIN_ALLOW_THREADS r = UDT::bind(u, reinterpret_cast<sockaddr*>(&ss), len);
        Py_END_ALLOW_THREADS
    }
    if (r == UDT::ERROR) return raise_udt("bind");
    Py_RETURN_NONE;
}

// bind_udp(u, fd): the UDT socket takes over an already bound UDP socket (UDT::bind2), so the
// caller can set it up first (lu2k attaches a socket filter: lu2k/backends/udt_guard.py).
// libudt owns the descriptor from then on and closes it with the last UDT socket using it.
// libudt does not bind it, so __wrap_bind never sees it: the channel is keyed here instead.
static PyObject* py_bind_udp(PyObject*, PyObject* args) {
    int u, fd;
    if (!PyArg_ParseTuple(args, "ii", &u, &fd)) return nullptr;
    int r;
    {
        ChannelKeyScope keyed(u);
        g_guard.key_channel(fd, t_channel_keyed ? &t_channel_key : nullptr);
    }
    Py_BEGIN_ALLOW_THREADS r = UDT::bind2(u, fd);
    Py_END_ALLOW_THREADS if (r == UDT::ERROR) {
        g_guard.forget_channel(fd);  // the caller closes the descriptor, not libudt
        return raise_udt("bind_udp");
    }
    Py_RETURN_NONE;
}

static PyObject* py_listen(PyObject*, PyObject* args) {
    int u, backlog = 64;
    if (!PyArg_ParseTuple(args, "i|i", &u, &backlog)) return nullptr;
    if (without_gil([&] { return UDT::listen(u, backlog); }) == UDT::ERROR) return raise_udt("listen");
    Py_RETURN_NONE;
}

static PyObject* py_accept(PyObject*, PyObject* args) {
    int u;
    if (!PyArg_ParseTuple(args, "i", &u)) return nullptr;
    sockaddr_storage ss;
    int len = sizeof(ss);
    UDTSOCKET c;
    Py_BEGIN_ALLOW_THREADS c = UDT::accept(u, reinterpret_cast<sockaddr*>(&ss), &len);
    Py_END_ALLOW_THREADS if (c == UDT::INVALID_SOCK) return raise_udt("accept");
    register_conn(c);
    PyObject* addr = addr_tuple(&ss);
    if (!addr) return nullptr;
    PyObject* out = Py_BuildValue("(iO)", c, addr);
    Py_DECREF(addr);
    return out;
}

static PyObject* py_connect(PyObject*, PyObject* args) {
    int u, port;
    const char* host;
    if (!PyArg_ParseTuple(args, "isi", &u, &host, &port)) return nullptr;
    sockaddr_storage ss;
    int len;
    if (!make_addr(host, port, &ss, &len)) return nullptr;
    int r;
    {
        ChannelKeyScope keyed(u);  // a socket not bound yet gets its channel here
        Py_BEGIN_ALLOW_THREADS r = UDT::connect(u, reinterpret_cast<sockaddr*>(&ss), len);
        Py_END_ALLOW_THREADS
    }
    if (r == UDT::ERROR) return raise_udt("connect");
    register_conn(u);
    Py_RETURN_NONE;
}

static PyObject* py_close(PyObject*, PyObject* args) {
    int u;
    if (!PyArg_ParseTuple(args, "i", &u)) return nullptr;
    unregister_conn(u);
    forget_socket(u);
    int r;
    Py_BEGIN_ALLOW_THREADS r = UDT::close(u);
    Py_END_ALLOW_THREADS if (r == UDT::ERROR) return raise_udt("close");
    Py_RETURN_NONE;
}

static PyObject* name_of(int u, bool peer) {
    sockaddr_storage ss;
    int len = sizeof(ss);
    int r = without_gil([&] {
        return peer ? UDT::getpeername(u, reinterpret_cast<sockaddr*>(&ss), &len)
                    : UDT::getsockname(u, reinterpret_cast<sockaddr*>(&ss), &len);
    });
    if (r == UDT::ERROR) return raise_udt(peer ? "getpeername" : "getsockname");
    return addr_tuple(&ss);
}

static PyObject* py_getsockname(PyObject*, PyObject* args) {
    int u;
    if (!PyArg_ParseTuple(args, "i", &u)) return nullptr;
    return name_of(u, false);
}

static PyObject* py_getpeername(PyObject*, PyObject* args) {
    int u;
    if (!PyArg_ParseTuple(args, "i", &u)) return nullptr;
    return name_of(u, true);
}

// Options by name: the Python side never sees UDT's enum numbering.
enum OptKind { OPT_INT, OPT_BOOL, OPT_INT64, OPT_LINGER };
struct OptInfo { const char* name; UDTOpt opt; OptKind kind; bool writable; };
static const OptInfo OPTIONS[] = {
    {"mss", UDT_MSS, OPT_INT, true},           {"sndsyn", UDT_SNDSYN, OPT_BOOL, true},
    {"rcvsyn", UDT_RCVSYN, OPT_BOOL, true},    {"fc", UDT_FC, OPT_INT, true},
    {"sndbuf", UDT_SNDBUF, OPT_INT, true},     {"rcvbuf", UDT_RCVBUF, OPT_INT, true},
    {"linger", UDT_LINGER, OPT_LINGER, true},  {"udp_sndbuf", UDP_SNDBUF, OPT_INT, true},
    {"udp_rcvbuf", UDP_RCVBUF, OPT_INT, true}, {"rendezvous", UDT_RENDEZVOUS, OPT_BOOL, true},
    {"sndtimeo", UDT_SNDTIMEO, OPT_INT, true}, {"rcvtimeo", UDT_RCVTIMEO, OPT_INT, true},
    {"reuseaddr", UDT_REUSEADDR, OPT_BOOL, true}, {"maxbw", UDT_MAXBW, OPT_INT64, true},
    {"state", UDT_STATE, OPT_INT, false},      {"event", UDT_EVENT, OPT_INT, false},
    {"snddata", UDT_SNDDATA, OPT_INT, false},  {"rcvdata", UDT_RCVDATA, OPT_INT, false},
};

static const OptInfo* find_opt(const char* name) {
    for (const auto& o : OPTIONS)
        if (std::strcmp(o.name, name) == 0) return &o;
    PyErr_Format(PyExc_ValueError, "unknown UDT socket option %s", name);
    return nullptr;
}

static PyObject* py_setsockopt(PyObject*, PyObject* args) {
    int u;
    const char* name;
    long long value;
    if (!PyArg_ParseTuple(args, "isL", &u, &name, &value)) return nullptr;
    const OptInfo* o = find_opt(name);
    if (!o) return nullptr;
    if (!o->writable) {
        PyErr_Format(PyExc_ValueError, "UDT socket option %s is read-only", name);
        return nullptr;
    }
    int r;
    switch (o->kind) {
        case OPT_BOOL: {
            bool b = value != 0;
            r = without_gil([&] { return UDT::setsockopt(u, 0, o->opt, &b, sizeof(b)); });
            break;
        }
        case OPT_INT64: {
            int64_t v = value;
            r = without_gil([&] { return UDT::setsockopt(u, 0, o->opt, &v, sizeof(v)); });
            break;
        }
        case OPT_LINGER: {  // value: seconds to linger; < 0 turns lingering off
            linger l;
            l.l_onoff = value >= 0;
            l.l_linger = value >= 0 ? int(value) : 0;
            r = without_gil([&] { return UDT::setsockopt(u, 0, o->opt, &l, sizeof(l)); });
            break;
        }
        default: {
            if (value < INT32_MIN || value > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "UDT socket option %s value %lld out of range", name, value);
                return nullptr;
            }
            int v = int(value);
            r = without_gil([&] { return UDT::setsockopt(u, 0, o->opt, &v, sizeof(v)); });
        }
    }
    if (r == UDT::ERROR) return raise_udt(name);
    Py_RETURN_NONE;
}

static PyObject* py_getsockopt(PyObject*, PyObject* args) {
    int u;
    const char* name;
    if (!PyArg_ParseTuple(args, "is", &u, &name)) return nullptr;
    const OptInfo* o = find_opt(name);
    if (!o) return nullptr;
    union { bool b; int i; int64_t l; linger lg; } v;
    std::memset(&v, 0, sizeof(v));
    int len = sizeof(v);
    if (without_gil([&] { return UDT::getsockopt(u, 0, o->opt, &v, &len); }) == UDT::ERROR) return raise_udt(name);
    switch (o->kind) {
        case OPT_BOOL: return PyBool_FromLong(v.b);
        case OPT_INT64: return PyLong_FromLongLong(v.l);
        case OPT_LINGER: return PyLong_FromLong(v.lg.l_onoff ? v.lg.l_linger : -1);
        default: return PyLong_FromLong(v.i);
    }
}

// sendmsg(u, data, ttl_ms=-1, inorder=True) -> bytes sent; 0 when the send timeout expired
// with the buffer still full (the caller retries or gives up).
static PyObject* py_sendmsg(PyObject*, PyObject* args) {
    int u, ttl = -1, inorder = 1;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iy*|ip", &u, &buf, &ttl, &inorder)) return nullptr;
    if (buf.len > INT32_MAX) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "message larger than 2 GiB");
        return nullptr;
    }
    int r;
    Py_BEGIN_ALLOW_THREADS r = UDT::sendmsg(u, static_cast<const char*>(buf.buf), int(buf.len), ttl, inorder != 0);
    Py_END_ALLOW_THREADS PyBuffer_Release(&buf);
    if (r == UDT::ERROR) {
        if (UDT::getlasterror_code() == CUDTException::ETIMEOUT ||
            UDT::getlasterror_code() == CUDTException::EASYNCSND) {
            UDT::getlasterror().clear();
            return PyLong_FromLong(0);
        }
        return raise_udt("sendmsg");
    }
    return PyLong_FromLong(r);
}

// recvmsg_into(u, buffer) -> size of the message, or None when the receive timeout expired.
// A message longer than the buffer is truncated by UDT; callers size the buffer one byte
// larger than anything legal and treat a full buffer as an oversized message.
static PyObject* py_recvmsg_into(PyObject*, PyObject* args) {
    int u;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iw*", &u, &buf)) return nullptr;
    int len = buf.len > INT32_MAX ? INT32_MAX : int(buf.len);
    int r;
    Py_BEGIN_ALLOW_THREADS r = UDT::recvmsg(u, static_cast<char*>(buf.buf), len);
    Py_END_ALLOW_THREADS PyBuffer_Release(&buf);
    if (r == UDT::ERROR) {
        if (UDT::getlasterror_code() == CUDTException::ETIMEOUT ||
            UDT::getlasterror_code() == CUDTException::EASYNCRCV) {
            UDT::getlasterror().clear();
            Py_RETURN_NONE;
        }
        return raise_udt("recvmsg");
    }
    return PyLong_FromLong(r);
}

static PyObject* py_state(PyObject*, PyObject* args) {
    int u;
    if (!PyArg_ParseTuple(args, "i", &u)) return nullptr;
    return PyLong_FromLong(without_gil([&] { return int(UDT::getsockstate(u)); }));
}

static PyObject* py_perfmon(PyObject*, PyObject* args) {
    int u, clear = 0;
    if (!PyArg_ParseTuple(args, "i|p", &u, &clear)) return nullptr;
    UDT::TRACEINFO t;
    int r;
    Py_BEGIN_ALLOW_THREADS r = UDT::perfmon(u, &t, clear != 0);
    Py_END_ALLOW_THREADS if (r == UDT::ERROR) return raise_udt("perfmon");
    return Py_BuildValue(
        "{s:L,s:L,s:L,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:L,"
        "s:L,s:L,s:i,s:i,s:i,s:d,s:d,"
        "s:d,s:i,s:i,s:i,s:d,s:d,s:i,s:i}",
        "ms_timestamp", (long long)t.msTimeStamp, "pkt_sent_total", (long long)t.pktSentTotal,
        "pkt_recv_total", (long long)t.pktRecvTotal, "pkt_snd_loss_total", t.pktSndLossTotal,
        "pkt_rcv_loss_total", t.pktRcvLossTotal, "pkt_retrans_total", t.pktRetransTotal,
        "pkt_sent_ack_total", t.pktSentACKTotal, "pkt_recv_ack_total", t.pktRecvACKTotal,
        "pkt_sent_nak_total", t.pktSentNAKTotal, "pkt_recv_nak_total", t.pktRecvNAKTotal,
        "us_snd_duration_total", (long long)t.usSndDurationTotal,
        "pkt_sent", (long long)t.pktSent, "pkt_recv", (long long)t.pktRecv, "pkt_snd_loss", t.pktSndLoss,
        "pkt_rcv_loss", t.pktRcvLoss, "pkt_retrans", t.pktRetrans, "mbps_send_rate", t.mbpsSendRate,
        "mbps_recv_rate", t.mbpsRecvRate,
        "us_pkt_snd_period", t.usPktSndPeriod, "pkt_flow_window", t.pktFlowWindow,
        "pkt_congestion_window", t.pktCongestionWindow, "pkt_flight_size", t.pktFlightSize,
        "ms_rtt", t.msRTT, "mbps_bandwidth", t.mbpsBandwidth, "byte_avail_snd_buf", t.byteAvailSndBuf,
        "byte_avail_rcv_buf", t.byteAvailRcvBuf);
}

// --- congestion control selection ----------------------------------------------------------------

// set_cc(u, name, **params): "udt" keeps UDT's stock DAIMD; "lu2k-rate" installs Lu2kRateCC.
// Must be called before connect/listen; accepted sockets inherit the listener's choice.
static PyObject* py_set_cc(PyObject*, PyObject* args, PyObject* kwargs) {
    int u;
    const char* name;
    if (!PyArg_ParseTuple(args, "is", &u, &name)) return nullptr;
    int r;
    if (std::strcmp(name, "udt") == 0) {
        if (kwargs && PyDict_Size(kwargs) > 0) {
            PyErr_SetString(PyExc_ValueError, "congestion control 'udt' takes no parameters");
            return nullptr;
        }
        // UDT's own DAIMD (CUDTCC) is what every fresh socket has; libudt does not export
        // its class, so "udt" means "leave the socket as it is".
        r = 0;
    } else if (std::strcmp(name, "lu2k-rate") == 0) {
        RateParams p;
        double cwnd = 0;
        if (!parse_params(kwargs, &p, &cwnd)) return nullptr;
        Lu2kRateFactory f(p, cwnd);
        r = without_gil([&] { return UDT::setsockopt(u, 0, UDT_CC, &f, sizeof(f)); });
    } else {
        PyErr_Format(PyExc_ValueError, "unknown congestion control %s (known: udt, lu2k-rate)", name);
        return nullptr;
    }
    if (r == UDT::ERROR) return raise_udt("set_cc");
    Py_RETURN_NONE;
}

// cc_state(u) -> dict of the lu2k-rate control's state, or None under UDT's own control.
static PyObject* py_cc_state(PyObject*, PyObject* args) {
    int u;
    if (!PyArg_ParseTuple(args, "i", &u)) return nullptr;
    CCC* cc = nullptr;
    int len = sizeof(cc);
    if (without_gil([&] { return UDT::getsockopt(u, 0, UDT_CC, &cc, &len); }) == UDT::ERROR) return raise_udt("cc_state");
    std::shared_ptr<CcSnapshot> snap;
    {
        std::lock_guard<std::mutex> g(g_snapshots_mu);
        auto it = g_snapshots.find(cc);
        if (it != g_snapshots.end()) snap = it->second;
    }
    if (!snap) Py_RETURN_NONE;  // UDT's own control (or the connection just ended)
    std::lock_guard<std::mutex> g(snap->mu);
    const CcSnapshot& s = *snap;
    return Py_BuildValue(
        "{s:s,s:d,s:d,s:d,s:d,s:d,s:L,s:L,s:O,s:d,s:O,s:d,s:L,s:L,s:L,s:d,s:L,s:L}",
        "cc", "lu2k-rate", "rate_mbit", s.rate_bps / 1e6, "min_rtt_ms", s.min_rtt_us / 1e3, "srtt_ms", s.srtt_us / 1e3,
        "loss_fraction", s.loss, "bw_estimate_mbit", s.bw_bps / 1e6, "backoffs", (long long)s.backoffs,
        "timeouts", (long long)s.timeouts, "probing", s.probing ? Py_True : Py_False, "target_mbit", s.target_bps / 1e6,
        "rtt_settled", s.settled ? Py_True : Py_False, "rto_ms", s.rto_us / 1e3, "renaks", (long long)s.renaks,
        "missing", (long long)s.missing, "consecutive_timeouts", (long long)s.consecutive_timeouts,
        "silent_s", s.last_feedback_us ? double(monotonic_us() - s.last_feedback_us) / 1e6 : 0.0,
        "probes", (long long)s.probes, "probes_answered", (long long)s.probes_answered);
}

// --- UDT epoll -------------------------------------------------------------------------------------

static PyObject* py_epoll_create(PyObject*, PyObject*) {
    int eid = without_gil([] { return UDT::epoll_create(); });
    if (eid < 0) return raise_udt("epoll_create");
    return PyLong_FromLong(eid);
}

static PyObject* py_epoll_add(PyObject*, PyObject* args) {
    int eid, u, events = UDT_EPOLL_IN | UDT_EPOLL_ERR;
    if (!PyArg_ParseTuple(args, "ii|i", &eid, &u, &events)) return nullptr;
    if (without_gil([&] { return UDT::epoll_add_usock(eid, u, &events); }) == UDT::ERROR) return raise_udt("epoll_add");
    Py_RETURN_NONE;
}

static PyObject* py_epoll_remove(PyObject*, PyObject* args) {
    int eid, u;
    if (!PyArg_ParseTuple(args, "ii", &eid, &u)) return nullptr;
    if (without_gil([&] { return UDT::epoll_remove_usock(eid, u); }) == UDT::ERROR) return raise_udt("epoll_remove");
    Py_RETURN_NONE;
}

static PyObject* set_to_list(const std::set<UDTSOCKET>& s) {
    PyObject* l = PyList_New(0);
    if (!l) return nullptr;
    for (UDTSOCKET u : s) {
        PyObject* v = PyLong_FromLong(u);
        if (!v || PyList_Append(l, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(l);
            return nullptr;
        }
        Py_DECREF(v);
    }
    return l;
}

// epoll_wait(eid, timeout_ms) -> (readable, writable); both empty on timeout.
static PyObject* py_epoll_wait(PyObject*, PyObject* args) {
    int eid;
    long long timeout;
    if (!PyArg_ParseTuple(args, "iL", &eid, &timeout)) return nullptr;
    std::set<UDTSOCKET> rd, wr;
    int r;
    Py_BEGIN_ALLOW_THREADS r = UDT::epoll_wait(eid, &rd, &wr, timeout);
    Py_END_ALLOW_THREADS if (r < 0) {
        if (UDT::getlasterror_code() == CUDTException::ETIMEOUT) {
            UDT::getlasterror().clear();
            rd.clear();
            wr.clear();
        } else {
            return raise_udt("epoll_wait");
        }
    }
    PyObject* a = set_to_list(rd);
    PyObject* b = a ? set_to_list(wr) : nullptr;
    if (!b) {
        Py_XDECREF(a);
        return nullptr;
    }
    return Py_BuildValue("(NN)", a, b);
}

static PyObject* py_epoll_release(PyObject*, PyObject* args) {
    int eid;
    if (!PyArg_ParseTuple(args, "i", &eid)) return nullptr;
    if (UDT::epoll_release(eid) == UDT::ERROR) return raise_udt("epoll_release");
    Py_RETURN_NONE;
}

// --- RateLaw: the pure control law, for tests with a fake clock ------------------------------------

typedef struct {
    PyObject_HEAD RateLaw* law;
} RateLawObject;

static int RateLaw_init(RateLawObject* self, PyObject* args, PyObject* kwargs) {
    if (PyTuple_Size(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "RateLaw takes keyword arguments only");
        return -1;
    }
    RateParams p;
    double cwnd = 0;
    if (!parse_params(kwargs, &p, &cwnd)) return -1;
    delete self->law;
    self->law = new RateLaw(p);
    return 0;
}

static void RateLaw_dealloc(RateLawObject* self) {
    delete self->law;
    Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

static PyObject* RateLaw_on_sent(RateLawObject* self, PyObject* args) {
    long long n;
    if (!PyArg_ParseTuple(args, "L", &n)) return nullptr;
    self->law->on_sent(n);
    Py_RETURN_NONE;
}

static PyObject* RateLaw_on_loss(RateLawObject* self, PyObject* args) {
    long long n;
    if (!PyArg_ParseTuple(args, "L", &n)) return nullptr;
    self->law->on_loss(n);
    Py_RETURN_NONE;
}

static PyObject* RateLaw_on_ack(RateLawObject* self, PyObject* args) {
    unsigned long long now;
    double rtt, bw = 0, arrival = 0;
    if (!PyArg_ParseTuple(args, "Kd|dd", &now, &rtt, &bw, &arrival)) return nullptr;
    self->law->on_ack(now, rtt, bw, arrival);
    Py_RETURN_NONE;
}

static PyObject* RateLaw_on_timeout(RateLawObject* self, PyObject*) {
    self->law->on_timeout();
    Py_RETURN_NONE;
}

static PyObject* RateLaw_period_us(RateLawObject* self, PyObject* args) {
    int packet = 1500;
    if (!PyArg_ParseTuple(args, "|i", &packet)) return nullptr;
    return PyFloat_FromDouble(self->law->period_us(packet));
}

static PyObject* RateLaw_get_rate(RateLawObject* self, void*) { return PyFloat_FromDouble(self->law->rate_bps()); }
static PyObject* RateLaw_get_min_rtt(RateLawObject* self, void*) { return PyFloat_FromDouble(self->law->min_rtt_us()); }
static PyObject* RateLaw_get_rto(RateLawObject* self, void*) { return PyFloat_FromDouble(self->law->rto_us()); }
static PyObject* RateLaw_get_settled(RateLawObject* self, void*) { return PyBool_FromLong(self->law->settled()); }
static PyObject* RateLaw_get_backoffs(RateLawObject* self, void*) { return PyLong_FromLongLong(self->law->backoffs()); }
static PyObject* RateLaw_get_loss(RateLawObject* self, void*) {
    return PyFloat_FromDouble(self->law->last_loss_fraction());
}

static PyMethodDef RateLaw_methods[] = {
    {"on_sent", (PyCFunction)RateLaw_on_sent, METH_VARARGS, "on_sent(packets)"},
    {"on_loss", (PyCFunction)RateLaw_on_loss, METH_VARARGS, "on_loss(packets)"},
    {"on_ack", (PyCFunction)RateLaw_on_ack, METH_VARARGS, "on_ack(now_us, srtt_us, bw_bps=0, arrival_bps=0)"},
    {"on_timeout", (PyCFunction)RateLaw_on_timeout, METH_NOARGS, "on_timeout()"},
    {"period_us", (PyCFunction)RateLaw_period_us, METH_VARARGS, "period_us(packet_bytes=1500)"},
    {nullptr, nullptr, 0, nullptr},
};

static PyGetSetDef RateLaw_getset[] = {
    {"rate_bps", (getter)RateLaw_get_rate, nullptr, "current pacing rate, bits/s", nullptr},
    {"min_rtt_us", (getter)RateLaw_get_min_rtt, nullptr, "windowed minimum RTT", nullptr},
    {"backoffs", (getter)RateLaw_get_backoffs, nullptr, "congestion backoffs so far", nullptr},
    {"rto_us", (getter)RateLaw_get_rto, nullptr, "retransmission timeout handed to UDT", nullptr},
    {"rtt_settled", (getter)RateLaw_get_settled, nullptr, "whether RTT inflation is being judged yet", nullptr},
    {"last_loss_fraction", (getter)RateLaw_get_loss, nullptr, "loss fraction of the last interval", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

static PyTypeObject RateLawType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// --- PacketAuth: the guard on bytes, for tests ----------------------------------------------------

typedef struct {
    PyObject_HEAD packet_auth::PacketGuard* guard;
} PacketAuthObject;

static constexpr int kBytesChannel = 0;  // PacketAuth's guard has this one channel

static int PacketAuth_init(PacketAuthObject* self, PyObject* args, PyObject* kwargs) {
    static const char* kwlist[] = {"key", nullptr};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*", const_cast<char**>(kwlist), &key)) return -1;
    if (key.len != 16) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "a packet key is 16 bytes, got %zd", key.len);
        return -1;
    }
    packet_auth::Key k = packet_auth::Key::from_bytes(static_cast<const uint8_t*>(key.buf));
    PyBuffer_Release(&key);
    delete self->guard;
    self->guard = new packet_auth::PacketGuard();
    self->guard->key_channel(kBytesChannel, &k);
    return 0;
}

static void PacketAuth_dealloc(PacketAuthObject* self) {
    delete self->guard;
    Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

static bool PacketAuth_ready(PacketAuthObject* self) {
    if (self->guard == nullptr) PyErr_SetString(PyExc_RuntimeError, "PacketAuth not initialised");
    return self->guard != nullptr;
}

// seal(datagram) -> the datagram as sent, trailer appended.
static PyObject* PacketAuth_seal(PacketAuthObject* self, PyObject* args) {
    Py_buffer d;
    if (!PacketAuth_ready(self) || !PyArg_ParseTuple(args, "y*", &d)) return nullptr;
    if (d.len < Py_ssize_t(packet_auth::kHeader)) {
        PyBuffer_Release(&d);
        PyErr_Format(PyExc_ValueError, "a UDT packet has a 16-byte header; got %zd bytes", d.len);
        return nullptr;
    }
    char* p = static_cast<char*>(d.buf);
    iovec iov[2] = {{p, packet_auth::kHeader}, {p + packet_auth::kHeader, size_t(d.len) - packet_auth::kHeader}};
    sockaddr_in to{};
    to.sin_family = AF_INET;
    uint8_t trailer[packet_auth::kTrailer];
    bool sealed = self->guard->seal(kBytesChannel, reinterpret_cast<sockaddr*>(&to), sizeof(to), iov, 2, trailer);
    PyObject* out = PyBytes_FromStringAndSize(nullptr, d.len + (sealed ? Py_ssize_t(sizeof(trailer)) : 0));
    if (out) {
        std::memcpy(PyBytes_AS_STRING(out), p, size_t(d.len));
        if (sealed) std::memcpy(PyBytes_AS_STRING(out) + d.len, trailer, sizeof(trailer));
    }
    PyBuffer_Release(&d);
    return out;
}

// open(datagram, room=-1) -> what libudt would be handed, or None if it is dropped.  room:
// the size of libudt's data buffer (default: exactly the datagram's, after the header).
static PyObject* PacketAuth_open(PacketAuthObject* self, PyObject* args, PyObject* kwargs) {
    static const char* kwlist[] = {"datagram", "room", nullptr};
    Py_buffer d;
    Py_ssize_t room = -1;
    if (!PacketAuth_ready(self) ||
        !PyArg_ParseTupleAndKeywords(args, kwargs, "y*|n", const_cast<char**>(kwlist), &d, &room))
        return nullptr;
    size_t n = size_t(d.len);
    size_t head = std::min(n, packet_auth::kHeader);
    size_t data_room = room >= 0 ? size_t(room) : n - head;
    // Laid out as a read by libudt would leave it: header, data buffer, spare; the rest is lost.
    std::vector<uint8_t> buf(packet_auth::kHeader + data_room + packet_auth::kTrailer);
    n = std::min(n, buf.size());
    std::memcpy(buf.data(), d.buf, n);
    PyBuffer_Release(&d);
    iovec iov[3] = {{buf.data(), packet_auth::kHeader},
                    {buf.data() + packet_auth::kHeader, data_room},
                    {buf.data() + packet_auth::kHeader + data_room, packet_auth::kTrailer}};
    bool cut;
    long len = self->guard->deliver(kBytesChannel, iov, n, &cut);
    if (len < 0) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(buf.data()), Py_ssize_t(len));
}

static PyObject* PacketAuth_socket_stats(PacketAuthObject* self, PyObject* args) {
    int id;
    if (!PacketAuth_ready(self) || !PyArg_ParseTuple(args, "i", &id)) return nullptr;
    return counts_dict(self->guard->socket_counts(id));
}

static PyObject* PacketAuth_get_totals(PacketAuthObject* self, void*) {
    if (!PacketAuth_ready(self)) return nullptr;
    return counts_dict(self->guard->totals());
}

static PyMethodDef PacketAuth_methods[] = {
    {"seal", (PyCFunction)PacketAuth_seal, METH_VARARGS, "seal(datagram) -> datagram as sent, trailer appended"},
    {"open", (PyCFunction)(void (*)(void))PacketAuth_open, METH_VARARGS | METH_KEYWORDS,
     "open(datagram, room=-1) -> what libudt gets, or None if dropped"},
    {"socket_stats", (PyCFunction)PacketAuth_socket_stats, METH_VARARGS, "socket_stats(id) -> {authenticated, forged, replayed}"},
    {nullptr, nullptr, 0, nullptr},
};

static PyGetSetDef PacketAuth_getset[] = {
    {"totals", (getter)PacketAuth_get_totals, nullptr, "{authenticated, forged, replayed} over every packet opened", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

static PyTypeObject PacketAuthType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// --- module --------------------------------------------------------------------------------------

static PyMethodDef methods[] = {
    {"socket", py_socket, METH_VARARGS, "socket(family=AF_INET, stream=False) -> UDT socket id"},
    {"bind", py_bind, METH_VARARGS, "bind(u, host, port)"},
    {"bind_udp", py_bind_udp, METH_VARARGS, "bind_udp(u, fd): use this bound UDP socket (libudt owns it from now on)"},
    {"listen", py_listen, METH_VARARGS, "listen(u, backlog=64)"},
    {"accept", py_accept, METH_VARARGS, "accept(u) -> (u2, (host, port)); blocks without the GIL"},
    {"connect", py_connect, METH_VARARGS, "connect(u, host, port); blocks without the GIL"},
    {"close", py_close, METH_VARARGS, "close(u)"},
    {"getsockname", py_getsockname, METH_VARARGS, "getsockname(u) -> (host, port)"},
    {"getpeername", py_getpeername, METH_VARARGS, "getpeername(u) -> (host, port)"},
    {"setsockopt", py_setsockopt, METH_VARARGS, "setsockopt(u, name, value)"},
    {"getsockopt", py_getsockopt, METH_VARARGS, "getsockopt(u, name) -> int|bool"},
    {"sendmsg", py_sendmsg, METH_VARARGS, "sendmsg(u, data, ttl_ms=-1, inorder=True) -> bytes sent (0: timed out)"},
    {"recvmsg_into", py_recvmsg_into, METH_VARARGS, "recvmsg_into(u, buffer) -> size, or None on timeout"},
    {"state", py_state, METH_VARARGS, "state(u) -> UDTSTATUS"},
    {"perfmon", py_perfmon, METH_VARARGS, "perfmon(u, clear=False) -> dict (UDT::perfmon)"},
    {"set_cc", (PyCFunction)(void (*)(void))py_set_cc, METH_VARARGS | METH_KEYWORDS,
     "set_cc(u, name, **params): 'udt' or 'lu2k-rate'"},
    {"cc_state", py_cc_state, METH_VARARGS, "cc_state(u) -> dict or None"},
    {"set_packet_key", py_set_packet_key, METH_VARARGS, "set_packet_key(u, key16): authenticate u's packets (before bind/connect)"},
    {"packet_auth_stats", py_packet_auth_stats, METH_VARARGS, "packet_auth_stats(u) -> {authenticated, forged, replayed}"},
    {"packet_auth_totals", py_packet_auth_totals, METH_NOARGS, "packet_auth_totals() -> {authenticated, forged, replayed}"},
    {"epoll_create", py_epoll_create, METH_NOARGS, "epoll_create() -> eid"},
    {"epoll_add", py_epoll_add, METH_VARARGS, "epoll_add(eid, u, events=IN|ERR)"},
    {"epoll_remove", py_epoll_remove, METH_VARARGS, "epoll_remove(eid, u)"},
    {"epoll_wait", py_epoll_wait, METH_VARARGS, "epoll_wait(eid, timeout_ms) -> (readable, writable)"},
    {"epoll_release", py_epoll_release, METH_VARARGS, "epoll_release(eid)"},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_udtcore", "lu2k's binding of libudt (UDT 4) with its own congestion control.", -1, methods,
};

PyMODINIT_FUNC PyInit__udtcore(void) {
    RateLawType.tp_name = "lu2k.backends._udtcore.RateLaw";
    RateLawType.tp_basicsize = sizeof(RateLawObject);
    RateLawType.tp_flags = Py_TPFLAGS_DEFAULT;
    RateLawType.tp_doc = "The lu2k-rate congestion control law, driven by hand (fake clock).";
    RateLawType.tp_new = PyType_GenericNew;
    RateLawType.tp_init = (initproc)RateLaw_init;
    RateLawType.tp_dealloc = (destructor)RateLaw_dealloc;
    RateLawType.tp_methods = RateLaw_methods;
    RateLawType.tp_getset = RateLaw_getset;
    if (PyType_Ready(&RateLawType) < 0) return nullptr;
    PacketAuthType.tp_name = "lu2k.backends._udtcore.PacketAuth";
    PacketAuthType.tp_basicsize = sizeof(PacketAuthObject);
    PacketAuthType.tp_flags = Py_TPFLAGS_DEFAULT;
    PacketAuthType.tp_doc = "The packet authentication of one keyed channel, on bytes (packet_auth.h).";
    PacketAuthType.tp_new = PyType_GenericNew;
    PacketAuthType.tp_init = (initproc)PacketAuth_init;
    PacketAuthType.tp_dealloc = (destructor)PacketAuth_dealloc;
    PacketAuthType.tp_methods = PacketAuth_methods;
    PacketAuthType.tp_getset = PacketAuth_getset;
    if (PyType_Ready(&PacketAuthType) < 0) return nullptr;

    if (UDT::startup() == UDT::ERROR) return raise_udt("startup");
    PyObject* m = PyModule_Create(&moduledef);
    if (!m) return nullptr;
    UDTErrorType = PyErr_NewExceptionWithDoc(
        "lu2k.backends._udtcore.UDTError", "A libudt call failed: args are (code, message).",
        PyExc_Exception, nullptr);
    if (!UDTErrorType || PyModule_AddObject(m, "UDTError", UDTErrorType) < 0) return nullptr;
    Py_INCREF(UDTErrorType);
    Py_INCREF(&RateLawType);
    if (PyModule_AddObject(m, "RateLaw", reinterpret_cast<PyObject*>(&RateLawType)) < 0) return nullptr;
    Py_INCREF(&PacketAuthType);
    if (PyModule_AddObject(m, "PacketAuth", reinterpret_cast<PyObject*>(&PacketAuthType)) < 0) return nullptr;
    PyModule_AddIntConstant(m, "PACKET_TRAILER_SIZE", int(packet_auth::kTrailer));
    PyModule_AddIntConstant(m, "EPOLL_IN", UDT_EPOLL_IN);
    PyModule_AddIntConstant(m, "EPOLL_OUT", UDT_EPOLL_OUT);
    PyModule_AddIntConstant(m, "EPOLL_ERR", UDT_EPOLL_ERR);
    PyModule_AddIntConstant(m, "CONNECTING", CONNECTING);
    PyModule_AddIntConstant(m, "CONNECTED", CONNECTED);
    PyModule_AddIntConstant(m, "BROKEN", BROKEN);
    PyModule_AddIntConstant(m, "CLOSED", CLOSED);
    PyModule_AddIntConstant(m, "NONEXIST", NONEXIST);
    PyModule_AddIntConstant(m, "E_NOSERVER", CUDTException::ENOSERVER);
    PyModule_AddIntConstant(m, "E_CONNREJ", CUDTException::ECONNREJ);
    PyModule_AddIntConstant(m, "E_CONNSETUP", CUDTException::ECONNSETUP);
    PyModule_AddIntConstant(m, "E_CONNLOST", CUDTException::ECONNLOST);
    PyModule_AddIntConstant(m, "E_NOCONN", CUDTException::ENOCONN);
    PyModule_AddIntConstant(m, "E_INVSOCK", CUDTException::EINVSOCK);
    PyModule_AddIntConstant(m, "E_LARGEMSG", CUDTException::ELARGEMSG);
    PyModule_AddIntConstant(m, "E_TIMEOUT", CUDTException::ETIMEOUT);
    PyModule_AddIntConstant(m, "E_SOCKFAIL", CUDTException::ESOCKFAIL);
    PyModule_AddIntConstant(m, "E_INVPARAM", CUDTException::EINVPARAM);
    PyModule_AddIntConstant(m, "E_DUPLISTEN", CUDTException::EDUPLISTEN);
    return m;
}
