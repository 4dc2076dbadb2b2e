/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * shim_stream.c -- stream messages through lu2kd as a C endpoint: the sender and receiver
 * of `lu2k bench loopback --app c`.
 *
 *   cc -std=c11 -O2 -Wall -Icontrib -o shim_stream contrib/shim_stream.c
 *   ./shim_stream recv SOCKET PORTAL SIZE COUNT
 *   ./shim_stream send SOCKET PORTAL DST_NID DST_PORTAL SIZE COUNT WINDOW
 *
 * The sender keeps up to WINDOW messages of SIZE bytes in flight to DST_PORTAL at DST_NID
 * (the 20-byte packed NID as 40 hex digits), ringing the doorbell once per 64 descriptors,
 * and reuses a TX slot when its completion comes back.  Each payload starts with its message
 * number (when SIZE >= 8).  The receiver reads each message in place and releases it; it
 * checks every length and, from the numbers, that no message arrives twice and none is
 * missing.  Both sleep on the notify eventfd whenever their rings are empty (the need-wakeup
 * handshake of lu2k_shim.h), as an application sharing the machine must.
 *
 * Output, one line on stdout (CLOCK_MONOTONIC nanoseconds, the clock of Python's
 * time.perf_counter on Linux):
 *   ready                                              receiver, once attached
 *   received count=N bytes=B first_ns=T last_ns=T      receiver, at the end
 *   sent count=N failed=F start_ns=T end_ns=T          sender, after the last completion
 * Exit status 0 on success, 1 on a failure (said on stderr), 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lu2k_endpoint.h"

#define DOORBELL_EVERY 64   /* descriptors posted per doorbell, as a busy application would */
#define WAIT_MS 60000       /* give up after this long without progress */
#define SLOT_BITS 24        /* cookie = bit 63 | message number << SLOT_BITS | TX slot index */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int parse_u64(const char *what, const char *text, uint64_t min, uint64_t max, uint64_t *out)
{
	char *end;

	errno = 0;
	unsigned long long v = strtoull(text, &end, 0);
	if (errno || end == text || *end || text[0] == '-' || v < min || v > max) {
		fprintf(stderr, "shim_stream: %s must be a number from %llu to %llu, not '%s'\n", what,
			(unsigned long long)min, (unsigned long long)max, text);
		return -1;
	}
	*out = v;
	return 0;
}

