//! Routable connection IDs, as in QUIC-LB (draft-ietf-quic-load-balancers-21): every connection
//! ID a sidecar issues names the sidecar, so an east-west gateway in front of it routes each
//! packet by its destination connection ID alone, with no table of connections. The gateway
//! can restart, run as several replicas, and follow a client that changes address (RFC 9000 §9),
//! because every packet carries what routes it.
//!
//! ```text
//! byte 0          bytes 1..7           bytes 7..
//! CR(3) | L(5)    server ID (6 bytes)  nonce (8 random bytes; 10 with a key)
//!                 └─── with a key: 16 bytes, one AES-128 block, encrypted ───┘
//! ```
//!
//! - `CR`, config rotation (the draft's §2.1): the [`LbConfig`]'s id, 0 to 6; `0b111` is the
//!   draft's "unroutable" code point and is never issued. A gateway holds every configuration
//!   in use ([`LbConfigs`]), so keys rotate without a flag day: gateways learn the new id and
//!   key first, then sidecars move to it.
//! - `L`, length self-description (§2.3): the connection ID's length minus one (14, or 16 with a
//!   key), so a gateway reads a short-header packet's connection ID without knowing the length
//!   in advance. Unencrypted IDs keep the 15 bytes they have always had, so sidecars and
//!   gateways of different releases still read each other's.
//! - The server ID is [`ServerId::of`] the sidecar's registered QUIC address: the first 6 bytes
//!   of SHA-256 over a label and the address, so a gateway derives the same ID from the registry
//!   and connection IDs do not spell out the cluster's internal addresses.
//! - Without a key (the draft's unencrypted configuration) an observer can link every
//!   connection ID to one server, and so link a connection's packets before and after the
//!   client moves. With a key ([`LbKey`]) the server ID and nonce, 16 bytes together, are one
//!   AES-128-ECB block: the draft's single-pass encryption (§5.4.1), whose IDs look random to
//!   anyone without the key and which the draft's distinguishing attacks on the four-pass
//!   Feistel network (§10.6) do not reach. [`encrypt`] and [`decrypt`] implement both of the
//!   draft's algorithms for any length, checked against its test vectors (Appendix B).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use sha2::{Digest, Sha256};

/// The config rotation code point of a sidecar with no `[quic_lb]` setting.
pub const DEFAULT_CONFIG_ID: u8 = 0;
/// The draft's code point for connection IDs no load balancer can route (§2.2); never a
/// configuration's id.
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;
/// Length of a [`ServerId`] in bytes.
pub const SERVER_ID_LEN: usize = 6;
/// Length of the random nonce of an encrypted ID in bytes: with the server ID, one AES block; a
/// repeat is likely only after about 2^40 IDs from one server (§10.5).
pub const NONCE_LEN: usize = 10;
/// Length of the random nonce of an unencrypted ID in bytes (2^32 IDs per server before a
/// repeat is likely; a repeat there reveals nothing the ID does not show already).
pub const PLAIN_NONCE_LEN: usize = 8;
/// Length of an encrypted connection ID: first octet, server ID, nonce (17 bytes).
pub const CID_LEN: usize = 1 + SERVER_ID_LEN + NONCE_LEN;
/// Length of an unencrypted connection ID (15 bytes).
pub const PLAIN_CID_LEN: usize = 1 + SERVER_ID_LEN + PLAIN_NONCE_LEN;
/// Length of a QUIC-LB key (AES-128).
pub const KEY_LEN: usize = 16;

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
        let mut id = [0u8; SERVER_ID_LEN];
        parse_hex(text, &mut id)?;
        Some(ServerId(id))
    }
}

