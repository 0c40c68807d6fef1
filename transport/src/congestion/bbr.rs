//! BBR version 3 (draft-ietf-ccwg-bbr-06) as a pure state machine: sends, acknowledgements,
//! losses and `now` in; a congestion window and a pacing rate out. No clock, no sockets, no
//! randomness from outside: the random parts of the probing schedule come from a seed.
//!
//! Section numbers (§) are those of draft-ietf-ccwg-bbr-06, which names the loss-bounded
//! model `inflight_longterm` / `inflight_shortterm` (`inflight_hi` / `inflight_lo` in earlier
//! drafts and in Linux); the code uses the older, shorter names.
//!
//! Four deliberate departures from the draft, all for the links Halyard runs on, and all
//! measured in `benches/` (see ARCHITECTURE.md, "Congestion control"):
//!
//! 1. **Loss counts as congestion only with a queue.** The draft treats a per-round loss rate
//!    above 2 % (`LossThresh`) as a sign of too much data in flight, and any loss in a round as
//!    a reason to lower `bw_lo`/`inflight_lo`; it aims at full throughput only up to about 1 %
//!    random loss (§3.1). A drop-tail or AQM bottleneck drops because its queue is full or
//!    growing, so congestive loss comes with a queueing delay; random loss on a lossy link
//!    (radio, overloaded middlebox, the emulator) does not. Here a loss signal is acted on only
//!    when the round's smallest RTT sample exceeds `min_rtt` by [`queue_threshold`]. With no
//!    RTT information yet, loss counts (the draft's behaviour).
//! 2. **The window carries the pacing rate.** quinn 0.11's `Controller` trait has no way to
//!    set a pacing rate: its pacer sends `1.25 × window / smoothed_rtt` in bursts of about 2 ms.
//!    A BBR window of `2 × BDP` therefore sends at up to 2.5× the bottleneck rate until a
//!    standing queue of one BDP forms (quinn's own BBRv1 does exactly that). [`Bbr::window`]
//!    is the draft's cwnd further bounded by the volume the draft's pacing rate would put in
//!    flight in one round trip, plus the aggregation allowance (`extra_acked`) and a send
//!    quantum and one segment (while app-limited, never below the draft's offload budget of
//!    3 quanta): `min(cwnd, pacing_gain × bw × max(window_rtt, 1 ms) + extra_acked +
//!    quantum + SMSS)`, where [`Bbr::window_rtt`] is `min_rtt` plus any standing queue this
//!    flow did not build itself (the 1 ms is departure 4's). The flow is then window-limited
//!    at the draft's pacing rate, and quinn's pacer only smooths bursts.
//! 3. **Beside a flow that does not yield, the flow competes.** When a queue still stands at
//!    the end of the flow's own ProbeRTT, after its inflight went down to the ProbeRTT window
//!    (half a BDP, at least 4 packets), more than that window can explain, another flow holds
//!    it (kernel BBRv1, CUBIC). The draft's loss response would only hand that flow the link
//!    (0.17× of kernel BBRv1's goodput on a 1-BDP buffer), so until the next ProbeRTT (16 s
//!    later at most) loss bounds nothing and the queue above a margin counts in
//!    [`Bbr::window_rtt`] ([`Bbr::competing`], after Copa's competitive mode).
//! 4. **A BDP spans at least a millisecond.** Two user-space QUIC stacks on one host or a
//!    veth pair see a `min_rtt` of microseconds, but acknowledge and pace at the granularity
//!    of their hosts' schedulers and timers. Every BDP, ProbeRTT's included, is computed over
//!    `max(min_rtt, 1 ms)` (`BDP_RTT_FLOOR`); paths of 1 ms or more are untouched.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Per-round loss rate above which a bandwidth probe has gone too far (§2.8 `LossThresh`).
const LOSS_THRESH: f64 = 0.02;
/// Multiplicative decrease per round with congestive loss (§2.8 `Beta`).
const BETA: f64 = 0.7;
/// Share of `inflight_hi` left free for other flows while cruising (§2.8 `Headroom`).
const HEADROOM: f64 = 0.15;
/// Startup pacing gain, 4 ln 2 (§2.5 `StartupPacingGain`).
const STARTUP_PACING_GAIN: f64 = 2.77;
/// Drain pacing gain (§2.5 `DrainPacingGain`).
const DRAIN_PACING_GAIN: f64 = 0.5;
/// Default cwnd gain (§2.6 `DefaultCwndGain`).
const CWND_GAIN: f64 = 2.0;
/// cwnd gain in ProbeBW_UP (§5.3.3.4).
const UP_CWND_GAIN: f64 = 2.25;
/// ProbeBW pacing gains (§5.3.3).
const DOWN_PACING_GAIN: f64 = 0.9;
const UP_PACING_GAIN: f64 = 1.25;
/// Pacing margin (§2.5 `PacingMarginPercent`).
const PACING_MARGIN: f64 = 0.99;
/// Startup ends after this many rounds without 25 % bandwidth growth (§5.3.1.2).
const FULL_BW_ROUNDS: u32 = 3;
const FULL_BW_GROWTH: f64 = 1.25;
/// Startup ends on loss only after this many loss events in a round (§5.3.1.3).
const STARTUP_FULL_LOSS_COUNT: u32 = 6;
/// min_rtt filter window (§2.16.1) and ProbeRTT schedule (§2.16.2).
const MIN_RTT_FILTER: Duration = Duration::from_secs(10);
const PROBE_RTT_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_RTT_DURATION: Duration = Duration::from_millis(200);
const PROBE_RTT_CWND_GAIN: f64 = 0.5;
/// extra_acked filter length in rounds (§2.12).
const EXTRA_ACKED_ROUNDS: usize = 10;
/// Reno-coexistence bound on rounds between bandwidth probes (§5.3.3.5.3).
const MAX_RENO_ROUNDS: u64 = 63;
/// Departure 3: this long after the ProbeRTT that decided to compete, another ProbeRTT
/// decides again, even if lower RTT samples have kept putting off the one due (5 s after the
/// last lower sample, §5.3.4). A kernel BBRv1 competitor's own ProbeRTT, every 10 s, puts it
/// off once, to 15 s at most; forced earlier, the check would read a `max_bw` inflated by
/// the moment the competitor stepped aside, and the rate check would fail.
const COMPETING_FOR: Duration = Duration::from_secs(16);
/// Departure 4: the shortest RTT a BDP is computed over. A QUIC receiver acknowledges from
/// user space and its sender paces on a timer, both at the granularity of the hosts'
/// schedulers and timers (tokio's timer wheel ticks in milliseconds), so on a path whose
/// `min_rtt` is microseconds a window of `2 × bw × min_rtt` empties long before the next ACK
/// batch or pacing tick. Paths of 1 ms or more are untouched.
const BDP_RTT_FLOOR: Duration = Duration::from_millis(1);
/// Largest window this controller ever asks for (1 GiB): bounds every product of a bandwidth
/// and an RTT, whatever a peer makes them.
pub const MAX_WINDOW: u64 = 1 << 30;
/// Largest bandwidth estimate kept, bytes per second (8 Tbit/s).
const MAX_BW: u64 = 1 << 40;
/// RTT samples are clamped into this range (a zero or an hours-long sample changes nothing
/// beyond it).
const MIN_RTT_SAMPLE: Duration = Duration::from_micros(1);
const MAX_RTT_SAMPLE: Duration = Duration::from_secs(60);
/// Send records kept at most (one per transmit batch); older ones are forgotten, which only
/// costs rate samples.
const MAX_SEND_RECORDS: usize = 1 << 15;

/// The phase of the state machine (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Exponential search for the bottleneck rate (§5.3.1).
    Startup,
    /// Draining the queue Startup built (§5.3.2).
    Drain,
    /// ProbeBW_DOWN: below the estimate to drain what a probe queued (§5.3.3.1).
    ProbeBwDown,
    /// ProbeBW_CRUISE: at the estimate, leaving headroom (§5.3.3.2).
    ProbeBwCruise,
    /// ProbeBW_REFILL: refilling the pipe before a probe (§5.3.3.3).
    ProbeBwRefill,
    /// ProbeBW_UP: probing for more bandwidth (§5.3.3.4).
    ProbeBwUp,
    /// ProbeRTT: a short dip to re-measure the path's RTT (§5.3.4).
    ProbeRtt,
}

