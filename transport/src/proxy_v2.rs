//! PROXY protocol version 2 headers for UDP (the HAProxy PROXY protocol specification, §2.2,
//! "binary header format", `\x21` PROXY command, `\x12` UDP over IPv4 / `\x22` UDP over IPv6):
//! how an east-west gateway hands a QUIC datagram to a sidecar together with the client's
//! address, and how the sidecar hands its answer back with the address to send it to.
//!
//! ```text
//! 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A   signature (12 bytes)
//! 21                                     version 2, command PROXY
//! 12 | 22                                AF_INET | AF_INET6, SOCK_DGRAM
//! LL LL                                  length of what follows (big-endian)
//! src addr, dst addr, src port, dst port (4+4+2+2 or 16+16+2+2 bytes), then TLVs (skipped)
//! ```
//!
//! The signature's first byte (0x0D) has the QUIC fixed bit (0x40) clear, so a header can
//! never be mistaken for a QUIC v1 packet from a peer that does not grease that bit (RFC 9000
//! §17.2, RFC 9287; Halyard endpoints do not).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Header length for IPv4 addresses: 16 fixed bytes and 12 of addresses.
pub const V4_LEN: usize = 28;
/// Header length for IPv6 addresses: 16 fixed bytes and 36 of addresses.
pub const V6_LEN: usize = 52;
/// The longest header [`encode`] writes.
pub const MAX_LEN: usize = V6_LEN;

/// The addresses a header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Where the datagram came from (the gateway → sidecar direction: the client).
    pub source: SocketAddr,
    /// Where it was sent (gateway → sidecar: the gateway's address the client used; sidecar →
    /// gateway: the client to forward the payload to).
    pub destination: SocketAddr,
}

/// Why bytes are not a header [`decode`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No PROXY v2 signature.
    #[error("no PROXY protocol v2 signature")]
    NoSignature,
    /// Shorter than its fixed part or than its own length field.
    #[error("truncated PROXY protocol header")]
    Truncated,
    /// Another version, the LOCAL command, or a family/transport other than UDP over IPv4/IPv6.
    #[error(
        "unsupported PROXY protocol header (version/command {0:#04x}, family/transport {1:#04x})"
    )]
    Unsupported(u8, u8),
}

/// Whether `datagram` starts with the PROXY v2 signature.
pub fn has_signature(datagram: &[u8]) -> bool {
    datagram.starts_with(&SIGNATURE)
}

/// The header length [`encode`] uses for this pair: IPv4 when both are IPv4, else IPv6 (an
/// IPv4 address then written IPv4-mapped).
pub fn encoded_len(header: &ProxyHeader) -> usize {
    match (header.source, header.destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => V4_LEN,
        _ => V6_LEN,
    }
}

