//! A fuzzing peer: malformed QUIC datagrams from anywhere, and malformed HTTP/3 from a peer with
//! a valid mesh certificate (bad frames, bad QPACK, bad and duplicate critical streams, lengths
//! at the varint limit). The server answers, resets or closes that one connection, never
//! panics anywhere in the process, and the legitimate peer's flows go on between every case.
//! Seeded: a failing case prints its seed and kind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use halyard_transport::MeshEndpoint;

/// Panics anywhere in this test process (the server's tasks included).
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Connections of malformed HTTP/3 per kind, and datagrams of malformed QUIC per kind.
const CASES_PER_KIND: u64 = 6;
const DATAGRAMS: u64 = 300;
/// Longest the server may take to answer, reset or close one malformed case.
const VERDICT: Duration = Duration::from_secs(10);

/// RFC 9000 §16 variable-length integer.
fn varint(v: u64) -> Vec<u8> {
    match v {
        0..=63 => vec![v as u8],
        64..=16_383 => (0x4000 | v as u16).to_be_bytes().to_vec(),
        16_384..=1_073_741_823 => (0x8000_0000 | v as u32).to_be_bytes().to_vec(),
        _ => (0xC000_0000_0000_0000 | v.min((1 << 62) - 1))
            .to_be_bytes()
            .to_vec(),
    }
}

/// An HTTP/3 frame (RFC 9114 §7.1): type, length, payload.
fn frame(ty: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = varint(ty);
    out.extend(varint(payload.len() as u64));
    out.extend_from_slice(payload);
    out
}

/// A SETTINGS frame with random identifiers and values, some of them reserved ones.
fn settings(seed: u64) -> Vec<u8> {
    let r = pattern(seed, 16);
    let mut payload = Vec::new();
    for pair in r.chunks(4) {
        payload.extend(varint(u64::from(pair[0]) * 0x1f + 0x21));
        payload.extend(varint(u64::from(u16::from_be_bytes([pair[1], pair[2]]))));
    }
    // QPACK_MAX_TABLE_CAPACITY (0x01) and SETTINGS_MAX_FIELD_SECTION_SIZE (0x06) at extremes.
    payload.extend(varint(0x01));
    payload.extend(varint(u64::from(r[0]) << 40));
    payload.extend(varint(0x06));
    payload.extend(varint(0));
    frame(0x04, &payload)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Random bytes on a request stream.
    BidiNoise,
    /// A HEADERS frame whose field section is random bytes (bad QPACK).
    BadQpack,
    /// DATA before any HEADERS on a request stream.
    DataFirst,
    /// A frame declaring a length at the varint limit, then a few bytes.
    HugeLength,
    /// A HEADERS frame declaring 1 GiB of field section.
    HugeHeaders,
    /// A control stream: SETTINGS, then random frames (reserved, DATA, HEADERS, GOAWAY).
    ControlNoise,
    /// A control stream whose first frame is not SETTINGS.
    ControlWithoutSettings,
    /// Two control streams.
    TwoControlStreams,
    /// A push stream opened by the client (only servers push).
    ClientPush,
    /// A QPACK encoder stream with random instructions.
    EncoderNoise,
    /// A unidirectional stream of a random type with random bytes.
    UniNoise,
}

const KINDS: [Kind; 11] = [
    Kind::BidiNoise,
    Kind::BadQpack,
    Kind::DataFirst,
    Kind::HugeLength,
    Kind::HugeHeaders,
    Kind::ControlNoise,
    Kind::ControlWithoutSettings,
    Kind::TwoControlStreams,
    Kind::ClientPush,
    Kind::EncoderNoise,
    Kind::UniNoise,
];

/// Waits until the server has dealt with `send`: read it to the end or stopped it, or closed
/// the connection.
async fn verdict_on(conn: &quinn::Connection, send: &mut quinn::SendStream) {
    tokio::select! {
        _ = send.stopped() => {}
        _ = conn.closed() => {}
    }
}

/// Opens a unidirectional stream of `ty`, writes `body`, and waits for the server's verdict.
/// A control stream is not finished (finishing it is an error of its own, tried by noise).
async fn uni(conn: &quinn::Connection, ty: u64, body: &[u8], finish: bool) {
    let Ok(mut send) = conn.open_uni().await else {
        return;
    };
    let mut bytes = varint(ty);
    bytes.extend_from_slice(body);
    if send.write_all(&bytes).await.is_err() {
        return;
    }
    if finish {
        let _ = send.finish();
        verdict_on(conn, &mut send).await;
    } else {
        // An unfinished control stream is read, never completed: the verdict is a closed
        // connection or nothing. A request the server answers with a stream error only (a
        // field section of `:method GET` alone, static QPACK index 17, no :scheme or :path,
        // RFC 9114 §4.1.2) shows the server got that far without ending the connection itself.
        bidi_request(conn, &frame(0x01, &[0x00, 0x00, 0xC0 | 17])).await;
    }
}

/// Sends `bytes` on a new request stream, finishes it, and reads whatever comes back until
/// the stream or the connection ends.
async fn bidi_request(conn: &quinn::Connection, bytes: &[u8]) {
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return;
    };
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    tokio::select! {
        _ = recv.read_to_end(1 << 20) => {}
        _ = conn.closed() => {}
    }
}

