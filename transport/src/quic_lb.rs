//! Routable connection IDs, as in QUIC-LB (draft-ietf-quic-load-balancers): every connection
//! ID a sidecar issues names the sidecar, so an east-west gateway in front of it routes each
//! packet by its destination connection ID alone, with no table of connections. The gateway
//! can restart, run as several replicas, and follow a client that changes address (RFC 9000 §9),
//! because every packet carries what routes it.
//!
//! ```text
//! byte 0          bytes 1..7           bytes 7..15
//! CR(3) | L(5)    server ID (6 bytes)  nonce (8 random bytes)
//! ```
//!
//! - `CR`, config rotation (the draft's first octet): [`CONFIG_ID`]; `0b111` is the draft's
//!   "unroutable" code point and is never issued.
//! - `L`, length self-description: the connection ID's length minus one (14), so a gateway
//!   reads a short-header packet's connection ID without knowing the length in advance.
//! - The server ID is [`ServerId::of`] the sidecar's registered QUIC address: the first 6 bytes
//!   of SHA-256 over a label and the address, so a gateway derives the same ID from the registry
//!   and connection IDs do not spell out the cluster's internal addresses. This is the draft's
//!   unencrypted configuration: an observer can still link a connection's IDs to one server
//!   (not to one connection: the nonce is random per ID).

use std::fmt;
use std::net::SocketAddr;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use sha2::{Digest, Sha256};

/// The config rotation code point of every connection ID Halyard issues.
pub const CONFIG_ID: u8 = 0;
/// Length of a [`ServerId`] in bytes.
pub const SERVER_ID_LEN: usize = 6;
/// Length of the random nonce in bytes: 2^64 IDs per server before a repeat is likely.
pub const NONCE_LEN: usize = 8;
/// Length of every connection ID Halyard issues: first octet, server ID, nonce (15 bytes).
pub const CID_LEN: usize = 1 + SERVER_ID_LEN + NONCE_LEN;

/// The server ID of one sidecar in its connection IDs: 6 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub [u8; SERVER_ID_LEN]);

impl ServerId {
    /// The server ID of the sidecar registered at `addr` (its advertised QUIC address): the
    /// first 6 bytes of SHA-256("halyard quic-lb v1" ‖ `addr` as text).
    pub fn of(addr: SocketAddr) -> ServerId {
        let mut hash = Sha256::new();
        hash.update(b"halyard quic-lb v1\0");
        hash.update(addr.to_string().as_bytes());
        let digest = hash.finalize();
        let mut id = [0u8; SERVER_ID_LEN];
        id.copy_from_slice(&digest[..SERVER_ID_LEN]);
        ServerId(id)
    }

    /// The server ID written as 12 lowercase hex digits (as in the gateway's server names).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 12 hex digits (either case); `None` for anything else.
    pub fn from_hex(text: &str) -> Option<ServerId> {
        if text.len() != SERVER_ID_LEN * 2 || !text.is_ascii() {
            return None;
        }
        let mut id = [0u8; SERVER_ID_LEN];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ServerId(id))
    }
}

impl fmt::Debug for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerId({})", self.to_hex())
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The first octet of a Halyard connection ID.
const FIRST_OCTET: u8 = (CONFIG_ID << 5) | (CID_LEN as u8 - 1);

/// The server ID in `cid` when it is a Halyard connection ID (right length, config rotation and
/// length self-description); `None` for any other bytes (a client's random Initial ID, another
/// configuration).
pub fn server_id(cid: &[u8]) -> Option<ServerId> {
    if cid.len() != CID_LEN || cid.first() != Some(&FIRST_OCTET) {
        return None;
    }
    let mut id = [0u8; SERVER_ID_LEN];
    id.copy_from_slice(cid.get(1..1 + SERVER_ID_LEN)?);
    Some(ServerId(id))
}

/// The connection ID naming `server` with `nonce`: first octet, server ID, nonce.
pub fn connection_id(server: ServerId, nonce: [u8; NONCE_LEN]) -> [u8; CID_LEN] {
    let mut bytes = [0u8; CID_LEN];
    bytes[0] = FIRST_OCTET;
    bytes[1..1 + SERVER_ID_LEN].copy_from_slice(&server.0);
    bytes[1 + SERVER_ID_LEN..].copy_from_slice(&nonce);
    bytes
}

