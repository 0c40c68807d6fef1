//! SPIFFE ids (SPIFFE-ID §2) as found in certificates and registry values: parsing never
//! panics, and an accepted id prints as what parses back to it.
#![no_main]

use halyard_certs::SpiffeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<SpiffeId>() {
        let again: SpiffeId = id.to_string().parse().expect("a printed id parses");
        assert_eq!(again, id);
    }
});
