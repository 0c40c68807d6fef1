//! The UDP socket under the QUIC endpoint, with one job more than quinn's: Initial packets from a
//! source that is past both its handshake rates (`admission`) are dropped as they are read,
//! before quinn derives the Initial keys for them and decrypts them (RFC 9001 §5.2: keys from
//! the client's destination connection ID, so each such packet costs an HKDF and an AEAD
//! decryption of ≥ 1,200 bytes, RFC 9000 §14.1). Everything else passes untouched: short-header
//! packets (established connections, also from a throttled address), Handshake and 0-RTT
//! packets, other versions (quinn answers them with Version Negotiation).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::admission::Gate;

/// Whether `datagram` starts with a QUIC version 1 Initial packet (RFC 9000 §17.2.2: long header
/// form bit set, type bits 0b00, version 0x00000001).
pub(crate) fn is_v1_initial(datagram: &[u8]) -> bool {
    matches!(datagram, [first, 0, 0, 0, 1, ..] if first & 0xB0 == 0x80)
}

/// An [`AsyncUdpSocket`] that drops the Initials of sources the [`Gate`] throttles.
pub(crate) struct InitialFilter {
    inner: Arc<dyn AsyncUdpSocket>,
    gate: Gate,
}

impl InitialFilter {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, gate: Gate) -> Arc<Self> {
        Arc::new(Self { inner, gate })
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
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let received = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = received {
            for (m, buf) in meta.iter_mut().zip(bufs.iter()).take(n) {
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