/// Fills `out` from exactly `2 × out.len()` hex digits (either case).
fn parse_hex(text: &str, out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2 || !text.is_ascii() {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(())
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

/// A QUIC-LB key: 16 bytes for AES-128 (§3.1). `Debug` never shows it; its bytes are wiped
/// when it is dropped (as are the expanded round keys of every [`LbConfig`], the `aes`
/// crate's `zeroize` feature).
#[derive(Clone, PartialEq, Eq)]
pub struct LbKey([u8; KEY_LEN]);

impl Drop for LbKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// Why a QUIC-LB key or configuration was refused. Never quotes a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LbError {
    /// The key text is not 32 hex digits.
    #[error("a QUIC-LB key is 32 hex digits (16 bytes, AES-128), on one line")]
    KeyFormat,
    /// The config rotation id is out of range.
    #[error("QUIC-LB config id {0} is out of range: use 0 to 6 (7, 0b111, marks unroutable IDs)")]
    ConfigId(u8),
    /// Two configurations share an id.
    #[error("QUIC-LB config id {0} is given twice")]
    DuplicateId(u8),
    /// Server ID and nonce of a length the draft does not define.
    #[error("QUIC-LB encrypts 5 to 19 bytes (server ID and nonce), not {0}")]
    Length(usize),
}

impl LbKey {
    /// A key from its 16 bytes.
    pub fn new(bytes: [u8; KEY_LEN]) -> LbKey {
        LbKey(bytes)
    }

    /// Parses a key file's text: 32 hex digits, one optional trailing LF or CRLF.
    ///
    /// # Errors
    /// [`LbError::KeyFormat`] for anything else; the error never repeats the text.
    pub fn parse(text: &str) -> Result<LbKey, LbError> {
        let text = text
            .strip_suffix('\n')
            .map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
        let mut key = [0u8; KEY_LEN];
        parse_hex(text, &mut key).ok_or(LbError::KeyFormat)?;
        Ok(LbKey(key))
    }
}

impl fmt::Debug for LbKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LbKey(..)")
    }
}

/// AES-128 in ECB mode on one 16-byte block: the draft's only cipher (§5.4).
#[derive(Clone)]
struct Cipher(Arc<aes::Aes128>);

impl Cipher {
    fn new(key: &LbKey) -> Cipher {
        Cipher(Arc::new(aes::Aes128::new(GenericArray::from_slice(&key.0))))
    }

    fn encrypt(&self, block: &mut [u8; 16]) {
        self.0
            .encrypt_block(GenericArray::from_mut_slice(&mut block[..]));
    }

    fn decrypt(&self, block: &mut [u8; 16]) {
        self.0
            .decrypt_block(GenericArray::from_mut_slice(&mut block[..]));
    }
}

/// The draft's `expand(length, pass, input_bytes)` (§5.4.2): `half` in the most significant
/// octets, zeros, then the plaintext length and the pass number.
fn expand(length: usize, pass: u8, half: &[u8]) -> [u8; 16] {
    let mut block = [0u8; 16];
    block[..half.len()].copy_from_slice(half);
    block[14] = length as u8;
    block[15] = pass;
    block
}

/// One pass of the Feistel network: `target ^= truncate(AES(expand(len, pass, source)))`, then
/// the odd-length nibble clearing of `target` (`clear_first` for a right half).
fn feistel_pass(
    cipher: &Cipher,
    len: usize,
    pass: u8,
    source: &[u8],
    target: &mut [u8],
    clear_first: bool,
) {
    let mut block = expand(len, pass, source);
    cipher.encrypt(&mut block);
    for (t, b) in target.iter_mut().zip(block) {
        *t ^= b;
    }
    clear_nibble(len, target, clear_first);
}

/// For an odd plaintext length the halves share the middle octet: the left half keeps its
/// high four bits, the right half its low four.
fn clear_nibble(len: usize, half: &mut [u8], first: bool) {
    if len % 2 == 0 {
        return;
    }
    if first {
        if let Some(b) = half.first_mut() {
            *b &= 0x0f;
        }
    } else if let Some(b) = half.last_mut() {
        *b &= 0xf0;
    }
}

