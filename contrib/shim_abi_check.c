/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * shim_abi_check.c -- print every size, field offset and number of lu2k_shim.h as
 * "name value" lines, so tests/test_shim_c.py can compare them with lu2k/kernel_shim/abi.py.
 * Also checks that the LU2K_IOC encoding equals Linux's own _IOC from <linux/ioctl.h>.
 */
#include <stdio.h>
#include <linux/ioctl.h>
#include "lu2k_shim.h"

#define SIZE(T) printf("sizeof.%s %zu\n", #T, sizeof(struct T))
#define OFF(T, f) printf("offsetof.%s.%s %zu\n", #T, #f, offsetof(struct T, f))
#define NUM(n) printf("%s %llu\n", #n, (unsigned long long)(n))

int main(void)
{
	SIZE(lu2k_ctl_hdr); OFF(lu2k_ctl_hdr, cmd); OFF(lu2k_ctl_hdr, seq);
	SIZE(lu2k_ctl_reply); OFF(lu2k_ctl_reply, cmd); OFF(lu2k_ctl_reply, seq); OFF(lu2k_ctl_reply, error);
	OFF(lu2k_ctl_reply, arg_len); OFF(lu2k_ctl_reply, reason);
	SIZE(lu2k_pool_class); OFF(lu2k_pool_class, offset); OFF(lu2k_pool_class, slot_size); OFF(lu2k_pool_class, count);
	SIZE(lu2k_pool); OFF(lu2k_pool, nclasses); OFF(lu2k_pool, reserved); OFF(lu2k_pool, offset); OFF(lu2k_pool, size);
	OFF(lu2k_pool, classes);
	SIZE(lu2k_ring_off); OFF(lu2k_ring_off, ctrl); OFF(lu2k_ring_off, descs); OFF(lu2k_ring_off, entries);
	OFF(lu2k_ring_off, desc_size);
	SIZE(lu2k_layout); OFF(lu2k_layout, region_size); OFF(lu2k_layout, max_message_size); OFF(lu2k_layout, reserved);
	OFF(lu2k_layout, tx); OFF(lu2k_layout, rx); OFF(lu2k_layout, rings);
	SIZE(lu2k_region_hdr); OFF(lu2k_region_hdr, magic); OFF(lu2k_region_hdr, abi_version); OFF(lu2k_region_hdr, layout);
	SIZE(lu2k_send_desc); OFF(lu2k_send_desc, cookie); OFF(lu2k_send_desc, offset); OFF(lu2k_send_desc, length);
	OFF(lu2k_send_desc, dst_portal); OFF(lu2k_send_desc, dst_nid); OFF(lu2k_send_desc, flags);
	SIZE(lu2k_completion); OFF(lu2k_completion, cookie); OFF(lu2k_completion, status); OFF(lu2k_completion, flags);
	OFF(lu2k_completion, reason);
	SIZE(lu2k_rx_desc); OFF(lu2k_rx_desc, offset); OFF(lu2k_rx_desc, length); OFF(lu2k_rx_desc, src_portal);
	OFF(lu2k_rx_desc, dst_portal); OFF(lu2k_rx_desc, src_nid); OFF(lu2k_rx_desc, flags); OFF(lu2k_rx_desc, reserved);
	SIZE(lu2k_release_desc); OFF(lu2k_release_desc, offset);
	SIZE(lu2k_attach_in); OFF(lu2k_attach_in, abi_version); OFF(lu2k_attach_in, portal); OFF(lu2k_attach_in, flags);
	OFF(lu2k_attach_in, reserved); OFF(lu2k_attach_in, tx_pool_bytes); OFF(lu2k_attach_in, rx_pool_bytes);
	SIZE(lu2k_attach); OFF(lu2k_attach, in); OFF(lu2k_attach, local_nid); OFF(lu2k_attach, max_in_flight);
	OFF(lu2k_attach, layout);
	SIZE(lu2k_info); OFF(lu2k_info, abi_version); OFF(lu2k_info, portal); OFF(lu2k_info, daemon_pid);
	OFF(lu2k_info, nports); OFF(lu2k_info, local_nid); OFF(lu2k_info, max_message_size); OFF(lu2k_info, max_in_flight);
	SIZE(lu2k_stats);

	NUM(LU2K_ABI_VERSION); NUM(LU2K_REGION_MAGIC); NUM(LU2K_NID_SIZE);
	NUM(LU2K_CMD_ATTACH); NUM(LU2K_CMD_DETACH); NUM(LU2K_CMD_INFO); NUM(LU2K_CMD_STATS);
	NUM(LU2K_REASON_LEN); NUM(LU2K_COMP_REASON_LEN); NUM(LU2K_MAX_CLASSES);
	NUM(LU2K_HDR_DAEMON_FLAGS); NUM(LU2K_HDR_ENDPOINT_FLAGS); NUM(LU2K_HEADER_SIZE);
	NUM(LU2K_FLAG_NEED_WAKEUP); NUM(LU2K_FLAG_NEED_WAKEUP_RELEASE); NUM(LU2K_COMP_EVENT); NUM(LU2K_SEND_FLAGS_KNOWN);
	NUM(LU2K_RING_CTRL_SIZE); NUM(LU2K_RING_PRODUCER_OFF); NUM(LU2K_RING_CONSUMER_OFF);
	NUM(LU2K_RING_SUBMIT); NUM(LU2K_RING_COMPLETE); NUM(LU2K_RING_DELIVER); NUM(LU2K_RING_RELEASE);
	NUM(LU2K_STATUS_DELIVERED); NUM(LU2K_STATUS_NO_ROUTE); NUM(LU2K_STATUS_TIMED_OUT); NUM(LU2K_STATUS_NO_RECEIVER);
	NUM(LU2K_STATUS_PEER_RESTARTED); NUM(LU2K_STATUS_TOO_LARGE); NUM(LU2K_STATUS_PROTOCOL);
	NUM(LU2K_STATUS_AUTH_FAILED); NUM(LU2K_STATUS_CANCELLED); NUM(LU2K_STATUS_INVALID);

	/* The kernel's own encoding, for the same arguments. */
	printf("linux.ATTACH %llu\n", (unsigned long long)_IOWR('L', 1, struct lu2k_attach));
	printf("linux.DETACH %llu\n", (unsigned long long)_IO('L', 2));
	printf("linux.INFO %llu\n", (unsigned long long)_IOR('L', 3, struct lu2k_info));
	printf("linux.STATS %llu\n", (unsigned long long)_IOR('L', 4, struct lu2k_stats));
	return 0;
}
