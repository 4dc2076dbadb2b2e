/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * lu2k_endpoint.h -- a small C endpoint of the lu2k shim, on lu2k_shim.h and libc alone.
 *
 * Header-only (static functions), so that a program is one `cc -Icontrib prog.c`.  It does
 * what every endpoint needs: ATTACH over the SOCK_SEQPACKET control socket (region memfd and
 * the two eventfds in SCM_RIGHTS), mmap the region, ring index helpers with the ABI's
 * memory ordering, the need-wakeup handshake in both directions, and STATS / DETACH.
 * contrib/shim_demo.c (one message each way) and contrib/shim_stream.c (a stream of
 * messages, used by `lu2k bench loopback --app c`) are built on it.
 *
 * Every function prints what went wrong on stderr, prefixed with ep->prog, and returns -1.
 */
#ifndef LU2K_ENDPOINT_H
#define LU2K_ENDPOINT_H

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "lu2k_shim.h"

struct lu2k_endpoint {
	const char *prog;         /* prefix of error messages */
	int sock, kick_fd, notify_fd;
	uint8_t *base;
	size_t size;
	struct lu2k_attach att;
	uint32_t seq;
	uint32_t sub_head, comp_tail, dlv_tail, rel_head; /* our private copies of our indices */
	uint32_t kick_want;       /* daemon flag bits to test after our next publish */
};

static inline int lu2k_fail(const struct lu2k_endpoint *ep, const char *what)
{
	fprintf(stderr, "%s: %s: %s\n", ep->prog, what, strerror(errno));
	return -1;
}

static inline uint32_t *lu2k_ring_index(struct lu2k_endpoint *ep, int ring, int which)
{
	return (uint32_t *)(ep->base + ep->att.layout.rings[ring].ctrl + which);
}

static inline void *lu2k_ring_desc(struct lu2k_endpoint *ep, int ring, uint32_t index)
{
	const struct lu2k_ring_off *r = &ep->att.layout.rings[ring];
	return ep->base + r->descs + (uint64_t)(index & (r->entries - 1)) * r->desc_size;
}

static inline uint32_t *lu2k_flag_word(struct lu2k_endpoint *ep, size_t off)
{
	return (uint32_t *)(ep->base + off);
}

/* Descriptors the daemon has published on `ring` beyond our consumer copy `tail`. */
static inline uint32_t lu2k_ring_ready(struct lu2k_endpoint *ep, int ring, uint32_t tail)
{
	return __atomic_load_n(lu2k_ring_index(ep, ring, LU2K_RING_PRODUCER_OFF), __ATOMIC_ACQUIRE) - tail;
}

/* Free entries on a ring we produce, whose private producer copy is `head`. */
static inline uint32_t lu2k_ring_room(struct lu2k_endpoint *ep, int ring, uint32_t head)
{
	uint32_t consumer = __atomic_load_n(lu2k_ring_index(ep, ring, LU2K_RING_CONSUMER_OFF), __ATOMIC_ACQUIRE);
	return ep->att.layout.rings[ring].entries - (head - consumer);
}

/* Publish our submit producer index; the daemon is kicked at lu2k_kick_if_wanted(). */
static inline void lu2k_publish_submit(struct lu2k_endpoint *ep)
{
	__atomic_store_n(lu2k_ring_index(ep, LU2K_RING_SUBMIT, LU2K_RING_PRODUCER_OFF), ep->sub_head, __ATOMIC_RELEASE);
	ep->kick_want |= LU2K_FLAG_NEED_WAKEUP;
}

static inline void lu2k_publish_release(struct lu2k_endpoint *ep)
{
	__atomic_store_n(lu2k_ring_index(ep, LU2K_RING_RELEASE, LU2K_RING_PRODUCER_OFF), ep->rel_head, __ATOMIC_RELEASE);
	ep->kick_want |= LU2K_FLAG_NEED_WAKEUP_RELEASE;
}

