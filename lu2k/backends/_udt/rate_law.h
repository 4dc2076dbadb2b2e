// lu2k's loss-tolerant, rate-based congestion control law -- the pure part.
//
// No UDT, no clock, no threads: times come in as microseconds, counts as packets, and the
// output is a sending rate.  The UDT glue (Lu2kRateCC in udtcore.cpp) feeds it from UDT's
// CCC callbacks; the Python type _udtcore.RateLaw feeds it from tests with a fake clock.
//
// Theory of operation.  On a GEO hop most losses are random (rain fade, bit errors), not
// a full queue, so a loss says nothing about the sending rate.  UDT's stock DAIMD control
// cuts on every loss event and never gets back to the link rate at 600 ms RTT.  This law
// instead:
//
//   * paces at a rate: the site's configured link rate when the profile gives one (there is
//     nothing to discover), otherwise it probes multiplicatively each control interval;
//   * ignores losses up to `heavy_loss` (a fraction of the packets sent in an interval):
//     they are repaired by UDT's NAK retransmissions without slowing down;
//   * treats *sustained RTT inflation* -- the smoothed RTT above the windowed minimum by
//     more than max(rtt_slack * min_rtt, rtt_slack_min_us) for `inflation_intervals`
//     consecutive intervals -- as the sign of a queue building somewhere (a shared or
//     slower bottleneck) and multiplies the rate by `backoff`, or, when probing (no
//     target) and the receiver's measured arrival rate is known, drops to `drain` x that
//     rate (the bottleneck's delivery rate while a queue stands), so the queue empties
//     within about a round trip -- but never below half the current rate in one step;
//   * treats heavy loss the same way (a shallow tail-drop queue overflows before the RTT
//     shows it);
//   * after a backoff waits one interval for the effect to show, then recovers additively
//     (`recover` x target per interval) up to the target, or keeps probing upwards when
//     no target is known;
//   * on a retransmission timeout (nothing acknowledged for a long time) halves the rate;
//     the timeout itself is max(min_rto_us, 2 x max(smoothed RTT, rtt_hint_us) + 100 ms),
//     so a 600 ms path does not time out before its first ACK can possibly arrive
//     (libudt's own first guess is a 100 ms RTT), nor between two of the receiver's
//     repeated NAKs chasing a lost retransmission (1.25 RTT + 30 ms apart, see
//     udtcore.cpp) -- libudt's timeout re-sends the whole flight -- yet a lost tail
//     (nothing after it to reveal the hole) is repaired within about two round trips;
//   * only starts judging RTT inflation once the smoothed RTT has settled (two intervals
//     within 5 % of each other, or 20 intervals at most): UDT's RTT starts at 100 ms and
//     is smoothed twice (receiver and sender), so on GEO it climbs for seconds, and a
//     minimum taken during that climb would make every later RTT look like a queue.
//
// The control interval is max(smoothed RTT, min_interval_us): decisions are made once per
// round trip, when the consequences of the previous one have been seen.

#ifndef LU2K_RATE_LAW_H
#define LU2K_RATE_LAW_H

#include <algorithm>
#include <cmath>
#include <cstdint>

struct RateParams {
    double target_bps = 0.0;         // configured link rate (wire bits/s); 0: unknown, probe
    double start_bps = 2e6;          // first rate when probing
    double min_bps = 256e3;          // never pace slower than this
    double max_bps = 10e9;           // never pace faster than this
    double rtt_slack = 0.20;         // queueing tolerated, as a fraction of the minimum RTT
    double rtt_slack_min_us = 15000; // ... but at least this much (LAN RTTs jitter)
    int inflation_intervals = 2;     // consecutive inflated intervals before backing off
    double heavy_loss = 0.10;        // loss fraction per interval treated as congestion
    double backoff = 0.85;           // multiplicative decrease on congestion
    double recover = 0.05;           // additive increase per interval (fraction of target)
    double probe_gain = 1.25;        // multiplicative increase per interval when probing
    double drain = 0.9;              // on inflation: pace at this share of the arrival rate
    double min_interval_us = 50000;  // shortest control interval
    double rtt_window_us = 30e6;     // min-RTT window (two halves of this, rolled)
    double rtt_hint_us = 0;          // the operator's RTT for the path (site profile), 0: none
    double min_rto_us = 300000;      // retransmission timeout floor (libudt's own minimum)
};