static int hex_value(char c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static int parse_nid(const char *text, uint8_t nid[LU2K_NID_SIZE])
{
	if (strlen(text) != 2 * LU2K_NID_SIZE) {
		fprintf(stderr, "shim_stream: DST_NID must be %d hex digits (a packed NID), not '%s'\n", 2 * LU2K_NID_SIZE, text);
		return -1;
	}
	for (int i = 0; i < LU2K_NID_SIZE; i++) {
		int hi = hex_value(text[2 * i]), lo = hex_value(text[2 * i + 1]);
		if (hi < 0 || lo < 0) {
			fprintf(stderr, "shim_stream: DST_NID has a non-hex digit: '%s'\n", text);
			return -1;
		}
		nid[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

static int run_send(struct lu2k_endpoint *ep, const uint8_t dst_nid[LU2K_NID_SIZE], uint32_t dst_portal, uint32_t size,
		    uint64_t count, uint64_t window)
{
	const struct lu2k_pool_class *cls = lu2k_tx_class(ep, size);
	uint64_t next = 0, done = 0, failed = 0;
	uint32_t *free_slots, nfree = 0;

	if (!cls) {
		fprintf(stderr, "shim_stream: SIZE %u is above the daemon's largest message or TX slot\n", size);
		return -1;
	}
	/* In flight at once: bounded by the window, the slots of this class, the daemon's limit and the ring. */
	if (window > cls->count)
		window = cls->count;
	if (window > ep->att.max_in_flight)
		window = ep->att.max_in_flight;
	if (window > ep->att.layout.rings[LU2K_RING_SUBMIT].entries)
		window = ep->att.layout.rings[LU2K_RING_SUBMIT].entries;
	free_slots = malloc(window * sizeof(*free_slots));
	if (!free_slots) {
		fprintf(stderr, "shim_stream: out of memory\n");
		return -1;
	}
	for (uint32_t i = 0; i < window; i++) {
		free_slots[nfree++] = (uint32_t)(window - 1 - i);
		memset(ep->base + cls->offset + (uint64_t)i * cls->slot_size, 0x5a, size);
	}
	uint64_t start = now_ns();
	while (done < count) {
		uint32_t room = lu2k_ring_room(ep, LU2K_RING_SUBMIT, ep->sub_head), posted = 0;
		while (next < count && nfree && room && posted < DOORBELL_EVERY) {
			uint32_t slot = free_slots[--nfree];
			uint64_t offset = cls->offset + (uint64_t)slot * cls->slot_size;
			if (size >= sizeof(next))
				memcpy(ep->base + offset, &next, sizeof(next));
			struct lu2k_send_desc *d = lu2k_ring_desc(ep, LU2K_RING_SUBMIT, ep->sub_head++);
			d->cookie = (1ull << 63) | (next << SLOT_BITS) | slot;
			d->offset = offset;
			d->length = size;
			d->dst_portal = dst_portal;
			memcpy(d->dst_nid, dst_nid, LU2K_NID_SIZE);
			d->flags = 0;
			next++, posted++, room--;
		}
		if (posted) {
			lu2k_publish_submit(ep);
			lu2k_kick_if_wanted(ep);
		}
		uint32_t ready = lu2k_ring_ready(ep, LU2K_RING_COMPLETE, ep->comp_tail);
		for (uint32_t i = 0; i < ready; i++) {
			const struct lu2k_completion *c = lu2k_ring_desc(ep, LU2K_RING_COMPLETE, ep->comp_tail + i);
			uint32_t slot = (uint32_t)(c->cookie & ((1u << SLOT_BITS) - 1));
			if (c->flags & LU2K_COMP_EVENT) {
				fprintf(stderr, "shim_stream: daemon event: %.*s\n", LU2K_COMP_REASON_LEN, c->reason);
				continue;
			}
			if (!(c->cookie >> 63) || slot >= window || nfree >= window) {
				fprintf(stderr, "shim_stream: completion for a cookie we did not send (%#llx)\n", (unsigned long long)c->cookie);
				free(free_slots);
				return -1;
			}
			if (c->status != LU2K_STATUS_DELIVERED && failed++ == 0)
				fprintf(stderr, "shim_stream: message %llu failed: %s (%.*s)\n", (unsigned long long)((c->cookie & ~(1ull << 63)) >> SLOT_BITS),
					strerror(c->status), LU2K_COMP_REASON_LEN, c->reason);
			free_slots[nfree++] = slot;
			done++;
		}
		if (ready) {
			ep->comp_tail += ready;
			__atomic_store_n(lu2k_ring_index(ep, LU2K_RING_COMPLETE, LU2K_RING_CONSUMER_OFF), ep->comp_tail, __ATOMIC_RELEASE);
			lu2k_busy(ep);
		} else if (!posted) {
			int w = lu2k_wait(ep, LU2K_RING_COMPLETE, ep->comp_tail, WAIT_MS);
			if (w <= 0) {
				if (w == 0)
					fprintf(stderr, "shim_stream: no completion for %d s after %llu of %llu\n", WAIT_MS / 1000,
						(unsigned long long)done, (unsigned long long)count);
				free(free_slots);
				return -1;
			}
		}
	}
	uint64_t end = now_ns();
	free(free_slots);
	printf("sent count=%llu failed=%llu start_ns=%llu end_ns=%llu\n", (unsigned long long)count, (unsigned long long)failed,
	       (unsigned long long)start, (unsigned long long)end);
	return failed ? -1 : 0;
}

static int run_recv(struct lu2k_endpoint *ep, uint32_t size, uint64_t count)
{
	uint8_t *seen = calloc(count / 8 + 1, 1);  /* one bit per message number */
	uint64_t got = 0, bytes = 0, first = 0;
	int rc = -1;

	if (!seen) {
		fprintf(stderr, "shim_stream: out of memory\n");
		return -1;
	}
	printf("ready\n");
	fflush(stdout);
	while (got < count) {
		uint32_t ready = lu2k_ring_ready(ep, LU2K_RING_DELIVER, ep->dlv_tail);
		if (!ready) {
			int w = lu2k_wait(ep, LU2K_RING_DELIVER, ep->dlv_tail, WAIT_MS);
			if (w == 0)
				fprintf(stderr, "shim_stream: no message for %d s after %llu of %llu\n", WAIT_MS / 1000,
					(unsigned long long)got, (unsigned long long)count);
			if (w <= 0)
				goto out;
			continue;
		}
		if (!got)
			first = now_ns();
		lu2k_busy(ep);
		if (lu2k_ring_room(ep, LU2K_RING_RELEASE, ep->rel_head) < ready) {
			fprintf(stderr, "shim_stream: release ring smaller than the messages delivered\n");
			goto out;
		}
		for (uint32_t i = 0; i < ready; i++) {
			const struct lu2k_rx_desc *r = lu2k_ring_desc(ep, LU2K_RING_DELIVER, ep->dlv_tail + i);
			if (!lu2k_rx_in_pool(ep, r) || r->length != size) {
				fprintf(stderr, "shim_stream: message of %u bytes at offset %llu, expected %u bytes in the RX pool\n",
					r->length, (unsigned long long)r->offset, size);
				goto out;
			}
			if (size >= sizeof(uint64_t)) {
				uint64_t number;
				memcpy(&number, ep->base + r->offset, sizeof(number));  /* read in place: zero copy */
				if (number >= count || (seen[number / 8] & (1u << (number % 8)))) {
					fprintf(stderr, "shim_stream: message number %llu %s\n", (unsigned long long)number,
						number >= count ? "was never sent" : "arrived twice");
					goto out;
				}
				seen[number / 8] |= (uint8_t)(1u << (number % 8));
			}
			struct lu2k_release_desc *rel = lu2k_ring_desc(ep, LU2K_RING_RELEASE, ep->rel_head++);
			rel->offset = r->offset;
			bytes += r->length;
		}
		got += ready;
		ep->dlv_tail += ready;
		__atomic_store_n(lu2k_ring_index(ep, LU2K_RING_DELIVER, LU2K_RING_CONSUMER_OFF), ep->dlv_tail, __ATOMIC_RELEASE);
		lu2k_publish_release(ep);
		lu2k_kick_if_wanted(ep);
	}
	printf("received count=%llu bytes=%llu first_ns=%llu last_ns=%llu\n", (unsigned long long)got,
	       (unsigned long long)bytes, (unsigned long long)first, (unsigned long long)now_ns());
	rc = 0;
out:
	free(seen);
	return rc;
}

static int usage(const char *prog)
{
	fprintf(stderr, "usage: %s recv SOCKET PORTAL SIZE COUNT\n"
			"       %s send SOCKET PORTAL DST_NID DST_PORTAL SIZE COUNT WINDOW\n", prog, prog);
	return 2;
}

int main(int argc, char **argv)
{
	struct lu2k_endpoint ep = { .prog = "shim_stream", .sock = -1 };
	uint64_t portal, dst_portal = 0, size, count, window = 0;
	uint8_t dst_nid[LU2K_NID_SIZE];
	int sending, rc;

	if (argc == 6 && !strcmp(argv[1], "recv"))
		sending = 0;
	else if (argc == 9 && !strcmp(argv[1], "send"))
		sending = 1;
	else
		return usage(argv[0]);
	if (parse_u64("PORTAL", argv[3], 0, UINT32_MAX, &portal))
		return 2;
	if (sending) {
		if (parse_nid(argv[4], dst_nid) || parse_u64("DST_PORTAL", argv[5], 0, UINT32_MAX, &dst_portal) ||
		    parse_u64("SIZE", argv[6], 1, UINT32_MAX, &size) || parse_u64("COUNT", argv[7], 1, 1ull << 38, &count) ||
		    parse_u64("WINDOW", argv[8], 1, 1u << SLOT_BITS, &window))
			return 2;
	} else if (parse_u64("SIZE", argv[4], 1, UINT32_MAX, &size) || parse_u64("COUNT", argv[5], 1, 1ull << 38, &count)) {
		return 2;
	}
	if (lu2k_attach(&ep, argv[2], (uint32_t)portal)) {
		lu2k_close(&ep, 0);
		return 1;
	}
	rc = sending ? run_send(&ep, dst_nid, (uint32_t)dst_portal, (uint32_t)size, count, window)
		     : run_recv(&ep, (uint32_t)size, count);
	if (lu2k_close(&ep, rc == 0))
		rc = -1;
	return rc ? 1 : 0;
}
