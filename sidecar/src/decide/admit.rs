//! Inbound admission, one function for L4 tunnels and L7 requests: the Service port a peer's
//! stream names (`:authority` = `<service>:<port>`, DESIGN §2) must be one this sidecar serves,
//! an HTTP request must go to an `http` or `grpc` port (404 otherwise), and the access policy
//! must allow the verified caller (403 otherwise).

use halyard_registry::model::{Protocol, ServicePort};
use halyard_registry::Snapshot;
use halyard_transport::Target;
use http::StatusCode;

use super::policy::{self, Decision, DenyReason, Peer};
use super::retry::Flag;

/// What the peer opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// An L4 tunnel (CONNECT): any port of the service.
    Tunnel,
    /// An L7 request: an `http` or `grpc` port.
    Request,
}

/// Why a peer's stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The target names another service than the one this sidecar serves.
    #[error("this sidecar serves {serves}, not {asked}")]
    OtherService {
        /// This sidecar's service.
        serves: String,
        /// The service asked for.
        asked: String,
    },
    /// The registry has no such service.
    #[error("service {0} is not in the registry")]
    UnknownService(String),
    /// The service has no such port.
    #[error("service {service} has no port {port}")]
    NoSuchPort {
        /// The service.
        service: String,
        /// The port asked for.
        port: u16,
    },
    /// An HTTP request to a `tcp` port.
    #[error("port {port} of {service} is tcp, not http")]
    NotHttp {
        /// The service.
        service: String,
        /// The port.
        port: u16,
    },
    /// The access policy denies the caller.
    #[error("denied by policy ({})", .0.as_str())]
    Denied(DenyReason),
    /// A rate limit refuses the caller for now.
    #[error("rate limited by {} ({}); retry after {} s", .0.limit, .0.scope.as_str(), .0.retry_after_secs())]
    RateLimited(super::ratelimit::Limited),
}

impl Refusal {
    /// The status the peer gets (DESIGN §2: 403 policy, 404 unknown service or port).
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::NOT_FOUND,
        }
    }

    /// The L4 flag of a refused tunnel.
    pub fn flag(&self) -> Flag {
        match self {
            Refusal::Denied(_) => Flag::Denied,
            Refusal::RateLimited(_) => Flag::RateLimited,
            _ => Flag::NoRoute,
        }
    }
}

/// Admits `stream` from `caller` to `target` on a sidecar serving `serves`, with the policy
/// evaluated on `on` (the port, and for a request its method, normalized path and headers).
/// Returns the Service port to forward to.
pub fn admit<'s>(
    snap: &'s Snapshot,
    serves: &str,
    target: &Target,
    stream: Stream,
    caller: Peer<'_>,
    on: policy::Target<'_>,
) -> Result<&'s ServicePort, Refusal> {
    if target.service() != serves {
        return Err(Refusal::OtherService {
            serves: serves.to_owned(),
            asked: target.service().to_owned(),
        });
    }
    let svc = snap
        .service(serves)
        .ok_or_else(|| Refusal::UnknownService(serves.to_owned()))?;
    let port = svc.port(target.port()).ok_or_else(|| Refusal::NoSuchPort {
        service: serves.to_owned(),
        port: target.port(),
    })?;
    if stream == Stream::Request && port.protocol == Protocol::Tcp {
        return Err(Refusal::NotHttp {
            service: serves.to_owned(),
            port: target.port(),
        });
    }
    let policy = snap.policy(serves).map(|p| p.as_ref());
    match policy::evaluate(policy, snap.default_policy(), caller, on) {
        Decision::Allow => Ok(port),
        Decision::Deny(reason) => Err(Refusal::Denied(reason)),
    }
}