class RateLaw {
public:
    explicit RateLaw(const RateParams& p) : p_(p) {
        p_.min_bps = std::max(1e3, p_.min_bps);
        p_.max_bps = std::max(p_.min_bps, p_.max_bps);
        if (p_.target_bps > 0) {
            p_.target_bps = clamp(p_.target_bps);
            rate_ = p_.target_bps;
        } else {
            rate_ = clamp(p_.start_bps);
        }
    }

    // Packets handed to the wire since the last call (first transmissions and retransmissions).
    void on_sent(int64_t packets) { sent_ += packets; }

    // Packets reported lost (a NAK's loss list, expanded).
    void on_loss(int64_t packets) { lost_ += packets; }

    // An ACK arrived carrying the (smoothed) RTT; runs the control once per interval.
    // bw_bps is the receiver's capacity estimate (packet pairs), arrival_bps the rate
    // packets arrive at the receiver; 0 when not known (yet).
    void on_ack(uint64_t now_us, double rtt_us, double bw_bps, double arrival_bps = 0) {
        consecutive_timeouts_ = 0;
        if (rtt_us <= 0) return;
        srtt_us_ = rtt_us;
        if (settled_) track_min_rtt(now_us, rtt_us);
        if (bw_bps > 0) bw_bps_ = bw_bps;
        if (arrival_bps > 0) arrival_bps_ = arrival_bps;
        if (interval_start_us_ == 0) {
            interval_start_us_ = now_us;
            return;
        }
        double interval = std::max(p_.min_interval_us, srtt_us_);
        if (double(now_us - interval_start_us_) < interval) return;
        if (!settled_) settle();
        control(now_us);
        interval_start_us_ = now_us;
        sent_ = 0;
        lost_ = 0;
    }

    // UDT's EXP timer fired with data outstanding: the path may be gone or badly congested.
    void on_timeout() {
        ++consecutive_timeouts_;
        rate_ = clamp(rate_ * 0.5);
        hold_ = 1;
        inflated_run_ = 0;
        ++timeouts_;
    }

    double rate_bps() const { return rate_; }
    // Backed off exponentially (x2 per consecutive timeout, at most x16) while nothing is
    // acknowledged: a path that is gone is not hammered.
    double rto_us() const { return base_rto_us() * double(1 << std::min(consecutive_timeouts_, 4)); }
    double base_rto_us() const { return std::max(p_.min_rto_us, 2.0 * std::max(srtt_us_, p_.rtt_hint_us) + 100000.0); }
    int consecutive_timeouts() const { return consecutive_timeouts_; }
    bool settled() const { return settled_; }
    double period_us(int packet_bytes) const { return packet_bytes * 8.0 * 1e6 / rate_; }
    double min_rtt_us() const { return min_rtt_us_; }
    double srtt_us() const { return srtt_us_; }
    double last_loss_fraction() const { return last_loss_; }
    double bw_estimate_bps() const { return bw_bps_; }
    int64_t backoffs() const { return backoffs_; }
    int64_t timeouts() const { return timeouts_; }
    bool probing() const { return p_.target_bps <= 0; }
    const RateParams& params() const { return p_; }

private:
    double clamp(double r) const { return std::min(p_.max_bps, std::max(p_.min_bps, r)); }

