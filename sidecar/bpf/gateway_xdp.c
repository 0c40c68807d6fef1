// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// The kernel lets a program call bpf_fib_lookup only under a GPL-compatible license; the rest
// of Halyard is Apache-2.0.
//
// The east-west gateway's forwarding path in the kernel: an XDP program (eXpress Data Path,
// Linux 4.8+) that routes the established connections' packets between clusters without a copy
// to user space. It does what the gateway's user-space relay (`sidecar/src/gateway.rs`) does
// for the same packets, and passes every other packet to that relay untouched (XDP_PASS):
//
// - a short-header QUIC packet (RFC 9000 §17.3.1) to the gateway's UDP port whose destination
//   connection ID is an unencrypted QUIC-LB one (draft-ietf-quic-load-balancers-21 §5.2: first
//   octet = config rotation | length - 1, then the 6-byte server ID) of an endpoint in the
//   ROUTES map: a PROXY protocol v2 header naming the caller is put in front of it (the HAProxy
//   PROXY protocol specification §2.2, UDP over IPv4, 28 bytes), and it is sent from the
//   gateway to the endpoint;
// - a datagram from an endpoint in BACKENDS with such a header (an answer for a caller): the
//   header is taken off, and the rest is sent from the gateway to the caller it names.
//
// Only IPv4 without options or fragments. Long-header packets (Initials, Handshake), encrypted
// connection IDs, IPv6, endpoints this host delivers to itself (the kernel drops a packet whose
// source is a local address), next hops whose neighbour entry is not resolved and packets
// over the egress MTU all go to user space. The UDP checksum of a rewritten packet is computed
// in full (the sender's may still be a partial, offloaded one at this point).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif

// The length of an unencrypted Halyard connection ID: first octet, server ID, 8-byte nonce
// (halyard_transport::quic_lb::PLAIN_CID_LEN).
#define PLAIN_CID_LEN 15
// PROXY v2 header for UDP over IPv4: signature (12), version/command, family, length (2),
// addresses (4 + 4), ports (2 + 2).
#define PROXY_V4_LEN 28
// Ethernet + IPv4 (no options) + UDP.
#define HEADERS_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))
// Largest IPv4 packet handled here; anything longer (a GRO aggregate in generic mode, jumbo
// frames) goes to user space.
#define MAX_IP_LEN 4096

// The route key: the connection ID's first 7 octets (first octet, server ID) and a zero pad.
struct route_key {
	__u8 cid[7];
	__u8 pad;
};

// An endpoint's IPv4 QUIC address, network byte order.
struct endpoint {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

// The gateway's settings, written by user space before attaching: its UDP port and the IPv4
// address its socket is bound to (network byte order; 0 when bound to the unspecified address).
struct settings {
	__u16 port;
	__u16 pad;
	__u32 addr;
};

// Counters, per CPU: packets and payload bytes (excluding the PROXY header) forwarded to
// endpoints and returned to callers, and routable packets left to user space.
enum {
	STAT_FORWARDED = 0,
	STAT_FORWARDED_BYTES,
	STAT_RETURNED,
	STAT_RETURNED_BYTES,
	// Routable packets passed to user space: the route lookup gave no next hop.
	STAT_UNROUTED,
	STAT_COUNT,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct route_key);
	__type(value, struct endpoint);
} ROUTES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct endpoint);
	__type(value, __u8);
} BACKENDS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} SETTINGS SEC(".maps");

// The interfaces the program is attached to, by index: the only ones it sends out of (a frame
// redirected to an interface that cannot take XDP frames would be dropped without a trace).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} EGRESS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} STATS SEC(".maps");

