//! L7: HTTP/1.1, h2 and gRPC between apps, carried as HTTP/3 between sidecars, routed and
//! checked per request.
//!
//! `outbound` serves the app's connection (behind the `guard` on HTTP/1 framing), normalizes
//! the path once (`normalize`), cleans headers (`headers`), continues the trace
//! (`telemetry::trace`) and sends each request to the endpoint `decide` picks; `inbound` admits
//! a peer's request and forwards it to the app over its pooled clients; `body` streams bodies
//! through bounded channels; `upload` sends an outbound request body on its own task (so both
//! directions flow at once, and `Expect: 100-continue` is passed through); `upgrade` carries
//! WebSocket upgrades between sidecars; `expect` sees an app's `100 Continue`; `limits` sizes
//! both app sides from the one header-section limit.

pub(crate) mod body;
pub(crate) mod expect;
pub(crate) mod guard;
pub(crate) mod headers;
pub(crate) mod inbound;
pub(crate) mod limits;
pub(crate) mod normalize;
pub(crate) mod outbound;
pub(crate) mod upgrade;
pub(crate) mod upload;

/// Polls once, without waiting: `poll` gets a context whose waker does nothing, so `Pending`
/// leaves no wake-up behind and the caller goes on as if it had not asked (a task that waits
/// takes over). Used where a result is usually ready at once and taking it inline saves a
/// packet or a write (`upload::finish_now`, `outbound::first_data`).
fn poll_now<T>(
    poll: impl FnOnce(&mut std::task::Context<'_>) -> std::task::Poll<T>,
) -> std::task::Poll<T> {
    poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}