    void track_min_rtt(uint64_t now_us, double rtt_us) {
        // Two half-window minima, rolled: the minimum forgets a path that got longer
        // (a route change) within one window, yet a standing queue cannot hide it.
        if (window_start_us_ == 0 || double(now_us - window_start_us_) >= p_.rtt_window_us / 2) {
            prev_min_ = cur_min_;
            cur_min_ = rtt_us;
            window_start_us_ = now_us;
        } else {
            cur_min_ = std::min(cur_min_, rtt_us);
        }
        min_rtt_us_ = prev_min_ > 0 ? std::min(prev_min_, cur_min_) : cur_min_;
        // Never below the operator's RTT for the path: a path is not shorter than its
        // propagation delay, and UDT's smoothed RTT can pause part-way up its climb from the
        // 100 ms guess (no new samples while a connection is idle) long enough to look
        // settled.  On GEO that left min RTT at ~290 ms, every later 600 ms RTT looked like
        // a queue, and the rate was backed off to ~5 Mbit/s on a loss-free link.
        min_rtt_us_ = std::max(min_rtt_us_, p_.rtt_hint_us);
    }

    void settle() {
        ++settle_intervals_;
        if (last_srtt_ > 0 && std::abs(srtt_us_ - last_srtt_) <= 0.05 * last_srtt_)
            ++stable_intervals_;
        else
            stable_intervals_ = 0;
        last_srtt_ = srtt_us_;
        settled_ = stable_intervals_ >= 2 || settle_intervals_ >= 20;
    }

    void control(uint64_t) {
        last_loss_ = sent_ > 0 ? double(lost_) / double(sent_) : 0.0;
        if (hold_ > 0) {  // a decision is still travelling; judge it next interval
            --hold_;
            return;
        }
        double slack = std::max(p_.rtt_slack * min_rtt_us_, p_.rtt_slack_min_us);
        bool inflated = settled_ && min_rtt_us_ > 0 && srtt_us_ - min_rtt_us_ > slack;
        inflated_run_ = inflated ? inflated_run_ + 1 : 0;
        bool heavy = sent_ >= 20 && last_loss_ > p_.heavy_loss;
        if (inflated_run_ >= p_.inflation_intervals || heavy) {
            double next = rate_ * p_.backoff;
            // Probing overshoots an unknown bottleneck: drop to what actually arrives.  With a
            // configured target the excess is small (clock skew, a shared hop), and the
            // arrival rate of a sender that is briefly application-limited would be misread
            // as the bottleneck, so the plain multiplicative step is used.
            if (inflated && arrival_bps_ > 0 && p_.target_bps <= 0)
                next = std::max(rate_ * 0.5, std::min(next, arrival_bps_ * p_.drain));
            rate_ = clamp(next);
            ++backoffs_;
            backed_off_ = true;
            inflated_run_ = 0;
            hold_ = 1;
            return;
        }
        if (inflated) return;  // not yet sustained: neither cut nor push
        if (p_.target_bps > 0) {
            rate_ = clamp(std::min(p_.target_bps, rate_ + p_.recover * p_.target_bps));
        } else if (!backed_off_) {
            double next = rate_ * p_.probe_gain;
            // The receiver's packet-pair estimate bounds a blind probe: there is no point
            // in overshooting a bottleneck that has already been measured.
            if (bw_bps_ > 0) next = std::min(next, std::max(rate_, bw_bps_));
            rate_ = clamp(next);
        } else {
            rate_ = clamp(rate_ * (1.0 + p_.recover));
        }
    }

    RateParams p_;
    double rate_ = 0;
    double srtt_us_ = 0;
    double min_rtt_us_ = 0;
    double cur_min_ = 0;
    double prev_min_ = 0;
    uint64_t window_start_us_ = 0;
    uint64_t interval_start_us_ = 0;
    double bw_bps_ = 0;
    double arrival_bps_ = 0;
    int64_t sent_ = 0;
    int64_t lost_ = 0;
    double last_loss_ = 0;
    int inflated_run_ = 0;
    int hold_ = 0;
    bool backed_off_ = false;
    bool settled_ = false;
    int settle_intervals_ = 0;
    int stable_intervals_ = 0;
    double last_srtt_ = 0;
    int64_t backoffs_ = 0;
    int64_t timeouts_ = 0;
    int consecutive_timeouts_ = 0;
};

#endif