/// Splits `plaintext` into the draft's `left_0` and `right_0` halves (§5.4.2 step 2).
fn split(plaintext: &[u8]) -> ([u8; 10], [u8; 10], usize) {
    let len = plaintext.len();
    let half = len.div_ceil(2);
    let (mut left, mut right) = ([0u8; 10], [0u8; 10]);
    left[..half].copy_from_slice(&plaintext[..half]);
    right[..half].copy_from_slice(&plaintext[len - half..]);
    clear_nibble(len, &mut left[..half], false);
    clear_nibble(len, &mut right[..half], true);
    (left, right, half)
}

/// Joins two halves back into `out` (§5.4.2 step 12): for an odd length the shared octet is the
/// left half's high nibble and the right half's low nibble.
fn join(left: &[u8], right: &[u8], out: &mut [u8]) {
    let len = out.len();
    let half = left.len();
    out[..half].copy_from_slice(left);
    if len % 2 == 1 {
        out[half - 1] |= right[0];
        out[half..].copy_from_slice(&right[1..]);
    } else {
        out[half..].copy_from_slice(right);
    }
}

/// Encrypts the server ID and nonce, `block` (5 to 19 bytes: every connection ID octet but the
/// first), in place with `key`: single-pass AES-128-ECB for 16 bytes (§5.4.1), otherwise the
/// four-pass Feistel network (§5.4.2).
///
/// # Errors
/// [`LbError::Length`] for any other length; `block` is left unchanged.
pub fn encrypt(key: &LbKey, block: &mut [u8]) -> Result<(), LbError> {
    check_length(block.len())?;
    encrypt_with(&Cipher::new(key), block);
    Ok(())
}

/// Reverses [`encrypt`] (§5.5): the server ID and nonce from the connection ID's octets after
/// the first.
///
/// # Errors
/// [`LbError::Length`] for a length outside 5 to 19; `block` is left unchanged.
pub fn decrypt(key: &LbKey, block: &mut [u8]) -> Result<(), LbError> {
    check_length(block.len())?;
    decrypt_with(&Cipher::new(key), block);
    Ok(())
}

fn check_length(len: usize) -> Result<(), LbError> {
    if (5..=19).contains(&len) {
        Ok(())
    } else {
        Err(LbError::Length(len))
    }
}

fn encrypt_with(cipher: &Cipher, block: &mut [u8]) {
    let len = block.len();
    if let Ok(one) = <&mut [u8; 16]>::try_from(&mut *block) {
        return cipher.encrypt(one);
    }
    if !(5..=19).contains(&len) {
        return;
    }
    let (mut left, mut right, half) = split(block);
    let (l, r) = (&mut left[..half], &mut right[..half]);
    feistel_pass(cipher, len, 1, l, r, true);
    feistel_pass(cipher, len, 2, r, l, false);
    feistel_pass(cipher, len, 3, l, r, true);
    feistel_pass(cipher, len, 4, r, l, false);
    join(l, r, block);
}

fn decrypt_with(cipher: &Cipher, block: &mut [u8]) {
    let len = block.len();
    if let Ok(one) = <&mut [u8; 16]>::try_from(&mut *block) {
        return cipher.decrypt(one);
    }
    if !(5..=19).contains(&len) {
        return;
    }
    let (mut left, mut right, half) = split(block);
    let (l, r) = (&mut left[..half], &mut right[..half]);
    feistel_pass(cipher, len, 4, r, l, false);
    feistel_pass(cipher, len, 3, l, r, true);
    feistel_pass(cipher, len, 2, r, l, false);
    feistel_pass(cipher, len, 1, l, r, true);
    join(l, r, block);
}

/// One QUIC-LB configuration (§3): its config rotation id and, for encrypted IDs, its key.
/// Cheap to clone (the expanded key is shared). `Debug` never shows the key.
#[derive(Clone)]
pub struct LbConfig {
    id: u8,
    cipher: Option<Cipher>,
}

impl fmt::Debug for LbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LbConfig")
            .field("id", &self.id)
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

impl Default for LbConfig {
    /// Unencrypted IDs with config id 0: what a sidecar issues without `[quic_lb]`.
    fn default() -> Self {
        LbConfig {
            id: DEFAULT_CONFIG_ID,
            cipher: None,
        }
    }
}