impl Phase {
    /// A short lowercase name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Startup => "startup",
            Phase::Drain => "drain",
            Phase::ProbeBwDown => "probe_bw_down",
            Phase::ProbeBwCruise => "probe_bw_cruise",
            Phase::ProbeBwRefill => "probe_bw_refill",
            Phase::ProbeBwUp => "probe_bw_up",
            Phase::ProbeRtt => "probe_rtt",
        }
    }

    pub(crate) fn is_probe_bw(self) -> bool {
        matches!(
            self,
            Phase::ProbeBwDown | Phase::ProbeBwCruise | Phase::ProbeBwRefill | Phase::ProbeBwUp
        )
    }
}

/// Where the flow is in interpreting probe feedback (§2.14 `ack_phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckPhase {
    Init,
    Refilling,
    ProbeStarting,
    ProbeFeedback,
    ProbeStopping,
}

/// Connection state at the moment a transmit batch left (§4.1.2, per-packet state `P.*`).
#[derive(Debug, Clone, Copy)]
struct SendRecord {
    time: Instant,
    delivered: u64,
    delivered_time: Instant,
    first_send_time: Instant,
    lost: u64,
    tx_in_flight: u64,
    app_limited: bool,
}

/// A delivery-rate sample built from one batch of acknowledgements (§2.3, §4.1.2).
#[derive(Debug, Clone, Copy, Default)]
struct RateSample {
    delivery_rate: u64,
    delivered: u64,
    newly_acked: u64,
    rtt: Option<Duration>,
    tx_in_flight: u64,
    lost: u64,
    is_app_limited: bool,
    /// `P.delivered` of the newest packet acknowledged, for round counting.
    prior_delivered: u64,
    valid: bool,
}

/// What one batch of acknowledgements has accumulated until `on_end_acks`.
#[derive(Debug, Clone, Copy, Default)]
struct AckBatch {
    newly_acked: u64,
    /// When the newest packet of the batch was sent: its send record is looked up once, at
    /// the end of the batch (the newest record at or before a time only grows with it).
    newest_sent: Option<Instant>,
    app_limited: bool,
}

/// The two-slot max filter of `max_bw` over ProbeBW cycles (§5.5.3–§5.5.6).
#[derive(Debug, Clone, Copy, Default)]
struct MaxBwFilter {
    slots: [u64; 2],
    cycle: u8,
}

impl MaxBwFilter {
    fn update(&mut self, sample: u64) {
        let slot = &mut self.slots[usize::from(self.cycle & 1)];
        *slot = (*slot).max(sample);
    }

    fn advance(&mut self) {
        self.cycle = self.cycle.wrapping_add(1);
        self.slots[usize::from(self.cycle & 1)] = 0;
    }

    fn get(&self) -> u64 {
        self.slots[0].max(self.slots[1])
    }
}

/// A BBRv3 sender (see the module documentation for the four departures from the draft).
///
/// Units: bytes, bytes per second, [`Instant`]s passed in by the caller. Every arithmetic path
/// saturates; the window stays within `[4 × SMSS, MAX_WINDOW]`.
#[derive(Debug, Clone)]
pub struct Bbr {
    smss: u64,
    initial_cwnd: u64,
    rng: u64,

    // Delivery-rate sampling state (§4.1.2, `C.*`).
    delivered: u64,
    delivered_time: Option<Instant>,
    first_send_time: Option<Instant>,
    lost: u64,
    inflight: u64,
    app_limited: bool,
    sends: VecDeque<SendRecord>,
    batch: AckBatch,

    // Network path model (§2.9).
    max_bw: MaxBwFilter,
    bw: u64,
    bw_lo: Option<u64>,
    bw_latest: u64,
    inflight_hi: Option<u64>,
    inflight_lo: Option<u64>,
    inflight_latest: u64,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Option<Instant>,
    probe_rtt_min_delay: Option<Duration>,
    probe_rtt_min_stamp: Option<Instant>,
    /// `BBR.probe_rtt_expired`: the 5 s window ran out before this ACK's sample (§5.5.7).
    probe_rtt_due: bool,
    extra_acked: [u64; EXTRA_ACKED_ROUNDS],
    extra_acked_interval_start: Option<Instant>,
    extra_acked_delivered: u64,

    // Rounds (§5.5.1).
    round_count: u64,
    next_round_delivered: u64,
    round_start: bool,
    loss_round_delivered: u64,
    loss_round_start: bool,

    // Congestion signals of the current round (§2.10) and the queue signal (departure 1).
    loss_in_round: bool,
    loss_events_in_round: u32,
    lost_in_round: u64,
    delivered_in_round: u64,
    round_min_rtt: Option<Duration>,
    prev_round_min_rtt: Option<Duration>,
    /// Departure 3: set while the last ProbeRTT found a queue another flow keeps standing,
    /// to when a ProbeRTT is forced to decide again ([`COMPETING_FOR`]).
    competing_until: Option<Instant>,
    /// The smallest RTT sample of a packet sent since this ProbeRTT brought the flow's inflight
    /// down to its ProbeRTT window.
    probe_rtt_drained_min: Option<Duration>,
    /// `bw_latest` when this ProbeRTT began: the delivery rate the flow had just before.
    bw_before_probe_rtt: u64,

    // State machine (§5.1, §2.13, §2.14).
    phase: Phase,
    pacing_gain: f64,
    cwnd_gain: f64,
    full_bw: u64,
    full_bw_count: u32,
    full_bw_now: bool,
    full_bw_reached: bool,
    ack_phase: AckPhase,
    bw_probe_samples: bool,
    bw_probe_up_rounds: u32,
    bw_probe_up_acked: u64,
    probe_up_acked_per_inc: u64,
    rounds_since_bw_probe: u64,
    bw_probe_wait: Duration,
    cycle_stamp: Option<Instant>,
    phase_stamp: Option<Instant>,
    probe_rtt_done_stamp: Option<Instant>,
    probe_rtt_round_done: bool,
    prior_cwnd: u64,
    idle_restart: bool,
    /// A probe saw too much loss: leave ProbeBW_UP on the next ACK.
    probe_down_pending: bool,
    /// Persistent congestion (the QUIC analogue of an RTO): packet conservation until a
    /// packet sent after this instant is acknowledged (§5.6.4.4).
    recovery_start: Option<Instant>,

    // Outputs (§5.6).
    cwnd: u64,
    pacing_rate: u64,
    send_quantum: u64,
    /// [`Bbr::window`], recomputed whenever an input changes the state it is built from:
    /// quinn reads it for every packet it sends.
    window: u64,
}

/// How far the round's smallest RTT must exceed `min_rtt` for a loss to count as congestion:
/// an eighth of `min_rtt`, within 1–10 ms (a full drop-tail queue of even 0.1 BDP shows
/// well above it; the delayed-ACK and scheduling noise of a loaded host stays below it).
pub fn queue_threshold(min_rtt: Duration) -> Duration {
    (min_rtt / 8).clamp(Duration::from_millis(1), Duration::from_millis(10))
}

fn scale(value: u64, gain: f64) -> u64 {
    // Float-to-integer `as` saturates (and maps NaN to 0): no overflow is possible here.
    (value as f64 * gain) as u64
}

/// `bw × rtt` in bytes, saturated at [`MAX_WINDOW`].
pub(crate) fn bdp_of(bw: u64, rtt: Duration) -> u64 {
    let bytes = u128::from(bw).saturating_mul(rtt.as_nanos()) / 1_000_000_000;
    u64::try_from(bytes).unwrap_or(u64::MAX).min(MAX_WINDOW)
}

/// The time `bytes` take at `bw` bytes per second, saturated at `MAX_RTT_SAMPLE`; zero at a
/// zero rate.
fn duration_at(bytes: u64, bw: u64) -> Duration {
    if bw == 0 {
        return Duration::ZERO;
    }
    let nanos = u128::from(bytes).saturating_mul(1_000_000_000) / u128::from(bw);
    let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
    Duration::from_nanos(nanos).min(MAX_RTT_SAMPLE)
}

/// `bytes / interval` in bytes per second, saturated at `MAX_BW`; `None` for an empty interval.
fn rate_of(bytes: u64, interval: Duration) -> Option<u64> {
    let nanos = interval.as_nanos();
    if nanos == 0 {
        return None;
    }
    let rate = u128::from(bytes).saturating_mul(1_000_000_000) / nanos;
    Some(u64::try_from(rate).unwrap_or(u64::MAX).min(MAX_BW))
}

