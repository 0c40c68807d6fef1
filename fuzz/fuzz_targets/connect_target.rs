//! The CONNECT `:authority` (`<service>:<port>`, RFC 9114 §4.4) from a peer: it never panics,
//! and an accepted target prints as what parses back to it.
#![no_main]

use halyard_transport::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(target) = text.parse::<Target>() {
        let again: Target = target.to_string().parse().expect("a printed target parses");
        assert_eq!(again, target);
    }
    if let Ok(uri) = text.parse::<http::Uri>() {
        let _ = Target::from_uri(&uri);
    }
});
