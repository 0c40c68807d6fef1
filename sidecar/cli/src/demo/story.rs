//! The story the demo walks through. Each step prints a heading, changes the mesh the way an
//! operator would (a registry write through the admin API behind `halyard ctl`, a killed
//! process, a degraded link), measures a window of traffic and prints what the numbers show.

use std::time::{Duration, Instant};

use halyard_registry::Key;

pub use super::load::Load;
use super::mesh::Mesh;
use super::stats::{self, counter_delta, Scrape};
use super::view::{self, Window, EDGES};
use crate::sample_app;

/// Retries on every reviews rule: a dead or slow endpoint costs a retry, not a failed page.
const RETRIES: &str =
    "retries: { attempts: 2, perTryTimeout: 300ms, on: [connect-failure, reset, 5xx] }";

/// Loss of the lossy-link step.
const LOSS: f64 = 0.05;

/// How long each step runs and how the table is shown.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Measurement window of each step.
    pub step: Duration,
    /// Pause after a change, for every sidecar to apply it.
    pub settle: Duration,
    /// Redraw a live table on a terminal.
    pub live: bool,
}

/// A finished step.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Title in the summary.
    pub title: &'static str,
    /// What was measured.
    pub window: Window,
    /// What the numbers show, in words.
    pub effect: String,
}

/// What the story works on.
pub struct Story {
    /// The mesh.
    pub mesh: Mesh,
    /// The load generator.
    pub load: Load,
    /// Timing.
    pub pace: Pace,
    /// Steps done.
    pub results: Vec<StepResult>,
}

/// The first route: every reviews request to v1.
pub fn route_all_v1() -> String {
    format!(
        "kind: Route\nservice: reviews\nrules:\n  - backends:\n      - {{ subset: {{ version: v1 }}, weight: 100 }}\n    {RETRIES}\n"
    )
}

fn route_canary(v1: u32, v2: u32) -> String {
    format!(
        "kind: Route\nservice: reviews\nrules:\n  - backends:\n      - {{ subset: {{ version: v1 }}, weight: {v1} }}\n      - {{ subset: {{ version: v2 }}, weight: {v2} }}\n    {RETRIES}\n"
    )
}

fn route_tester_v3() -> String {
    format!(
        "kind: Route\nservice: reviews\nrules:\n  - match:\n      headers: {{ x-user: {{ exact: tester }} }}\n    backends:\n      - {{ subset: {{ version: v3 }}, weight: 100 }}\n    {RETRIES}\n  - backends:\n      - {{ subset: {{ version: v1 }}, weight: 50 }}\n      - {{ subset: {{ version: v2 }}, weight: 50 }}\n    {RETRIES}\n"
    )
}

/// The tester route, with the 50/50 rule's retries and failover allowed to leave the subset
/// the request was given (by default they stay inside it: a dead v2 would fail its share).
fn route_tester_v3_fallback() -> String {
    format!("{}    fallback: service\n", route_tester_v3())
}

const POLICY_DENY: &str =
    "kind: Policy\nservice: ratings\nrules:\n  - action: deny\n    from: { services: [reviews] }\n";