impl LbConfig {
    /// Configuration `id` (0 to 6), encrypted with `key` when one is given.
    ///
    /// # Errors
    /// [`LbError::ConfigId`] for an id above 6.
    pub fn new(id: u8, key: Option<&LbKey>) -> Result<LbConfig, LbError> {
        if id >= UNROUTABLE_CONFIG_ID {
            return Err(LbError::ConfigId(id));
        }
        Ok(LbConfig {
            id,
            cipher: key.map(Cipher::new),
        })
    }

    /// The config rotation id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Whether its IDs are encrypted.
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// Length of the IDs it issues: [`CID_LEN`] with a key, else [`PLAIN_CID_LEN`].
    pub fn cid_len(&self) -> usize {
        if self.cipher.is_some() {
            CID_LEN
        } else {
            PLAIN_CID_LEN
        }
    }

    fn first_octet(&self) -> u8 {
        (self.id << 5) | (self.cid_len() as u8 - 1)
    }

    /// The connection ID naming `server` with `nonce` under this configuration (an
    /// unencrypted one takes the nonce's first [`PLAIN_NONCE_LEN`] bytes).
    pub fn connection_id(&self, server: ServerId, nonce: [u8; NONCE_LEN]) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        bytes[0] = self.first_octet();
        bytes[1..1 + SERVER_ID_LEN].copy_from_slice(&server.0);
        bytes[1 + SERVER_ID_LEN..].copy_from_slice(&nonce);
        if let Some(cipher) = &self.cipher {
            encrypt_with(cipher, &mut bytes[1..]);
        }
        ConnectionId::new(&bytes[..self.cid_len()])
    }

    /// The server ID in `cid` when it is a Halyard connection ID of this configuration (right
    /// length, config rotation and length self-description); `None` for any other bytes (a
    /// client's random Initial ID, another configuration).
    pub fn server_id(&self, cid: &[u8]) -> Option<ServerId> {
        if cid.len() != self.cid_len() || cid.first() != Some(&self.first_octet()) {
            return None;
        }
        let mut id = [0u8; SERVER_ID_LEN];
        match &self.cipher {
            Some(cipher) => {
                let mut block = [0u8; 16];
                block.copy_from_slice(cid.get(1..1 + 16)?);
                cipher.decrypt(&mut block);
                id.copy_from_slice(&block[..SERVER_ID_LEN]);
            }
            None => id.copy_from_slice(cid.get(1..1 + SERVER_ID_LEN)?),
        }
        Some(ServerId(id))
    }
}

/// The configurations a gateway reads connection IDs with, by config rotation id: every one
/// its cluster's sidecars may be issuing during a key rotation (§2.1).
#[derive(Clone, Debug)]
pub struct LbConfigs {
    by_id: [Option<LbConfig>; 7],
}

impl Default for LbConfigs {
    /// The default configuration alone (unencrypted, id 0).
    fn default() -> Self {
        LbConfigs::new(vec![LbConfig::default()]).unwrap_or_else(|_| LbConfigs {
            by_id: Default::default(),
        })
    }
}

impl LbConfigs {
    /// The configurations `configs`, each id at most once.
    ///
    /// # Errors
    /// [`LbError::DuplicateId`] when two share an id.
    pub fn new(configs: Vec<LbConfig>) -> Result<LbConfigs, LbError> {
        let mut by_id: [Option<LbConfig>; 7] = Default::default();
        for c in configs {
            let slot = by_id
                .get_mut(usize::from(c.id))
                .ok_or(LbError::ConfigId(c.id))?;
            if slot.is_some() {
                return Err(LbError::DuplicateId(c.id));
            }
            *slot = Some(c);
        }
        Ok(LbConfigs { by_id })
    }

    /// The server ID in `cid`, read with the configuration its first octet names; `None` when
    /// that configuration is not held or the bytes are not a Halyard connection ID.
    pub fn server_id(&self, cid: &[u8]) -> Option<ServerId> {
        let id = cid.first()? >> 5;
        self.by_id.get(usize::from(id))?.as_ref()?.server_id(cid)
    }