/// Writes `header` at the start of `out` and returns its length; `None` (nothing written) when
/// `out` is shorter than [`encoded_len`].
pub fn encode(header: &ProxyHeader, out: &mut [u8]) -> Option<usize> {
    let len = encoded_len(header);
    let out = out.get_mut(..len)?;
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = 0x21;
    let addresses = len - 16;
    out[14..16].copy_from_slice(&(addresses as u16).to_be_bytes());
    match (header.source, header.destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out[13] = 0x12;
            out[16..20].copy_from_slice(&s.ip().octets());
            out[20..24].copy_from_slice(&d.ip().octets());
            out[24..26].copy_from_slice(&s.port().to_be_bytes());
            out[26..28].copy_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            out[13] = 0x22;
            out[16..32].copy_from_slice(&v6(s.ip()).octets());
            out[32..48].copy_from_slice(&v6(d.ip()).octets());
            out[48..50].copy_from_slice(&s.port().to_be_bytes());
            out[50..52].copy_from_slice(&d.port().to_be_bytes());
        }
    }
    Some(len)
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Reads the header at the start of `datagram`: its addresses and its whole length (TLVs
/// included), after which the payload starts. IPv4-mapped IPv6 addresses come back as IPv4.
pub fn decode(datagram: &[u8]) -> Result<(ProxyHeader, usize), ProxyError> {
    if !has_signature(datagram) {
        return Err(ProxyError::NoSignature);
    }
    let fixed = datagram.get(..16).ok_or(ProxyError::Truncated)?;
    let (command, family) = (fixed[12], fixed[13]);
    let following = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let total = 16 + following;
    let body = datagram.get(16..total).ok_or(ProxyError::Truncated)?;
    if command != 0x21 {
        return Err(ProxyError::Unsupported(command, family));
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let header = match family {
        0x12 if body.len() >= 12 => {
            let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            ProxyHeader {
                source: SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                destination: SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
            }
        }
        0x22 if body.len() >= 36 => {
            let ip = |b: &[u8]| {
                let mut o = [0u8; 16];
                o.copy_from_slice(b);
                let v6 = Ipv6Addr::from(o);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            };
            ProxyHeader {
                source: SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                destination: SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
            }
        }
        0x12 | 0x22 => return Err(ProxyError::Truncated),
        _ => return Err(ProxyError::Unsupported(command, family)),
    };
    Ok((header, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(source: &str, destination: &str) -> (ProxyHeader, usize) {
        let header = ProxyHeader {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        };
        let mut buf = vec![0u8; MAX_LEN];
        let len = encode(&header, &mut buf).unwrap();
        buf.truncate(len);
        buf.extend_from_slice(b"abc");
        let (read, at) = decode(&buf).unwrap();
        assert_eq!(at, len);
        assert_eq!(&buf[at..], b"abc");
        (read, len)
    }

    #[test]
    fn headers_roundtrip_for_both_families() {
        let (h, len) = roundtrip("192.0.2.1:4433", "10.0.0.9:15444");
        assert_eq!(len, V4_LEN);
        assert_eq!(h.source, "192.0.2.1:4433".parse().unwrap());
        assert_eq!(h.destination, "10.0.0.9:15444".parse().unwrap());
        let (h, len) = roundtrip("[2001:db8::1]:4433", "[fd00::9]:15444");
        assert_eq!(len, V6_LEN);
        assert_eq!(h.source, "[2001:db8::1]:4433".parse().unwrap());
        // Mixed families are written as IPv6 and read back as they were.
        let (h, len) = roundtrip("192.0.2.1:4433", "[fd00::9]:15444");
        assert_eq!(len, V6_LEN);
        assert_eq!(h.source, "192.0.2.1:4433".parse().unwrap());
    }

    #[test]
    fn the_specifications_example_bytes_decode() {
        // UDP over IPv4, 127.0.0.1:1 -> 127.0.0.2:2, written out by hand from the spec.
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x12, 0, 12, 127, 0, 0, 1, 127, 0, 0, 2, 0, 1, 0, 2]);
        let (h, len) = decode(&bytes).unwrap();
        assert_eq!(len, 28);
        assert_eq!(h.source, "127.0.0.1:1".parse().unwrap());
        assert_eq!(h.destination, "127.0.0.2:2".parse().unwrap());
        // TLVs after the addresses are covered by the length and skipped.
        bytes[15] = 12 + 4;
        bytes.extend_from_slice(&[0x04, 0, 1, 0, b'x']);
        let (_, len) = decode(&bytes).unwrap();
        assert_eq!(len, 32);
        assert_eq!(&bytes[len..], b"x");
    }

    #[test]
    fn bad_headers_are_refused_by_kind() {
        let mut ok = [0u8; V4_LEN];
        let header = ProxyHeader {
            source: "192.0.2.1:1".parse().unwrap(),
            destination: "192.0.2.2:2".parse().unwrap(),
        };
        encode(&header, &mut ok).unwrap();
        assert_eq!(decode(b"\x40abc"), Err(ProxyError::NoSignature));
        assert_eq!(decode(&ok[..14]), Err(ProxyError::Truncated));
        assert_eq!(decode(&ok[..27]), Err(ProxyError::Truncated));
        let mut local = ok;
        local[12] = 0x20;
        assert!(matches!(
            decode(&local),
            Err(ProxyError::Unsupported(0x20, _))
        ));
        let mut tcp = ok;
        tcp[13] = 0x11;
        assert!(matches!(
            decode(&tcp),
            Err(ProxyError::Unsupported(_, 0x11))
        ));
        let mut short = ok;
        short[15] = 4;
        assert_eq!(decode(&short), Err(ProxyError::Truncated));
        assert_eq!(encode(&header, &mut [0u8; 27]), None);
    }

    #[test]
    fn no_quic_v1_packet_starts_like_a_header() {
        // The fixed bit (0x40) is set in every QUIC v1 packet; the signature's first byte has it clear.
        assert_eq!(SIGNATURE[0] & 0x40, 0);
    }
}
