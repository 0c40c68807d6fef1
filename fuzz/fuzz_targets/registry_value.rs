//! A registry value as an operator may write it with `etcdctl put`: the first line is the key
//! below `/halyard/<mesh>/`, the rest the value. Decoding and validation never panic.
#![no_main]

use halyard_registry::{Key, Object};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (key, value) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    if let Some(key) = Key::parse(key) {
        let _ = Object::from_stored(&key, "fuzz", value);
    }
});