fn heading(title: &str, why: &str) {
    println!();
    println!("== {title}");
    for line in why.lines() {
        println!("   {line}");
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

impl Story {
    /// Runs every step, then prints the summary.
    pub async fn run(&mut self) -> anyhow::Result<()> {
        self.warm_up().await?;
        self.baseline().await?;
        self.canary().await?;
        self.header_routing().await?;
        self.policy().await?;
        self.kill().await?;
        self.lossy_link().await?;
        if self.mesh.cluster_b.is_some() {
            self.other_cluster().await?;
        }
        self.summary();
        Ok(())
    }

    /// Waits until pages come back whole (every sidecar has the endpoints it needs).
    async fn warm_up(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let from = self.load.mark();
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.mesh.check_children()?;
            let t = self.load.window(from, self.load.mark());
            if t.pages >= 3 && t.failed == 0 && t.degraded == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("pages still fail 30 s after start: {t:?}");
            }
        }
    }

    async fn write(&self, what: &str, yaml: &str) -> anyhow::Result<()> {
        println!("   $ halyard ctl apply -f {what}.yaml");
        for line in yaml.lines() {
            println!("   | {line}");
        }
        self.mesh.apply(what, yaml).await?;
        tokio::time::sleep(self.pace.settle).await;
        Ok(())
    }

    async fn baseline(&mut self) -> anyhow::Result<()> {
        heading(
            "(a) baseline: every reviews request to v1",
            "ingress → productpage → details + reviews (v1, v2, v3) → ratings; each hop is\n\
             mutually authenticated QUIC between sidecars (SPIFFE ids checked on both sides).",
        );
        let w = self.measure().await?;
        let effect = format!("reviews v1 {}", pct(w.load.share("v1")));
        self.record("a", "(a) baseline", w, effect);
        Ok(())
    }

    async fn canary(&mut self) -> anyhow::Result<()> {
        heading(
            "(b) canary: reviews v1 90 / v2 10, then 50/50, live",
            "One registry write; every sidecar applies it to the next request. No restart.",
        );
        self.write("reviews-canary-90-10", &route_canary(90, 10))
            .await?;
        let w = self.measure().await?;
        let effect = format!("v2 got {} (asked 10%)", pct(w.load.share("v2")));
        self.record("b1", "(b) canary 90/10", w, effect);
        self.write("reviews-canary-50-50", &route_canary(50, 50))
            .await?;
        let w = self.measure().await?;
        let effect = format!("v2 got {} (asked 50%)", pct(w.load.share("v2")));
        self.record("b2", "(b) canary 50/50", w, effect);
        Ok(())
    }

    async fn header_routing(&mut self) -> anyhow::Result<()> {
        heading(
            "(c) header routing: x-user: tester → reviews v3",
            "A rule matching the request header comes first; everyone else keeps the 50/50 split.",
        );
        self.write("reviews-tester-v3", &route_tester_v3()).await?;
        let w = self.measure().await?;
        let l = &w.load;
        let mut effect = format!("tester saw v3 on {}/{} pages", l.tester_v3, l.tester);
        if !w.edge("productpage", "reviews").l7 {
            effect += " (header rules need protocol http, L7)";
        }
        self.record("c", "(c) tester → v3", w, effect);
        Ok(())
    }

    async fn policy(&mut self) -> anyhow::Result<()> {
        heading(
            "(d) policy: ratings refuses reviews, so productpage loses its ratings",
            "The ratings sidecar checks the caller's verified SPIFFE id against the Policy.\n\
             Pages still come back, degraded (no stars), and the denials are counted.",
        );
        self.write("ratings-deny-reviews", POLICY_DENY).await?;
        let w = self.measure().await?;
        let effect = format!("{} denials, {} pages degraded", w.denials, w.load.degraded);
        self.record("d1", "(d) ratings denied", w, effect);
        println!("   $ halyard ctl delete policies ratings");
        self.mesh.delete(Key::Policy("ratings".into())).await?;
        tokio::time::sleep(self.pace.settle).await;
        let w = self.measure().await?;
        let effect = format!(
            "restored: {} denials, {} degraded",
            w.denials, w.load.degraded
        );
        self.record("d2", "(d) policy removed", w, effect);
        Ok(())
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        heading(
            "(e) a reviews instance dies: kill -9 reviews-v2 (app and sidecar)",
            "Its endpoint is still registered (on etcd, until its lease expires). Retries stay\n\
             inside the subset a request was given unless the rule says otherwise, so the route\n\
             first lets them leave it (fallback: service). Requests the route sends to v2 get no\n\
             answer, are retried on another endpoint after perTryTimeout (300ms), and the dead\n\
             endpoint is ejected: v2's share moves to v1 and v3.",
        );
        self.write("reviews-fallback-service", &route_tester_v3_fallback())
            .await?;
        self.mesh.kill("reviews-v2")?;
        // Long enough for the dead endpoint to be picked, retried and ejected in quick mode too.
        let step = self.pace.step;
        self.pace.step = step.max(Duration::from_secs(4));
        let w = self.measure().await;
        self.pace.step = step;
        let w = w?;
        let effect = format!(
            "{} failed pages; {} retries, {} ejections; v2 answered {}",
            w.load.failed,
            w.retries,
            w.ejections,
            pct(w.load.share("v2"))
        );
        self.record("e", "(e) instance killed", w, effect);
        Ok(())
    }

    async fn lossy_link(&mut self) -> anyhow::Result<()> {
        heading(
            "(f) lossy link: 5% packet loss between productpage and reviews",
            "Every packet to and from the reviews sidecars crosses a simulated link; QUIC\n\
             recovers what is lost. Traffic keeps flowing; the price is latency.",
        );
        self.mesh.set_reviews_loss(LOSS);
        let w = self.measure().await?;
        self.mesh.set_reviews_loss(0.0);
        let base = self
            .results
            .first()
            .map(|r| r.window.edge("productpage", "reviews"));
        let now = w.edge("productpage", "reviews");
        let effect = format!(
            "{} packets dropped, {} failed pages; reviews p99 {} → {}",
            w.link_drops,
            w.load.failed,
            stats::ms(base.and_then(|b| b.p99)),
            stats::ms(now.p99)
        );
        self.record("f", "(f) 5% loss", w, effect);
        Ok(())
    }

    /// `--clusters 2`: ratings is lost here and served from cluster B through B's gateway.
    async fn other_cluster(&mut self) -> anyhow::Result<()> {
        let Some(b) = &self.mesh.cluster_b else {
            return Ok(());
        };
        let (gateway, admin) = (b.gateway, b.gateway_admin);
        heading(
            "(g) another cluster: ratings dies here, cluster B serves it",
            &format!(
                "Cluster B has its own registry, a ratings instance, and an east-west gateway\n\
                 (halyard gateway on {gateway}) that routes QUIC by server name and connection ID\n\
                 and never decrypts it. A ClusterLink lets every sidecar here read B's exported\n\
                 endpoints: the farthest tier, used once this cluster has none. First a Route\n\
                 gives ratings calls a per-try timeout (a killed peer answers nothing), then\n\
                 kill -9 ratings: calls time out, are retried on B, and the dead endpoint is ejected."
            ),
        );
        self.write(
            "ratings-retries",
            &format!("kind: Route\nservice: ratings\nrules:\n  - backends: [{{ weight: 100 }}]\n    {RETRIES}\n"),
        )
        .await?;
        let forwarded = |text: &str| {
            crate::promtext::parse(text)
                .iter()
                .filter(|s| s.name == "halyard_gateway_datagrams_total")
                .filter(|s| s.label("decision") == Some("forwarded"))
                .map(|s| s.value)
                .sum::<f64>()
        };
        let before = forwarded(&gateway_metrics(admin).await);
        self.mesh.kill("ratings")?;
        let step = self.pace.step;
        self.pace.step = step.max(Duration::from_secs(4));
        let start = scrape(&self.mesh).await;
        let w = self.measure().await;
        self.pace.step = step;
        let w = w?;
        let end = scrape(&self.mesh).await;
        let served = |s: &super::stats::Scrape| -> f64 {
            s.sidecars
                .get("ratings-b")
                .map(|(_, samples)| {
                    samples
                        .iter()
                        .filter(|x| {
                            (x.name == "halyard_requests_total"
                                || x.name == "halyard_tcp_connections_total")
                                && x.label("direction") == Some("inbound")
                        })
                        .map(|x| x.value)
                        .sum()
                })
                .unwrap_or(0.0)
        };
        let through = forwarded(&gateway_metrics(admin).await) - before;
        let effect = format!(
            "{} failed pages, {} degraded; cluster B's ratings answered {:.0}, {:.0} datagrams through its gateway",
            w.load.failed,
            w.load.degraded,
            (served(&end) - served(&start)).max(0.0),
            through.max(0.0)
        );
        self.record("g", "(g) ratings from cluster B", w, effect);
        Ok(())
    }

    fn record(&mut self, key: &'static str, title: &'static str, window: Window, effect: String) {
        println!("{}", view::result_line(key, &window));
        println!("   => {effect}");
        self.results.push(StepResult {
            title,
            window,
            effect,
        });
    }

    fn summary(&self) {
        heading("summary", "Per step, as the user and the sidecars saw it.");
        println!("{}", view::summary_header());
        for r in &self.results {
            println!("{}", view::summary_row(r.title, &r.window, &r.effect));
        }
        let failed: u64 = self.results.iter().map(|r| r.window.load.failed).sum();
        let pages: u64 = self.results.iter().map(|r| r.window.load.pages).sum();
        println!("   {pages} pages, {failed} failed, across every step.");
    }

    /// Measures one step's window, showing a live table on a terminal.
    async fn measure(&mut self) -> anyhow::Result<Window> {
        let start = (scrape(&self.mesh).await, self.load.mark(), Instant::now());
        let drops = self.mesh.link_drops();
        let mut prev = start.clone();
        let mut drawn = 0;
        while start.2.elapsed() < self.pace.step {
            let left = self.pace.step.saturating_sub(start.2.elapsed());
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
            self.mesh.check_children()?;
            if self.pace.live {
                let now = (scrape(&self.mesh).await, self.load.mark(), Instant::now());
                let w = self.window(&prev, &now, drops);
                drawn = view::redraw(drawn, &view::table(&w));
                prev = now;
            }
        }
        let end = (scrape(&self.mesh).await, self.load.mark(), Instant::now());
        let w = self.window(&start, &end, drops);
        view::erase(drawn);
        print!("{}", view::table(&w));
        Ok(w)
    }

    fn window(
        &self,
        a: &(Scrape, usize, Instant),
        b: &(Scrape, usize, Instant),
        drops: u64,
    ) -> Window {
        let (before, after) = (&a.0, &b.0);
        let pp = |name: &str| {
            counter_delta(
                before,
                after,
                "productpage",
                name,
                &[("destination_service", "reviews")],
            )
        };
        Window {
            secs: b.2.duration_since(a.2).as_secs_f64(),
            load: self.load.window(a.1, b.1),
            edges: EDGES
                .iter()
                .map(|(s, d)| stats::edge(before, after, s, d))
                .collect(),
            retries: pp("halyard_retries_total"),
            ejections: pp("halyard_outlier_ejections_total"),
            denials: counter_delta(
                before,
                after,
                "ratings",
                "halyard_policy_denials_total",
                &[],
            ),
            link_drops: self.mesh.link_drops().saturating_sub(drops),
            quic_lost: counter_delta(
                before,
                after,
                "productpage",
                "halyard_quic_lost_packets_total",
                &[],
            ),
        }
    }
}

