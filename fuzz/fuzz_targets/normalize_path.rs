//! Path normalization on a request target from an app or a peer: it never panics, and a
//! normalized target normalizes to itself (routing, policy and forwarding see one path).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(normal) = halyard_sidecar::fuzzing::normalize_target(target) {
        assert_eq!(
            halyard_sidecar::fuzzing::normalize_target(&normal).as_deref(),
            Ok(normal.as_str()),
            "{target:?}"
        );
    }
});
