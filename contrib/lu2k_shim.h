/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * lu2k_shim.h -- the lu2k shim ABI for C (and kernel) endpoints.
 *
 * Mirror of lu2k/kernel_shim/abi.py; tests/test_shim_c.py compiles this header and checks
 * every size, offset and number against the Python definition.  Everything is
 * little-endian with no implicit padding (the structs are laid out so that natural
 * alignment adds none; the static asserts below prove it).
 *
 * Control channel: a SOCK_SEQPACKET Unix socket.  Request = struct lu2k_ctl_hdr followed by
 * exactly LU2K_IOC_SIZE(cmd) argument bytes; reply = struct lu2k_ctl_reply followed by
 * arg_len bytes (the updated argument for read-direction commands when error == 0).
 * The ATTACH reply carries three descriptors in SCM_RIGHTS: region memfd, kick eventfd
 * (endpoint -> daemon), notify eventfd (daemon -> endpoint).  Both eventfds are
 * non-blocking.  EOF on the socket means the other side is gone.
 *
 * Memory ordering:
 *  - producer: write descriptors, then __atomic_store_n(&producer, v, __ATOMIC_RELEASE);
 *  - consumer: __atomic_load_n(&producer, __ATOMIC_ACQUIRE), read descriptors, then
 *    __atomic_store_n(&consumer, v, __ATOMIC_RELEASE);
 *  - before sleeping: set LU2K_FLAG_NEED_WAKEUP in your flag word,
 *    __atomic_thread_fence(__ATOMIC_SEQ_CST), re-check your rings, then poll();
 *  - after publishing: __atomic_thread_fence(__ATOMIC_SEQ_CST), load the other side's
 *    flag word, write(eventfd, 1) only if its NEED_WAKEUP bit for that ring is set.
 * Indices are free-running u32; slot = index & (entries - 1); producer - consumer must
 * never exceed entries (the daemon disconnects an endpoint whose indices do).
 *
 * What the daemon checks (an endpoint is untrusted): the producer index of the submit and
 * release rings and the consumer index of the complete and deliver rings (a bad one
 * detaches the endpoint, the reason is logged and, if the complete ring still has room,
 * posted as a LU2K_COMP_EVENT); every send descriptor's offset (the start of a TX slot),
 * length (fits the slot and max_message_size), flags (no bit outside
 * LU2K_SEND_FLAGS_KNOWN) and that its slot is not already in flight (a bad one completes
 * with LU2K_STATUS_INVALID); every release offset (an RX slot delivered and not yet
 * released; else an INVALID event).  A buffer is released only after the deliver ring's
 * consumer index has moved past its descriptor: the ring has an entry for every RX slot, so
 * a deliver ring found full while a slot is free detaches the endpoint.  Who may attach
 * and which portals it may bind is the daemon's access policy (lu2k.shim.access; refused
 * with EACCES and a reason).
 */
#ifndef LU2K_SHIM_H
#define LU2K_SHIM_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#define LU2K_ABI_VERSION   1u
#define LU2K_ABI_REVISION  1u          /* 1: LU2K_SEND_FLAG_MSG_ID; older daemons refuse it (INVALID) */
#define LU2K_REGION_MAGIC  0x5332554Cu /* "LU2S" as little-endian u32 */
#define LU2K_NID_SIZE      20          /* struct lnet_nid: u8 size, u8 type, be16 num, be32 addr[4] */

/* ---- ioctl-style command numbers (same encoding as asm-generic/ioctl.h) ---- */
#define LU2K_IOC_NRBITS    8
#define LU2K_IOC_TYPEBITS  8
#define LU2K_IOC_SIZEBITS  14
#define LU2K_IOC_DIRBITS   2
#define LU2K_IOC_NRSHIFT   0
#define LU2K_IOC_TYPESHIFT (LU2K_IOC_NRSHIFT + LU2K_IOC_NRBITS)
#define LU2K_IOC_SIZESHIFT (LU2K_IOC_TYPESHIFT + LU2K_IOC_TYPEBITS)
#define LU2K_IOC_DIRSHIFT  (LU2K_IOC_SIZESHIFT + LU2K_IOC_SIZEBITS)
#define LU2K_IOC_NONE      0u
#define LU2K_IOC_WRITE     1u
#define LU2K_IOC_READ      2u
#define LU2K_IOC_TYPE      'L'
#define LU2K_IOC(dir, type, nr, size) \
	(((uint32_t)(dir) << LU2K_IOC_DIRSHIFT) | ((uint32_t)(type) << LU2K_IOC_TYPESHIFT) | \
	 ((uint32_t)(nr) << LU2K_IOC_NRSHIFT) | ((uint32_t)(size) << LU2K_IOC_SIZESHIFT))
