//! Path normalization on a request target from an app or a peer: it never panics, and a
//! normalized target normalizes to itself (routing, policy and forwarding see one path). Under
//! every `inbound.path_parameters` setting the matched path carries no path parameter, is the
//! same path whichever setting admitted it, and the forwarded target is matched as that path.
#![no_main]

use halyard_sidecar::config::PathParameters;
use halyard_sidecar::fuzzing::{normalize_target, normalize_target_with};
use libfuzzer_sys::fuzz_target;

const SETTINGS: [PathParameters; 3] = [
    PathParameters::Reject,
    PathParameters::Strip,
    PathParameters::Keep,
];

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(normal) = normalize_target(target) {
        assert_eq!(
            normalize_target(&normal).as_deref(),
            Ok(normal.as_str()),
            "{target:?}"
        );
    }
    let mut matched: Option<String> = None;
    for params in SETTINGS {
        let Ok((path, forwarded)) = normalize_target_with(target, params) else {
            continue;
        };
        assert!(
            !path.contains(';') && !path.contains("%3B"),
            "{target:?} {params:?} matched {path:?}"
        );
        assert_eq!(
            normalize_target_with(&forwarded, params),
            Ok((path.clone(), forwarded.clone())),
            "{target:?} {params:?}"
        );
        if let Some(before) = &matched {
            assert_eq!(before, &path, "{target:?} {params:?}");
        }
        matched = Some(path);
    }
});
