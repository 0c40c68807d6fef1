//! L7: HTTP/1.1, h2 and gRPC between apps, carried as HTTP/3 between sidecars, routed and
//! checked per request.

pub mod body;
pub mod budget;
pub mod guard;
pub mod headers;
pub mod inbound;
pub mod normalize;
pub mod outbound;
pub mod route;
pub mod trace;
