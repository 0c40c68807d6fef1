//! The Workload API's `:authority` rewrite on bytes from a local gRPC client, in reads of any
//! size: it never panics, never changes the length of the stream (frames and HPACK table sizes
//! must stay what the client counted), gives the same bytes however the reads are cut, and only
//! ever turns a byte into `-`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(size % 64) + 1;
    let out = halyard_sidecar::fuzzing::authority_rewrite(rest.chunks(chunk));
    assert_eq!(out.len(), rest.len());
    assert_eq!(out, halyard_sidecar::fuzzing::authority_rewrite([rest]));
    for (a, b) in rest.iter().zip(&out) {
        assert!(a == b || *b == b'-', "{a:#x} became {b:#x}");
    }
});
