//! The one retry and failure policy of L4 flows and L7 requests: what a failed attempt means
//! (for the caller, the endpoint's outlier record and the telemetry), and whether the next step
//! is another attempt, the answer in hand, or giving up.
//!
//! What a failure means, decided once here:
//!
//! | attempt error      | retried on        | endpoint charged      | L7 status | L4 flag |
//! |--------------------|-------------------|-----------------------|-----------|---------|
//! | connect failure    | `connect-failure` | ejected at once       | 503       | `UF`    |
//! | app unreached      | `connect-failure` | one strike            | 502       | `UF`    |
//! | rejected unread    | `connect-failure` | no (it is draining)   | 503       | `UF`    |
//! | connection lost    | `reset`           | one strike            | 502       | `UF`    |
//! | peer restarted     | `reset`, same one | neither way           | 502       | `UF`    |
//! | stream reset       | `reset`           | one strike            | 502       | `UF`    |
//! | per-try timeout    | `reset`           | one strike            | 504       | `UF`    |
//! | refused 403        | never             | no (policy said no)   | 403       | `DENY`  |
//! | refused 404        | `refused-stream`  | one strike            | 404       | `NR`    |
//! | refused 503        | `gateway-error`   | one strike            | 503       | `UH`    |
//! | refused other 5xx  | `gateway-error`   | one strike            | that      | `UF`    |
//! | refused 429        | never             | no (a rate limit)     | 429       | `RL`    |
//! | refused other      | never             | no                    | that      | `UF`    |
//! | too large headers  | never             | never (the request's) | 431       | `UF`    |
//! | overflow           | `connect-failure` | never (this side's)   | 503       | `UO`    |
//! | protocol error     | `reset`           | one strike            | 502       | `UF`    |
//! | local failure      | never             | never                 | 400       | `UF`    |
//!
//! A lost connection means the QUIC connection under the attempt closed or timed out: the peer
//! may have died, but it may as well have been idle-closed or briefly unreachable while its other
//! streams were fine, and the pool opens a new connection for the next attempt. So it counts as
//! one strike towards ejection, like a reset, not as a failed connect (which ejects at once:
//! nothing could reach the endpoint at all). A peer that refuses with 404 disagrees with this
//! sidecar's registry snapshot about what it serves (one of the two is stale): another endpoint
//! may serve the request. Local failures (the caller's request could not be sent: a target that
//! forms no URI, an app body that broke) are never charged to an endpoint and never retried.
//!
//! A restarted peer is a lost connection whose end was the peer's stateless reset (RFC 9000
//! §10.3): the endpoint answered, from a new process that has no state for the connection this
//! sidecar still held. A new connection reaches it, so its outlier record is neither charged
//! nor credited (a peer that keeps crashing still gets ejected by what its new process does),
//! and an L4 retry may go back to it even though L4 does not revisit otherwise: the flow takes
//! it off its tried list, once (L7 revisits anyway). The reset does not prove that the dead
//! process never read the request (it ends every stream of the connection, also one it was
//! serving when it died), so an L7 request is retried only as a `reset` allows: by the route's
//! retries, or, when the route sets none, for a method that may be repeated ([`for_request`]).
//!
//! An unreached app means the peer sidecar could not connect to its app (refused, or not
//! accepted in time): the request reached no app, so — like a connect failure — it is safe to
//! send again whatever its method, and an L7 request is retried on it up to the mesh-wide
//! `failure.retries` even when its route sets no retries, as an L4 flow is ([`for_request`]).
//! A pod whose app and sidecar get SIGTERM together therefore fails no request: the draining
//! sidecar's refusals go to another endpoint.
//!
//! Retries: at most `max_retries` further attempts, only while the request can be sent again
//! (nothing reached the app yet on L4; an idempotent or opted-in method with a kept body on L7),
//! only for a condition in `on` (an empty `on` means `connect-failure`, `refused-stream` and
//! `reset`), and only while the retry budget allows — which is asked last, so the budget is
//! spent only when a retry really happens. A retry goes to an endpoint not tried yet while there
//! is one; after that only where `revisit` allows (L7 yes, L4 no). Pure: the budget and `now`
//! are arguments.

use std::time::Instant;