/// The destination connection ID of a short-header (1-RTT) packet, read through the length
/// self-description of its first byte (RFC 9000 §17.3.1: the length is not on the wire).
/// `None` when the packet is too short or the first byte is not a Halyard one.
pub fn short_header_dcid(datagram: &[u8]) -> Option<&[u8]> {
    let first = *datagram.get(1)?;
    if first >> 5 != CONFIG_ID {
        return None;
    }
    let len = usize::from(first & 0x1f) + 1;
    datagram.get(1..1 + len)
}

/// quinn's connection ID generator for a sidecar whose server ID is fixed: every ID is
/// [`CID_LEN`] bytes, first octet, server ID, random nonce.
#[derive(Debug, Clone, Copy)]
pub struct LbConnectionIdGenerator {
    server: ServerId,
}

impl LbConnectionIdGenerator {
    /// A generator issuing IDs that name `server`.
    pub fn new(server: ServerId) -> Self {
        LbConnectionIdGenerator { server }
    }

    /// The server ID every ID carries.
    pub fn server(&self) -> ServerId {
        self.server
    }
}

impl ConnectionIdGenerator for LbConnectionIdGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        ConnectionId::new(&connection_id(self.server, rand::random()))
    }

    /// An ID is one of ours when it names this server (quinn answers others with stateless
    /// resets only when they validate).
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match server_id(cid) {
            Some(id) if id == self.server => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_name_their_server_and_differ() {
        let server = ServerId::of("10.1.2.3:15443".parse().unwrap());
        let mut generator = LbConnectionIdGenerator::new(server);
        let a = generator.generate_cid();
        let b = generator.generate_cid();
        assert_eq!(a.len(), CID_LEN);
        assert_ne!(a, b, "the nonce is random");
        assert_eq!(server_id(&a), Some(server));
        assert_eq!(server_id(&b), Some(server));
        assert!(generator.validate(&a).is_ok());
        let other = LbConnectionIdGenerator::new(ServerId::of("10.1.2.4:15443".parse().unwrap()))
            .generate_cid();
        assert!(generator.validate(&other).is_err());
    }

    #[test]
    fn server_ids_are_stable_and_distinct_per_address() {
        let a: SocketAddr = "10.1.2.3:15443".parse().unwrap();
        assert_eq!(ServerId::of(a), ServerId::of(a));
        assert_ne!(
            ServerId::of(a),
            ServerId::of("10.1.2.3:15444".parse().unwrap())
        );
        assert_ne!(
            ServerId::of(a),
            ServerId::of("[fd00::1]:15443".parse().unwrap())
        );
        let hex = ServerId::of(a).to_hex();
        assert_eq!(hex.len(), 12);
        assert_eq!(ServerId::from_hex(&hex), Some(ServerId::of(a)));
        assert_eq!(
            ServerId::from_hex(&hex.to_uppercase()),
            Some(ServerId::of(a))
        );
        for bad in [
            "",
            "0011223344",
            "00112233445566",
            "zz1122334455",
            "é0112233445",
        ] {
            assert_eq!(ServerId::from_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn foreign_ids_are_not_read_as_ours() {
        // A client's random 8-byte Initial ID, a 15-byte ID with another first octet, and the
        // draft's unroutable config rotation 0b111.
        assert_eq!(server_id(&[0x0e; 8]), None);
        let mut cid = [0u8; CID_LEN];
        cid[0] = 0x0d;
        assert_eq!(server_id(&cid), None);
        cid[0] = 0xe0 | 14;
        assert_eq!(server_id(&cid), None);
        cid[0] = FIRST_OCTET;
        assert_eq!(server_id(&cid), Some(ServerId([0; 6])));
        assert_eq!(server_id(&cid[..CID_LEN - 1]), None);
    }

    #[test]
    fn short_header_ids_are_read_by_their_self_described_length() {
        let mut generator = LbConnectionIdGenerator::new(ServerId([1, 2, 3, 4, 5, 6]));
        let cid = generator.generate_cid();
        let mut packet = vec![0x41];
        packet.extend_from_slice(&cid);
        packet.extend_from_slice(&[0xaa; 40]);
        assert_eq!(short_header_dcid(&packet), Some(&cid[..]));
        assert_eq!(short_header_dcid(&packet[..10]), None, "truncated");
        assert_eq!(short_header_dcid(&[0x41]), None);
        assert_eq!(short_header_dcid(&[0x41, 0xe0 | 14]), None, "unroutable");
    }
}