    /// The configurations held, by id.
    pub fn iter(&self) -> impl Iterator<Item = &LbConfig> {
        self.by_id.iter().flatten()
    }
}

/// The destination connection ID of a short-header (1-RTT) packet, read through the length
/// self-description of its first byte (RFC 9000 §17.3.1: the length is not on the wire).
/// `None` when the packet is too short or the ID carries the unroutable code point.
pub fn short_header_dcid(datagram: &[u8]) -> Option<&[u8]> {
    let first = *datagram.get(1)?;
    if first >> 5 == UNROUTABLE_CONFIG_ID {
        return None;
    }
    let len = usize::from(first & 0x1f) + 1;
    datagram.get(1..1 + len)
}

/// quinn's connection ID generator for a sidecar whose server ID is fixed: every ID is
/// first octet, server ID, random nonce ([`LbConfig::cid_len`] bytes), encrypted when its
/// configuration has a key.
#[derive(Debug, Clone)]
pub struct LbConnectionIdGenerator {
    server: ServerId,
    config: LbConfig,
}

impl LbConnectionIdGenerator {
    /// A generator issuing IDs that name `server` under `config`.
    pub fn new(server: ServerId, config: LbConfig) -> Self {
        LbConnectionIdGenerator { server, config }
    }

    /// The server ID every ID carries.
    pub fn server(&self) -> ServerId {
        self.server
    }
}

