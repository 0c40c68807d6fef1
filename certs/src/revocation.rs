//! The deny list: SPIFFE ids and certificate serials no handshake may accept, on either side.
//! It is shared by reference with the verifiers, so an update applies to the next handshake
//! without rebuilding any TLS configuration.

use std::collections::BTreeSet;
use std::sync::RwLock;

use crate::SpiffeId;

/// What is revoked: whole workloads by id, single leaves by serial.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Revoked SPIFFE ids: every leaf naming one is refused.
    pub ids: BTreeSet<SpiffeId>,
    /// Revoked serial numbers, lowercase hex without leading zero bytes (as `openssl x509
    /// -serial` prints them, lowercased).
    pub serials: BTreeSet<String>,
}

impl Revoked {
    /// Whether a leaf with this id and serial (big-endian bytes) is revoked.
    pub fn refuses(&self, id: &SpiffeId, serial: &[u8]) -> bool {
        self.ids.contains(id)
            || (!self.serials.is_empty() && self.serials.contains(&serial_hex(serial)))
    }
}

/// A serial as the deny list writes it: lowercase hex, leading zero bytes dropped.
pub fn serial_hex(serial: &[u8]) -> String {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    let hex: String = serial[start..].iter().map(|b| format!("{b:02x}")).collect();
    if hex.is_empty() {
        "00".into()
    } else {
        hex
    }
}

/// The deny list in force, replaced as a whole when the registry changes.
#[derive(Debug, Default)]
pub struct DenyList {
    current: RwLock<Revoked>,
}

impl DenyList {
    /// Replaces what is revoked.
    pub fn set(&self, revoked: Revoked) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = revoked;
    }

    /// Whether a leaf with this id and serial is revoked.
    pub fn refuses(&self, id: &SpiffeId, serial: &[u8]) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .refuses(id, serial)
    }

    /// Whether this id is revoked as a whole.
    pub fn refuses_id(&self, id: &SpiffeId) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ids
            .contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_serials_are_refused() {
        let a = SpiffeId::parse("spiffe://t/ns/d/sa/a").unwrap();
        let b = SpiffeId::parse("spiffe://t/ns/d/sa/b").unwrap();
        let list = DenyList::default();
        assert!(!list.refuses(&a, &[1]));
        list.set(Revoked {
            ids: [a.clone()].into(),
            serials: ["0abc".into()].into(),
        });
        assert!(list.refuses(&a, &[9]));
        assert!(!list.refuses(&b, &[0x0a, 0xbd]));
        assert_eq!(serial_hex(&[0, 0x0a, 0xbc]), "0abc");
        assert!(list.refuses(&b, &[0, 0x0a, 0xbc]));
    }
}
