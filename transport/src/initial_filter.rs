//! The UDP socket under the QUIC endpoint, with one job more than quinn's: Initial packets from a
//! source that is past both its handshake rates (`admission`) are dropped as they are read,
//! before quinn derives the Initial keys for them and decrypts them (RFC 9001 §5.2: keys from
//! the client's destination connection ID, so each such packet costs an HKDF and an AEAD
//! decryption of ≥ 1,200 bytes, RFC 9000 §14.1). Everything else passes untouched: short-header
//! packets (established connections, also from a throttled address), Handshake and 0-RTT
//! packets, other versions (quinn answers them with Version Negotiation).
//!
//! With `proxy_protocol_from` set it has a second: datagrams that a trusted east-west gateway
//! hands over behind a PROXY protocol v2 header ([`crate::proxy_v2`]) are unwrapped and given
//! to quinn as coming from the client the header names, and quinn's answers to such a client
//! are wrapped and sent to the gateway that last brought one of its datagrams. quinn sees the
//! real client address: admission per source, path validation and migration (RFC 9000 §9) work
//! across the gateway, which keeps no state of its own.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::admission::Gate;
use crate::config::IpPrefix;
use crate::proxy_v2::{self, ProxyHeader};

/// Clients remembered as reached through a gateway; past it the longest-silent is forgotten.
const MAX_PROXIED_CLIENTS: usize = 65_536;
/// Datagrams held back when a gateway's GRO batch mixed clients (delivered on the next reads).
const MAX_PENDING: usize = 256;

/// Whether `datagram` starts with a QUIC version 1 Initial packet (RFC 9000 §17.2.2: long header
/// form bit set, type bits 0b00, version 0x00000001).
pub(crate) fn is_v1_initial(datagram: &[u8]) -> bool {
    matches!(datagram, [first, 0, 0, 0, 1, ..] if first & 0xB0 == 0x80)
}

/// An [`AsyncUdpSocket`] that drops the Initials of sources the [`Gate`] throttles, and
/// unwraps and wraps the datagrams of clients behind east-west gateways.
pub(crate) struct InitialFilter {
    inner: Arc<dyn AsyncUdpSocket>,
    gate: Gate,
    /// `None` when no gateway is trusted.
    proxy: Option<Arc<Proxied>>,
}

impl InitialFilter {
    pub(crate) fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        gate: Gate,
        proxy: Option<Arc<Proxied>>,
    ) -> Arc<Self> {
        Arc::new(Self { inner, gate, proxy })
    }
}

/// Where answers to a client behind a gateway go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Via {
    /// The gateway's address on this side (where its wrapped datagram came from).
    gateway: SocketAddr,
    /// The gateway's address the client sent to (the header's destination), put back as the
    /// source of answers.
    public: SocketAddr,
    seen: Instant,
}

/// The gateway state of one endpoint, kept across `rebind`.
#[derive(Debug)]
pub(crate) struct Proxied {
    trusted: Vec<IpPrefix>,
    clients: Mutex<HashMap<SocketAddr, Via>>,
    pending: Mutex<VecDeque<(RecvMeta, Vec<u8>)>>,
    /// Reused to build wrapped transmits.
    scratch: Mutex<Vec<u8>>,
}

impl Proxied {
    /// `None` for an empty trust list (nothing to unwrap).
    pub(crate) fn new(trusted: &[IpPrefix]) -> Option<Arc<Self>> {
        (!trusted.is_empty()).then(|| {
            Arc::new(Proxied {
                trusted: trusted.to_vec(),
                clients: Mutex::new(HashMap::new()),
                pending: Mutex::new(VecDeque::new()),
                scratch: Mutex::new(Vec::new()),
            })
        })
    }

    fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted.iter().any(|p| p.contains(ip))
    }

    fn remember(&self, client: SocketAddr, gateway: SocketAddr, public: SocketAddr) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if clients.len() >= MAX_PROXIED_CLIENTS && !clients.contains_key(&client) {
            // Forget the longer-silent half at once: one pass per MAX/2 new callers, so a
            // stream of new source addresses costs O(1) each, not a scan each.
            let mut seen: Vec<Instant> = clients.values().map(|v| v.seen).collect();
            let mid = seen.len() / 2;
            let (_, cut, _) = seen.select_nth_unstable(mid);
            let cut = *cut;
            clients.retain(|_, v| v.seen > cut);
        }
        clients.insert(
            client,
            Via {
                gateway,
                public,
                seen: now,
            },
        );
    }

    pub(crate) fn via(&self, client: SocketAddr) -> Option<Via> {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients.is_empty() {
            return None;
        }
        clients.get(&client).copied()
    }

    /// Unwraps the datagrams of entry `m` in place (one, or a GRO batch of `stride`-sized
    /// ones). Those of the first client stay in the entry (its address becomes the client's);
    /// those of other clients are queued for the next reads. Returns false when the entry is
    /// to be dropped whole (a header that does not parse).
    fn unwrap_entry(&self, m: &mut RecvMeta, buf: &mut [u8]) -> bool {
        let gateway = m.addr;
        let stride = m.stride.clamp(1, m.len.max(1));
        let len = m.len.min(buf.len());
        let mut kept: Option<SocketAddr> = None;
        let mut write = 0;
        let mut new_stride = 0;
        let mut start = 0;
        while start < len {
            let end = (start + stride).min(len);
            let (header, at) = match proxy_v2::decode(&buf[start..end]) {
                Ok(ok) => ok,
                Err(_) => return false,
            };
            let client = header.source;
            self.remember(client, gateway, header.destination);
            match kept {
                None => {
                    kept = Some(client);
                    new_stride = end - start - at;
                }
                // Kept segments must keep the entry's stride (only the last may be shorter).
                Some(first)
                    if first == client && (end - start - at == new_stride || end == len) => {}
                Some(_) => {
                    let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    if pending.len() < MAX_PENDING {
                        let mut meta = *m;
                        meta.addr = client;
                        meta.len = end - start - at;
                        meta.stride = meta.len;
                        pending.push_back((meta, buf[start + at..end].to_vec()));
                    }
                    start = end;
                    continue;
                }
            }
            buf.copy_within(start + at..end, write);
            write += end - start - at;
            start = end;
        }
        match kept {
            Some(client) => {
                m.addr = client;
                m.len = write;
                m.stride = new_stride.max(1);
                true
            }
            None => false,
        }
    }

    /// Fills the first entry with a held-back datagram, if any.
    fn take_pending(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Option<usize> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (m, bytes) = pending.pop_front()?;
        let (buf, slot) = (bufs.first_mut()?, meta.first_mut()?);
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        *slot = RecvMeta {
            len: n,
            stride: n.max(1),
            ..m
        };
        Some(1)
    }

    /// Sends `transmit` to the gateway of its destination, each datagram behind a header;
    /// `None` when the destination was not reached through a gateway.
    fn send_via(
        &self,
        inner: &dyn AsyncUdpSocket,
        transmit: &Transmit<'_>,
    ) -> Option<io::Result<()>> {
        let via = self.via(transmit.destination)?;
        let header = ProxyHeader {
            source: via.public,
            destination: transmit.destination,
        };
        let hlen = proxy_v2::encoded_len(&header);
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let mut out = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        out.clear();
        let mut count = 0;
        for chunk in transmit.contents.chunks(segment) {
            let at = out.len();
            out.resize(at + hlen, 0);
            proxy_v2::encode(&header, &mut out[at..])?;
            out.extend_from_slice(chunk);
            count += 1;
        }
        Some(inner.try_send(&Transmit {
            destination: via.gateway,
            ecn: transmit.ecn,
            contents: &out,
            segment_size: (count > 1).then_some(segment + hlen),
            src_ip: transmit.src_ip,
        }))
    }
}