static const __u8 PROXY_SIGNATURE[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
					 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

static __always_inline void count(__u32 which, __u64 by)
{
	__u64 *c = bpf_map_lookup_elem(&STATS, &which);
	if (c)
		*c += by;
}

static __always_inline __u16 csum_fold(__u32 sum);

// Whether `p` (12 readable bytes) starts with the PROXY v2 signature (no memcmp in BPF).
static __always_inline int has_signature(const __u8 *p)
{
	int differ = 0;
#pragma unroll
	for (int i = 0; i < (int)sizeof(PROXY_SIGNATURE); i++)
		differ |= p[i] ^ PROXY_SIGNATURE[i];
	return differ == 0;
}

static __always_inline __u16 ipv4_checksum(struct iphdr *ip)
{
	__u32 sum = 0;
	__u16 *words = (__u16 *)ip;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(struct iphdr) / 2); i++)
		sum += words[i];
	return csum_fold(sum);
}

// The one's complement sum (RFC 1071) of the `len` bytes at `p` (`p + len <= data_end`, len at
// most MAX_IP_LEN), added to `sum`: whole 512-byte chunks, then 256, 128, ..., 4 bytes, then
// the last 2 and 1, each a constant size the verifier can check against `data_end`. Sums are in
// memory order, as the kernel's csum_partial (what bpf_csum_diff returns) keeps them.
static __always_inline __u32 csum_add_bytes(__u8 *p, void *data_end, __u32 len, __u32 sum)
{
#pragma unroll
	for (int i = 0; i < MAX_IP_LEN / 512; i++) {
		if (len < 512)
			break;
		if ((void *)(p + 512) > data_end)
			return sum;
		sum = bpf_csum_diff(0, 0, (__be32 *)p, 512, sum);
		p += 512;
		len -= 512;
	}
#define CSUM_STEP(n)                                                                   \
	if (len & (n)) {                                                               \
		if ((void *)(p + (n)) > data_end)                                       \
			return sum;                                                    \
		sum = bpf_csum_diff(0, 0, (__be32 *)p, (n), sum);                      \
		p += (n);                                                              \
	}
	CSUM_STEP(256)
	CSUM_STEP(128)
	CSUM_STEP(64)
	CSUM_STEP(32)
	CSUM_STEP(16)
	CSUM_STEP(8)
	CSUM_STEP(4)
#undef CSUM_STEP
	__u8 tail[4] = {};
	if (len & 2) {
		if ((void *)(p + 2) > data_end)
			return sum;
		tail[0] = p[0];
		tail[1] = p[1];
		p += 2;
	}
	if (len & 1) {
		if ((void *)(p + 1) > data_end)
			return sum;
		if (len & 2)
			tail[2] = p[0];
		else
			tail[0] = p[0];
	}
	if (len & 3)
		sum = bpf_csum_diff(0, 0, (__be32 *)tail, 4, sum);
	return sum;
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

// The UDP checksum of the datagram at `udp` (header written, check zero) from `saddr` to
// `daddr` (RFC 768: pseudo-header of addresses, protocol and UDP length, then the datagram);
// a computed zero is sent as all ones.
static __always_inline __u16 udp_checksum(struct udphdr *udp, void *data_end, __u32 saddr,
					  __u32 daddr)
{
	__u32 pseudo[3] = {saddr, daddr, 0};
	__u16 *words = (__u16 *)&pseudo[2];
	words[0] = bpf_htons(IPPROTO_UDP);
	words[1] = udp->len;
	__u32 sum = bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), 0);
	sum = csum_add_bytes((__u8 *)udp, data_end, bpf_ntohs(udp->len), sum);
	__u16 check = csum_fold(sum);
	return check ? check : 0xffff;
}

// Whether the stack would deliver a packet for `daddr` arriving on the ingress interface to
// this host (a local address: the route lookup's "not forwarded"), as the user-space relay's
// socket would receive it. Packets for other hosts that happen to use the gateway's port are
// left to the stack, which routes or drops them as it would without the program.
static __always_inline int is_local(struct xdp_md *ctx, __u32 daddr)
{
	struct bpf_fib_lookup fib;
	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.ipv4_dst = daddr;
	fib.ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH) ==
	       BPF_FIB_LKUP_RET_NOT_FWDED;
}

