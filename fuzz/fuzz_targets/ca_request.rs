//! What the mesh CA reads from the network and from its registry: a CSR (PEM text, or DER bytes
//! as a client would wrap them), a bootstrap token, a sign request body, a token record. None of
//! it may panic; an accepted CSR names exactly the id it was checked against, and an accepted
//! token parses back to itself.
#![no_main]

use std::time::SystemTime;

use halyard_certs::enroll::{check_csr, BootstrapToken, TokenRecord};
use halyard_certs::SpiffeId;
use halyard_sidecar::ca::SignRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let allowed =
        SpiffeId::parse("spiffe://mesh.local/ns/default/sa/reviews").expect("a valid id");
    match kind % 4 {
        0 => {
            let text = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", rest.to_vec()));
            if let Ok(csr) = check_csr(&text, &allowed) {
                assert_eq!(csr.id(), &allowed);
            }
        }
        1 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(csr) = check_csr(text, &allowed) {
                    assert_eq!(csr.id(), &allowed);
                }
            }
        }
        2 => {
            if let Ok(token) = std::str::from_utf8(rest).map(BootstrapToken::parse) {
                if let Ok(token) = token {
                    let again = BootstrapToken::parse(token.secret()).expect("a parsed token");
                    assert_eq!(again.hash(), token.hash());
                }
            }
        }
        _ => {
            if let Ok(record) = serde_json::from_slice::<TokenRecord>(rest) {
                let _ = record.admit(SystemTime::now());
                let _ = record.spent().admit(SystemTime::now());
            }
            let _ = serde_json::from_slice::<SignRequest>(rest);
        }
    }
});
