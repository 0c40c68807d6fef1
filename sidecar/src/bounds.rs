//! Bounds on what local apps may make the sidecar hold (`[limits]`): an app is not trusted to
//! behave, and one that floods its listener must not take the file descriptors, memory or
//! time the sidecar's other listeners and flows need.
//!
//! - **Connections per app-facing listener** (`max_connections_per_listener`): each explicit
//!   upstream listener and the transparent one holds at most this many app connections. A
//!   connection past it is accepted and closed at once (the app sees a reset or an empty
//!   answer, at once, instead of hanging in the kernel's backlog), and the refusal is logged
//!   once per episode. The default shares half of the process's soft file-descriptor limit
//!   among the app-facing listeners, so one flooding app cannot starve the other listeners,
//!   the connections to the local app that inbound flows open, the QUIC socket, the registry
//!   client or certificate reloads.
//! - **Header read timeout** (`header_read_timeout`): an app connection must deliver its first
//!   complete request head within this time of being accepted, and every later head within
//!   this time of its first byte (slowloris). An idle keep-alive connection between requests is
//!   not timed. The admin port applies the same timeout to every head, idle time included.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Fewest app connections a listener is given by the derived default.
const MIN_PER_LISTENER: usize = 64;
/// Soft file-descriptor limit assumed when `/proc/self/limits` cannot be read.
const ASSUMED_NOFILE: u64 = 1024;

/// `[limits]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most app connections one app-facing listener holds at once; absent: half the soft
    /// file-descriptor limit, shared among the app-facing listeners (at least 64 each).
    #[serde(default)]
    pub max_connections_per_listener: Option<usize>,
    /// Time allowed for a complete request head (HTTP listeners and the admin port).
    #[serde(default)]
    pub header_read_timeout: HeaderReadTimeout,
}

/// A positive duration of at most an hour (`limits.header_read_timeout`, default 10 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "humantime_serde::Serde<Duration>",
    into = "humantime_serde::Serde<Duration>"
)]
pub struct HeaderReadTimeout(Duration);

impl HeaderReadTimeout {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl Default for HeaderReadTimeout {
    fn default() -> Self {
        HeaderReadTimeout(Duration::from_secs(10))
    }
}

impl TryFrom<humantime_serde::Serde<Duration>> for HeaderReadTimeout {
    type Error = String;
    fn try_from(d: humantime_serde::Serde<Duration>) -> Result<Self, String> {
        let d = d.into_inner();
        if d.is_zero() || d > Duration::from_secs(3600) {
            return Err(format!(
                "{} is out of range: give a duration from 1ms to 1h, e.g. \"10s\"",
                humantime::format_duration(d)
            ));
        }
        Ok(HeaderReadTimeout(d))
    }
}

impl From<HeaderReadTimeout> for humantime_serde::Serde<Duration> {
    fn from(t: HeaderReadTimeout) -> Self {
        t.0.into()
    }
}

/// The connection cap of each app-facing listener: the configured value, else half of
/// `nofile` (the soft file-descriptor limit) shared among `listeners`, at least
/// [`MIN_PER_LISTENER`].
pub(crate) fn per_listener(configured: Option<usize>, nofile: u64, listeners: usize) -> usize {
    if let Some(n) = configured {
        return n.max(1);
    }
    let half = usize::try_from(nofile / 2).unwrap_or(usize::MAX);
    (half / listeners.max(1)).max(MIN_PER_LISTENER)
}

/// The soft limit on open files from the text of `/proc/self/limits`; `None` when the line is
/// missing or the limit is `unlimited`.
pub(crate) fn soft_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The process's soft file-descriptor limit now.
fn nofile_now() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| soft_nofile(&t))
        .unwrap_or(ASSUMED_NOFILE)
}

/// Holds one app-facing listener to its connection cap.
pub(crate) struct ListenerCap {
    what: &'static str,
    permits: Arc<Semaphore>,
    max: usize,
    refused: AtomicU64,
    /// Whether the last connection was refused: one log line per episode at the cap.
    at_cap: std::sync::atomic::AtomicBool,
}

impl ListenerCap {
    /// The cap for one of `listeners` app-facing listeners.
    pub(crate) fn new(limits: &LimitsConfig, listeners: usize, what: &'static str) -> ListenerCap {
        let max = per_listener(limits.max_connections_per_listener, nofile_now(), listeners);
        ListenerCap {
            what,
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: AtomicU64::new(0),
            at_cap: Default::default(),
        }
    }

    /// The listener's name in logs.
    pub(crate) fn what(&self) -> &'static str {
        self.what
    }

    /// A place for one more connection, or `None` at the cap (the caller closes it).
    pub(crate) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => {
                if self.at_cap.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        listener = self.what,
                        refused = self.refused.load(Ordering::Relaxed),
                        "app connections below the listener's cap again; accepting"
                    );
                }
                Some(p)
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if !self.at_cap.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        listener = self.what,
                        max = self.max,
                        "app connections at the listener's cap (limits.max_connections_per_listener): \
                         new ones are closed at once until some end; other listeners and open flows \
                         are not affected"
                    );
                }
                None
            }
        }
    }
}

/// One warning per burst of accept errors: the first, then at most one every [`WARN_EVERY`].
pub(crate) struct AcceptWarnings {
    last: std::sync::Mutex<Option<Instant>>,
}

/// Least time between two accept-error warnings of one process.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl AcceptWarnings {
    pub(crate) const fn new() -> Self {
        AcceptWarnings {
            last: std::sync::Mutex::new(None),
        }
    }

    /// Whether an accept error at `now` should be logged.
    pub(crate) fn should_warn(&self, now: Instant) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return true;
        };
        let due = last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
        if due {
            *last = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn per_listener_shares_half_the_fd_limit() {
        assert_eq!(per_listener(None, 1_048_576, 4), 131_072);
        assert_eq!(per_listener(None, 1024, 2), 256);
    }

    #[test]
    fn per_listener_keeps_a_floor() {
        assert_eq!(per_listener(None, 256, 8), MIN_PER_LISTENER);
        assert_eq!(per_listener(None, 1024, 0), 512);
    }

    #[test]
    fn per_listener_takes_the_configured_value() {
        assert_eq!(per_listener(Some(50), 1024, 2), 50);
        assert_eq!(per_listener(Some(0), 1024, 2), 1);
    }

    #[test]
    fn soft_nofile_reads_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63704                63704                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(soft_nofile(text), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(soft_nofile(unlimited), None);
        assert_eq!(soft_nofile(""), None);
    }

    #[test]
    fn accept_warnings_are_spaced() {
        let w = AcceptWarnings::new();
        let t = Instant::now();
        assert!(w.should_warn(t));
        assert!(!w.should_warn(t + Duration::from_secs(1)));
        assert!(w.should_warn(t + WARN_EVERY));
    }

    #[test]
    fn header_read_timeout_refuses_zero() {
        let zero: Result<HeaderReadTimeout, _> =
            HeaderReadTimeout::try_from(humantime_serde::Serde::from(Duration::ZERO));
        assert!(zero.unwrap_err().contains("1ms to 1h"));
    }
}
