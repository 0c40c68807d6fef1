//! Congestion control of the mesh's QUIC connections: the `[transport] congestion` setting,
//! the BBRv3 controller ([`Bbr`], a pure state machine) plugged into quinn, and per-connection
//! figures for the metrics ([`CongestionStats`]).
//!
//! quinn 0.11's `Controller` trait exposes only a window: quinn paces at
//! `1.25 × window / smoothed RTT` itself and no controller can set a pacing rate. [`Bbr`]
//! therefore expresses its pacing rate through the window (module `bbr`, "departure 2").

mod bbr;

use std::any::Any;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use serde::{Deserialize, Serialize};

#[cfg(test)]
use bbr::bdp_of;
pub use bbr::{queue_threshold, Bbr, Phase, MAX_WINDOW};

/// The congestion controller of every connection of an endpoint (`[transport] congestion`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// BBRv3 (draft-ietf-ccwg-bbr) with Halyard's four departures ([`Bbr`]): full rate
    /// through random loss, a small queue. The default: the `lossy`, `bulk` and `latency`
    /// benches find it no worse than `cubic` on a clean link and far better on a lossy one
    /// (ARCHITECTURE.md, "Congestion control").
    #[default]
    Bbr,
    /// quinn's CUBIC (RFC 9438): loss-based; halves its rate on random loss and fills
    /// drop-tail queues.
    Cubic,
}

/// A `congestion` value that names no controller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transport.congestion = {0:?} is not a congestion controller; use \"bbr\" or \"cubic\"")]
pub struct UnknownCongestion(pub String);

impl FromStr for Congestion {
    type Err = UnknownCongestion;

    fn from_str(s: &str) -> Result<Self, UnknownCongestion> {
        match s {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            other => Err(UnknownCongestion(other.to_owned())),
        }
    }
}

impl Congestion {
    /// The setting's name as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
        }
    }

    /// The quinn factory that builds this controller for each connection path.
    pub fn factory(self) -> Arc<dyn ControllerFactory + Send + Sync> {
        match self {
            Congestion::Bbr => Arc::new(BbrConfig::new(rand::random())),
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
        }
    }
}

/// Builds a [`Bbr`] per connection path (quinn's `ControllerFactory`). Each controller gets
/// its own seed for the random part of its probing schedule.
#[derive(Debug)]
pub struct BbrConfig {
    seed: AtomicU64,
}

impl BbrConfig {
    /// A factory whose controllers draw their seeds from `seed`.
    pub fn new(seed: u64) -> Self {
        BbrConfig {
            seed: AtomicU64::new(seed),
        }
    }
}

/// RFC 9002 §7.2: `min(10 × max_datagram_size, max(14720, 2 × max_datagram_size))`.
fn initial_window(mtu: u16) -> u64 {
    let mtu = u64::from(mtu);
    (10 * mtu).min(14_720_u64.max(2 * mtu))
}

impl ControllerFactory for BbrConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let seed = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        Box::new(BbrController(Bbr::new(
            current_mtu,
            initial_window(current_mtu),
            seed,
        )))
    }
}

/// [`Bbr`] behind quinn's `Controller` trait: a thin adapter, all decisions are in `Bbr`.
#[derive(Debug, Clone)]
pub struct BbrController(pub Bbr);

impl Controller for BbrController {
    fn on_sent(&mut self, now: Instant, bytes: u64, _last_packet_number: u64) {
        self.0.on_sent(now, bytes);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &quinn_proto::RttEstimator,
    ) {
        self.0.on_ack(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.0.on_end_acks(now, in_flight, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.0
            .on_loss(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.0.set_mtu(new_mtu);
    }

    fn window(&self) -> u64 {
        self.0.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.0.window();
        // quinn's field is in bits per second.
        metrics.pacing_rate = Some(self.0.pacing_rate().saturating_mul(8));
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.0.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// What a connection's congestion controller says now, for the per-peer gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CongestionStats {
    /// Smoothed RTT of the connection (to pick the same connection as the other gauges).
    pub rtt: Duration,
    /// Bytes the connection may have in flight (`halyard_quic_cwnd_bytes`).
    pub cwnd: u64,
    /// Bytes per second (`halyard_quic_pacing_rate_bytes`): with `bbr` the model's pacing rate
    /// (§5.6.2), which the window carries; with `cubic` the rate quinn's pacer derives,
    /// `1.25 × cwnd / smoothed RTT`.
    pub pacing_rate: u64,
    /// The controller's delivery-rate estimate in bytes per second
    /// (`halyard_quic_delivery_rate_bytes`): `BBR.bw`; `None` with `cubic`, which has none.
    pub delivery_rate: Option<u64>,
    /// The BBR phase (`startup`, `drain`, `probe_bw_down`, …); `None` with `cubic`.
    pub phase: Option<&'static str>,
    /// Whether `bbr` competes with a flow that does not yield (`halyard_quic_bbr_competing`,
    /// [`Bbr::competing`]); `None` with `cubic`.
    pub competing: Option<bool>,
}

impl CongestionStats {
    /// Reads the controller of `conn` (clones its state under quinn's connection lock).
    pub fn of(conn: &quinn::Connection) -> Self {
        let rtt = conn.rtt();
        let controller = conn.congestion_state();
        let cwnd = controller.window();
        match controller.into_any().downcast::<BbrController>() {
            Ok(bbr) => CongestionStats {
                rtt,
                cwnd,
                pacing_rate: bbr.0.pacing_rate(),
                delivery_rate: Some(bbr.0.bandwidth()),
                phase: Some(bbr.0.phase().as_str()),
                competing: Some(bbr.0.competing()),
            },
            Err(_) => CongestionStats {
                rtt,
                cwnd,
                pacing_rate: quinn_pacer_rate(cwnd, rtt),
                delivery_rate: None,
                phase: None,
                competing: None,
            },
        }
    }
}

/// quinn's pacer rate for a window: `1.25 × window / rtt` bytes per second.
fn quinn_pacer_rate(window: u64, rtt: Duration) -> u64 {
    let nanos = rtt.as_nanos().max(1);
    let rate = u128::from(window).saturating_mul(1_250_000_000) / nanos;
    u64::try_from(rate).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