// The route to `daddr` from this host: next hop MACs, egress interface and the source address
// the kernel would choose (BPF_FIB_LOOKUP_SRC, Linux 6.7+). Zero on success: a next hop out of
// an interface in EGRESS.
static __always_inline int route_to(struct xdp_md *ctx, __u32 daddr, __u16 tot_len,
				    struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	fib->ipv4_dst = daddr;
	fib->ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, fib, sizeof(*fib), BPF_FIB_LOOKUP_SRC) != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	// Out of an interface the program is attached to only.
	__u32 out = fib->ifindex;
	return bpf_map_lookup_elem(&EGRESS, &out) ? 0 : -1;
}

// Rewrites the headers at `data` (after the move) for a packet from `saddr:sport` to
// `daddr:dport` of UDP payload length `payload`, and sends it where `fib` says.
static __always_inline int send(void *data, void *data_end, struct bpf_fib_lookup *fib,
				__u32 saddr, __u16 sport, __u32 daddr, __u16 dport,
				__u16 payload, __u32 ingress)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->ttl = 64;
	ip->tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct udphdr) + payload);
	ip->check = ipv4_checksum(ip);
	udp->source = sport;
	udp->dest = dport;
	udp->len = bpf_htons(sizeof(struct udphdr) + payload);
	udp->check = 0;
	// A full checksum, not an update of the sender's: on a veth that one may still be the
	// partial (offloaded) sum. The receiver's UDP GRO also needs it non-zero to batch.
	udp->check = udp_checksum(udp, data_end, saddr, daddr);
	if (fib->ifindex == ingress)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

