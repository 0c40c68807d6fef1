//! Ports a parent process hands to its children to listen on: the demo's sidecars, apps and CA;
//! etcd, sidecar processes and restarted servers in tests and benches.
//!
//! The parent picks a port, writes it into a child's config, and the child binds it later (a
//! second or more, while the other children start). A port from `bind(":0")` is an *ephemeral*
//! port: in that gap the kernel hands the same number to anyone's `connect` (as its source port)
//! or `bind(":0")` — the demo's own load generator makes thousands of such connections — and the
//! child then fails with "address already in use". So the ports come from outside the
//! ephemeral range (`net.ipv4.ip_local_port_range`, RFC 6056 §2), which the kernel never hands
//! out on its own; each is checked free and never handed out twice by one process (another
//! process may still bind one in the gap, as any program may bind a fixed port).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::ops::Range;
use std::sync::Mutex;

/// Where the ephemeral range is read.
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Linux's default ephemeral range, when the file cannot be read.
const DEFAULT_EPHEMERAL: Range<u16> = 32768..61000;
/// The lowest port the demo uses (clear of well-known and common registered services).
const LOWEST: u16 = 20000;
/// The fewest ports a usable range holds (the demo needs some forty).
const ENOUGH: u16 = 1000;

/// Ports handed out by this process so far.
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Which kind of socket the port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// A TCP listener.
    Tcp,
    /// A UDP socket.
    Udp,
}

/// A port on 127.0.0.1 free for `proto` now, outside the ephemeral range, and not handed out
/// before by this process.
///
/// # Errors
/// `AddrInUse` when no such port is left (the range is scanned once from a random start).
pub fn free(proto: Proto) -> std::io::Result<SocketAddr> {
    let range = usable(&ephemeral());
    let len = range.end - range.start;
    let start = u32::from(rand::random::<u16>() % len);
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    for i in 0..u32::from(len) {
        // Below `range.end` by construction (`len` = its width), so the sum fits.
        let offset = u16::try_from((start + i) % u32::from(len)).unwrap_or(0);
        let port = range.start + offset;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if taken.contains(&port) || !bindable(addr, proto) {
            continue;
        }
        taken.insert(port);
        return Ok(addr);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!(
            "no free {proto:?} port left on 127.0.0.1 in {}..{}",
            range.start, range.end
        ),
    ))
}

/// Whether `addr` can be bound for `proto` now (the socket is closed again at once).
fn bindable(addr: SocketAddr, proto: Proto) -> bool {
    match proto {
        Proto::Tcp => TcpListener::bind(addr).is_ok(),
        Proto::Udp => UdpSocket::bind(addr).is_ok(),
    }
}

/// The kernel's ephemeral port range (`first..last + 1`).
fn ephemeral() -> Range<u16> {
    std::fs::read_to_string(PORT_RANGE)
        .ok()
        .and_then(|s| parse_range(&s))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// `"32768\t60999\n"` → `32768..61000`; `None` for anything else.
fn parse_range(text: &str) -> Option<Range<u16>> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(first)), Some(Ok(last)), None) = (it.next(), it.next(), it.next()) else {
        return None;
    };
    (first <= last).then(|| first..last.saturating_add(1))
}

/// The ports to pick from: below the ephemeral range when that leaves enough room above
/// [`LOWEST`], else above it, else (a range that covers nearly everything) the top of the port
/// space, where the kernel's own choices are least dense.
fn usable(ephemeral: &Range<u16>) -> Range<u16> {
    if ephemeral.start >= LOWEST.saturating_add(ENOUGH) {
        LOWEST..ephemeral.start
    } else if ephemeral.end <= u16::MAX - ENOUGH {
        ephemeral.end..u16::MAX
    } else {
        u16::MAX - ENOUGH..u16::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_range_is_read_and_bad_text_is_refused() {
        assert_eq!(parse_range("32768\t60999\n"), Some(32768..61000));
        assert_eq!(parse_range("1024 65535"), Some(1024..65535));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("32768"), None);
        assert_eq!(parse_range("a b"), None);
        assert_eq!(parse_range("1 2 3"), None);
    }

    #[test]
    fn ports_are_picked_outside_the_ephemeral_range() {
        assert_eq!(usable(&(32768..61000)), 20000..32768);
        assert_eq!(usable(&(10000..50000)), 50000..65535);
        assert_eq!(usable(&(1024..65535)), 64535..65535);
    }

    #[test]
    fn each_port_is_free_outside_the_kernels_range_and_handed_out_once() {
        let eph = ephemeral();
        let mut seen = HashSet::new();
        for i in 0..40 {
            let proto = if i % 2 == 0 { Proto::Tcp } else { Proto::Udp };
            let addr = free(proto).unwrap();
            assert!(!eph.contains(&addr.port()), "{addr} is ephemeral");
            assert!(seen.insert(addr.port()), "{addr} handed out twice");
            assert!(bindable(addr, proto), "{addr} not free");
        }
    }
}
