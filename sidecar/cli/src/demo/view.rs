//! What the demo prints: the per-edge table, result lines and the summary. Pure formatting.

use std::fmt::Write as _;
use std::time::Duration;

use super::load::Tally;
use super::stats::{ms, EdgeStats};

/// The edges shown, in call order.
pub const EDGES: &[(&str, &str)] = &[
    ("ingress", "productpage"),
    ("productpage", "details"),
    ("productpage", "reviews"),
    ("reviews", "ratings"),
];

/// What one window of the story measured.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Length, seconds.
    pub secs: f64,
    /// Pages as the load generator saw them.
    pub load: Tally,
    /// Per edge of [`EDGES`].
    pub edges: Vec<EdgeStats>,
    /// productpage's retries toward reviews.
    pub retries: f64,
    /// productpage's outlier ejections of reviews endpoints.
    pub ejections: f64,
    /// Policy denials counted by ratings.
    pub denials: f64,
    /// Packets the reviews links dropped.
    pub link_drops: u64,
    /// QUIC packets productpage's sidecar declared lost.
    pub quic_lost: f64,
}

impl Window {
    /// The figures of edge `source → dest`.
    pub fn edge(&self, source: &str, dest: &str) -> EdgeStats {
        EDGES
            .iter()
            .position(|e| *e == (source, dest))
            .and_then(|i| self.edges.get(i).cloned())
            .unwrap_or_default()
    }
}

fn dur(d: Option<Duration>) -> String {
    ms(d.map(|d| d.as_secs_f64()))
}

/// The live table: one line per edge, then the pages line.
pub fn table(w: &Window) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "   {:<24} {:>7} {:>8} {:>8} {:>8}  versions",
        "edge (from sidecar /metrics)", "rps", "success", "p50", "p99"
    );
    for ((src, dst), e) in EDGES.iter().zip(&w.edges) {
        let rate = if w.secs > 0.0 { e.total / w.secs } else { 0.0 };
        let _ = writeln!(
            out,
            "   {:<24} {:>7.1} {:>7.1}% {:>8} {:>8}  {}",
            format!("{src} → {dst}"),
            rate,
            100.0 * e.success(),
            ms(e.p50),
            ms(e.p99),
            e.split()
        );
    }
    let l = &w.load;
    let _ = writeln!(
        out,
        "   pages: {} asked, {} failed, {} degraded; p50 {} p99 {}; tester saw v3 on {}/{}",
        l.pages,
        l.failed,
        l.degraded,
        dur(l.p50),
        dur(l.p99),
        l.tester_v3,
        l.tester
    );
    out
}

/// A machine-readable line with a window's key figures (the tests read it).
pub fn result_line(key: &str, w: &Window) -> String {
    let l = &w.load;
    let pr = w.edge("productpage", "reviews");
    format!(
        "   result {key}: pages={} failed={} degraded={} v1={:.2} v2={:.2} v3={:.2} tester_v3={}/{} \
         denials={} retries={} ejections={} link_drops={} quic_lost={} page_p50_ms={:.1} page_p99_ms={:.1} \
         reviews_p99_ms={:.1}",
        l.pages,
        l.failed,
        l.degraded,
        l.share("v1"),
        l.share("v2"),
        l.share("v3"),
        l.tester_v3,
        l.tester,
        w.denials,
        w.retries,
        w.ejections,
        w.link_drops,
        w.quic_lost,
        l.p50.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        l.p99.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        pr.p99.unwrap_or(0.0) * 1000.0,
    )
}

/// One row of the summary.
pub fn summary_row(title: &str, w: &Window, effect: &str) -> String {
    let l = &w.load;
    let split = w.edge("productpage", "reviews").split();
    format!(
        "   {:<30} {:>6} {:>7} {:>9} {:>9}  {:<22} {}",
        title,
        l.pages,
        l.failed,
        l.degraded,
        dur(l.p99),
        split,
        effect
    )
}

/// The summary's header.
pub fn summary_header() -> String {
    format!(
        "   {:<30} {:>6} {:>7} {:>9} {:>9}  {:<22} {}",
        "step",
        "pages",
        "failed",
        "degraded",
        "page p99",
        "productpage → reviews",
        "what the numbers show"
    )
}

/// Redraws a block in place on a terminal: moves up over the `previous` lines first. Returns
/// the number of lines drawn.
pub fn redraw(previous: usize, block: &str) -> usize {
    let mut out = String::new();
    if previous > 0 {
        let _ = write!(out, "\x1b[{previous}A\x1b[J");
    }
    out.push_str(block);
    print!("{out}");
    block.lines().count()
}

/// Erases the last `previous` lines on a terminal.
pub fn erase(previous: usize) {
    if previous > 0 {
        print!("\x1b[{previous}A\x1b[J");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2 s window in which productpage → reviews served 10 requests, all by v2.
    fn window() -> Window {
        let mut w = Window {
            secs: 2.0,
            edges: vec![EdgeStats::default(); EDGES.len()],
            ..Window::default()
        };
        w.edges[2].total = 10.0;
        w.edges[2].ok = 10.0;
        w.edges[2].versions.insert("v2".into(), 10.0);
        w
    }

    #[test]
    fn the_table_shows_every_edge_with_its_figures() {
        let t = table(&window());
        assert!(t.contains("productpage → reviews"));
        assert!(t.contains("5.0"), "{t}");
        assert!(t.contains("v2 100%"), "{t}");
    }

    #[test]
    fn the_result_line_names_the_run_with_its_figures() {
        let r = result_line("b1", &window());
        assert!(r.contains("result b1: pages=0 failed=0"), "{r}");
    }
}
