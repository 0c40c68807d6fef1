//! The decision core: every choice on the data path as a pure function or pure state over
//! registry data. Nothing here reads a clock, draws a random number or does I/O: `now` and
//! random samples are arguments (as in quinn-proto), so each decision is tested exactly, in
//! microseconds, and the async glue in `l4`, `l7` and `state` only gathers inputs and acts.
//! CI greps this folder for clocks, randomness and I/O (`.ci/pure-core`).
//!
//! - [`capture`]: the Service port a transparently captured connection meant.
//! - [`route`]: the route rule a flow or request takes (one function for L4 and L7).
//! - [`pick`]: the weighted backend subset of a rule, then an endpoint inside it (locality,
//!   power of two choices, subset failover, panic mode).
//! - [`admit`]: inbound admission of a tunnel or request (port, then policy; L4 and L7).
//! - [`policy`]: the access policy's decision on a verified caller.
//! - [`ratelimit`]: rate limits on verified callers (token buckets, service-wide shares).
//! - [`outlier`]: passive outlier detection (consecutive failures eject, doubling, a cap).
//! - [`breaker`]: circuit breakers per destination service (counts against thresholds).
//! - [`budget`]: the retry budget (a share of requests over a window, plus a floor).
//! - [`retry`]: the one retry and failure policy of L4 and L7.

pub mod admit;
pub mod breaker;
pub mod budget;
pub mod capture;
pub mod outlier;
pub mod pick;
pub mod policy;
pub mod ratelimit;
pub mod retry;
pub mod route;

#[cfg(test)]
mod tests;