#define LU2K_IO(nr)         LU2K_IOC(LU2K_IOC_NONE, LU2K_IOC_TYPE, (nr), 0)
#define LU2K_IOR(nr, T)     LU2K_IOC(LU2K_IOC_READ, LU2K_IOC_TYPE, (nr), sizeof(T))
#define LU2K_IOW(nr, T)     LU2K_IOC(LU2K_IOC_WRITE, LU2K_IOC_TYPE, (nr), sizeof(T))
#define LU2K_IOWR(nr, T)    LU2K_IOC(LU2K_IOC_READ | LU2K_IOC_WRITE, LU2K_IOC_TYPE, (nr), sizeof(T))
#define LU2K_IOC_SIZE(cmd)  (((cmd) >> LU2K_IOC_SIZESHIFT) & ((1u << LU2K_IOC_SIZEBITS) - 1))

/* ---- control packets ---- */
struct lu2k_ctl_hdr {
	uint32_t cmd;             /* LU2K_CMD_* */
	uint32_t seq;             /* echoed in the reply */
};

#define LU2K_REASON_LEN 112
struct lu2k_ctl_reply {
	uint32_t cmd;             /* the request's cmd (as sent, even if unknown) */
	uint32_t seq;             /* the request's seq */
	int32_t  error;           /* 0, or a positive errno: ENOTTY unknown cmd, EINVAL bad size/arg, ... */
	uint32_t arg_len;         /* bytes of argument following this header */
	char     reason[LU2K_REASON_LEN]; /* NUL-padded UTF-8 explanation of an error */
};

/* ---- region layout ---- */
#define LU2K_MAX_CLASSES 8
struct lu2k_pool_class {
	uint64_t offset;          /* region offset of slot 0 (64-byte aligned) */
	uint32_t slot_size;       /* bytes per slot; slot i is at offset + i * slot_size */
	uint32_t count;           /* number of slots */
};

struct lu2k_pool {
	uint32_t nclasses;        /* valid entries in classes[] (1..LU2K_MAX_CLASSES) */
	uint32_t reserved;        /* 0 */
	uint64_t offset;          /* region offset of the pool */
	uint64_t size;            /* bytes of the pool */
	struct lu2k_pool_class classes[LU2K_MAX_CLASSES]; /* ascending slot_size */
};

struct lu2k_ring_off {
	uint64_t ctrl;            /* region offset of the control block (producer @+0, consumer @+64) */
	uint64_t descs;           /* region offset of descriptor 0 */
	uint32_t entries;         /* power of two */
	uint32_t desc_size;       /* sizeof the ring's descriptor struct */
};

enum lu2k_ring_id {
	LU2K_RING_SUBMIT = 0,     /* endpoint -> daemon, struct lu2k_send_desc */
	LU2K_RING_COMPLETE = 1,   /* daemon -> endpoint, struct lu2k_completion */
	LU2K_RING_DELIVER = 2,    /* daemon -> endpoint, struct lu2k_rx_desc */
	LU2K_RING_RELEASE = 3,    /* endpoint -> daemon, struct lu2k_release_desc */
};

struct lu2k_layout {
	uint64_t region_size;     /* bytes to mmap from the memfd */
	uint32_t max_message_size;/* largest payload either way */
	uint32_t reserved;        /* 0 */
	struct lu2k_pool tx;      /* endpoint allocates, daemon reads */
	struct lu2k_pool rx;      /* daemon allocates, endpoint reads and releases */
	struct lu2k_ring_off rings[4]; /* indexed by enum lu2k_ring_id */
};