impl fmt::Debug for InitialFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitialFilter")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for InitialFilter {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if let Some(proxy) = &self.proxy {
            if let Some(sent) = proxy.send_via(&*self.inner, transmit) {
                return sent;
            }
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let Some(n) = self.proxy.as_ref().and_then(|p| p.take_pending(bufs, meta)) {
            self.gate.stats.proxied.fetch_add(1, Relaxed);
            return Poll::Ready(Ok(n));
        }
        let received = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = received {
            for (m, buf) in meta.iter_mut().zip(bufs.iter_mut()).take(n) {
                if proxy_v2::has_signature(buf.get(..m.len).unwrap_or_default()) {
                    let unwrapped = match &self.proxy {
                        Some(proxy) if proxy.trusts(m.addr.ip()) => proxy.unwrap_entry(m, buf),
                        _ => false,
                    };
                    if !unwrapped {
                        self.gate.stats.proxy_refused.fetch_add(1, Relaxed);
                        m.len = 0;
                        continue;
                    }
                    self.gate.stats.proxied.fetch_add(1, Relaxed);
                }
                // A GRO batch (`stride`) holds datagrams of one source: one check for all.
                let first = buf.get(..m.len.min(m.stride.max(1))).unwrap_or_default();
                if is_v1_initial(first) && self.gate.throttles(m.addr.ip()) {
                    // quinn reads `len` bytes: none, so it skips the entry.
                    m.len = 0;
                }
            }
        }
        received
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_of_callers_forgets_its_longer_silent_half_at_once() {
        let proxy = Proxied::new(&["127.0.0.0/8".parse().unwrap()]).unwrap();
        let gateway: SocketAddr = "127.0.0.9:15444".parse().unwrap();
        let caller =
            |i: usize| SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 4433));
        for i in 0..MAX_PROXIED_CLIENTS {
            proxy.remember(caller(i), gateway, gateway);
        }
        let len = || proxy.clients.lock().unwrap().len();
        assert_eq!(len(), MAX_PROXIED_CLIENTS);
        proxy.remember(caller(MAX_PROXIED_CLIENTS), gateway, gateway);
        assert!(len() <= MAX_PROXIED_CLIENTS / 2 + 1, "{}", len());
        assert!(
            proxy.via(caller(MAX_PROXIED_CLIENTS)).is_some(),
            "the newest is kept"
        );
        assert!(
            proxy.via(caller(MAX_PROXIED_CLIENTS - 1)).is_some(),
            "a recent one is kept"
        );
        assert!(proxy.via(caller(0)).is_none(), "the oldest is forgotten");
    }

    #[test]
    fn only_version_1_initials_are_recognised() {
        let mut initial = vec![0xC3, 0, 0, 0, 1, 8];
        initial.resize(1200, 0);
        assert!(is_v1_initial(&initial));
        // Long header, other types: 0-RTT (0b01), Handshake (0b10), Retry (0b11).
        for first in [0xD3, 0xE3, 0xF3] {
            initial[0] = first;
            assert!(!is_v1_initial(&initial), "{first:#x}");
        }
        // Short header (1-RTT), whatever follows.
        assert!(!is_v1_initial(&[0x43, 0, 0, 0, 1]));
        // Other versions: QUIC v2 (RFC 9369), version negotiation (0), a grease version.
        assert!(!is_v1_initial(&[0xC3, 0x6b, 0x33, 0x43, 0xcf]));
        assert!(!is_v1_initial(&[0xC3, 0, 0, 0, 0]));
        assert!(!is_v1_initial(&[0xC3, 0x1a, 0x2a, 0x3a, 0x4a]));
        // Too short to say.
        assert!(!is_v1_initial(&[]));
        assert!(!is_v1_initial(&[0xC3, 0, 0, 0]));
    }
}