impl Bbr {
    /// A sender at the start of a connection (§5.2.1): `smss` is the current maximum datagram
    /// size in bytes, `initial_cwnd` the initial window in bytes, `seed` drives the random
    /// parts of the ProbeBW schedule (§5.3.3.5.3).
    pub fn new(smss: u16, initial_cwnd: u64, seed: u64) -> Self {
        let smss = u64::from(smss.max(1200));
        let initial_cwnd = initial_cwnd.clamp(4 * smss, MAX_WINDOW);
        let mut bbr = Bbr {
            smss,
            initial_cwnd,
            rng: seed | 1,
            delivered: 0,
            delivered_time: None,
            first_send_time: None,
            lost: 0,
            inflight: 0,
            app_limited: false,
            sends: VecDeque::new(),
            batch: AckBatch::default(),
            max_bw: MaxBwFilter::default(),
            bw: 0,
            bw_lo: None,
            bw_latest: 0,
            inflight_hi: None,
            inflight_lo: None,
            inflight_latest: 0,
            min_rtt: None,
            min_rtt_stamp: None,
            probe_rtt_min_delay: None,
            probe_rtt_min_stamp: None,
            probe_rtt_due: false,
            extra_acked: [0; EXTRA_ACKED_ROUNDS],
            extra_acked_interval_start: None,
            extra_acked_delivered: 0,
            round_count: 0,
            next_round_delivered: 0,
            round_start: false,
            loss_round_delivered: 0,
            loss_round_start: false,
            loss_in_round: false,
            loss_events_in_round: 0,
            lost_in_round: 0,
            delivered_in_round: 0,
            round_min_rtt: None,
            prev_round_min_rtt: None,
            competing_until: None,
            probe_rtt_drained_min: None,
            bw_before_probe_rtt: 0,
            phase: Phase::Startup,
            pacing_gain: STARTUP_PACING_GAIN,
            cwnd_gain: CWND_GAIN,
            full_bw: 0,
            full_bw_count: 0,
            full_bw_now: false,
            full_bw_reached: false,
            ack_phase: AckPhase::Init,
            bw_probe_samples: false,
            bw_probe_up_rounds: 0,
            bw_probe_up_acked: 0,
            probe_up_acked_per_inc: u64::MAX,
            rounds_since_bw_probe: 0,
            bw_probe_wait: Duration::from_secs(2),
            cycle_stamp: None,
            phase_stamp: None,
            probe_rtt_done_stamp: None,
            probe_rtt_round_done: false,
            prior_cwnd: 0,
            idle_restart: false,
            probe_down_pending: false,
            recovery_start: None,
            cwnd: initial_cwnd,
            pacing_rate: 0,
            send_quantum: 2 * smss,
            window: 0,
        };
        bbr.window = bbr.compute_window();
        bbr
    }

    // ----- outputs -------------------------------------------------------------------------

    /// The window quinn enforces, in bytes: the draft's cwnd (§5.6.4, with every bound of
    /// §5.6.4.4–§5.6.4.7) further bounded by the draft's pacing rate over [`Bbr::window_rtt`]
    /// plus an allowance for ACK aggregation and one send quantum (departure 2 in the module
    /// docs); while the sender is app-limited, never below the offload budget the draft's
    /// cwnd keeps (3 send quanta, §5.6.4.2) where cwnd allows it. Always within
    /// `[4 × SMSS, MAX_WINDOW]`.
    pub fn window(&self) -> u64 {
        self.window
    }

    fn compute_window(&self) -> u64 {
        let min_pipe = self.min_pipe_cwnd();
        let Some(min_rtt) = self.min_rtt.filter(|_| self.bw > 0) else {
            return self.cwnd.clamp(min_pipe, MAX_WINDOW);
        };
        let allowance = self.window_allowance();
        let rtt = self.window_rtt().unwrap_or(min_rtt).max(BDP_RTT_FLOOR);
        let paced = bdp_of(self.pacing_rate, rtt).saturating_add(allowance);
        // An app-limited flow keeps the draft's offload budget: with nothing more to send it
        // builds no queue with it. A flow with a backlog does not: quinn would put the whole
        // window in flight, three milliseconds of its own queue on a short path.
        let offload = if self.app_limited {
            self.send_quantum.saturating_mul(3)
        } else {
            0
        };
        self.cwnd
            .min(paced.max(offload))
            .clamp(min_pipe, MAX_WINDOW)
    }

    /// What the window adds to `pacing_rate × window_rtt`: `extra_acked` in full, as the
    /// draft's cwnd takes it (§5.5.9, already at most cwnd), one send quantum (§5.6.3) and one
    /// segment, bytes. A QUIC receiver acknowledges from user space, so a host busy with other
    /// work holds every ACK for a while and releases them at once: on a sub-millisecond path
    /// that aggregation is many BDPs, and an allowance capped at one BDP (the first version)
    /// left the sender idle through each stall (`bbr` 0.6× of `cubic`'s 8-flow goodput on
    /// the `bulk` bench's veth; the unit test with a stalling receiver measures 0.87× of the
    /// link rate with the cap).
    fn window_allowance(&self) -> u64 {
        self.extra_acked()
            .saturating_add(self.send_quantum)
            .saturating_add(self.smss)
    }

    /// The RTT over which [`Bbr::window`] carries the pacing rate: `min_rtt` plus the part of
    /// the last round's smallest queueing delay that this flow's own allowance and a margin of
    /// `min_rtt / 8` (at most 10 ms) do not explain, i.e. a queue another flow keeps standing
    /// (or, on a sub-millisecond path, the scheduling delay of a CPU-bound host).
    ///
    /// Over `min_rtt` alone, a flow sharing a bottleneck with one that holds a standing queue
    /// (kernel BBRv1 and CUBIC both do) delivers `window / (min_rtt + queue)`, below its own
    /// estimate, and its bandwidth estimate and window shrink each cycle until it starves. Over
    /// this RTT it delivers at its pacing rate, as the draft's paced sender would. Alone, its
    /// own queue stays under `allowance / bw` plus the margin, so the window is the one over
    /// `min_rtt`; a probe's queue (ProbeBW_UP) drains within a few rounds of ProbeBW_DOWN. The
    /// draft's cwnd (`2 × BDP + extra_acked`) still bounds the result. `None` before the
    /// first RTT sample; `min_rtt` until a round has ended. While competing (departure 3,
    /// [`Bbr::competing`]) the own-queue term is left out: the queue stood through the flow's
    /// own ProbeRTT.
    pub fn window_rtt(&self) -> Option<Duration> {
        let min_rtt = self.min_rtt?;
        let Some(round) = self.prev_round_min_rtt else {
            return Some(min_rtt);
        };
        // While competing (departure 3) the queue stood through the flow's own ProbeRTT:
        // `allowance / bw` divides by the flow's own rate and would call most of a foreign
        // queue the flow's own exactly when its share (bw) is small.
        let own = if self.competing() {
            Duration::ZERO
        } else {
            duration_at(self.window_allowance(), self.bw)
        };
        let margin = (min_rtt / 8).min(Duration::from_millis(10));
        let foreign = round
            .saturating_sub(min_rtt)
            .saturating_sub(own)
            .saturating_sub(margin);
        Some(min_rtt.saturating_add(foreign).min(MAX_RTT_SAMPLE))
    }

    /// The draft's congestion window `C.cwnd` (§5.6.4), bytes.
    pub fn cwnd(&self) -> u64 {
        self.cwnd
    }

    /// The draft's pacing rate `C.pacing_rate` (§5.6.2), bytes per second.
    pub fn pacing_rate(&self) -> u64 {
        self.pacing_rate
    }

    /// The bandwidth the model works with, `BBR.bw = min(max_bw, bw_lo)` (§2.9.1), bytes
    /// per second; 0 before the first sample.
    pub fn bandwidth(&self) -> u64 {
        self.bw
    }

    /// The windowed maximum delivery rate `BBR.max_bw` (§5.5.2), bytes per second.
    pub fn max_bw(&self) -> u64 {
        self.max_bw.get()
    }

    /// The windowed minimum RTT `BBR.min_rtt` (§5.5.7), if measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// `BBR.inflight_longterm` (`inflight_hi`), if the model has one (§5.5.10).
    pub fn inflight_hi(&self) -> Option<u64> {
        self.inflight_hi
    }

