//! Reading the server name from a client's first QUIC packet, and nothing more: what an
//! east-west gateway needs to route a new connection without any key of the mesh.
//!
//! An Initial packet is protected with keys that anyone can derive from its destination
//! connection ID and the version's public salt (RFC 9001 §5.2), so it hides nothing from an
//! on-path reader: [`initial_server_name`] removes header protection (RFC 9001 §5.4), opens
//! the packet (AEAD_AES_128_GCM, RFC 9001 §5.3), gathers its CRYPTO frames (RFC 9000 §19.6) and
//! lets rustls's `Acceptor` parse the ClientHello (RFC 8446 §4.1.2) for its `server_name`
//! (RFC 6066 §3). Handshake and 1-RTT packets use keys from the TLS handshake, which the
//! gateway never has.
//!
//! A ClientHello larger than one packet (a post-quantum key share, many ALPN names) spans the
//! client's first Initials: [`initial_crypto`] gives each packet's CRYPTO frames and
//! [`server_name_in`] reads the name once the pieces gathered from offset 0 hold the whole
//! ClientHello ([`InitialError::Incomplete`] before). Halyard's own (X25519 key share, no
//! session tickets) is a few hundred bytes: one packet.

use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
use rustls::quic::{Keys, Version};
use rustls::{Side, SupportedCipherSuite};

/// The longest connection ID QUIC version 1 allows (RFC 9000 §17.2).
const MAX_CID_LEN: usize = 20;
/// QUIC version 1 (RFC 9000 §15).
const VERSION_1: [u8; 4] = [0, 0, 0, 1];