/// The east-west gateway's `/metrics` text (empty when it does not answer).
async fn gateway_metrics(admin: std::net::SocketAddr) -> String {
    let Ok(url) = format!("http://{admin}/metrics").parse::<http::Uri>() else {
        return String::new();
    };
    match sample_app::get(&url, &http::HeaderMap::new(), Duration::from_secs(2)).await {
        Ok((status, body)) if status.is_success() => String::from_utf8_lossy(&body).into_owned(),
        _ => String::new(),
    }
}

/// Every live sidecar's `/metrics`.
pub async fn scrape(mesh: &Mesh) -> Scrape {
    let live: Vec<_> = mesh.workloads.iter().filter(|w| !w.killed).collect();
    let texts = futures::future::join_all(live.iter().map(|w| async move {
        let url: http::Uri = format!("http://{}/metrics", w.admin).parse().ok()?;
        let (status, body) = sample_app::get(&url, &http::HeaderMap::new(), Duration::from_secs(2))
            .await
            .ok()?;
        status
            .is_success()
            .then(|| String::from_utf8_lossy(&body).into_owned())
    }))
    .await;
    let mut s = Scrape::default();
    for (w, text) in live.iter().zip(texts) {
        if let Some(text) = text {
            s.sidecars.insert(
                w.name.to_owned(),
                (w.service.to_owned(), stats::parse(&text)),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use halyard_registry::model::{parse_documents, Fallback, Object};

    #[test]
    fn the_kill_steps_route_lets_only_the_split_rule_leave_its_subset() {
        let objects = parse_documents("kill.yaml", &super::route_tester_v3_fallback()).unwrap();
        let Some(Object::Route(route)) = objects.first() else {
            panic!("not a route: {objects:?}");
        };
        let fallbacks: Vec<Fallback> = route.rules.iter().map(|r| r.fallback).collect();
        assert_eq!(fallbacks, [Fallback::Subset, Fallback::Service]);
    }
}