struct lu2k_region_hdr {      /* at region offset 0 */
	uint32_t magic;           /* LU2K_REGION_MAGIC */
	uint32_t abi_version;     /* LU2K_ABI_VERSION */
	struct lu2k_layout layout;/* same as the ATTACH reply */
};

#define LU2K_HDR_DAEMON_FLAGS    512  /* u32 written by the daemon */
#define LU2K_HDR_ENDPOINT_FLAGS  576  /* u32 written by the endpoint */
#define LU2K_HEADER_SIZE         4096
#define LU2K_FLAG_NEED_WAKEUP          0x1u /* endpoint word: notify me; daemon word: kick me after a submit */
#define LU2K_FLAG_NEED_WAKEUP_RELEASE  0x2u /* daemon word: kick me after a release */
#define LU2K_RING_CTRL_SIZE      128
#define LU2K_RING_PRODUCER_OFF   0
#define LU2K_RING_CONSUMER_OFF   64

/* ---- ring descriptors ---- */
struct lu2k_send_desc {       /* submit ring */
	uint64_t cookie;          /* endpoint's id, echoed in the completion (not 0) */
	uint64_t offset;          /* region offset of a TX slot start */
	uint32_t length;          /* payload bytes (<= slot size, <= max_message_size) */
	uint32_t dst_portal;      /* destination portal */
	uint8_t  dst_nid[LU2K_NID_SIZE]; /* destination NID, packed */
	uint32_t flags;           /* no bit outside LU2K_SEND_FLAGS_KNOWN */
};
/* The cookie is also the application's id for the message (1 .. 2^63-1, unique among its
 * messages; another value is refused INVALID): a copy sent again (after this daemon crashed, the first completed CANCELLED)
 * is not delivered twice by a receiving daemon that delivered it in the last hour (last
 * 65536 ids).  Cookies of messages without this flag should have bit 63 set. */
#define LU2K_SEND_FLAG_MSG_ID 0x1u
#define LU2K_SEND_FLAGS_KNOWN 0x1u

#define LU2K_COMP_REASON_LEN 48
#define LU2K_COMP_EVENT      0x1u /* not a send completion: an error event (cookie 0) */
struct lu2k_completion {      /* complete ring: exactly one per send descriptor */
	uint64_t cookie;          /* the send descriptor's cookie */
	int32_t  status;          /* 0 delivered, else LU2K_STATUS_* (an errno) */
	uint32_t flags;           /* LU2K_COMP_EVENT */
	char     reason[LU2K_COMP_REASON_LEN]; /* NUL-padded UTF-8 reason of a failure */
};

struct lu2k_rx_desc {         /* deliver ring */
	uint64_t offset;          /* region offset of an RX slot start; release it when done */
	uint32_t length;          /* payload bytes */
	uint32_t src_portal;      /* sender's portal */
	uint32_t dst_portal;      /* our portal */
	uint8_t  src_nid[LU2K_NID_SIZE]; /* sender's NID, packed */
	uint32_t flags;           /* 0 */
	uint32_t reserved;        /* 0 */
};

struct lu2k_release_desc {    /* release ring */
	uint64_t offset;          /* an RX slot offset from a consumed lu2k_rx_desc, exactly once */
};

/* ---- commands ---- */
struct lu2k_attach_in {
	uint32_t abi_version;     /* LU2K_ABI_VERSION */
	uint32_t portal;          /* portal to bind (EADDRINUSE if taken) */
	uint32_t flags;           /* 0 (else EINVAL) */
	uint32_t reserved;        /* 0 (else EINVAL) */
	uint64_t tx_pool_bytes;   /* 0: daemon default; above the daemon's limit: EINVAL */
	uint64_t rx_pool_bytes;   /* 0: daemon default */
};

struct lu2k_attach {          /* LU2K_CMD_ATTACH: in and out */
	struct lu2k_attach_in in; /* filled by the endpoint, echoed */
	uint8_t  local_nid[LU2K_NID_SIZE]; /* out: the daemon's primary NID */
	uint32_t max_in_flight;   /* out: sends the daemon takes before back-pressure */
	struct lu2k_layout layout;/* out: where everything is in the region */
};