use halyard_registry::model::RetryOn;
use halyard_transport::TunnelError;
use http::StatusCode;

use super::budget::{BudgetConfig, RetryBudget};
use super::outlier::Failure;

/// Why one attempt (one endpoint, one stream) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    /// The endpoint could not be reached: connect refused or timed out, or the peer is in
    /// reconnect backoff after such a failure.
    ConnectFailure,
    /// The QUIC connection under the attempt closed or timed out.
    ConnectionLost,
    /// The QUIC connection under the attempt ended with the peer's stateless reset: a new
    /// process answers at the endpoint's address.
    PeerRestarted,
    /// The peer sidecar could not connect to its app (refused, or not accepted in time): the
    /// request reached no app.
    AppUnreached,
    /// The peer did not process the request: it reset the stream with H3_REQUEST_REJECTED, or
    /// closed the connection gracefully (H3_NO_ERROR, after answering every request it
    /// accepted) before answering this one (RFC 9114 §5.2, §8.1). A draining peer does this.
    Rejected,
    /// The peer reset the stream.
    Reset,
    /// No answer within the per-try timeout.
    Timeout,
    /// The peer sidecar answered with a non-2xx status instead of serving the stream.
    Refused(StatusCode),
    /// The request's header section is over the limit (this sidecar's, or the peer's advertised
    /// SETTINGS_MAX_FIELD_SECTION_SIZE, RFC 9114 §4.2.2); it was refused before it was sent.
    HeaderTooBig,
    /// The peer broke the HTTP/3 protocol, or the stream was closed under the attempt.
    Protocol,
    /// The caller's request could not be sent (a target that forms no URI, an app body that
    /// broke): this side's failure, never the endpoint's.
    Local,
    /// No place left: every connection this sidecar may open to the endpoint is out of stream
    /// credit (`TunnelError::StreamLimit`; another endpoint is another peer with its own
    /// credit, so it is retried like a connect failure), or a circuit-breaker threshold of this
    /// sidecar is full (`decide::breaker`). This side's limit: nothing was sent, never the
    /// endpoint's doing.
    Overflow,
}

/// A failed attempt: what went wrong and whether any byte may have reached the app behind the
/// endpoint (only then is a retry unsafe whatever the method).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    /// What went wrong.
    pub error: AttemptError,
    /// True when nothing of the flow or request can have reached the target application.
    pub before_any_byte: bool,
}

/// The L4 `response_flags` word of a flow that ended with an error (Envoy's vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// Upstream failure: no endpoint could be reached or served the flow.
    UpstreamFailure,
    /// No healthy upstream.
    NoHealthy,
    /// Refused by the destination's access policy.
    Denied,
    /// No route: the destination serves no such service or port.
    NoRoute,
    /// Refused by a rate limit at the destination.
    RateLimited,
    /// Upstream overflow: this sidecar's own limit (streams to the endpoint, a circuit breaker)
    /// was reached.
    Overflow,
}

impl Flag {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::UpstreamFailure => "UF",
            Flag::NoHealthy => "UH",
            Flag::Denied => "DENY",
            Flag::NoRoute => "NR",
            Flag::RateLimited => "RL",
            Flag::Overflow => "UO",
        }
    }
}

impl Failed {
    /// Classifies a transport error (RFC 9114 §4.4 CONNECT answers, §8 stream errors).
    pub fn of(e: &TunnelError) -> Failed {
        let error = match e {
            TunnelError::Connect { .. }
            | TunnelError::ConnectTimeout { .. }
            | TunnelError::Backoff { .. } => AttemptError::ConnectFailure,
            TunnelError::ConnectionLost {
                peer_restarted: true,
                ..
            } => AttemptError::PeerRestarted,
            TunnelError::ConnectionLost { .. } => AttemptError::ConnectionLost,
            TunnelError::Reset { .. } => AttemptError::Reset,
            TunnelError::Status { status } => AttemptError::Refused(*status),
            TunnelError::HeaderTooBig { .. } => AttemptError::HeaderTooBig,
            TunnelError::StreamLimit { .. } => AttemptError::Overflow,
            TunnelError::Closed | TunnelError::Protocol(_) => AttemptError::Protocol,
        };
        Failed {
            error,
            before_any_byte: e.before_any_byte(),
        }
    }