SEC("xdp")
int halyard_gateway(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__u8 *payload = (void *)(udp + 1);
	if ((void *)payload > data_end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	// Fragments (more-fragments flag or an offset) are reassembled by the stack.
	if (ip->frag_off & bpf_htons(0x3FFF))
		return XDP_PASS;
	__u32 zero = 0;
	struct settings *s = bpf_map_lookup_elem(&SETTINGS, &zero);
	if (!s || udp->dest != s->port)
		return XDP_PASS;
	// Only datagrams the gateway's own socket would receive: to its bound address, or with
	// none, to an address of this host.
	if (s->addr ? ip->daddr != s->addr : !is_local(ctx, ip->daddr))
		return XDP_PASS;
	__u16 ip_len = bpf_ntohs(ip->tot_len);
	if (ip_len > MAX_IP_LEN || (void *)eth + sizeof(*eth) + ip_len != data_end)
		return XDP_PASS;
	if (bpf_ntohs(udp->len) != ip_len - sizeof(struct iphdr))
		return XDP_PASS;
	__u16 len = ip_len - sizeof(struct iphdr) - sizeof(struct udphdr);
	struct bpf_fib_lookup fib;

	if (payload + 1 + PLAIN_CID_LEN <= (__u8 *)data_end && (payload[0] & 0xC0) == 0x40) {
		// A short-header packet from a caller: routed by its connection ID.
		struct route_key key = {};
		__builtin_memcpy(key.cid, payload + 1, sizeof(key.cid));
		struct endpoint *to = bpf_map_lookup_elem(&ROUTES, &key);
		if (!to)
			return XDP_PASS;
		__u16 out_len = ip_len + PROXY_V4_LEN;
		if (route_to(ctx, to->addr, out_len, &fib)) {
			count(STAT_UNROUTED, 1);
			return XDP_PASS;
		}
		__u32 caller = ip->saddr, dialled = ip->daddr;
		__u16 caller_port = udp->source, gateway_port = udp->dest;
		__u32 to_addr = to->addr;
		__u16 to_port = to->port;
		if (bpf_xdp_adjust_head(ctx, -PROXY_V4_LEN))
			return XDP_PASS;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		__u8 *head = data;
		if ((void *)(head + HEADERS_LEN + PROXY_V4_LEN) > data_end)
			return XDP_ABORTED;
		// The Ethernet, IP and UDP headers move to the new front; the PROXY header fills
		// the gap between them and the QUIC packet.
		__u8 saved[HEADERS_LEN];
		__builtin_memcpy(saved, head + PROXY_V4_LEN, HEADERS_LEN);
		__builtin_memcpy(head, saved, HEADERS_LEN);
		__u8 *proxy = head + HEADERS_LEN;
		__builtin_memcpy(proxy, PROXY_SIGNATURE, sizeof(PROXY_SIGNATURE));
		proxy[12] = 0x21; // version 2, PROXY
		proxy[13] = 0x12; // AF_INET, SOCK_DGRAM
		proxy[14] = 0;
		proxy[15] = 12;
		__builtin_memcpy(proxy + 16, &caller, 4);
		__builtin_memcpy(proxy + 20, &dialled, 4);
		__builtin_memcpy(proxy + 24, &caller_port, 2);
		__builtin_memcpy(proxy + 26, &gateway_port, 2);
		count(STAT_FORWARDED, 1);
		count(STAT_FORWARDED_BYTES, len);
		// From the address the user-space relay sends from: its bound one, else the one
		// the kernel chooses for the route.
		__u32 from = s->addr ? s->addr : fib.ipv4_src;
		return send(data, data_end, &fib, from, gateway_port, to_addr, to_port,
			    len + PROXY_V4_LEN, ctx->ingress_ifindex);
	}

	if (payload + PROXY_V4_LEN <= (__u8 *)data_end && payload[0] == PROXY_SIGNATURE[0]) {
		// An answer from an endpoint for one of its callers.
		struct endpoint from = {.addr = ip->saddr, .port = udp->source};
		if (!bpf_map_lookup_elem(&BACKENDS, &from))
			return XDP_PASS;
		// The endpoint's address is believed only on the interface the route to it leaves
		// by (a reverse-path check: XDP runs before the stack's rp_filter).
		struct bpf_fib_lookup back;
		if (route_to(ctx, ip->saddr, ip_len, &back) || back.ifindex != ctx->ingress_ifindex)
			return XDP_PASS;
		if (!has_signature(payload) ||
		    payload[12] != 0x21 || payload[13] != 0x12 || payload[14] != 0 ||
		    payload[15] != 12 || len < PROXY_V4_LEN)
			return XDP_PASS;
		// The header's source (the address the caller dialled) is not used: the answer
		// leaves from where the user-space relay's socket would send it, so an endpoint
		// cannot choose the gateway's source address or port.
		__u32 caller;
		__u16 caller_port;
		__builtin_memcpy(&caller, payload + 20, 4);
		__builtin_memcpy(&caller_port, payload + 26, 2);
		__u16 out_len = ip_len - PROXY_V4_LEN;
		if (route_to(ctx, caller, out_len, &fib)) {
			count(STAT_UNROUTED, 1);
			return XDP_PASS;
		}
		__u32 public_addr = s->addr ? s->addr : fib.ipv4_src;
		__u16 public_port = s->port;
		__u8 saved[HEADERS_LEN];
		__builtin_memcpy(saved, data, HEADERS_LEN);
		if (bpf_xdp_adjust_head(ctx, PROXY_V4_LEN))
			return XDP_PASS;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + HEADERS_LEN > data_end)
			return XDP_ABORTED;
		__builtin_memcpy(data, saved, HEADERS_LEN);
		__u16 out_payload = len - PROXY_V4_LEN;
		count(STAT_RETURNED, 1);
		count(STAT_RETURNED_BYTES, out_payload);
		return send(data, data_end, &fib, public_addr, public_port, caller, caller_port,
			    out_payload, ctx->ingress_ifindex);
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
