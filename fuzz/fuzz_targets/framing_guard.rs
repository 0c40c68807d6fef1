//! The HTTP/1 framing guard on bytes from an app, arriving in reads of any size: it never
//! panics, and never passes on more than it was given plus the one header section it may put in
//! place of a refused one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(size % 64) + 1;
    let passed = halyard_sidecar::fuzzing::framing_guard(rest.chunks(chunk));
    assert!(passed <= rest.len() + 256, "{passed} bytes out of {}", rest.len());
});