    /// A failure of this sidecar's own making, before anything was sent.
    pub fn local() -> Failed {
        Failed {
            error: AttemptError::Local,
            before_any_byte: true,
        }
    }
}

impl AttemptError {
    /// Whether the attempt says anything about the endpoint's health, so its outlier record is
    /// charged ([`AttemptError::charge`]) or credited with a success. Not for failures on this
    /// side ([`AttemptError::is_local`]), nor for a restarted peer: it answered, from a process
    /// that has yet to serve anything (crediting it would wipe the record of a peer that keeps
    /// crashing).
    pub fn judges_endpoint(self) -> bool {
        !self.is_local() && self != AttemptError::PeerRestarted
    }

    /// Whether the attempt failed on this side, before the endpoint saw anything: its outlier
    /// record is left alone (neither charged nor credited with a success).
    pub fn is_local(self) -> bool {
        matches!(
            self,
            AttemptError::Local | AttemptError::HeaderTooBig | AttemptError::Overflow
        )
    }

    /// The retry condition (`Route.rules[].retries.on`) this failure falls under, if any.
    pub fn condition(self) -> Option<RetryOn> {
        match self {
            AttemptError::ConnectFailure
            | AttemptError::AppUnreached
            | AttemptError::Rejected
            | AttemptError::Overflow => Some(RetryOn::ConnectFailure),
            AttemptError::ConnectionLost
            | AttemptError::PeerRestarted
            | AttemptError::Reset
            | AttemptError::Timeout
            | AttemptError::Protocol => Some(RetryOn::Reset),
            AttemptError::Refused(s) if s == StatusCode::NOT_FOUND => Some(RetryOn::RefusedStream),
            AttemptError::Refused(s) if s.is_server_error() => Some(RetryOn::GatewayError),
            AttemptError::Refused(_) | AttemptError::HeaderTooBig | AttemptError::Local => None,
        }
    }

    /// What the endpoint's outlier record is charged with, if anything.
    pub fn charge(self) -> Option<Failure> {
        match self {
            AttemptError::ConnectFailure => Some(Failure::Connect),
            AttemptError::AppUnreached
            | AttemptError::ConnectionLost
            | AttemptError::Reset
            | AttemptError::Timeout
            | AttemptError::Protocol => Some(Failure::Error),
            AttemptError::Refused(s) if s == StatusCode::NOT_FOUND || s.is_server_error() => {
                Some(Failure::Error)
            }
            AttemptError::Refused(_)
            | AttemptError::Rejected
            | AttemptError::PeerRestarted
            | AttemptError::HeaderTooBig
            | AttemptError::Local
            | AttemptError::Overflow => None,
        }
    }

    /// The status an L7 caller gets when this is the last attempt.
    pub fn status(self) -> StatusCode {
        match self {
            AttemptError::ConnectFailure | AttemptError::Rejected | AttemptError::Overflow => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AttemptError::AppUnreached
            | AttemptError::ConnectionLost
            | AttemptError::PeerRestarted
            | AttemptError::Reset
            | AttemptError::Protocol => StatusCode::BAD_GATEWAY,
            AttemptError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            AttemptError::Refused(s) => s,
            AttemptError::HeaderTooBig => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            AttemptError::Local => StatusCode::BAD_REQUEST,
        }
    }

    /// The L4 flag of a flow that ends with this failure.
    pub fn flag(self) -> Flag {
        match self {
            AttemptError::Refused(StatusCode::FORBIDDEN) => Flag::Denied,
            AttemptError::Refused(StatusCode::NOT_FOUND) => Flag::NoRoute,
            AttemptError::Refused(StatusCode::SERVICE_UNAVAILABLE) => Flag::NoHealthy,
            AttemptError::Refused(StatusCode::TOO_MANY_REQUESTS) => Flag::RateLimited,
            AttemptError::Overflow => Flag::Overflow,
            _ => Flag::UpstreamFailure,
        }
    }
}

/// The retry condition an upstream's own answer falls under (L7): 502-504 `gateway-error`,
/// other 5xx `5xx`, 409 `retriable-4xx`.
pub fn status_condition(status: StatusCode) -> Option<RetryOn> {
    match status.as_u16() {
        502..=504 => Some(RetryOn::GatewayError),
        500..=599 => Some(RetryOn::FiveXx),
        409 => Some(RetryOn::Retriable4xx),
        _ => None,
    }
}

