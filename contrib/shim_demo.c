/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * shim_demo.c -- attach to lu2kd through the shim ABI, send one message, receive one.
 *
 * Uses only lu2k_shim.h, lu2k_endpoint.h and libc: SOCK_SEQPACKET + SCM_RIGHTS for the region
 * memfd and the two eventfds, mmap, __atomic loads/stores/fences for the ring indices.  This is
 * the shape a kernel implementation of the endpoint side would take (lu2klnd's kernel half).
 *
 *   cc -std=c11 -O2 -Wall -Icontrib -o shim_demo contrib/shim_demo.c
 *   ./shim_demo SOCKET PORTAL DST_PORTAL MESSAGE
 *
 * Sends MESSAGE to DST_PORTAL at the daemon's own NID, prints its completion, then waits
 * (10 s) for one message, prints it, releases it and detaches.  Exit status 0 on success.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lu2k_endpoint.h"

static int attach(struct lu2k_endpoint *ep, const char *path, uint32_t portal)
{
	if (lu2k_attach(ep, path, portal))
		return -1;
	printf("attached portal=%u region=%llu max_message_size=%u max_in_flight=%u\n", portal,
	       (unsigned long long)ep->size, ep->att.layout.max_message_size, ep->att.max_in_flight);
	return 0;
}

static int send_message(struct lu2k_endpoint *ep, uint32_t dst_portal, const char *text)
{
	size_t len = strlen(text);
	const struct lu2k_pool_class *cls = lu2k_tx_class(ep, len);

	if (!cls) {
		fprintf(stderr, "shim_demo: message too large\n");
		return -1;
	}
	memcpy(ep->base + cls->offset, text, len);  /* slot 0 of the class: straight into shared memory */

	struct lu2k_send_desc *d = lu2k_ring_desc(ep, LU2K_RING_SUBMIT, ep->sub_head++);
	d->cookie = 42;
	d->offset = cls->offset;
	d->length = (uint32_t)len;
	d->dst_portal = dst_portal;
	memcpy(d->dst_nid, ep->att.local_nid, LU2K_NID_SIZE);
	d->flags = 0;
	lu2k_publish_submit(ep);

	for (;;) {  /* exactly one completion comes back for cookie 42; skip error events */
		int w = lu2k_wait(ep, LU2K_RING_COMPLETE, ep->comp_tail, 10000);
		if (w <= 0) {
			if (w == 0)
				fprintf(stderr, "shim_demo: no completion within 10 s\n");
			return -1;
		}
		struct lu2k_completion c = *(struct lu2k_completion *)lu2k_ring_desc(ep, LU2K_RING_COMPLETE, ep->comp_tail);
		__atomic_store_n(lu2k_ring_index(ep, LU2K_RING_COMPLETE, LU2K_RING_CONSUMER_OFF), ++ep->comp_tail, __ATOMIC_RELEASE);
		if (c.flags & LU2K_COMP_EVENT)
			continue;
		printf("sent cookie=%llu status=%d reason=%.*s\n", (unsigned long long)c.cookie, c.status,
		       LU2K_COMP_REASON_LEN, c.reason);
		return c.cookie == 42 && c.status == LU2K_STATUS_DELIVERED ? 0 : -1;
	}
}

static int receive_message(struct lu2k_endpoint *ep)
{
	int w = lu2k_wait(ep, LU2K_RING_DELIVER, ep->dlv_tail, 10000);
	if (w <= 0) {
		if (w == 0)
			fprintf(stderr, "shim_demo: no message within 10 s\n");
		return -1;
	}
	struct lu2k_rx_desc r = *(struct lu2k_rx_desc *)lu2k_ring_desc(ep, LU2K_RING_DELIVER, ep->dlv_tail);
	__atomic_store_n(lu2k_ring_index(ep, LU2K_RING_DELIVER, LU2K_RING_CONSUMER_OFF), ++ep->dlv_tail, __ATOMIC_RELEASE);
	if (!lu2k_rx_in_pool(ep, &r)) {
		fprintf(stderr, "shim_demo: RX descriptor outside the RX pool\n");
		return -1;
	}
	printf("received src_portal=%u dst_portal=%u len=%u data=%.*s\n", r.src_portal, r.dst_portal, r.length,
	       (int)r.length, (const char *)(ep->base + r.offset));  /* read in place: zero copy */

	struct lu2k_release_desc *rel = lu2k_ring_desc(ep, LU2K_RING_RELEASE, ep->rel_head++);
	rel->offset = r.offset;
	lu2k_publish_release(ep);
	lu2k_kick_if_wanted(ep);
	return 0;
}

int main(int argc, char **argv)
{
	struct lu2k_endpoint ep = { .prog = "shim_demo", .sock = -1 };
	struct lu2k_stats st;

	if (argc != 5) {
		fprintf(stderr, "usage: %s SOCKET PORTAL DST_PORTAL MESSAGE\n", argv[0]);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (attach(&ep, argv[1], (uint32_t)strtoul(argv[2], NULL, 0)) || send_message(&ep, (uint32_t)strtoul(argv[3], NULL, 0), argv[4]) ||
	    receive_message(&ep) || lu2k_stats(&ep, &st)) {
		lu2k_close(&ep, 0);
		return 1;
	}
	printf("stats submitted=%llu completed=%llu delivered=%llu released=%llu\n", (unsigned long long)st.submitted,
	       (unsigned long long)st.completed, (unsigned long long)st.delivered, (unsigned long long)st.released);
	if (lu2k_close(&ep, 1))
		return 1;
	printf("detached\n");
	return 0;
}