async fn fuzz_case(conn: &quinn::Connection, kind: Kind, seed: u64) {
    let noise = pattern(seed, (seed as usize * 37) % 3000);
    match kind {
        Kind::BidiNoise => bidi_request(conn, &noise).await,
        Kind::BadQpack => bidi_request(conn, &frame(0x01, &noise)).await,
        Kind::DataFirst => {
            let mut bytes = frame(0x00, &noise);
            bytes.extend(frame(0x01, &noise[..noise.len() / 2]));
            bidi_request(conn, &bytes).await;
        }
        Kind::HugeLength => {
            let mut bytes = varint(0x01);
            bytes.extend(varint((1 << 62) - 1));
            bytes.extend_from_slice(&noise[..noise.len().min(64)]);
            bidi_request(conn, &bytes).await;
        }
        Kind::HugeHeaders => {
            let mut bytes = varint(0x01);
            bytes.extend(varint(1 << 30));
            bytes.extend_from_slice(&noise);
            bidi_request(conn, &bytes).await;
        }
        Kind::ControlNoise => {
            let mut body = settings(seed);
            for (i, chunk) in noise.chunks(50).enumerate() {
                let ty = [0x21 + 0x1f * seed, 0x00, 0x01, 0x07, 0x0d][i % 5];
                body.extend(frame(ty, chunk));
            }
            uni(conn, 0x00, &body, seed % 2 == 0).await;
        }
        Kind::ControlWithoutSettings => uni(conn, 0x00, &frame(0x00, &noise), false).await,
        Kind::TwoControlStreams => {
            uni(conn, 0x00, &settings(seed), false).await;
            uni(conn, 0x00, &settings(seed + 1), false).await;
        }
        Kind::ClientPush => {
            let mut body = varint(seed);
            body.extend(frame(0x01, &noise));
            uni(conn, 0x01, &body, true).await;
        }
        Kind::EncoderNoise => uni(conn, 0x02, &noise, true).await,
        Kind::UniNoise => {
            let ty = u64::from(noise.first().copied().unwrap_or(9)) + 0x04;
            uni(conn, ty, &noise, true).await;
        }
    }
}

/// The legitimate peer's flow still works.
async fn legit_flow(mesh: &Mesh, what: &str) {
    let reply = exchange(mesh.open("echo").await, b"still here")
        .await
        .unwrap_or_else(|e| panic!("legitimate flow after {what}: {e}"));
    assert_eq!(reply, b"still here", "after {what}");
}

/// Real Initial datagrams (distinct connection IDs) from handshakes towards a local socket
/// that never answers.
async fn captured_initials(ep: &MeshEndpoint, mesh: &Mesh, n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while out.len() < n {
        let (ep, id) = (ep.clone(), mesh.server_id.clone());
        let attempt = tokio::spawn(async move { ep.connect(sink_addr, &id).await });
        let (len, _) = sink.recv_from(&mut buf).await.unwrap();
        attempt.abort();
        out.push(buf[..len].to_vec());
        while sink.try_recv_from(&mut buf).is_ok() {}
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fuzzing_peer_never_harms_the_server_or_other_flows() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let mesh = Mesh::new().await;
    legit_flow(&mesh, "start").await;
    // An authenticated peer of this mesh (its own certificate) sending malformed HTTP/3.
    let fuzzer = MeshEndpoint::new(
        mesh.pki.resolver("fuzzer"),
        mesh.pki.bundle.clone(),
        config(|_| {}),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let mut outcomes = Vec::new();
    for kind in KINDS {
        for n in 0..CASES_PER_KIND {
            let seed = n * 1000 + kind as u64;
            let conn = fuzzer.connect(mesh.addr(), &mesh.server_id).await.unwrap();
            tokio::time::timeout(VERDICT, fuzz_case(&conn, kind, seed))
                .await
                .unwrap_or_else(|_| {
                    panic!("{kind:?} seed {seed}: no answer, reset or close in {VERDICT:?}")
                });
            outcomes.push(format!("{kind:?}: {:?}", conn.close_reason()));
            conn.close(0u32.into(), b"done");
            legit_flow(&mesh, &format!("{kind:?} seed {seed}")).await;
        }
    }
    // How the server dealt with each kind (printed with --nocapture): a connection error names
    // the HTTP/3 error code; none means it answered or reset the stream.
    outcomes.dedup();
    for o in &outcomes {
        eprintln!("{o}");
    }
    // Malformed QUIC from anywhere: random datagrams, and real Initials with bits flipped.
    let initials = captured_initials(&fuzzer, &mesh, 8).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for n in 0..DATAGRAMS {
        let mut datagram = if n % 2 == 0 {
            pattern(n, 1 + (n as usize * 53) % 1500)
        } else {
            let mut d = initials[n as usize % initials.len()].clone();
            let flips = pattern(n, 8);
            for pair in flips.chunks(2) {
                let at = (usize::from(pair[0]) * 7 + n as usize) % d.len();
                d[at] ^= pair[1] | 1;
            }
            d
        };
        // Some keep a valid long-header first byte and version so they reach the decryption.
        if n % 3 == 0 && datagram.len() > 5 {
            datagram[..5].copy_from_slice(&[0xC3, 0, 0, 0, 1]);
        }
        socket.send_to(&datagram, mesh.addr()).await.unwrap();
    }
    legit_flow(&mesh, "malformed datagrams").await;
    assert!(!mesh.serve_task.is_finished(), "the server stopped");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic in the process");
}
