//! What an east-west gateway reads from the network, on any bytes: the routing decision
//! (`gateway::decide`: PROXY v2 header, QUIC long/short header, connection ID, and the Initial
//! it opens with the public keys to read the ClientHello's server name) never panics, and a
//! PROXY header it accepts says where its payload starts inside the datagram; QUIC-LB's
//! encryption of any 5 to 19 bytes under any key decrypts back to them.
#![no_main]

use std::sync::OnceLock;

use halyard_registry::model::parse_documents;
use halyard_registry::{Origin, Snapshot};
use halyard_sidecar::gateway::{decide, Decision, Table};
use halyard_transport::{initial, proxy_v2, quic_lb};
use libfuzzer_sys::fuzz_target;

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let yaml = "kind: Service\nname: r\nexported: true\nports: [{port: 80, protocol: tcp}]\n---\n\
                    kind: Endpoint\nid: e\nservice: r\naddress: 127.0.0.1:15443\nidentity: spiffe://td/r\n";
        let objects = parse_documents("fuzz", yaml).unwrap_or_default();
        Table::with_lb(&Snapshot::of_objects(Origin::Live, objects), configs().clone())
    })
}

/// The plaintext configuration 0 and an encrypted configuration 1.
fn configs() -> &'static quic_lb::LbConfigs {
    static CONFIGS: OnceLock<quic_lb::LbConfigs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let key = quic_lb::LbKey::new([0x5a; quic_lb::KEY_LEN]);
        let encrypted = quic_lb::LbConfig::new(1, Some(&key)).unwrap_or_default();
        quic_lb::LbConfigs::new(vec![quic_lb::LbConfig::default(), encrypted]).unwrap_or_default()
    })
}

fuzz_target!(|data: &[u8]| {
    // From the routed endpoint (so PROXY headers are read) or from anyone.
    let from = if data.first().is_some_and(|b| b & 1 == 1) {
        "127.0.0.1:15443"
    } else {
        "198.51.100.7:4433"
    };
    let from = from.parse().unwrap_or_else(|_| unreachable!());
    match decide(table(), from, data) {
        Decision::Return { offset, .. } => assert!(offset <= data.len()),
        Decision::Forward(_) | Decision::Drop(_) | Decision::Incomplete => {}
    }
    let _ = initial::initial_server_name(data);
    // Held Initials: any bytes offered twice, from one source, never panic and stay bounded.
    let mut hellos = halyard_sidecar::gateway::HelloAssembler::default();
    let now = std::time::Instant::now();
    for _ in 0..2 {
        let _ = hellos.offer(from, data, now);
    }
    assert!(hellos.len() <= 1);
    let _ = initial::long_header_dcid(data);
    let _ = quic_lb::short_header_dcid(data).and_then(|cid| configs().server_id(cid));
    if data.len() >= quic_lb::KEY_LEN + 5 {
        let (key, rest) = data.split_at(quic_lb::KEY_LEN);
        let key = quic_lb::LbKey::new(key.try_into().unwrap_or_else(|_| unreachable!()));
        let plain = &rest[..rest.len().min(19)];
        let mut block = plain.to_vec();
        let encrypted = quic_lb::encrypt(&key, &mut block);
        let decrypted = quic_lb::decrypt(&key, &mut block);
        assert_eq!(encrypted.is_ok(), plain.len() >= 5);
        assert_eq!(decrypted, encrypted);
        assert_eq!(block, plain);
    }
    if let Ok((header, at)) = proxy_v2::decode(data) {
        assert!(at <= data.len());
        let mut again = [0u8; proxy_v2::MAX_LEN];
        let n = proxy_v2::encode(&header, &mut again).unwrap_or_else(|| unreachable!());
        assert_eq!(proxy_v2::decode(&again[..n]).map(|(h, _)| h), Ok(header));
    }
});
