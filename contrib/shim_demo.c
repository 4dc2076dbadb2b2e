/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * shim_demo.c -- attach to lu2kd through the shim ABI, send one message, receive one.
 *
 * Uses only lu2k_shim.h and libc: SOCK_SEQPACKET + SCM_RIGHTS for the region memfd and the
 * two eventfds, mmap, __atomic loads/stores/fences for the ring indices.  This is the shape a
 * kernel implementation of the endpoint side would take (lu2klnd's kernel half).
 *
 *   cc -std=c11 -O2 -Wall -Icontrib -o shim_demo contrib/shim_demo.c
 *   ./shim_demo SOCKET PORTAL DST_PORTAL MESSAGE
 *
 * Sends MESSAGE to DST_PORTAL at the daemon's own NID, prints its completion, then waits
 * (10 s) for one message, prints it, releases it and detaches.  Exit status 0 on success.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "lu2k_shim.h"

struct endpoint {
	int sock, kick_fd, notify_fd;
	uint8_t *base;
	size_t size;
	struct lu2k_attach att;
	uint32_t seq;
	uint32_t sub_head, comp_tail, dlv_tail, rel_head; /* our private copies of our indices */
};

static int fail(const char *what)
{
	fprintf(stderr, "shim_demo: %s: %s\n", what, strerror(errno));
	return -1;
}

static uint32_t *ring_index(struct endpoint *ep, int ring, int which)
{
	return (uint32_t *)(ep->base + ep->att.layout.rings[ring].ctrl + which);
}

static void *ring_desc(struct endpoint *ep, int ring, uint32_t index)
{
	const struct lu2k_ring_off *r = &ep->att.layout.rings[ring];
	return ep->base + r->descs + (uint64_t)(index & (r->entries - 1)) * r->desc_size;
}

static uint32_t *flag_word(struct endpoint *ep, size_t off)
{
	return (uint32_t *)(ep->base + off);
}

/* After publishing on a ring the daemon consumes: fence, then kick only if it asked. */
static void kick_if_wanted(struct endpoint *ep, uint32_t bit)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (__atomic_load_n(flag_word(ep, LU2K_HDR_DAEMON_FLAGS), __ATOMIC_RELAXED) & bit) {
		uint64_t one = 1;
		if (write(ep->kick_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
			fail("kick");
	}
}

static int ctl_send(struct endpoint *ep, uint32_t cmd, const void *arg)
{
	uint8_t packet[sizeof(struct lu2k_ctl_hdr) + sizeof(struct lu2k_attach)];
	struct lu2k_ctl_hdr hdr = { .cmd = cmd, .seq = ++ep->seq };
	size_t n = LU2K_IOC_SIZE(cmd);

	memcpy(packet, &hdr, sizeof(hdr));
	if (n)
		memcpy(packet + sizeof(hdr), arg, n);
	return send(ep->sock, packet, sizeof(hdr) + n, 0) < 0 ? fail("send command") : 0;
}

/* Receive one reply; copy its argument to out (if any), collect up to 3 descriptors. */
static int ctl_reply(struct endpoint *ep, void *out, size_t outlen, int *fds)
{
	uint8_t buf[sizeof(struct lu2k_ctl_reply) + 16384];
	char cbuf[CMSG_SPACE(3 * sizeof(int))];
	struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct lu2k_ctl_reply rep;
	ssize_t n = recvmsg(ep->sock, &msg, MSG_CMSG_CLOEXEC);

	if (n < 0)
		return fail("recvmsg");
	if ((size_t)n < sizeof(rep)) {
		fprintf(stderr, "shim_demo: short reply (%zd bytes)\n", n);
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
		fprintf(stderr, "shim_demo: command 0x%08x refused: %s (%.*s)\n", rep.cmd, strerror(rep.error),
			LU2K_REASON_LEN, rep.reason);
		return -1;
	}
	if (out) {
		if (rep.arg_len != outlen || (size_t)n != sizeof(rep) + outlen) {
			fprintf(stderr, "shim_demo: reply argument of %u bytes, expected %zu\n", rep.arg_len, outlen);
			return -1;
		}
		memcpy(out, buf + sizeof(rep), outlen);
	}
	return 0;
}

static int attach(struct endpoint *ep, const char *path, uint32_t portal)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fds[3] = { -1, -1, -1 };
	struct stat st;

	memset(&ep->att, 0, sizeof(ep->att));
	ep->att.in.abi_version = LU2K_ABI_VERSION;
	ep->att.in.portal = portal;
	if (strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "shim_demo: socket path too long\n");
		return -1;
	}
	strcpy(addr.sun_path, path);
	ep->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (ep->sock < 0 || connect(ep->sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail(path);
	if (ctl_send(ep, LU2K_CMD_ATTACH, &ep->att) || ctl_reply(ep, &ep->att, sizeof(ep->att), fds))
		return -1;
	if (fds[0] < 0 || fds[1] < 0 || fds[2] < 0) {
		fprintf(stderr, "shim_demo: ATTACH reply without descriptors\n");
		return -1;
	}
	ep->kick_fd = fds[1];
	ep->notify_fd = fds[2];
	ep->size = ep->att.layout.region_size;
	if (fstat(fds[0], &st) < 0 || (uint64_t)st.st_size < ep->size) {
		fprintf(stderr, "shim_demo: region smaller than its layout\n");
		return -1;
	}
	ep->base = mmap(NULL, ep->size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
	close(fds[0]);
	if (ep->base == MAP_FAILED)
		return fail("mmap");
	if (((struct lu2k_region_hdr *)ep->base)->magic != LU2K_REGION_MAGIC) {
		fprintf(stderr, "shim_demo: bad region magic\n");
		return -1;
	}
	ep->sub_head = __atomic_load_n(ring_index(ep, LU2K_RING_SUBMIT, LU2K_RING_PRODUCER_OFF), __ATOMIC_RELAXED);
	ep->comp_tail = __atomic_load_n(ring_index(ep, LU2K_RING_COMPLETE, LU2K_RING_CONSUMER_OFF), __ATOMIC_RELAXED);
	ep->dlv_tail = __atomic_load_n(ring_index(ep, LU2K_RING_DELIVER, LU2K_RING_CONSUMER_OFF), __ATOMIC_RELAXED);
	ep->rel_head = __atomic_load_n(ring_index(ep, LU2K_RING_RELEASE, LU2K_RING_PRODUCER_OFF), __ATOMIC_RELAXED);
	/* We always want notifies: this demo sleeps whenever its rings are empty. */
	__atomic_store_n(flag_word(ep, LU2K_HDR_ENDPOINT_FLAGS), LU2K_FLAG_NEED_WAKEUP, __ATOMIC_RELEASE);
	printf("attached portal=%u region=%llu max_message_size=%u max_in_flight=%u\n", portal,
	       (unsigned long long)ep->size, ep->att.layout.max_message_size, ep->att.max_in_flight);
	return 0;
}

/* Wait until `ring` has something (1), the daemon goes away (-1) or 10 s pass (0). */
static int wait_ring(struct endpoint *ep, int ring, uint32_t tail)
{
	for (;;) {
		__atomic_thread_fence(__ATOMIC_SEQ_CST); /* pairs with the daemon's fence before it reads our flag */
		if (__atomic_load_n(ring_index(ep, ring, LU2K_RING_PRODUCER_OFF), __ATOMIC_ACQUIRE) != tail)
			return 1;
		struct pollfd p[2] = { { .fd = ep->notify_fd, .events = POLLIN }, { .fd = ep->sock, .events = POLLIN } };
		int n = poll(p, 2, 10000);
		if (n < 0 && errno != EINTR)
			return fail("poll");
		if (n == 0)
			return 0;
		if (p[1].revents) {
			char c;
			if (recv(ep->sock, &c, 1, MSG_DONTWAIT) == 0) {
				fprintf(stderr, "shim_demo: daemon closed the shim socket\n");
				return -1;
			}
		}
		if (p[0].revents & POLLIN) {
			uint64_t v;
			if (read(ep->notify_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
				return fail("read notify");
		}
	}
}

static int send_message(struct endpoint *ep, uint32_t dst_portal, const char *text)
{
	const struct lu2k_pool *tx = &ep->att.layout.tx;
	size_t len = strlen(text);
	uint64_t offset = 0;

	for (uint32_t i = 0; i < tx->nclasses && !offset; i++)  /* slot 0 of the first class that fits */
		if (tx->classes[i].slot_size >= len)
			offset = tx->classes[i].offset;
	if (!offset || len > ep->att.layout.max_message_size) {
		fprintf(stderr, "shim_demo: message too large\n");
		return -1;
	}
	memcpy(ep->base + offset, text, len);  /* the payload goes straight into shared memory */

	struct lu2k_send_desc *d = ring_desc(ep, LU2K_RING_SUBMIT, ep->sub_head);
	d->cookie = 42;
	d->offset = offset;
	d->length = (uint32_t)len;
	d->dst_portal = dst_portal;
	memcpy(d->dst_nid, ep->att.local_nid, LU2K_NID_SIZE);
	d->flags = 0;
	__atomic_store_n(ring_index(ep, LU2K_RING_SUBMIT, LU2K_RING_PRODUCER_OFF), ++ep->sub_head, __ATOMIC_RELEASE);
	kick_if_wanted(ep, LU2K_FLAG_NEED_WAKEUP);

	for (;;) {  /* exactly one completion comes back for cookie 42; skip error events */
		int w = wait_ring(ep, LU2K_RING_COMPLETE, ep->comp_tail);
		if (w <= 0) {
			if (w == 0)
				fprintf(stderr, "shim_demo: no completion within 10 s\n");
			return -1;
		}
		struct lu2k_completion c = *(struct lu2k_completion *)ring_desc(ep, LU2K_RING_COMPLETE, ep->comp_tail);
		__atomic_store_n(ring_index(ep, LU2K_RING_COMPLETE, LU2K_RING_CONSUMER_OFF), ++ep->comp_tail, __ATOMIC_RELEASE);
		if (c.flags & LU2K_COMP_EVENT)
			continue;
		printf("sent cookie=%llu status=%d reason=%.*s\n", (unsigned long long)c.cookie, c.status,
		       LU2K_COMP_REASON_LEN, c.reason);
		return c.cookie == 42 && c.status == LU2K_STATUS_DELIVERED ? 0 : -1;
	}
}

static int receive_message(struct endpoint *ep)
{
	int w = wait_ring(ep, LU2K_RING_DELIVER, ep->dlv_tail);
	if (w <= 0) {
		if (w == 0)
			fprintf(stderr, "shim_demo: no message within 10 s\n");
		return -1;
	}
	struct lu2k_rx_desc r = *(struct lu2k_rx_desc *)ring_desc(ep, LU2K_RING_DELIVER, ep->dlv_tail);
	__atomic_store_n(ring_index(ep, LU2K_RING_DELIVER, LU2K_RING_CONSUMER_OFF), ++ep->dlv_tail, __ATOMIC_RELEASE);
	if (r.offset < ep->att.layout.rx.offset || r.offset + r.length > ep->att.layout.rx.offset + ep->att.layout.rx.size) {
		fprintf(stderr, "shim_demo: RX descriptor outside the RX pool\n");
		return -1;
	}
	printf("received src_portal=%u dst_portal=%u len=%u data=%.*s\n", r.src_portal, r.dst_portal, r.length,
	       (int)r.length, (const char *)(ep->base + r.offset));  /* read in place: zero copy */

	struct lu2k_release_desc *rel = ring_desc(ep, LU2K_RING_RELEASE, ep->rel_head);
	rel->offset = r.offset;
	__atomic_store_n(ring_index(ep, LU2K_RING_RELEASE, LU2K_RING_PRODUCER_OFF), ++ep->rel_head, __ATOMIC_RELEASE);
	kick_if_wanted(ep, LU2K_FLAG_NEED_WAKEUP_RELEASE);
	return 0;
}

static int print_stats(struct endpoint *ep)
{
	struct lu2k_stats st = { 0 };
	if (ctl_send(ep, LU2K_CMD_STATS, &st) || ctl_reply(ep, &st, sizeof(st), NULL))
		return -1;
	printf("stats submitted=%llu completed=%llu delivered=%llu released=%llu\n", (unsigned long long)st.submitted,
	       (unsigned long long)st.completed, (unsigned long long)st.delivered, (unsigned long long)st.released);
	return 0;
}

int main(int argc, char **argv)
{
	struct endpoint ep = { .sock = -1 };

	if (argc != 5) {
		fprintf(stderr, "usage: %s SOCKET PORTAL DST_PORTAL MESSAGE\n", argv[0]);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (attach(&ep, argv[1], (uint32_t)strtoul(argv[2], NULL, 0)))
		return 1;
	if (send_message(&ep, (uint32_t)strtoul(argv[3], NULL, 0), argv[4]))
		return 1;
	if (receive_message(&ep))
		return 1;
	if (print_stats(&ep))
		return 1;
	if (ctl_send(&ep, LU2K_CMD_DETACH, NULL) || ctl_reply(&ep, NULL, 0, NULL))
		return 1;
	printf("detached\n");
	munmap(ep.base, ep.size);
	close(ep.kick_fd);
	close(ep.notify_fd);
	close(ep.sock);
	return 0;
}