/// What an upstream's answer costs its endpoint: a 5xx is one strike, anything else a success.
pub fn answer_charge(status: StatusCode) -> Option<Failure> {
    status.is_server_error().then_some(Failure::Error)
}

/// The retry settings of one flow or request.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy<'a> {
    /// Further attempts allowed after the first.
    pub max_retries: u32,
    /// Conditions that allow a retry; empty: `connect-failure`, `refused-stream`, `reset`.
    pub on: &'a [RetryOn],
    /// Whether the request may be sent again at all: L4, the first bytes are kept; L7, an
    /// idempotent or opted-in method whose body is kept in memory.
    pub replayable: bool,
    /// Whether a retry may go back to an endpoint this flow or request already tried, once every
    /// endpoint has been tried. L4: no — its attempts fail on the endpoint taking the connection
    /// (unreachable, its app refusing), which an immediate repeat rarely changes. L7: yes — a 5xx
    /// or reset is often one request's bad luck, and a service with one endpoint must still be
    /// able to retry (Envoy's `previous_hosts` predicate likewise prefers, but does not require,
    /// another host).
    pub revisit: bool,
}

/// Retrying when nothing reached any app: only a connect failure's condition.
const UNREACHED_ON: &[RetryOn] = &[RetryOn::ConnectFailure];

/// Retrying after a restarted peer's stateless reset: the `reset` condition it falls under.
const RESTARTED_ON: &[RetryOn] = &[RetryOn::Reset];

/// The retry policy for one outcome of an L7 request.
///
/// - `route`: the rule's `retries` (further attempts and conditions), if it sets any.
/// - `mesh_retries`: `failure.retries`, the mesh-wide count L4 flows use.
/// - `method_ok`: the method may be sent twice (idempotent, RFC 9110 §9.2.2, or opted in).
/// - `body_intact`: the whole body can still be sent (kept in memory, or never read).
///
/// When the outcome shows that no app saw the request (a connect failure, an unreached app),
/// the request may go again whatever its method, up to the larger of the two counts. When the
/// peer restarted under the attempt (its stateless reset ended the connection) and the route
/// sets no retries, a request whose method may be repeated goes again up to the mesh-wide
/// count, as an HTTP client retries an idempotent request that met a stale kept-alive
/// connection (whether the dead process had read it cannot be known, so other methods do not).
/// Otherwise the route decides, and only for a method that may be repeated.
pub fn for_request<'a>(
    route: Option<(u32, &'a [RetryOn])>,
    mesh_retries: u32,
    method_ok: bool,
    body_intact: bool,
    outcome: &Outcome,
) -> RetryPolicy<'a> {
    let unreached = matches!(
        outcome,
        Outcome::Failed(Failed {
            error: AttemptError::ConnectFailure
                | AttemptError::AppUnreached
                | AttemptError::Rejected,
            before_any_byte: true,
        })
    );
    let restarted = matches!(
        outcome,
        Outcome::Failed(Failed {
            error: AttemptError::PeerRestarted,
            before_any_byte: true,
        })
    );
    let (rule_retries, rule_on) = route.unwrap_or((0, &[]));
    if restarted && route.is_none() {
        RetryPolicy {
            max_retries: mesh_retries,
            on: RESTARTED_ON,
            replayable: method_ok && body_intact,
            revisit: true,
        }
    } else if unreached {
        RetryPolicy {
            max_retries: rule_retries.max(mesh_retries),
            on: UNREACHED_ON,
            replayable: body_intact,
            revisit: true,
        }
    } else {
        RetryPolicy {
            max_retries: rule_retries,
            on: rule_on,
            replayable: method_ok && body_intact,
            revisit: true,
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Try another endpoint (the budget has paid for it).
    Retry,
    /// Hand the upstream's answer to the caller.
    Answer,
    /// Give up: the caller gets this failure's status or flag.
    Fail,
}

/// How an attempt ended, for [`next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (L7), possibly with an error status.
    Answered(StatusCode),
    /// The attempt failed.
    Failed(Failed),
}