/// Why a datagram gave no server name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitialError {
    /// Not a QUIC version 1 Initial packet.
    #[error("not a QUIC version 1 Initial packet")]
    NotInitial,
    /// A field runs past the datagram, or a length is out of range.
    #[error("malformed Initial packet: {0}")]
    Malformed(&'static str),
    /// Header protection or AEAD authentication failed (not sent with the public keys).
    #[error("Initial packet does not decrypt")]
    Undecryptable,
    /// A frame an Initial may not carry, or one that does not parse.
    #[error("malformed frame in Initial packet: {0}")]
    Frame(&'static str),
    /// The CRYPTO data is not a parseable ClientHello.
    #[error("CRYPTO data is not a ClientHello: {0}")]
    NotClientHello(String),
    /// The ClientHello continues in a later packet.
    #[error("ClientHello continues past the first Initial")]
    Incomplete,
}

/// The destination connection ID of a long-header packet (RFC 9000 §17.2), any version.
pub fn long_header_dcid(datagram: &[u8]) -> Option<&[u8]> {
    let first = *datagram.first()?;
    if first & 0x80 == 0 {
        return None;
    }
    let len = usize::from(*datagram.get(5)?);
    if len > MAX_CID_LEN {
        return None;
    }
    datagram.get(6..6 + len)
}

/// The `server_name` of the ClientHello in the first packet of `datagram`, a client's QUIC v1
/// Initial; `Ok(None)` when the ClientHello has none. The datagram is not changed (the packet
/// is copied to be decrypted).
///
/// # Errors
/// [`InitialError::Incomplete`] when the ClientHello continues in a later packet (see
/// [`initial_crypto`]); the others when the datagram is no readable client Initial.
pub fn initial_server_name(datagram: &[u8]) -> Result<Option<String>, InitialError> {
    server_name_in(&initial_crypto(datagram)?)
}

/// The CRYPTO frames of the first packet of `datagram`, a client's QUIC v1 Initial, as
/// (offset, data) pairs in the order they came (RFC 9000 §19.6). The datagram is not changed.
///
/// # Errors
/// As [`initial_server_name`], but never [`InitialError::Incomplete`] or
/// [`InitialError::NotClientHello`].
pub fn initial_crypto(datagram: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, InitialError> {
    let malformed = InitialError::Malformed;
    // RFC 9000 §17.2.2: long header form, fixed bit, type 0b00, version 1.
    let first = *datagram.first().ok_or(InitialError::NotInitial)?;
    if first & 0xF0 != 0xC0 || datagram.get(1..5) != Some(&VERSION_1[..]) {
        return Err(InitialError::NotInitial);
    }
    let mut at = 5;
    let dcid_len = usize::from(*datagram.get(at).ok_or(malformed("no DCID length"))?);
    if dcid_len > MAX_CID_LEN {
        return Err(malformed("DCID longer than 20 bytes"));
    }
    let dcid = datagram
        .get(at + 1..at + 1 + dcid_len)
        .ok_or(malformed("DCID runs past the datagram"))?;
    at += 1 + dcid_len;
    let scid_len = usize::from(*datagram.get(at).ok_or(malformed("no SCID length"))?);
    if scid_len > MAX_CID_LEN {
        return Err(malformed("SCID longer than 20 bytes"));
    }
    at += 1 + scid_len;
    let (token_len, n) =
        varint(datagram.get(at..).unwrap_or_default()).ok_or(malformed("token length"))?;
    at = at
        .checked_add(n)
        .and_then(|a| a.checked_add(usize::try_from(token_len).ok()?))
        .ok_or(malformed("token length"))?;
    let (length, n) =
        varint(datagram.get(at..).unwrap_or_default()).ok_or(malformed("packet length"))?;
    let pn_offset = at + n;
    let end = usize::try_from(length)
        .ok()
        .and_then(|l| pn_offset.checked_add(l))
        .filter(|end| *end <= datagram.len())
        .ok_or(malformed("packet length runs past the datagram"))?;
    // The header protection sample starts 4 bytes after the packet number's start (RFC 9001
    // §5.4.2) and is 16 bytes long.
    let sample: [u8; 16] = datagram
        .get(pn_offset + 4..pn_offset + 20)
        .filter(|_| pn_offset + 20 <= end)
        .and_then(|s| s.try_into().ok())
        .ok_or(malformed("packet too short to sample"))?;

    let keys = initial_keys(dcid)?;
    let mut packet = datagram[..end].to_vec();
    let mut first_byte = packet[0];
    let mut pn = [0u8; 4];
    pn.copy_from_slice(&packet[pn_offset..pn_offset + 4]);
    keys.remote
        .header
        .decrypt_in_place(&sample, &mut first_byte, &mut pn)
        .map_err(|_| InitialError::Undecryptable)?;
    let pn_len = usize::from(first_byte & 0x03) + 1;
    packet[0] = first_byte;
    packet[pn_offset..pn_offset + pn_len].copy_from_slice(&pn[..pn_len]);
    // A gateway keeps no state: the truncated number is the number (a client's first Initials
    // count from 0, RFC 9000 §12.3, so nothing is lost for the packets that carry a ClientHello).
    let number = pn[..pn_len]
        .iter()
        .fold(0u64, |n, b| (n << 8) | u64::from(*b));
    let (header, payload) = packet.split_at_mut(pn_offset + pn_len);
    let plain = keys
        .remote
        .packet
        .decrypt_in_place(number, header, payload)
        .map_err(|_| InitialError::Undecryptable)?;
    Ok(crypto_frames(plain)?
        .into_iter()
        .map(|(offset, data)| (offset, data.to_vec()))
        .collect())
}

/// The server name of the ClientHello that `pieces` (CRYPTO data of one or more Initials, any
/// order, overlaps allowed) hold from offset 0 on; `Ok(None)` when it has none.
///
/// # Errors
/// [`InitialError::Incomplete`] while the pieces from offset 0 on do not yet hold the whole
/// ClientHello; [`InitialError::NotClientHello`] when they hold something else.
pub fn server_name_in(pieces: &[(u64, Vec<u8>)]) -> Result<Option<String>, InitialError> {
    let borrowed: Vec<(u64, &[u8])> = pieces.iter().map(|(o, d)| (*o, &d[..])).collect();
    client_hello_server_name(&assemble(borrowed)?)
}

fn initial_keys(dcid: &[u8]) -> Result<Keys, InitialError> {
    match TLS13_AES_128_GCM_SHA256 {
        SupportedCipherSuite::Tls13(suite) => match suite.quic {
            // The keys a server uses: `remote` opens what the client sent.
            Some(quic) => Ok(Keys::initial(Version::V1, suite, quic, dcid, Side::Server)),
            None => Err(InitialError::Undecryptable),
        },
        #[allow(unreachable_patterns)]
        _ => Err(InitialError::Undecryptable),
    }
}

/// A variable-length integer (RFC 9000 §16) and the bytes it took.
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let len = 1usize << (first >> 6);
    let raw = bytes.get(..len)?;
    let value = raw[1..]
        .iter()
        .fold(u64::from(first & 0x3f), |v, b| (v << 8) | u64::from(*b));
    Some((value, len))
}

/// The CRYPTO data from offset 0 onward of an Initial's frames, in order (RFC 9000 §19.6).
#[cfg(test)]
fn crypto_data(frames: &[u8]) -> Result<Vec<u8>, InitialError> {
    assemble(crypto_frames(frames)?)
}

/// The CRYPTO frames of an Initial's frames (RFC 9000 §19.6) as (offset, data); the frames an
/// Initial may carry besides are skipped (§12.4, Table 3: PADDING, PING, ACK,
/// CONNECTION_CLOSE of type 0x1c).
fn crypto_frames(mut frames: &[u8]) -> Result<Vec<(u64, &[u8])>, InitialError> {
    let bad = InitialError::Frame;
    let mut pieces: Vec<(u64, &[u8])> = Vec::new();
    let next = |frames: &mut &[u8]| -> Result<u64, InitialError> {
        let (v, n) = varint(frames).ok_or(bad("truncated varint"))?;
        *frames = &frames[n..];
        Ok(v)
    };
    while let Some(&kind) = frames.first() {
        frames = &frames[1..];
        match kind {
            0x00 | 0x01 => {}
            0x02 | 0x03 => {
                next(&mut frames)?; // largest acknowledged
                next(&mut frames)?; // delay
                let ranges = next(&mut frames)?;
                next(&mut frames)?; // first range
                for _ in 0..ranges {
                    next(&mut frames)?;
                    next(&mut frames)?;
                }
                if kind == 0x03 {
                    for _ in 0..3 {
                        next(&mut frames)?;
                    }
                }
            }
            0x06 => {
                let offset = next(&mut frames)?;
                let len = usize::try_from(next(&mut frames)?).map_err(|_| bad("CRYPTO length"))?;
                let data = frames
                    .get(..len)
                    .ok_or(bad("CRYPTO data runs past the packet"))?;
                frames = &frames[len..];
                pieces.push((offset, data));
            }
            0x1c => {
                next(&mut frames)?; // error code
                next(&mut frames)?; // frame type
                let len = usize::try_from(next(&mut frames)?).map_err(|_| bad("reason length"))?;
                frames = frames
                    .get(len..)
                    .ok_or(bad("reason runs past the packet"))?;
            }
            _ => return Err(bad("frame type not allowed in an Initial")),
        }
    }
    Ok(pieces)
}

/// The bytes `pieces` hold from offset 0 up to the first gap.
fn assemble(mut pieces: Vec<(u64, &[u8])>) -> Result<Vec<u8>, InitialError> {
    pieces.sort_by_key(|(offset, _)| *offset);
    let mut data = Vec::new();
    for (offset, piece) in pieces {
        let offset = usize::try_from(offset).map_err(|_| InitialError::Incomplete)?;
        if offset > data.len() {
            break; // a gap: the rest is in a packet not seen
        }
        let skip = data.len() - offset;
        data.extend_from_slice(piece.get(skip..).unwrap_or_default());
    }
    if data.is_empty() {
        return Err(InitialError::Incomplete);
    }
    Ok(data)
}

/// The `server_name` of the ClientHello handshake message `hello` (RFC 8446 §4), parsed by
/// rustls after framing it as one TLS record.
fn client_hello_server_name(hello: &[u8]) -> Result<Option<String>, InitialError> {
    // RFC 8446 §4: msg_type client_hello (1), then a 24-bit length.
    match hello {
        [1, a, b, c, rest @ ..] => {
            let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
            if rest.len() < len {
                return Err(InitialError::Incomplete);
            }
        }
        [1, ..] => return Err(InitialError::Incomplete),
        _ => {
            return Err(InitialError::NotClientHello(
                "first message is not a ClientHello".into(),
            ))
        }
    }
    let len = u16::try_from(hello.len())
        .map_err(|_| InitialError::NotClientHello("longer than one TLS record".into()))?;
    // RFC 8446 §5.1: handshake record, legacy version 0x0303.
    let mut record = Vec::with_capacity(5 + hello.len());
    record.extend_from_slice(&[0x16, 0x03, 0x03]);
    record.extend_from_slice(&len.to_be_bytes());
    record.extend_from_slice(hello);
    let mut acceptor = rustls::server::Acceptor::default();
    acceptor
        .read_tls(&mut &record[..])
        .map_err(|e| InitialError::NotClientHello(e.to_string()))?;
    match acceptor.accept() {
        Ok(Some(accepted)) => Ok(accepted
            .client_hello()
            .server_name()
            .map(|name| name.to_ascii_lowercase())),
        Ok(None) => Err(InitialError::Incomplete),
        Err((e, _)) => Err(InitialError::NotClientHello(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_decode_every_length() {
        // RFC 9000 §A.1's examples.
        assert_eq!(
            varint(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(varint(&[0x9d, 0x7f, 0x3e, 0x7d]), Some((494_878_333, 4)));
        assert_eq!(varint(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(varint(&[0x25]), Some((37, 1)));
        assert_eq!(varint(&[0x7b]), None);
        assert_eq!(varint(&[]), None);
    }

    /// RFC 9001 Appendix A.2: the client Initial of the specification's example, protected.
    /// Its ClientHello names `example.com`.
    #[test]
    fn the_rfc_9001_example_initial_names_example_com() {
        let hex = concat!(
            "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11",
            "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399",
            "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c",
            "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212",
            "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5",
            "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208",
            "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec",
            "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3",
            "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db",
            "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c",
            "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8",
            "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556",
            "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74",
            "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a",
            "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00",
            "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632",
            "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964",
            "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd",
            "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff",
            "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198",
            "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd",
            "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73",
            "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f",
            "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e",
            "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade",
            "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047",
            "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2",
            "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4",
            "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0",
            "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e",
            "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0",
            "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400",
            "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab",
            "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9",
            "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4",
            "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064",
            "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241",
            "e221af44860018ab0856972e194cd934"
        );
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(bytes.len(), 1200);
        assert_eq!(
            long_header_dcid(&bytes),
            Some(&[0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08][..])
        );
        assert_eq!(
            initial_server_name(&bytes),
            Ok(Some("example.com".to_string()))
        );
        // One bit flipped in the payload: the AEAD refuses it.
        let mut flipped = bytes.clone();
        flipped[600] ^= 1;
        assert_eq!(
            initial_server_name(&flipped),
            Err(InitialError::Undecryptable)
        );
        // Truncated: the length field runs past the datagram.
        assert!(matches!(
            initial_server_name(&bytes[..1000]),
            Err(InitialError::Malformed(_))
        ));
    }

    #[test]
    fn other_packets_are_not_initials() {
        for datagram in [
            &[][..],
            &[0x40, 1, 2, 3][..],
            &[0xe0, 0, 0, 0, 1, 0][..],
            &[0xc0, 0, 0, 0, 2, 0][..],
        ] {
            assert_eq!(initial_server_name(datagram), Err(InitialError::NotInitial));
        }
        let mut long = vec![0xc0, 0, 0, 0, 1, 21];
        long.resize(1200, 0);
        assert!(matches!(
            initial_server_name(&long),
            Err(InitialError::Malformed(_))
        ));
        assert_eq!(long_header_dcid(&long), None);
    }

    #[test]
    fn crypto_frames_are_put_in_order_and_stop_at_a_gap() {
        // PADDING, CRYPTO at offset 3 "def", PING, CRYPTO at 0 "abc", CRYPTO at 9 "x" (gap).
        let frames = [
            &[0x00, 0x06, 0x03, 0x03][..],
            b"def",
            &[0x01, 0x06, 0x00, 0x03],
            b"abc",
            &[0x06, 0x09, 0x01],
            b"x",
            &[0x00, 0x00],
        ]
        .concat();
        assert_eq!(crypto_data(&frames).unwrap(), b"abcdef");
        assert_eq!(crypto_data(&[0x00; 10]), Err(InitialError::Incomplete));
        assert!(matches!(
            crypto_data(&[0x08, 0x00]),
            Err(InitialError::Frame(_))
        ));
        assert!(matches!(
            crypto_data(&[0x06, 0x00, 0x05, b'a']),
            Err(InitialError::Frame(_))
        ));
    }
}