/* After publishing on a ring the daemon consumes: fence, then kick only if it asked. */
static inline void lu2k_kick_if_wanted(struct lu2k_endpoint *ep)
{
	uint32_t want = ep->kick_want;

	if (!want)
		return;
	ep->kick_want = 0;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (__atomic_load_n(lu2k_flag_word(ep, LU2K_HDR_DAEMON_FLAGS), __ATOMIC_RELAXED) & want) {
		uint64_t one = 1;
		if (write(ep->kick_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
			lu2k_fail(ep, "kick");
	}
}

/* While we find work the daemon need not notify us: clear our NEED_WAKEUP bit. */
static inline void lu2k_busy(struct lu2k_endpoint *ep)
{
	uint32_t *flags = lu2k_flag_word(ep, LU2K_HDR_ENDPOINT_FLAGS);
	if (__atomic_load_n(flags, __ATOMIC_RELAXED))
		__atomic_store_n(flags, 0, __ATOMIC_RELEASE);
}

/*
 * Sleep until the daemon publishes on `ring` past `tail` (1), the daemon goes away (-1) or
 * `timeout_ms` pass (0).  Sets NEED_WAKEUP, fences and checks again before poll(), so a
 * publish between the check and the sleep is never missed (the daemon fences before it
 * reads our flag).
 */
static inline int lu2k_wait(struct lu2k_endpoint *ep, int ring, uint32_t tail, int timeout_ms)
{
	lu2k_kick_if_wanted(ep);
	for (;;) {
		__atomic_store_n(lu2k_flag_word(ep, LU2K_HDR_ENDPOINT_FLAGS), LU2K_FLAG_NEED_WAKEUP, __ATOMIC_RELEASE);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (lu2k_ring_ready(ep, ring, tail))
			return 1;
		struct pollfd p[2] = { { .fd = ep->notify_fd, .events = POLLIN }, { .fd = ep->sock, .events = POLLIN } };
		int n = poll(p, 2, timeout_ms);
		if (n < 0 && errno != EINTR)
			return lu2k_fail(ep, "poll");
		if (n == 0)
			return 0;
		if (p[1].revents) {
			char c;
			if (recv(ep->sock, &c, 1, MSG_DONTWAIT) == 0) {
				fprintf(stderr, "%s: daemon closed the shim socket\n", ep->prog);
				return -1;
			}
		}
		if (p[0].revents & POLLIN) {
			uint64_t v;
			if (read(ep->notify_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
				return lu2k_fail(ep, "read notify");
		}
	}
}

static inline int lu2k_ctl_send(struct lu2k_endpoint *ep, uint32_t cmd, const void *arg)
{
	uint8_t packet[sizeof(struct lu2k_ctl_hdr) + sizeof(struct lu2k_attach)];
	struct lu2k_ctl_hdr hdr = { .cmd = cmd, .seq = ++ep->seq };
	size_t n = LU2K_IOC_SIZE(cmd);

	memcpy(packet, &hdr, sizeof(hdr));
	if (n)
		memcpy(packet + sizeof(hdr), arg, n);
	return send(ep->sock, packet, sizeof(hdr) + n, 0) < 0 ? lu2k_fail(ep, "send command") : 0;
}

/* Receive one reply; copy its argument to out (if any), collect up to 3 descriptors. */
static inline int lu2k_ctl_reply(struct lu2k_endpoint *ep, void *out, size_t outlen, int *fds)
{
	uint8_t buf[sizeof(struct lu2k_ctl_reply) + 16384];
	char cbuf[CMSG_SPACE(3 * sizeof(int))];
	struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct lu2k_ctl_reply rep;
	ssize_t n = recvmsg(ep->sock, &msg, MSG_CMSG_CLOEXEC);

	if (n < 0)
		return lu2k_fail(ep, "recvmsg");
	if ((size_t)n < sizeof(rep)) {
		fprintf(stderr, "%s: short reply (%zd bytes)\n", ep->prog, n);
		return -1;
	}
	memcpy(&rep, buf, sizeof(rep));
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (fds && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			size_t bytes = c->cmsg_len - CMSG_LEN(0);
			memcpy(fds, CMSG_DATA(c), bytes < 3 * sizeof(int) ? bytes : 3 * sizeof(int));
		}
	}
	if (rep.error) {
		fprintf(stderr, "%s: command 0x%08x refused: %s (%.*s)\n", ep->prog, rep.cmd, strerror(rep.error),
			LU2K_REASON_LEN, rep.reason);
		return -1;
	}
	if (out) {
		if (rep.arg_len != outlen || (size_t)n != sizeof(rep) + outlen) {
			fprintf(stderr, "%s: reply argument of %u bytes, expected %zu\n", ep->prog, rep.arg_len, outlen);
			return -1;
		}
		memcpy(out, buf + sizeof(rep), outlen);
	}
	return 0;
}

/* Attach to the daemon's shim socket at `path`, bound to `portal`.  ep->prog must be set. */
static inline int lu2k_attach(struct lu2k_endpoint *ep, const char *path, uint32_t portal)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fds[3] = { -1, -1, -1 };
	struct stat st;

	ep->sock = ep->kick_fd = ep->notify_fd = -1;
	ep->base = NULL;
	ep->kick_want = 0;
	memset(&ep->att, 0, sizeof(ep->att));
	ep->att.in.abi_version = LU2K_ABI_VERSION;
	ep->att.in.portal = portal;
	if (strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "%s: socket path too long\n", ep->prog);
		return -1;
	}
	strcpy(addr.sun_path, path);
	ep->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (ep->sock < 0 || connect(ep->sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return lu2k_fail(ep, path);
	if (lu2k_ctl_send(ep, LU2K_CMD_ATTACH, &ep->att) || lu2k_ctl_reply(ep, &ep->att, sizeof(ep->att), fds))
		return -1;
	if (fds[0] < 0 || fds[1] < 0 || fds[2] < 0) {
		fprintf(stderr, "%s: ATTACH reply without descriptors\n", ep->prog);
		return -1;
	}
	ep->kick_fd = fds[1];
	ep->notify_fd = fds[2];
	ep->size = ep->att.layout.region_size;
	if (fstat(fds[0], &st) < 0 || (uint64_t)st.st_size < ep->size) {
		fprintf(stderr, "%s: region smaller than its layout\n", ep->prog);
		close(fds[0]);
		return -1;
	}
	ep->base = mmap(NULL, ep->size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
	close(fds[0]);
	if (ep->base == MAP_FAILED) {
		ep->base = NULL;
		return lu2k_fail(ep, "mmap");
	}
	if (((struct lu2k_region_hdr *)ep->base)->magic != LU2K_REGION_MAGIC) {
		fprintf(stderr, "%s: bad region magic\n", ep->prog);
		return -1;
	}
	ep->sub_head = __atomic_load_n(lu2k_ring_index(ep, LU2K_RING_SUBMIT, LU2K_RING_PRODUCER_OFF), __ATOMIC_RELAXED);
	ep->comp_tail = __atomic_load_n(lu2k_ring_index(ep, LU2K_RING_COMPLETE, LU2K_RING_CONSUMER_OFF), __ATOMIC_RELAXED);
	ep->dlv_tail = __atomic_load_n(lu2k_ring_index(ep, LU2K_RING_DELIVER, LU2K_RING_CONSUMER_OFF), __ATOMIC_RELAXED);
	ep->rel_head = __atomic_load_n(lu2k_ring_index(ep, LU2K_RING_RELEASE, LU2K_RING_PRODUCER_OFF), __ATOMIC_RELAXED);
	return 0;
}

/* The TX slot class that holds `len` bytes (the smallest that fits), or NULL. */
static inline const struct lu2k_pool_class *lu2k_tx_class(struct lu2k_endpoint *ep, size_t len)
{
	const struct lu2k_pool *tx = &ep->att.layout.tx;

	if (len > ep->att.layout.max_message_size)
		return NULL;
	for (uint32_t i = 0; i < tx->nclasses && i < LU2K_MAX_CLASSES; i++)
		if (tx->classes[i].slot_size >= len)
			return &tx->classes[i];
	return NULL;
}

/* Whether an RX descriptor from the daemon lies inside the RX pool (an endpoint checks). */
static inline int lu2k_rx_in_pool(struct lu2k_endpoint *ep, const struct lu2k_rx_desc *r)
{
	const struct lu2k_pool *rx = &ep->att.layout.rx;
	return r->offset >= rx->offset && r->offset + r->length <= rx->offset + rx->size;
}

static inline int lu2k_stats(struct lu2k_endpoint *ep, struct lu2k_stats *st)
{
	memset(st, 0, sizeof(*st));
	return lu2k_ctl_send(ep, LU2K_CMD_STATS, st) || lu2k_ctl_reply(ep, st, sizeof(*st), NULL) ? -1 : 0;
}

/* DETACH (if `detach`) and free everything attach set up. */
static inline int lu2k_close(struct lu2k_endpoint *ep, int detach)
{
	int rc = 0;

	if (detach && ep->sock >= 0)
		rc = lu2k_ctl_send(ep, LU2K_CMD_DETACH, NULL) || lu2k_ctl_reply(ep, NULL, 0, NULL) ? -1 : 0;
	if (ep->base)
		munmap(ep->base, ep->size);
	if (ep->kick_fd >= 0)
		close(ep->kick_fd);
	if (ep->notify_fd >= 0)
		close(ep->notify_fd);
	if (ep->sock >= 0)
		close(ep->sock);
	ep->base = NULL;
	ep->sock = ep->kick_fd = ep->notify_fd = -1;
	return rc;
}

#endif /* LU2K_ENDPOINT_H */