impl ConnectionIdGenerator for LbConnectionIdGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        self.config.connection_id(self.server, rand::random())
    }

    /// An ID is one of ours when it names this server (quinn answers others with stateless
    /// resets only when they validate).
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match self.config.server_id(cid) {
            Some(id) if id == self.server => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.config.cid_len()
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key(text: &str) -> LbKey {
        LbKey::parse(text).unwrap()
    }

    /// draft-ietf-quic-load-balancers-21 Appendix B, "Encrypted CIDs": config rotation bits,
    /// server ID, nonce, connection ID (the server encodes the length in the first octet). One
    /// four-pass case of odd length, the single-pass case, and two where the server ID is longer
    /// than the nonce (a fourth decryption pass).
    #[test]
    fn the_drafts_encrypted_test_vectors() {
        let k = key("8f95f09245765f80256934e50c66207f");
        for (cr, sid, nonce, cid) in [
            (0u8, "ed793a", "ee080dbf", "0720b1d07b359d3c"),
            (
                1,
                "ed793a51d49b8f5fab65",
                "ee080dbf48",
                "2fcc381bc74cb4fbad2823a3d1f8fed2",
            ),
            (
                2,
                "ed793a51d49b8f5f",
                "ee080dbf48c0d1e5",
                "504dd2d05a7b0de9b2b9907afb5ecf8cc3",
            ),
            (
                3,
                "ed793a51d49b8f5fab",
                "ee080dbf48c0d1e55d",
                "125779c9cc86beb3a3a4a3ca96fce4bfe0cdbc",
            ),
        ] {
            let cid = hex(cid);
            let mut plain = hex(sid);
            plain.extend(hex(nonce));
            // The length bits hold in every row; the last row's first octet (0x12) carries
            // config rotation 0 where its column says 3, so the rotation bits are checked on
            // the others.
            assert_eq!(
                usize::from(cid[0] & 0x1f),
                plain.len(),
                "length, config {cr}"
            );
            if cr < 3 {
                assert_eq!(cid[0] >> 5, cr, "config rotation");
            }
            let mut block = plain.clone();
            encrypt(&k, &mut block).unwrap();
            assert_eq!(block, cid[1..], "encrypt, config {cr}");
            decrypt(&k, &mut block).unwrap();
            assert_eq!(block, plain, "decrypt, config {cr}");
        }
    }

    /// The worked example of §5.4.2 (a 7-byte plaintext), through its last step.
    #[test]
    fn the_drafts_four_pass_example() {
        let k = key("fdf726a9893ec05c0632d3956680baf0");
        let mut block = hex("31441a9c69c275");
        encrypt(&k, &mut block).unwrap();
        assert_eq!(block, hex("67947d29be054a"));
        decrypt(&k, &mut block).unwrap();
        assert_eq!(block, hex("31441a9c69c275"));
    }

    /// Unencrypted IDs keep the layout of earlier releases (15 bytes, first octet 0x0e for
    /// config 0, the server ID in clear after it): mixed releases read each other's IDs.
    #[test]
    fn unencrypted_ids_keep_their_earlier_layout() {
        let server = ServerId([1, 2, 3, 4, 5, 6]);
        let cid = LbConfig::default().connection_id(server, [9; NONCE_LEN]);
        assert_eq!(&cid[..], &[0x0e, 1, 2, 3, 4, 5, 6, 9, 9, 9, 9, 9, 9, 9, 9]);
        let mut earlier = [0x0e; PLAIN_CID_LEN];
        earlier[1..7].copy_from_slice(&server.0);
        assert_eq!(LbConfigs::default().server_id(&earlier), Some(server));
    }

    #[test]
    fn lengths_the_draft_does_not_define_are_refused() {
        let k = key("00112233445566778899aabbccddeeff");
        for len in [0, 4, 20, 64] {
            let mut block = vec![0x33; len];
            assert_eq!(encrypt(&k, &mut block), Err(LbError::Length(len)));
            assert_eq!(decrypt(&k, &mut block), Err(LbError::Length(len)));
            assert!(block.iter().all(|&b| b == 0x33), "left unchanged");
        }
    }

    #[test]
    fn every_length_round_trips() {
        let k = key("00112233445566778899aabbccddeeff");
        for len in 5..=19 {
            for seed in 0..50u8 {
                let plain: Vec<u8> = (0..len as u8)
                    .map(|i| i.wrapping_mul(37).wrapping_add(seed))
                    .collect();
                let mut block = plain.clone();
                encrypt(&k, &mut block).unwrap();
                assert_ne!(block, plain, "length {len}");
                decrypt(&k, &mut block).unwrap();
                assert_eq!(block, plain, "length {len}");
            }
        }
    }

    #[test]
    fn generated_ids_name_their_server_and_differ() {
        for config in [
            LbConfig::default(),
            LbConfig::new(3, Some(&key("8f95f09245765f80256934e50c66207f"))).unwrap(),
        ] {
            let server = ServerId::of("10.1.2.3:15443".parse().unwrap());
            let mut generator = LbConnectionIdGenerator::new(server, config.clone());
            let a = generator.generate_cid();
            let b = generator.generate_cid();
            assert_eq!(a.len(), config.cid_len());
            assert_eq!(
                usize::from(a[0]),
                (usize::from(config.id()) << 5) | (config.cid_len() - 1),
                "length self-described"
            );
            assert_ne!(a, b, "the nonce is random");
            assert_eq!(config.server_id(&a), Some(server));
            assert_eq!(config.server_id(&b), Some(server));
            assert!(generator.validate(&a).is_ok());
            let other = LbConnectionIdGenerator::new(
                ServerId::of("10.1.2.4:15443".parse().unwrap()),
                config.clone(),
            )
            .generate_cid();
            assert!(generator.validate(&other).is_err());
        }
    }

    /// With a key no connection ID shows its server ID, and IDs of one server share no bytes
    /// beyond the first octet more often than random bytes would.
    #[test]
    fn encrypted_ids_do_not_show_their_server() {
        let config = LbConfig::new(1, Some(&key("8f95f09245765f80256934e50c66207f"))).unwrap();
        let server = ServerId([1, 2, 3, 4, 5, 6]);
        let mut generator = LbConnectionIdGenerator::new(server, config.clone());
        let ids: Vec<ConnectionId> = (0..256).map(|_| generator.generate_cid()).collect();
        let mut same = 0;
        for id in &ids {
            assert!(!id.windows(SERVER_ID_LEN).any(|w| w == server.0));
            same += usize::from(id[1..7] == ids[0][1..7]);
        }
        assert_eq!(same, 1, "only the first ID itself");
        // Another key reads another server (or nothing of use) from the same bytes.
        let wrong = LbConfig::new(1, Some(&key("00000000000000000000000000000000"))).unwrap();
        assert_ne!(wrong.server_id(&ids[0]), Some(server));
        // The plaintext configuration with the same id does not either.
        assert_ne!(
            LbConfig::new(1, None).unwrap().server_id(&ids[0]),
            Some(server)
        );
    }

    #[test]
    fn a_gateway_reads_every_configuration_it_holds() {
        let old = LbConfig::default();
        let new = LbConfig::new(1, Some(&key("8f95f09245765f80256934e50c66207f"))).unwrap();
        let both = LbConfigs::new(vec![old.clone(), new.clone()]).unwrap();
        let server = ServerId([9, 8, 7, 6, 5, 4]);
        for config in [&old, &new] {
            let cid = config.connection_id(server, [3; NONCE_LEN]);
            assert_eq!(both.server_id(&cid), Some(server));
        }
        let only_old = LbConfigs::default();
        assert_eq!(
            only_old.server_id(&new.connection_id(server, [3; NONCE_LEN])),
            None,
            "a configuration the gateway does not hold"
        );
        assert_eq!(
            LbConfigs::new(vec![old.clone(), old]).unwrap_err(),
            LbError::DuplicateId(0)
        );
        assert_eq!(LbConfig::new(7, None).unwrap_err(), LbError::ConfigId(7));
    }

    #[test]
    fn keys_are_32_hex_digits_and_never_shown() {
        let k = key("8F95f09245765f80256934e50c66207f\r\n");
        assert_eq!(k, key("8f95f09245765f80256934e50c66207f"));
        assert_eq!(format!("{k:?}"), "LbKey(..)");
        let config = LbConfig::new(2, Some(&k)).unwrap();
        assert!(!format!("{config:?}").contains("8f95"));
        for bad in [
            "",
            "8f95f09245765f80256934e50c66207",
            "8f95f09245765f80256934e50c66207f0",
            "8f95f09245765f80256934e50c66207g",
            " 8f95f09245765f80256934e50c66207f",
            "8f95f09245765f80256934e50c66207f\n\n",
            "8f95f092 45765f80256934e50c66207f",
            "é8f95f09245765f80256934e50c6620",
        ] {
            let err = LbKey::parse(bad).unwrap_err();
            assert_eq!(err, LbError::KeyFormat, "{bad:?}");
            assert!(!err.to_string().contains("8f95"));
        }
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
        // A client's random 8-byte Initial ID, a 17-byte ID with another first octet, and the
        // draft's unroutable config rotation 0b111.
        let config = LbConfig::default();
        let configs = LbConfigs::default();
        assert_eq!(config.server_id(&[0x10; 8]), None);
        assert_eq!(configs.server_id(&[0x10; 8]), None);
        let mut cid = [0u8; PLAIN_CID_LEN];
        cid[0] = 0x0d;
        assert_eq!(config.server_id(&cid), None);
        assert_eq!(configs.server_id(&cid), None);
        cid[0] = 0xe0 | 14;
        assert_eq!(configs.server_id(&cid), None);
        cid[0] = 14;
        assert_eq!(config.server_id(&cid), Some(ServerId([0; 6])));
        assert_eq!(configs.server_id(&cid), Some(ServerId([0; 6])));
        assert_eq!(config.server_id(&cid[..PLAIN_CID_LEN - 1]), None);
        assert_eq!(configs.server_id(&cid[..PLAIN_CID_LEN - 1]), None);
        // An encrypted configuration wants its own length.
        let encrypted = LbConfig::new(0, Some(&key("00112233445566778899aabbccddeeff"))).unwrap();
        assert_eq!(encrypted.server_id(&cid), None);
        assert_eq!(configs.server_id(&[]), None);
    }

    #[test]
    fn short_header_ids_are_read_by_their_self_described_length() {
        let mut generator =
            LbConnectionIdGenerator::new(ServerId([1, 2, 3, 4, 5, 6]), LbConfig::default());
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