struct lu2k_info {            /* LU2K_CMD_INFO: out */
	uint32_t abi_version;
	uint32_t portal;          /* this connection's portal (0 if not attached) */
	uint32_t daemon_pid;
	uint32_t nports;          /* endpoints attached to the daemon */
	uint8_t  local_nid[LU2K_NID_SIZE];
	uint32_t max_message_size;
	uint32_t max_in_flight;
};

struct lu2k_stats {           /* LU2K_CMD_STATS: out, the daemon's counters for this port */
	uint64_t submitted, completed, failed, invalid, delivered, released;
	uint64_t tx_bytes, rx_bytes, in_flight, kicks_in, notifies_out, events;
	uint64_t stalls, rx_full, bad_releases, reserved;
};

#define LU2K_CMD_ATTACH  LU2K_IOWR(1, struct lu2k_attach)
#define LU2K_CMD_DETACH  LU2K_IO(2)
#define LU2K_CMD_INFO    LU2K_IOR(3, struct lu2k_info)
#define LU2K_CMD_STATS   LU2K_IOR(4, struct lu2k_stats)

/* ---- completion status (lu2k.errors.Status): errno values ---- */
#define LU2K_STATUS_DELIVERED       0
#define LU2K_STATUS_NO_ROUTE        EHOSTUNREACH
#define LU2K_STATUS_TIMED_OUT       ETIMEDOUT
#define LU2K_STATUS_NO_RECEIVER     ECONNREFUSED
#define LU2K_STATUS_PEER_RESTARTED  ECONNABORTED
#define LU2K_STATUS_TOO_LARGE       EMSGSIZE
#define LU2K_STATUS_PROTOCOL        EPROTO
#define LU2K_STATUS_AUTH_FAILED     EACCES
#define LU2K_STATUS_CANCELLED       ECANCELED
#define LU2K_STATUS_INVALID         EINVAL

/* ---- layout checks ---- */
_Static_assert(sizeof(struct lu2k_ctl_hdr) == 8, "lu2k_ctl_hdr");
_Static_assert(sizeof(struct lu2k_ctl_reply) == 128, "lu2k_ctl_reply");
_Static_assert(sizeof(struct lu2k_pool_class) == 16, "lu2k_pool_class");
_Static_assert(sizeof(struct lu2k_pool) == 152, "lu2k_pool");
_Static_assert(sizeof(struct lu2k_ring_off) == 24, "lu2k_ring_off");
_Static_assert(sizeof(struct lu2k_layout) == 416, "lu2k_layout");
_Static_assert(sizeof(struct lu2k_region_hdr) == 424, "lu2k_region_hdr");
_Static_assert(sizeof(struct lu2k_send_desc) == 48, "lu2k_send_desc");
_Static_assert(offsetof(struct lu2k_send_desc, flags) == 44, "lu2k_send_desc.flags");
_Static_assert(sizeof(struct lu2k_completion) == 64, "lu2k_completion");
_Static_assert(sizeof(struct lu2k_rx_desc) == 48, "lu2k_rx_desc");
_Static_assert(offsetof(struct lu2k_rx_desc, src_nid) == 20, "lu2k_rx_desc.src_nid");
_Static_assert(sizeof(struct lu2k_release_desc) == 8, "lu2k_release_desc");
_Static_assert(sizeof(struct lu2k_attach_in) == 32, "lu2k_attach_in");
_Static_assert(sizeof(struct lu2k_attach) == 472, "lu2k_attach");
_Static_assert(offsetof(struct lu2k_attach, layout) == 56, "lu2k_attach.layout");
_Static_assert(sizeof(struct lu2k_info) == 44, "lu2k_info");
_Static_assert(sizeof(struct lu2k_stats) == 128, "lu2k_stats");
_Static_assert(sizeof(struct lu2k_region_hdr) <= LU2K_HDR_DAEMON_FLAGS, "header fits before the flag words");

#endif /* LU2K_SHIM_H */