impl RetryPolicy<'_> {
    fn covers(&self, cond: RetryOn) -> bool {
        if self.on.is_empty() {
            return matches!(
                cond,
                RetryOn::ConnectFailure | RetryOn::RefusedStream | RetryOn::Reset
            );
        }
        self.on.contains(&cond)
            || (cond == RetryOn::GatewayError && self.on.contains(&RetryOn::FiveXx))
    }
}

/// The step after attempt number `retries_done + 1` ended with `outcome`; `alternative` says
/// whether an endpoint exists that a retry may go to (see `pick::candidates`). When every other
/// condition allows a retry, one is taken from `budget` (at `now`); a refused budget fails (or
/// answers) instead. Nothing is spent for a retry that has nowhere to go.
pub fn next(
    policy: &RetryPolicy<'_>,
    retries_done: u32,
    outcome: Outcome,
    alternative: bool,
    budget: &mut RetryBudget,
    cfg: &BudgetConfig,
    now: Instant,
) -> Step {
    let (cond, safe, give_up) = match outcome {
        Outcome::Answered(s) => (status_condition(s), true, Step::Answer),
        Outcome::Failed(f) => (f.error.condition(), f.before_any_byte, Step::Fail),
    };
    let allowed = retries_done < policy.max_retries
        && alternative
        && policy.replayable
        && safe
        && cond.is_some_and(|c| policy.covers(c));
    if allowed && budget.try_retry(cfg, now) {
        Step::Retry
    } else {
        give_up
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn failed(error: AttemptError) -> Outcome {
        Outcome::Failed(Failed {
            error,
            before_any_byte: true,
        })
    }

    fn step(policy: &RetryPolicy<'_>, done: u32, outcome: Outcome) -> Step {
        let mut budget = RetryBudget::default();
        next(
            policy,
            done,
            outcome,
            true,
            &mut budget,
            &BudgetConfig::default(),
            Instant::now(),
        )
    }

    const ANY: RetryPolicy<'static> = RetryPolicy {
        max_retries: 2,
        on: &[],
        replayable: true,
        revisit: true,
    };

    #[test]
    fn a_connect_failure_is_retried() {
        assert_eq!(
            step(&ANY, 0, failed(AttemptError::ConnectFailure)),
            Step::Retry
        );
    }

    #[test]
    fn a_connect_failure_ejects_the_endpoint() {
        assert_eq!(
            AttemptError::ConnectFailure.charge(),
            Some(Failure::Connect)
        );
    }

    #[test]
    fn a_lost_connection_is_one_strike() {
        assert_eq!(AttemptError::ConnectionLost.charge(), Some(Failure::Error));
    }

    #[test]
    fn a_lost_connection_is_retried_as_a_reset() {
        assert_eq!(
            AttemptError::ConnectionLost.condition(),
            Some(RetryOn::Reset)
        );
        assert_eq!(
            step(&ANY, 0, failed(AttemptError::ConnectionLost)),
            Step::Retry
        );
    }

    const DENIED: AttemptError = AttemptError::Refused(StatusCode::FORBIDDEN);

    #[test]
    fn a_stateless_reset_is_a_restarted_peer_never_charged() {
        let lost = |peer_restarted| TunnelError::ConnectionLost {
            reason: "reset by peer".into(),
            established: false,
            peer_restarted,
        };
        let restarted = Failed::of(&lost(true));
        assert_eq!(restarted.error, AttemptError::PeerRestarted);
        assert!(restarted.before_any_byte);
        assert_eq!(Failed::of(&lost(false)).error, AttemptError::ConnectionLost);
        assert_eq!(AttemptError::PeerRestarted.charge(), None);
        assert!(!AttemptError::PeerRestarted.judges_endpoint());
        assert!(!AttemptError::PeerRestarted.is_local());
        assert!(AttemptError::ConnectionLost.judges_endpoint());
        assert_eq!(
            AttemptError::PeerRestarted.condition(),
            Some(RetryOn::Reset)
        );
        assert_eq!(
            AttemptError::PeerRestarted.status(),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn a_request_that_met_a_restarted_peer_is_retried_when_its_method_allows() {
        let outcome = failed(AttemptError::PeerRestarted);
        // No route retries: the mesh-wide count, on the `reset` condition, for a repeatable
        // method with its body intact.
        let p = for_request(None, 2, true, true, &outcome);
        assert_eq!((p.max_retries, p.on, p.replayable), (2, RESTARTED_ON, true));
        assert_eq!(step(&p, 0, outcome), Step::Retry);
        // A route with retries of its own decides: here its conditions leave `reset` out.
        let route = Some((1, &[RetryOn::GatewayError][..]));
        assert_eq!(
            step(&for_request(route, 2, true, true, &outcome), 0, outcome),
            Step::Fail
        );
        let route = Some((1, &[RetryOn::Reset][..]));
        assert_eq!(
            step(&for_request(route, 2, true, true, &outcome), 0, outcome),
            Step::Retry
        );
        // A method that may not be repeated: the route decides (here: no retries).
        assert_eq!(
            step(&for_request(None, 2, false, true, &outcome), 0, outcome),
            Step::Fail
        );
        // A streamed body already sent cannot go again.
        assert_eq!(
            step(&for_request(None, 2, true, false, &outcome), 0, outcome),
            Step::Fail
        );
    }

    #[test]
    fn a_policy_refusal_is_final() {
        assert_eq!(step(&ANY, 0, failed(DENIED)), Step::Fail);
    }

    #[test]
    fn a_policy_refusal_charges_nobody() {
        assert_eq!(DENIED.charge(), None);
    }

    #[test]
    fn a_policy_refusal_is_flagged_as_denied() {
        assert_eq!(DENIED.flag(), Flag::Denied);
    }

    #[test]
    fn a_header_section_over_the_limit_is_the_requests_failure() {
        let too_big = AttemptError::HeaderTooBig;
        assert!(too_big.is_local());
        assert_eq!(too_big.charge(), None);
        assert_eq!(
            too_big.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(step(&ANY, 0, failed(too_big)), Step::Fail);
    }

    #[test]
    fn a_stream_limit_is_this_sides_and_never_charged() {
        let e = TunnelError::StreamLimit {
            peer: "127.0.0.1:1".parse().unwrap(),
            connections: 8,
            waited: Duration::from_millis(100),
        };
        let failed = Failed::of(&e);
        assert_eq!(failed.error, AttemptError::Overflow);
        assert!(failed.error.is_local());
        assert_eq!(failed.error.charge(), None);
    }

    #[test]
    fn a_stream_limit_is_retried_on_another_endpoint() {
        assert_eq!(step(&ANY, 0, failed(AttemptError::Overflow)), Step::Retry);
    }

    #[test]
    fn a_stream_limit_answers_503_and_flags_upstream_overflow() {
        assert_eq!(
            AttemptError::Overflow.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(AttemptError::Overflow.flag().as_str(), "UO");
    }

    #[test]
    fn a_local_failure_is_never_charged_or_retried() {
        assert_eq!(AttemptError::Local.charge(), None);
        assert_eq!(step(&ANY, 0, Outcome::Failed(Failed::local())), Step::Fail);
    }

    #[test]
    fn nothing_is_retried_once_bytes_may_have_reached_the_app() {
        let after = Outcome::Failed(Failed {
            error: AttemptError::Reset,
            before_any_byte: false,
        });
        assert_eq!(step(&ANY, 0, after), Step::Fail);
    }

    #[test]
    fn a_retry_with_nowhere_to_go_spends_no_budget() {
        let cfg = BudgetConfig {
            percent: 0,
            min_per_second: 1,
            window: std::time::Duration::from_secs(1),
        };
        let mut budget = RetryBudget::default();
        let now = Instant::now();
        let reset = failed(AttemptError::Reset);
        assert_eq!(
            next(&ANY, 0, reset, false, &mut budget, &cfg, now),
            Step::Fail
        );
        assert_eq!(
            next(&ANY, 0, reset, true, &mut budget, &cfg, now),
            Step::Retry
        );
    }

    #[test]
    fn retries_stop_at_the_maximum() {
        assert_eq!(step(&ANY, 2, failed(AttemptError::Reset)), Step::Fail);
    }

    #[test]
    fn a_request_that_cannot_be_replayed_is_not_retried() {
        let once = RetryPolicy {
            replayable: false,
            ..ANY
        };
        assert_eq!(
            step(&once, 0, failed(AttemptError::ConnectFailure)),
            Step::Fail
        );
    }

    #[test]
    fn an_answer_is_retried_only_for_a_listed_condition() {
        let on_5xx = RetryPolicy {
            on: &[RetryOn::FiveXx],
            ..ANY
        };
        assert_eq!(
            step(&on_5xx, 0, Outcome::Answered(StatusCode::BAD_GATEWAY)),
            Step::Retry
        );
        assert_eq!(
            step(&on_5xx, 0, Outcome::Answered(StatusCode::OK)),
            Step::Answer
        );
        assert_eq!(
            step(&ANY, 0, Outcome::Answered(StatusCode::BAD_GATEWAY)),
            Step::Answer
        );
    }

    #[test]
    fn a_refused_budget_is_not_spent_by_attempts_that_would_not_retry() {
        let cfg = BudgetConfig {
            percent: 0,
            min_per_second: 1,
            window: Duration::from_secs(1),
        };
        let mut budget = RetryBudget::default();
        let now = Instant::now();
        // Not retryable: the budget's single retry stays.
        let denied = failed(AttemptError::Refused(StatusCode::FORBIDDEN));
        assert_eq!(
            next(&ANY, 0, denied, true, &mut budget, &cfg, now),
            Step::Fail
        );
        assert_eq!(
            next(
                &ANY,
                0,
                failed(AttemptError::Reset),
                true,
                &mut budget,
                &cfg,
                now
            ),
            Step::Retry
        );
        assert_eq!(
            next(
                &ANY,
                0,
                failed(AttemptError::Reset),
                true,
                &mut budget,
                &cfg,
                now
            ),
            Step::Fail
        );
    }

    #[test]
    fn a_request_that_reached_no_app_may_go_again_whatever_its_method() {
        let unreached = failed(AttemptError::AppUnreached);
        // A POST, no route retries: the mesh-wide count applies.
        let p = for_request(None, 2, false, true, &unreached);
        assert_eq!((p.max_retries, p.replayable), (2, true));
        assert_eq!(step(&p, 0, unreached), Step::Retry);
        assert_eq!(step(&p, 2, unreached), Step::Fail);
        // A route with more retries raises the count.
        let p = for_request(Some((5, &[RetryOn::FiveXx])), 2, false, true, &unreached);
        assert_eq!(p.max_retries, 5);
        assert_eq!(step(&p, 3, unreached), Step::Retry);
        // A body already read cannot go again.
        let p = for_request(None, 2, true, false, &unreached);
        assert_eq!(step(&p, 0, unreached), Step::Fail);
    }

    #[test]
    fn a_request_an_app_may_have_seen_follows_the_route_and_the_method() {
        let reset = failed(AttemptError::Reset);
        let answered = Outcome::Answered(StatusCode::SERVICE_UNAVAILABLE);
        // No route retries: nothing is retried.
        assert_eq!(
            step(&for_request(None, 2, true, true, &reset), 0, reset),
            Step::Fail
        );
        let route = Some((2, &[RetryOn::Reset, RetryOn::GatewayError][..]));
        let p = for_request(route, 0, true, true, &reset);
        assert_eq!(step(&p, 0, reset), Step::Retry);
        let p = for_request(route, 0, true, true, &answered);
        assert_eq!(step(&p, 0, answered), Step::Retry);
        // A POST that may have reached an app is not repeated.
        let p = for_request(route, 0, false, true, &reset);
        assert_eq!(step(&p, 0, reset), Step::Fail);
    }

    #[test]
    fn an_unreached_app_is_a_connect_failure_for_retries_and_one_strike() {
        let e = AttemptError::AppUnreached;
        assert_eq!(e.condition(), Some(RetryOn::ConnectFailure));
        assert_eq!(e.charge(), Some(Failure::Error));
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        let r = AttemptError::Rejected;
        assert_eq!(
            (r.condition(), r.charge()),
            (Some(RetryOn::ConnectFailure), None)
        );
        let p = for_request(None, 1, false, true, &failed(r));
        assert_eq!(step(&p, 0, failed(r)), Step::Retry);
    }
}