    /// `BBR.inflight_shortterm` (`inflight_lo`), if the model has one (§5.5.10).
    pub fn inflight_lo(&self) -> Option<u64> {
        self.inflight_lo
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Packet-timed rounds so far (§5.5.1).
    pub fn round_count(&self) -> u64 {
        self.round_count
    }

    /// The send quantum `C.send_quantum` (§5.6.3), bytes. quinn chooses its own bursts; the
    /// quantum is part of the window.
    pub fn send_quantum(&self) -> u64 {
        self.send_quantum
    }

    /// The initial window, bytes.
    pub fn initial_window(&self) -> u64 {
        self.initial_cwnd
    }

    /// A new path MTU (bytes): the segment size all per-packet quantities use.
    pub fn set_mtu(&mut self, mtu: u16) {
        self.smss = u64::from(mtu.max(1200));
        self.window = self.compute_window();
    }

    fn min_pipe_cwnd(&self) -> u64 {
        4 * self.smss
    }

    fn extra_acked(&self) -> u64 {
        self.extra_acked.iter().copied().max().unwrap_or(0)
    }

    // ----- inputs --------------------------------------------------------------------------

    /// A transmit batch of `bytes` left at `now` (§5.2.2, §4.1.2 "upon transmitting").
    pub fn on_sent(&mut self, now: Instant, bytes: u64) {
        if self.inflight == 0 {
            self.first_send_time = Some(now);
            self.delivered_time = Some(now);
            self.handle_restart_from_idle(now);
            self.window = self.compute_window();
        }
        self.inflight = self.inflight.saturating_add(bytes);
        let app_limited = self.app_limited || self.phase == Phase::ProbeRtt;
        if let Some(last) = self.sends.back_mut().filter(|r| r.time == now) {
            last.tx_in_flight = self.inflight;
            return;
        }
        if self.sends.back().is_some_and(|r| r.time > now) {
            // A clock that went backwards: keep the records ordered, lose this one sample.
            return;
        }
        if self.sends.len() >= MAX_SEND_RECORDS {
            self.sends.pop_front();
        }
        self.sends.push_back(SendRecord {
            time: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time.unwrap_or(now),
            first_send_time: self.first_send_time.unwrap_or(now),
            lost: self.lost,
            tx_in_flight: self.inflight,
            app_limited,
        });
    }

    /// One packet of `bytes`, sent at `sent`, was acknowledged at `now` (§4.1.2 "upon
    /// receiving an ACK"). Call [`Bbr::on_end_acks`] after the batch.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        self.delivered = self.delivered.saturating_add(bytes);
        self.delivered_time = Some(now);
        self.inflight = self.inflight.saturating_sub(bytes);
        self.batch.newly_acked = self.batch.newly_acked.saturating_add(bytes);
        self.batch.app_limited |= app_limited;
        if self.recovery_start.is_some_and(|start| sent > start) {
            self.exit_recovery();
            self.window = self.compute_window();
        }
        self.batch.newest_sent = self.batch.newest_sent.max(Some(sent));
    }

