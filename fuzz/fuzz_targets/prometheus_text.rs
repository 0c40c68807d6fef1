//! The Prometheus text parser `halyard ctl top` and the demo read sidecars' `/metrics` with:
//! it never panics on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = halyard_cli::promtext::parse(&text);
});
