//! Outbound capture: the app's TCP connections arrive on an explicit upstream listener (bound
//! to one destination service port) or, through iptables REDIRECT, on the transparent listener,
//! where SO_ORIGINAL_DST tells where the app meant to go and `decide::capture` maps that to a
//! service. Each accepted connection becomes one flow task on `Shared::flows`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::decide::capture::{resolve, CaptureError, Destination};
use crate::l4::outbound::{flow, reset, Flags};
use crate::state::Shared;
use crate::telemetry::flow::End;
use crate::telemetry::metrics::Direction;

/// Accepts app connections on an explicit upstream listener until `stop`.
pub(crate) async fn serve_upstream(
    shared: Arc<Shared>,
    listener: TcpListener,
    dest: Destination,
    stop: CancellationToken,
) {
    let cap = listener_cap(&shared, "outbound");
    while let Some((tcp, _, place)) = crate::net::accept_capped(&listener, &stop, &cap).await {
        let shared2 = shared.clone();
        let dest = dest.clone();
        shared.flows.spawn(async move {
            flow(shared2, tcp, dest).await;
            drop(place);
        });
    }
}

/// The connection cap of one app-facing listener (`bounds`).
fn listener_cap(shared: &Shared, what: &'static str) -> crate::bounds::ListenerCap {
    let out = &shared.config.file.outbound;
    let listeners = out.upstreams.len() + usize::from(out.transparent.is_some());
    crate::bounds::ListenerCap::new(&shared.config.file.limits, listeners, what)
}

/// Accepts transparently captured connections, reading the original destination.
pub(crate) async fn serve_transparent(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let own = listener.local_addr().ok();
    let cap = listener_cap(&shared, "transparent");
    while let Some((tcp, peer, place)) = crate::net::accept_capped(&listener, &stop, &cap).await {
        let resolved =
            original_destination(&tcp).and_then(|d| Ok(resolve(&shared.current(), d, own)?));
        match resolved {
            Ok(dest) => {
                let s = shared.clone();
                shared.flows.spawn(async move {
                    flow(s, tcp, dest).await;
                    drop(place);
                });
            }
            Err(Unrouted::Unmapped(CaptureError::Unknown(dest))) => {
                // Outside the mesh: an ExternalService, or the outbound traffic policy.
                let s = shared.clone();
                shared
                    .flows
                    .spawn(async move { super::egress::captured(s, tcp, dest).await });
            }
            Err(why) => {
                tracing::warn!(%peer, reason = %why, "captured connection refused");
                let rec = shared.flow_record(Direction::Outbound, &shared.service, "unknown");
                rec.finish(End::Flow {
                    flags: Flags::NoRoute.as_str(),
                    sent: 0,
                    received: 0,
                });
                reset(tcp);
            }
        }
    }
}

/// Why a captured connection has no destination service (it is reset and counted `NR`).
#[derive(Debug, thiserror::Error)]
enum Unrouted {
    /// The kernel gave no original destination (the connection was not REDIRECTed).
    #[error("no original destination: {0}")]
    NoOriginalDestination(std::io::Error),
    /// The original destination is not an IP socket address.
    #[error("original destination is not an IP address")]
    NotIp,
    /// The destination maps to no Service port.
    #[error(transparent)]
    Unmapped(#[from] CaptureError),
}

/// SO_ORIGINAL_DST of a REDIRECTed connection.
fn original_destination(tcp: &TcpStream) -> Result<SocketAddr, Unrouted> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr() {
        Ok(SocketAddr::V6(_)) => sock.original_dst_v6(),
        _ => sock.original_dst_v4(),
    };
    addr.map_err(Unrouted::NoOriginalDestination)?
        .as_socket()
        .ok_or(Unrouted::NotIp)
}
