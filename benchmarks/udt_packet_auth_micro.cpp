// What packet authentication costs per UDT packet: the work lu2k's wrapped sendmsg/recvmsg
// add (lu2k/backends/_udt/packet_auth.h), without the system calls, next to one real
// loopback UDP sendmsg + recvmsg of the same size for scale.  Built and run by
// udt_packet_auth_micro.py; prints nanoseconds per packet, best of 7 runs.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "packet_auth.h"

using packet_auth::kHeader;
using packet_auth::kTrailer;

static double best_ns(int n, const std::function<void()>& body) {
    double best = 1e18;
    for (int rep = 0; rep < 7; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < n; ++i) body();
        double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / n;
        if (ns < best) best = ns;
    }
    return best;
}

struct Packet {
    std::vector<uint8_t> bytes;  // header, body, then room for the trailer
    size_t body;
    Packet(bool control, size_t body_len) : bytes(kHeader + body_len + kTrailer), body(body_len) {
        uint32_t words[4] = {htonl(control ? 0x80020000u : 12345u), htonl(0xC0000001u), htonl(77u), htonl(4242u)};
        std::memcpy(bytes.data(), words, kHeader);
        for (size_t i = 0; i < body_len; ++i) bytes[kHeader + i] = uint8_t(i);
    }
};

int main() {
    packet_auth::Key key = packet_auth::Key::from_bytes(reinterpret_cast<const uint8_t*>("0123456789abcdef"));
    const int kSender = 3, kReceiver = 4;  // channel ids: any numbers will do, no socket is touched
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(9000);
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const int n = 2000000;

    std::printf("%-44s %10s\n", "per packet", "ns");
    for (auto [name, control, body] : {std::tuple{"data packet, 1456-byte payload", false, size_t(1456)},
                                       std::tuple{"ACK (24 bytes of fields)", true, size_t(24)},
                                       std::tuple{"NAK (1400 bytes of loss list)", true, size_t(1400)}}) {
        packet_auth::PacketGuard sender, receiver;
        sender.key_channel(kSender, &key);
        receiver.key_channel(kReceiver, &key);
        Packet p(control, body);
        iovec out[2] = {{p.bytes.data(), kHeader}, {p.bytes.data() + kHeader, body}};
        uint8_t* trailer = p.bytes.data() + kHeader + body;
        double seal = best_ns(n, [&] { sender.seal(kSender, reinterpret_cast<sockaddr*>(&to), sizeof(to), out, 2, trailer); });
        // Receiving: a fresh counter each time (a replay would be refused early), as libudt lays it out.
        std::vector<std::vector<uint8_t>> sealed;
        for (int i = 0; i < 4096; ++i) {
            sender.seal(kSender, reinterpret_cast<sockaddr*>(&to), sizeof(to), out, 2, trailer);
            sealed.push_back(p.bytes);
        }
        size_t next = 0;
        long total = 0;
        double open = best_ns(n, [&] {
            std::vector<uint8_t>& d = sealed[next++ % sealed.size()];
            if (next % sealed.size() == 0) receiver.forget_socket(4242);  // start the window again
            iovec in[3] = {{d.data(), kHeader}, {d.data() + kHeader, body}, {d.data() + kHeader + body, kTrailer}};
            bool cut;
            total += receiver.deliver(kReceiver, in, d.size(), &cut);
        });
        if (total <= 0) std::printf("(nothing was delivered: the measurement is wrong)\n");
        std::printf("%-44s %10.1f\n", (std::string(name) + ": seal").c_str(), seal);
        std::printf("%-44s %10.1f\n", (std::string(name) + ": check").c_str(), open);
    }

    // For scale: the system calls every packet costs anyway.
    int tx = socket(AF_INET, SOCK_DGRAM, 0), rx = socket(AF_INET, SOCK_DGRAM, 0);
    sockaddr_in at{};
    at.sin_family = AF_INET;
    at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(at);
    if (bind(rx, reinterpret_cast<sockaddr*>(&at), sizeof(at)) != 0 || getsockname(rx, reinterpret_cast<sockaddr*>(&at), &len) != 0)
        return 1;
    std::vector<uint8_t> dgram(kHeader + 1456 + kTrailer), back(dgram.size());
    double syscalls = best_ns(200000, [&] {
        sendto(tx, dgram.data(), dgram.size(), 0, reinterpret_cast<sockaddr*>(&at), sizeof(at));
        recv(rx, back.data(), back.size(), 0);
    });
    std::printf("%-44s %10.1f\n", "loopback UDP sendto + recv, 1488 bytes", syscalls);
    close(tx);
    close(rx);
    return 0;
}