    /// The end of a batch of acknowledgements: quinn's bytes in flight now, and whether the
    /// sender was limited by the application (§5.2.3 per-ACK steps).
    pub fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool) {
        self.inflight = in_flight;
        self.app_limited = app_limited;
        let batch = std::mem::take(&mut self.batch);
        let newest = batch.newest_sent.and_then(|sent| self.record_at(sent));
        if let Some(record) = newest {
            self.first_send_time = Some(record.time);
        }
        if batch.newly_acked > 0 {
            let rs = self.rate_sample(now, newest, &batch);
            self.update_model_and_state(now, &rs);
            self.update_control_parameters(&rs);
            self.prune_records(now);
        }
        self.window = self.compute_window();
    }

    /// Packets of `lost_bytes` in total were declared lost at `now`, the newest of them sent at
    /// `sent`; `persistent` is QUIC's persistent congestion (RFC 9002 §7.6). `lost_bytes` of
    /// 0 is an ECN congestion mark (§5.2.4 per-loss steps).
    pub fn on_loss(&mut self, now: Instant, sent: Instant, persistent: bool, lost_bytes: u64) {
        self.lost = self.lost.saturating_add(lost_bytes);
        self.inflight = self.inflight.saturating_sub(lost_bytes);
        self.loss_in_round = true;
        self.loss_events_in_round = self.loss_events_in_round.saturating_add(1);
        self.lost_in_round = self.lost_in_round.saturating_add(lost_bytes.max(self.smss));
        if persistent {
            self.enter_recovery(now);
        }
        if let Some(record) = self.record_at(sent) {
            self.handle_lost_packet(record, lost_bytes);
        }
        self.window = self.compute_window();
    }

    // ----- delivery-rate sampling (§4.1) --------------------------------------------------

    /// The newest send record at or before `sent` (records are per transmit batch).
    fn record_at(&self, sent: Instant) -> Option<SendRecord> {
        let after = self.sends.partition_point(|r| r.time <= sent);
        let index = after.checked_sub(1)?;
        self.sends.get(index).copied()
    }

    fn rate_sample(
        &self,
        now: Instant,
        newest: Option<SendRecord>,
        batch: &AckBatch,
    ) -> RateSample {
        let mut rs = RateSample {
            newly_acked: batch.newly_acked,
            ..RateSample::default()
        };
        let Some(p) = newest else {
            return rs;
        };
        let rtt = now
            .saturating_duration_since(p.time)
            .clamp(MIN_RTT_SAMPLE, MAX_RTT_SAMPLE);
        rs.rtt = Some(rtt);
        rs.prior_delivered = p.delivered;
        rs.delivered = self.delivered.saturating_sub(p.delivered);
        rs.tx_in_flight = p.tx_in_flight;
        rs.lost = self.lost.saturating_sub(p.lost);
        rs.is_app_limited = p.app_limited || batch.app_limited;
        let send_elapsed = p.time.saturating_duration_since(p.first_send_time);
        let ack_elapsed = now.saturating_duration_since(p.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        // An interval shorter than min_rtt comes from ACK compression: it would overestimate
        // the rate, so the sample is discarded (§4.1.2).
        if self.min_rtt.is_some_and(|m| interval < m) {
            return rs;
        }
        if let Some(rate) = rate_of(rs.delivered, interval) {
            rs.delivery_rate = rate;
            rs.valid = true;
        }
        rs
    }

    /// Forgets send records no acknowledgement can still refer to: quinn declares a packet
    /// lost 9/8 RTT after a later one is acknowledged, and never reports it afterwards.
    fn prune_records(&mut self, now: Instant) {
        let rtt = self
            .prev_round_min_rtt
            .or(self.min_rtt)
            .unwrap_or(MAX_RTT_SAMPLE);
        let horizon = rtt
            .saturating_mul(4)
            .saturating_add(Duration::from_millis(500))
            .min(MAX_RTT_SAMPLE);
        while self
            .sends
            .front()
            .is_some_and(|r| now.saturating_duration_since(r.time) > horizon)
        {
            self.sends.pop_front();
        }
    }

    // ----- per-ACK steps (§5.2.3) ---------------------------------------------------------

    fn update_model_and_state(&mut self, now: Instant, rs: &RateSample) {
        self.update_latest_delivery_signals(rs);
        self.update_congestion_signals(rs);
        self.update_ack_aggregation(now, rs);
        self.check_full_bw_reached(rs);
        self.check_startup_done(now);
        self.check_drain_done(now);
        self.update_probe_bw_cycle_phase(now, rs);
        self.update_min_rtt(now, rs);
        self.check_probe_rtt(now, rs);
        self.advance_latest_delivery_signals(rs);
        self.bound_bw_for_model();
    }

    fn update_control_parameters(&mut self, rs: &RateSample) {
        self.set_pacing_rate();
        self.set_send_quantum();
        self.set_cwnd(rs);
    }

    /// §5.5.10 "BBRUpdateLatestDeliverySignals": one-round maxima of rate and volume.
    fn update_latest_delivery_signals(&mut self, rs: &RateSample) {
        self.loss_round_start = false;
        if rs.valid {
            self.bw_latest = self.bw_latest.max(rs.delivery_rate);
        }
        self.inflight_latest = self.inflight_latest.max(rs.delivered);
        if rs.newly_acked > 0 && rs.prior_delivered >= self.loss_round_delivered {
            self.loss_round_delivered = self.delivered;
            self.loss_round_start = true;
        }
    }

    fn advance_latest_delivery_signals(&mut self, rs: &RateSample) {
        if self.loss_round_start {
            self.bw_latest = if rs.valid { rs.delivery_rate } else { 0 };
            self.inflight_latest = rs.delivered;
        }
    }

    /// §5.5.10 "BBRUpdateCongestionSignals", with the queue gate of departure 1.
    fn update_congestion_signals(&mut self, rs: &RateSample) {
        self.update_max_bw(rs);
        if !self.loss_round_start {
            return;
        }
        if self.loss_in_round && self.queue_seen() && !self.competing() {
            self.adapt_lower_bounds_from_congestion();
        }
        self.loss_in_round = false;
    }

    /// §5.5.1 round counting, then §5.5.5 the max filter.
    fn update_max_bw(&mut self, rs: &RateSample) {
        self.update_round(rs);
        if rs.valid && (rs.delivery_rate >= self.max_bw.get() || !rs.is_app_limited) {
            self.max_bw.update(rs.delivery_rate);
        }
    }

    fn update_round(&mut self, rs: &RateSample) {
        self.delivered_in_round = self.delivered_in_round.saturating_add(rs.newly_acked);
        if let Some(rtt) = rs.rtt {
            self.round_min_rtt = Some(self.round_min_rtt.map_or(rtt, |r| r.min(rtt)));
        }
        self.round_start = rs.newly_acked > 0 && rs.prior_delivered >= self.next_round_delivered;
        if !self.round_start {
            return;
        }
        self.start_round();
        self.round_count = self.round_count.saturating_add(1);
        self.rounds_since_bw_probe = self.rounds_since_bw_probe.saturating_add(1);
        let slot = usize::try_from(self.round_count % EXTRA_ACKED_ROUNDS as u64).unwrap_or(0);
        self.extra_acked[slot] = 0;
    }

    fn start_round(&mut self) {
        self.next_round_delivered = self.delivered;
    }

    /// Departure 1: did the last round show a queue? With no RTT information, yes.
    fn queue_seen(&self) -> bool {
        let round = self.round_min_rtt.or(self.prev_round_min_rtt);
        match (round, self.min_rtt) {
            (Some(round), Some(min)) => round.saturating_sub(min) > queue_threshold(min),
            _ => true,
        }
    }

    /// Round-scoped loss and RTT bookkeeping, at the end of each round (after the checks that
    /// read it).
    fn end_round_signals(&mut self) {
        self.prev_round_min_rtt = self.round_min_rtt.take().or(self.prev_round_min_rtt);
        if self.competing() {
            // Departure 3: loss bounds nothing while competing.
            self.inflight_hi = None;
            self.reset_lower_bounds();
        }
        self.loss_events_in_round = 0;
        self.lost_in_round = 0;
        self.delivered_in_round = 0;
    }

    /// §5.5.10 "BBRAdaptLowerBoundsFromCongestion".
    fn adapt_lower_bounds_from_congestion(&mut self) {
        if self.is_probing_bw() {
            return;
        }
        let bw_lo = *self.bw_lo.get_or_insert(self.max_bw.get());
        let inflight_lo = *self.inflight_lo.get_or_insert(self.cwnd);
        self.bw_lo = Some(self.bw_latest.max(scale(bw_lo, BETA)));
        self.inflight_lo = Some(self.inflight_latest.max(scale(inflight_lo, BETA)));
    }

    fn is_probing_bw(&self) -> bool {
        matches!(
            self.phase,
            Phase::Startup | Phase::ProbeBwRefill | Phase::ProbeBwUp
        )
    }

    fn reset_lower_bounds(&mut self) {
        self.bw_lo = None;
        self.inflight_lo = None;
    }

    fn reset_congestion_signals(&mut self) {
        self.loss_in_round = false;
        self.bw_latest = 0;
        self.inflight_latest = 0;
    }

    /// §5.5.10 "BBRBoundBWForModel".
    fn bound_bw_for_model(&mut self) {
        let max_bw = self.max_bw.get();
        self.bw = self.bw_lo.map_or(max_bw, |lo| max_bw.min(lo));
    }

    /// §5.5.9 `extra_acked`: data acknowledged beyond what `bw` explains, max over 10 rounds.
    fn update_ack_aggregation(&mut self, now: Instant, rs: &RateSample) {
        let start = *self.extra_acked_interval_start.get_or_insert(now);
        let mut expected = bdp_of(self.bw, now.saturating_duration_since(start));
        if self.extra_acked_delivered <= expected {
            self.extra_acked_delivered = 0;
            self.extra_acked_interval_start = Some(now);
            expected = 0;
        }
        self.extra_acked_delivered = self.extra_acked_delivered.saturating_add(rs.newly_acked);
        let extra = self
            .extra_acked_delivered
            .saturating_sub(expected)
            .min(self.cwnd);
        if !self.full_bw_reached {
            // In Startup the filter spans one round (§5.5.9).
            self.extra_acked = [0; EXTRA_ACKED_ROUNDS];
        }
        let slot = usize::try_from(self.round_count % EXTRA_ACKED_ROUNDS as u64).unwrap_or(0);
        self.extra_acked[slot] = self.extra_acked[slot].max(extra);
    }

    // ----- Startup and Drain (§5.3.1, §5.3.2) --------------------------------------------

    /// §5.3.1.2: three rounds without 25 % growth mean the pipe is full.
    fn check_full_bw_reached(&mut self, rs: &RateSample) {
        if self.full_bw_now || !self.round_start || rs.is_app_limited {
            return;
        }
        let max_bw = self.max_bw.get();
        if max_bw >= scale(self.full_bw, FULL_BW_GROWTH) {
            self.reset_full_bw();
            self.full_bw = max_bw;
            return;
        }
        self.full_bw_count = self.full_bw_count.saturating_add(1);
        self.full_bw_now = self.full_bw_count >= FULL_BW_ROUNDS;
        if self.full_bw_now {
            self.full_bw_reached = true;
        }
    }

    fn reset_full_bw(&mut self) {
        self.full_bw = 0;
        self.full_bw_count = 0;
        self.full_bw_now = false;
    }

    fn check_startup_done(&mut self, now: Instant) {
        self.check_startup_high_loss();
        if self.round_start {
            self.end_round_signals();
        }
        if self.phase == Phase::Startup && self.full_bw_reached {
            self.enter_drain(now);
        }
    }

    /// §5.3.1.3: too much loss in a Startup round (gated by the queue, departure 1) ends it.
    fn check_startup_high_loss(&mut self) {
        if self.full_bw_reached || !self.round_start || self.phase != Phase::Startup {
            return;
        }
        let total = self.delivered_in_round.saturating_add(self.lost_in_round);
        let too_high = self.lost_in_round as f64 > total as f64 * LOSS_THRESH;
        if self.loss_events_in_round >= STARTUP_FULL_LOSS_COUNT && too_high && self.queue_seen() {
            let bdp = self.bdp_multiple(self.max_bw.get(), 1.0);
            self.inflight_hi = Some(bdp.max(self.inflight_latest));
            self.full_bw_reached = true;
        }
    }

    fn enter_drain(&mut self, now: Instant) {
        self.set_phase(now, Phase::Drain, DRAIN_PACING_GAIN, CWND_GAIN);
    }

    fn check_drain_done(&mut self, now: Instant) {
        if self.phase == Phase::Drain && self.inflight <= self.inflight_at(1.0) {
            self.start_probe_bw_down(now);
        }
    }

    fn set_phase(&mut self, now: Instant, phase: Phase, pacing_gain: f64, cwnd_gain: f64) {
        self.phase = phase;
        self.pacing_gain = pacing_gain;
        self.cwnd_gain = cwnd_gain;
        self.phase_stamp = Some(now);
    }

    // ----- ProbeBW (§5.3.3) --------------------------------------------------------------

    fn update_probe_bw_cycle_phase(&mut self, now: Instant, rs: &RateSample) {
        if !self.full_bw_reached {
            return;
        }
        self.adapt_upper_bounds(rs);
        match self.phase {
            Phase::ProbeBwDown => {
                if !self.is_time_to_probe_bw(now) && self.is_time_to_cruise() {
                    self.set_phase(now, Phase::ProbeBwCruise, 1.0, CWND_GAIN);
                }
            }
            Phase::ProbeBwCruise => {
                self.is_time_to_probe_bw(now);
            }
            Phase::ProbeBwRefill => {
                if self.round_start {
                    self.bw_probe_samples = true;
                    self.start_probe_bw_up(now, rs);
                }
            }
            Phase::ProbeBwUp => {
                if self.is_time_to_go_down(now, rs) {
                    self.start_probe_bw_down(now);
                }
            }
            Phase::Startup | Phase::Drain | Phase::ProbeRtt => {}
        }
    }

    /// §5.3.3.6 "BBRAdaptLongTermModel": raise `inflight_hi` while probing, cut it when a
    /// probe sees too much (queued) loss.
    fn adapt_upper_bounds(&mut self, rs: &RateSample) {
        if self.ack_phase == AckPhase::ProbeStarting && self.round_start {
            self.ack_phase = AckPhase::ProbeFeedback;
        }
        if self.ack_phase == AckPhase::ProbeStopping && self.round_start {
            // The probe's feedback has arrived: start a new max-filter slot (§5.5.6).
            if self.phase.is_probe_bw() && !rs.is_app_limited {
                self.max_bw.advance();
            }
            self.ack_phase = AckPhase::Init;
        }
        if self.check_inflight_too_high(rs) {
            return;
        }
        let Some(hi) = self.inflight_hi else {
            return;
        };
        if rs.tx_in_flight > hi {
            self.inflight_hi = Some(rs.tx_in_flight);
        }
        if self.phase == Phase::ProbeBwUp {
            self.probe_inflight_hi_upward(rs);
        }
    }

    fn is_inflight_too_high(&self, lost: u64, tx_in_flight: u64) -> bool {
        !self.competing() && lost as f64 > tx_in_flight as f64 * LOSS_THRESH && self.queue_seen()
    }

    /// Departure 3: whether the flow competes with one that does not yield. Decided at the
    /// end of each ProbeRTT (§5.3.4), the one moment the flow's own queue is known to be
    /// gone: its inflight went down to the ProbeRTT window (half a BDP, at least 4 packets)
    /// for 200 ms and a round. If the smallest RTT sample of a packet sent since then still
    /// stood above `min_rtt` by [`queue_threshold`] plus whatever queue the window's floor
    /// makes on its own (above one BDP), and the flow had been delivering at least half its
    /// `max_bw` just before (else the queue may be its own backlog after the link rate fell),
    /// another flow holds the queue: kernel BBRv1 keeps two BDPs in flight whatever it loses,
    /// CUBIC refills any buffer. Yielding to their losses (the draft's `inflight_hi`,
    /// `inflight_lo`, `bw_lo`) hands them the link without emptying the queue (0.17× of
    /// kernel BBRv1's goodput on the `lossy` bench's 1-BDP buffer). Until the next ProbeRTT
    /// (due 5 s after the last lower RTT sample, 16 s at the latest), loss bounds nothing (the
    /// three bounds are cleared each round) and [`Bbr::window_rtt`] takes the standing queue
    /// above its margin; the probing schedule stays the draft's. Going idle and persistent
    /// congestion end it at once. Known limits: a queue that never drains (CUBIC on a deep
    /// buffer) enters `min_rtt` once the 10 s filter expires (§5.5.7), and the evidence is
    /// gone with it; a path whose base RTT rose by more than the threshold looks like a
    /// standing queue until `min_rtt` expires, and so does a peer that delays its ACKs more
    /// after a ProbeRTT than before (RTT samples are not corrected for ACK delay); and a rate
    /// step down just before a ProbeRTT can pass the rate check. Each costs at most one such
    /// interval of a window over the RTT the flow sees, with loss ignored.
    pub fn competing(&self) -> bool {
        self.competing_until.is_some()
    }

    fn check_inflight_too_high(&mut self, rs: &RateSample) -> bool {
        if !self.is_inflight_too_high(rs.lost, rs.tx_in_flight) {
            return false;
        }
        if self.bw_probe_samples {
            self.handle_inflight_too_high(rs.tx_in_flight, rs.is_app_limited);
        }
        true
    }

    /// §5.5.10 "BBRHandleInflightTooHigh". Leaving UP happens on the next ACK's phase update
    /// (which has the `now` the phase change is stamped with).
    fn handle_inflight_too_high(&mut self, tx_in_flight: u64, app_limited: bool) {
        self.bw_probe_samples = false;
        self.probe_down_pending = self.phase == Phase::ProbeBwUp;
        if !app_limited {
            let target = scale(self.target_inflight(), BETA);
            self.inflight_hi = Some(tx_in_flight.max(target));
        }
    }

    /// §5.5.10 "BBRHandleLostPacket" with "BBRInflightLongtermFromLostPacket": the volume in
    /// flight at which the loss rate crossed `LossThresh`.
    fn handle_lost_packet(&mut self, p: SendRecord, lost_bytes: u64) {
        if !self.bw_probe_samples {
            return;
        }
        let lost = self.lost.saturating_sub(p.lost);
        if !self.is_inflight_too_high(lost, p.tx_in_flight) {
            return;
        }
        let size = lost_bytes.min(p.tx_in_flight);
        let inflight_prev = p.tx_in_flight.saturating_sub(size);
        let lost_prev = lost.saturating_sub(size) as f64;
        let prefix =
            ((LOSS_THRESH * inflight_prev as f64 - lost_prev) / (1.0 - LOSS_THRESH)).max(0.0);
        let tx_in_flight = inflight_prev.saturating_add(prefix as u64);
        self.handle_inflight_too_high(tx_in_flight, p.app_limited);
    }

    /// §5.3.3.4 "BBRProbeInflightLongtermUpward": grow `inflight_hi` by 1, 2, 4, … packets
    /// per round while the flow uses all of it.
    fn probe_inflight_hi_upward(&mut self, rs: &RateSample) {
        let Some(hi) = self.inflight_hi else {
            return;
        };
        let cwnd_limited = !self.app_limited;
        if cwnd_limited && self.cwnd >= hi {
            self.bw_probe_up_acked = self.bw_probe_up_acked.saturating_add(rs.newly_acked);
            let per_inc = self.probe_up_acked_per_inc.max(1);
            if self.bw_probe_up_acked >= per_inc {
                let delta = self.bw_probe_up_acked / per_inc;
                self.bw_probe_up_acked -= delta.saturating_mul(per_inc);
                let grown = hi.saturating_add(delta.saturating_mul(self.smss));
                self.inflight_hi = Some(grown.min(MAX_WINDOW));
            }
        }
        if self.round_start {
            self.raise_inflight_hi_slope();
        }
    }

    fn raise_inflight_hi_slope(&mut self) {
        let growth = self
            .smss
            .saturating_mul(1 << self.bw_probe_up_rounds.min(30));
        self.bw_probe_up_rounds = (self.bw_probe_up_rounds + 1).min(30);
        let cwnd_packets = (self.cwnd / self.smss).max(1);
        let packets_per_inc = (cwnd_packets.saturating_mul(self.smss) / growth).max(1);
        self.probe_up_acked_per_inc = packets_per_inc.saturating_mul(self.smss);
    }

    /// §5.3.3.5.3: probe again after 2–3 s, or after as many rounds as Reno would take to
    /// grow by one BDP (at most 63).
    fn is_time_to_probe_bw(&mut self, now: Instant) -> bool {
        let elapsed = self
            .cycle_stamp
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let reno_rounds = (self.target_inflight() / self.smss).min(MAX_RENO_ROUNDS);
        if elapsed > self.bw_probe_wait || self.rounds_since_bw_probe >= reno_rounds {
            self.start_probe_bw_refill(now);
            return true;
        }
        false
    }

    /// §5.3.3.1: cruise once the probe's queue has drained, leaving headroom.
    fn is_time_to_cruise(&self) -> bool {
        if self.inflight > self.inflight_with_headroom() {
            return false;
        }
        self.inflight <= self.inflight_at(1.0)
    }

    /// §5.3.3.4: leave UP on a bandwidth plateau, or (as Linux BBRv3 does) once a full
    /// `min_rtt` has passed with 1.25 × BDP in flight.
    fn is_time_to_go_down(&mut self, now: Instant, rs: &RateSample) -> bool {
        if self.probe_down_pending {
            return true;
        }
        if !self.app_limited && self.inflight_hi.is_some_and(|hi| self.cwnd >= hi) {
            self.reset_full_bw();
            self.full_bw = rs.delivery_rate;
        } else if self.full_bw_now {
            return true;
        }
        let in_phase = self
            .phase_stamp
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let min_rtt = self.min_rtt.unwrap_or(MAX_RTT_SAMPLE);
        in_phase > min_rtt && self.inflight >= self.inflight_at(UP_PACING_GAIN)
    }

    fn start_probe_bw_down(&mut self, now: Instant) {
        self.probe_down_pending = false;
        self.reset_congestion_signals();
        self.probe_up_acked_per_inc = u64::MAX;
        self.pick_probe_wait();
        self.cycle_stamp = Some(now);
        self.ack_phase = AckPhase::ProbeStopping;
        self.start_round();
        self.set_phase(now, Phase::ProbeBwDown, DOWN_PACING_GAIN, CWND_GAIN);
    }

    fn start_probe_bw_refill(&mut self, now: Instant) {
        self.reset_lower_bounds();
        self.bw_probe_up_rounds = 0;
        self.bw_probe_up_acked = 0;
        self.ack_phase = AckPhase::Refilling;
        self.start_round();
        self.set_phase(now, Phase::ProbeBwRefill, 1.0, CWND_GAIN);
    }

    fn start_probe_bw_up(&mut self, now: Instant, rs: &RateSample) {
        self.ack_phase = AckPhase::ProbeStarting;
        self.start_round();
        self.reset_full_bw();
        self.full_bw = rs.delivery_rate;
        self.set_phase(now, Phase::ProbeBwUp, UP_PACING_GAIN, UP_CWND_GAIN);
        self.raise_inflight_hi_slope();
    }

    /// §5.3.3.5.3 "BBRPickProbeWait": 0–1 extra rounds, 2–3 s of wall-clock time.
    fn pick_probe_wait(&mut self) {
        let r = self.next_random();
        self.rounds_since_bw_probe = r & 1;
        self.bw_probe_wait = Duration::from_secs(2) + Duration::from_millis((r >> 8) % 1000);
    }

    /// xorshift64: a deterministic schedule from the seed, no global RNG in the state machine.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    // ----- min_rtt and ProbeRTT (§5.5.7, §5.3.4) -----------------------------------------

    fn update_min_rtt(&mut self, now: Instant, rs: &RateSample) {
        let expired = self.probe_rtt_expired(now);
        self.probe_rtt_due = expired;
        if let Some(rtt) = rs.rtt {
            if self.probe_rtt_min_delay.is_none_or(|d| rtt < d) || expired {
                self.probe_rtt_min_delay = Some(rtt);
                self.probe_rtt_min_stamp = Some(now);
            }
        }
        let min_expired = self
            .min_rtt_stamp
            .is_some_and(|s| now.saturating_duration_since(s) > MIN_RTT_FILTER);
        if let Some(delay) = self.probe_rtt_min_delay {
            if self.min_rtt.is_none_or(|m| delay < m) || min_expired {
                self.min_rtt = Some(delay);
                self.min_rtt_stamp = self.probe_rtt_min_stamp;
            }
        }
    }

    fn probe_rtt_expired(&self, now: Instant) -> bool {
        self.probe_rtt_min_stamp
            .is_some_and(|s| now.saturating_duration_since(s) > PROBE_RTT_INTERVAL)
    }

    fn check_probe_rtt(&mut self, now: Instant, rs: &RateSample) {
        if self.competing_until.is_some_and(|until| now > until) {
            self.probe_rtt_due = true;
        }
        if self.phase != Phase::ProbeRtt && self.probe_rtt_due && !self.idle_restart {
            self.prior_cwnd = self.saved_cwnd();
            self.probe_rtt_done_stamp = None;
            self.probe_rtt_drained_min = None;
            // `bw_latest` may have just been reset by a phase change on this ACK; the ACK's
            // own sample stands in then.
            let sample = if rs.valid { rs.delivery_rate } else { 0 };
            self.bw_before_probe_rtt = self.bw_latest.max(sample);
            self.ack_phase = AckPhase::ProbeStopping;
            self.start_round();
            self.set_phase(now, Phase::ProbeRtt, 1.0, PROBE_RTT_CWND_GAIN);
        }
        if self.phase == Phase::ProbeRtt {
            self.note_drained_rtt(now, rs);
            self.handle_probe_rtt(now);
        }
        if rs.delivered > 0 {
            self.idle_restart = false;
        }
    }

    /// Departure 3's evidence: the RTT of packets sent after the drain only (an earlier one
    /// carries the flow's own queue).
    fn note_drained_rtt(&mut self, now: Instant, rs: &RateSample) {
        // The drain ended PROBE_RTT_DURATION before the stamp ProbeRTT then set.
        let drained_at = self
            .probe_rtt_done_stamp
            .and_then(|done| done.checked_sub(PROBE_RTT_DURATION));
        let (Some(drained_at), Some(rtt)) = (drained_at, rs.rtt) else {
            return;
        };
        if now.checked_sub(rtt).is_some_and(|sent| sent >= drained_at) {
            let least = self.probe_rtt_drained_min.map_or(rtt, |m| m.min(rtt));
            self.probe_rtt_drained_min = Some(least);
        }
    }

    fn stop_competing(&mut self) {
        self.competing_until = None;
    }

    fn handle_probe_rtt(&mut self, now: Instant) {
        match self.probe_rtt_done_stamp {
            None if self.inflight <= self.probe_rtt_cwnd() => {
                self.probe_rtt_done_stamp = Some(now + PROBE_RTT_DURATION);
                self.probe_rtt_round_done = false;
                self.start_round();
            }
            None => {}
            Some(_) => {
                if self.round_start {
                    self.probe_rtt_round_done = true;
                }
                if self.probe_rtt_round_done {
                    self.check_probe_rtt_done(now);
                }
            }
        }
    }

    fn check_probe_rtt_done(&mut self, now: Instant) {
        if self.probe_rtt_done_stamp.is_some_and(|done| now > done) {
            // Schedule the next ProbeRTT from now (§5.3.4.4).
            self.probe_rtt_min_stamp = Some(now);
            self.cwnd = self.cwnd.max(self.prior_cwnd);
            self.exit_probe_rtt(now);
        }
    }

    fn exit_probe_rtt(&mut self, now: Instant) {
        self.competing_until = if self.foreign_queue_after_probe_rtt() {
            now.checked_add(COMPETING_FOR)
        } else {
            None
        };
        self.reset_lower_bounds();
        if self.full_bw_reached {
            self.start_probe_bw_down(now);
            self.set_phase(now, Phase::ProbeBwCruise, 1.0, CWND_GAIN);
        } else {
            self.set_phase(now, Phase::Startup, STARTUP_PACING_GAIN, CWND_GAIN);
        }
    }

    /// Departure 3's evidence (see [`Bbr::competing`]), read as ProbeRTT ends.
    fn foreign_queue_after_probe_rtt(&self) -> bool {
        let (Some(drained), Some(min_rtt)) = (self.probe_rtt_drained_min, self.min_rtt) else {
            return false;
        };
        if !self.probe_rtt_round_done {
            // Left early (the flow went idle): no round of drained samples to judge by.
            return false;
        }
        // Where the ProbeRTT window is above the BDP over `min_rtt` (its floor of 4 packets on
        // a slow path, half a BDP over departure 4's 1 ms on a sub-millisecond one), the
        // flow's own packets still queue during ProbeRTT: that part is its own.
        let own = self
            .probe_rtt_cwnd()
            .saturating_sub(bdp_of(self.bw, min_rtt));
        let own = duration_at(own, self.bw);
        let standing = drained.saturating_sub(min_rtt).saturating_sub(own);
        let max_bw = self.max_bw.get();
        standing > queue_threshold(min_rtt) && max_bw > 0 && self.bw_before_probe_rtt >= max_bw / 2
    }

    /// §5.6.4.5: half a BDP (over at least 1 ms, departure 4), at least 4 packets. Over a
    /// `min_rtt` of microseconds half a BDP is the 4-packet floor, and 200 ms at that window
    /// every 5 s took about 4 % of a veth flow's goodput.
    fn probe_rtt_cwnd(&self) -> u64 {
        self.bdp_multiple(self.bw, PROBE_RTT_CWND_GAIN)
            .max(self.min_pipe_cwnd())
    }

    /// §5.4: on restarting after idle, pace at the estimate rather than any probing gain.
    fn handle_restart_from_idle(&mut self, now: Instant) {
        if !self.app_limited {
            return;
        }
        self.idle_restart = true;
        self.extra_acked_interval_start = Some(now);
        // Idle, the flow held no queue: what it saw before says nothing now (departure 3).
        self.stop_competing();
        if self.phase == Phase::ProbeRtt {
            self.check_probe_rtt_done(now);
        }
    }

    // ----- control parameters (§5.6) ------------------------------------------------------

    /// `gain × bw × max(min_rtt, BDP_RTT_FLOOR)` (§5.6.4.2 "BBRBDPMultiple", with the
    /// floor of departure 4); the initial window before any RTT.
    fn bdp_multiple(&self, bw: u64, gain: f64) -> u64 {
        match self.min_rtt {
            None => self.initial_cwnd,
            Some(rtt) => scale(bdp_of(bw, rtt.max(BDP_RTT_FLOOR)), gain).min(MAX_WINDOW),
        }
    }

    /// §5.6.4.2 "BBRInflight": `gain × BDP` plus the quantization budget.
    fn inflight_at(&self, gain: f64) -> u64 {
        let inflight = self.bdp_multiple(self.max_bw.get(), gain);
        self.quantization_budget(inflight)
    }

    fn quantization_budget(&self, inflight: u64) -> u64 {
        let offload = self.send_quantum.saturating_mul(3);
        let mut inflight = inflight.max(offload).max(self.min_pipe_cwnd());
        if self.phase == Phase::ProbeBwUp {
            inflight = inflight.saturating_add(2 * self.smss);
        }
        inflight
    }

    fn inflight_with_headroom(&self) -> u64 {
        let Some(hi) = self.inflight_hi else {
            return u64::MAX;
        };
        let headroom = scale(hi, HEADROOM).max(self.smss);
        hi.saturating_sub(headroom).max(self.min_pipe_cwnd())
    }

    fn target_inflight(&self) -> u64 {
        self.bdp_multiple(self.bw, 1.0).min(self.cwnd)
    }

    /// §5.6.2: `pacing_gain × bw × (1 − 1 %)`; before the pipe is full it only rises.
    fn set_pacing_rate(&mut self) {
        let rate = scale(self.bw, self.pacing_gain * PACING_MARGIN).min(MAX_BW);
        if self.full_bw_reached || rate > self.pacing_rate {
            self.pacing_rate = rate;
        }
    }

    /// §5.6.3: a millisecond at the pacing rate, within 2 segments and 64 KiB.
    fn set_send_quantum(&mut self) {
        let quantum = self.pacing_rate / 1000;
        self.send_quantum = quantum.clamp(2 * self.smss, 64 * 1024);
    }

    /// §5.6.4.6 "BBRSetCwnd", with §5.6.4.4 (recovery), §5.6.4.5 (ProbeRTT) and §5.6.4.7
    /// (the model's bounds).
    fn set_cwnd(&mut self, rs: &RateSample) {
        let inflight = self
            .bdp_multiple(self.bw, self.cwnd_gain)
            .saturating_add(self.extra_acked());
        let max_inflight = self.quantization_budget(inflight);
        if self.recovery_start.is_some() {
            // Packet conservation: no more than what the ACKs just took out of the network.
            let conserved = self.inflight.saturating_add(rs.newly_acked);
            self.cwnd = self.cwnd.max(conserved).min(max_inflight.max(conserved));
        } else if self.full_bw_reached {
            self.cwnd = self.cwnd.saturating_add(rs.newly_acked).min(max_inflight);
        } else if self.cwnd < max_inflight || self.delivered < self.initial_cwnd {
            self.cwnd = self.cwnd.saturating_add(rs.newly_acked);
        }
        self.cwnd = self.cwnd.max(self.min_pipe_cwnd());
        if self.phase == Phase::ProbeRtt {
            self.cwnd = self.cwnd.min(self.probe_rtt_cwnd());
        }
        self.bound_cwnd_for_model();
        self.cwnd = self.cwnd.min(MAX_WINDOW);
    }

    fn bound_cwnd_for_model(&mut self) {
        let mut cap = match self.phase {
            Phase::ProbeBwDown | Phase::ProbeBwRefill | Phase::ProbeBwUp => {
                self.inflight_hi.unwrap_or(u64::MAX)
            }
            Phase::ProbeRtt | Phase::ProbeBwCruise => self.inflight_with_headroom(),
            Phase::Startup | Phase::Drain => u64::MAX,
        };
        cap = cap.min(self.inflight_lo.unwrap_or(u64::MAX));
        cap = cap.max(self.min_pipe_cwnd());
        self.cwnd = self.cwnd.min(cap);
    }

    fn saved_cwnd(&self) -> u64 {
        if self.recovery_start.is_some() || self.phase == Phase::ProbeRtt {
            self.prior_cwnd.max(self.cwnd)
        } else {
            self.cwnd
        }
    }

    /// Persistent congestion: RFC 9002 §7.6.2 collapses the window; BBR saves it to restore
    /// once the path delivers again (§5.6.4.4).
    fn enter_recovery(&mut self, now: Instant) {
        if self.recovery_start.is_none() {
            self.prior_cwnd = self.saved_cwnd();
        }
        // Persistent congestion is no queue another flow holds: loss counts again.
        self.stop_competing();
        self.recovery_start = Some(now);
        self.cwnd = self
            .inflight
            .saturating_add(self.smss)
            .max(self.min_pipe_cwnd());
    }

    fn exit_recovery(&mut self) {
        self.recovery_start = None;
        self.cwnd = self.cwnd.max(self.prior_cwnd);
    }

    /// The draft's bounds on the outputs, for tests to check after every ACK: the window
    /// within `[4 × SMSS, MAX_WINDOW]` and never above cwnd; once the pipe is full and outside
    /// recovery, cwnd at most `BBR.max_inflight` (§5.6.4.6 "BBRUpdateMaxInflight"); cwnd within
    /// the model's bounds (§5.6.4.7 "BBRBoundCwndForModel") and ProbeRTT's (§5.6.4.5);
    /// `bw = min(max_bw, bw_lo)` (§2.9.1); the pacing rate at most
    /// `pacing_gain × bw` (§5.6.2) once the pipe is full.
    /// Whether the cached window is the one the model gives now (for tests to check after
    /// every input, not only after a batch of ACKs).
    #[cfg(test)]
    pub(crate) fn window_is_current(&self) -> bool {
        self.window == self.compute_window()
    }

    #[cfg(test)]
    pub(crate) fn check_draft_bounds(&self) -> Result<(), String> {
        let min_pipe = self.min_pipe_cwnd();
        let window = self.window();
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("{what}: {self:?}"))
            }
        };
        check(
            (min_pipe..=MAX_WINDOW).contains(&window),
            "window outside [4 SMSS, MAX_WINDOW]",
        )?;
        check(window <= self.cwnd.max(min_pipe), "window above cwnd")?;
        check(self.window_is_current(), "window not recomputed")?;
        if self.app_limited {
            check(
                window >= self.cwnd.min(self.send_quantum.saturating_mul(3)),
                "app-limited window below the offload budget the cwnd allows",
            )?;
        }
        if self.full_bw_reached && self.recovery_start.is_none() {
            let inflight = self
                .bdp_multiple(self.bw, self.cwnd_gain)
                .saturating_add(self.extra_acked());
            let max_inflight = self.quantization_budget(inflight);
            check(
                self.cwnd <= max_inflight.max(min_pipe),
                "cwnd above max_inflight",
            )?;
        }
        let cap = match self.phase {
            Phase::ProbeBwDown | Phase::ProbeBwRefill | Phase::ProbeBwUp => self.inflight_hi,
            Phase::ProbeRtt | Phase::ProbeBwCruise => Some(self.inflight_with_headroom()),
            Phase::Startup | Phase::Drain => None,
        };
        let cap = cap
            .into_iter()
            .chain(self.inflight_lo)
            .min()
            .map(|c| c.max(min_pipe));
        check(
            cap.is_none_or(|c| self.cwnd <= c),
            "cwnd above the model's bound",
        )?;
        if self.phase == Phase::ProbeRtt {
            check(self.cwnd <= self.probe_rtt_cwnd(), "cwnd above ProbeRTT's")?;
        }
        let bw = self
            .bw_lo
            .map_or(self.max_bw.get(), |lo| lo.min(self.max_bw.get()));
        check(self.bw == bw, "bw is not min(max_bw, bw_lo)")?;
        if self.full_bw_reached {
            let most = scale(self.bw, self.pacing_gain * PACING_MARGIN).saturating_add(1);
            check(
                self.pacing_rate <= most,
                "pacing rate above pacing_gain × bw",
            )?;
        }
        Ok(())
    }
}
