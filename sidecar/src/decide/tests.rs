//! The decision core as one system, in memory and in virtual time: endpoint pick, outlier
//! ejection, the retry policy and its budget working together over many requests, as the L4 and
//! L7 glue drives them (pick, attempt, charge the endpoint, ask `retry::next`).
//!
//! Test code only (`mod tests` is declared under #[cfg(test)]): its `unwrap`s are on fixed
//! inputs the test itself builds, never on anything a peer, a user or etcd sends.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use halyard_registry::model::{Endpoint, Labels, Name};

use super::budget::{BudgetConfig, RetryBudget};
use super::outlier::{OutlierConfig, Outliers};
use super::pick::{candidates, choose, Load, Locality, Scope};
use super::retry::{next, AttemptError, Failed, Outcome, RetryPolicy, Step};

fn ep(id: &str) -> Endpoint {
    Endpoint {
        id: id.into(),
        service: Name::new("ratings").unwrap(),
        address: "127.0.0.1:1".parse().unwrap(),
        identity: "spiffe://mesh.local/ns/default/sa/ratings".parse().unwrap(),
        labels: Labels::new(),
        cluster: String::new(),
        zone: String::new(),
        weight: 1,
        gateway: None,
    }
}

/// A service whose endpoints in `dead` refuse every connect; the others always answer.
struct Mesh {
    endpoints: Vec<Endpoint>,
    dead: HashSet<String>,
    outliers: Outliers,
    budget: RetryBudget,
    outlier_cfg: OutlierConfig,
    budget_cfg: BudgetConfig,
    now: Instant,
    /// Deterministic "random" samples for power of two choices.
    seed: u64,
    attempts: u64,
    ejections: u64,
}

/// How one request ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Served,
    Failed,
}

impl Mesh {
    fn new(n: usize, dead: &[usize]) -> Mesh {
        let endpoints: Vec<Endpoint> = (0..n).map(|i| ep(&format!("e{i}"))).collect();
        Mesh {
            dead: dead.iter().map(|i| endpoints[*i].id.clone()).collect(),
            endpoints,
            outliers: Outliers::default(),
            budget: RetryBudget::default(),
            outlier_cfg: OutlierConfig::default(),
            budget_cfg: BudgetConfig::default(),
            now: Instant::now(),
            seed: 7,
            attempts: 0,
            ejections: 0,
        }
    }

    fn samples(&mut self) -> (u64, u64) {
        self.seed = self
            .seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.seed >> 33, self.seed >> 17)
    }

    /// One request as the L4 glue runs it: untried endpoints first, no revisits.
    fn request(&mut self, policy: &RetryPolicy<'_>) -> Ended {
        self.budget.request(&self.budget_cfg, self.now);
        let mut tried: Vec<String> = Vec::new();
        for retries_done in 0.. {
            let samples = self.samples();
            let all: Vec<&Endpoint> = self.endpoints.iter().collect();
            let pool = candidates(&all, &Scope::default(), &tried, policy.revisit);
            let now = self.now;
            let outliers = &self.outliers;
            let load = |e: &Endpoint| Load {
                healthy: !outliers.is_ejected(&e.id, now),
                ..Load::default()
            };
            let whole = Scope::default();
            let Some(chosen) = choose(&pool, &whole, &load, &Locality::default(), samples) else {
                return Ended::Failed;
            };
            let id = chosen.id.clone();
            tried.push(id.clone());
            self.attempts += 1;
            if !self.dead.contains(&id) {
                self.outliers.success(&id);
                return Ended::Served;
            }
            let failed = Failed {
                error: AttemptError::ConnectFailure,
                before_any_byte: true,
            };
            let total = self.endpoints.len();
            if let Some(kind) = failed.error.charge() {
                let cfg = self.outlier_cfg;
                if self.outliers.failure(&cfg, &id, kind, total, now) {
                    self.ejections += 1;
                }
            }
            let all: Vec<&Endpoint> = self.endpoints.iter().collect();
            let alternative =
                !candidates(&all, &Scope::default(), &tried, policy.revisit).is_empty();
            let step = next(
                policy,
                retries_done,
                Outcome::Failed(failed),
                alternative,
                &mut self.budget,
                &self.budget_cfg,
                now,
            );
            if step != Step::Retry {
                return Ended::Failed;
            }
        }
        Ended::Failed
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
    }
}

const L4: RetryPolicy<'static> = RetryPolicy {
    max_retries: 2,
    on: &[],
    replayable: true,
    revisit: false,
};

/// 300 requests, 10 ms apart, to three endpoints of which the first is dead: the mesh after
/// them and how many were served.
fn one_dead_of_three() -> (Mesh, usize) {
    let mut m = Mesh::new(3, &[0]);
    let served = (0..300)
        .filter(|_| {
            m.tick(Duration::from_millis(10));
            m.request(&L4) == Ended::Served
        })
        .count();
    (m, served)
}

#[test]
fn one_dead_endpoint_costs_no_request() {
    let (_, served) = one_dead_of_three();
    assert_eq!(served, 300);
}

#[test]
fn one_dead_endpoint_is_ejected_on_its_first_failed_connect() {
    let (m, _) = one_dead_of_three();
    // Ejected on its first failed connect; each 5 s ejection (doubling) costs one more attempt.
    assert!(m.ejections >= 1 && m.ejections <= 2, "{}", m.ejections);
    assert!(m.attempts <= 300 + 2, "{} attempts", m.attempts);
}

#[test]
fn ejection_never_takes_more_than_half_the_service() {
    let mut m = Mesh::new(4, &[0, 1, 2]);
    for _ in 0..200 {
        m.tick(Duration::from_millis(10));
        m.request(&L4);
    }
    let ejected = m.outliers.ejected_count(m.now);
    assert!(ejected <= 2, "{ejected} of 4 ejected");
}

/// 1000 requests, 1 ms apart, to a service whose three endpoints are all dead (each request
/// fails): the mesh after them and the number of requests.
fn fully_dead_service() -> (Mesh, u64) {
    let mut m = Mesh::new(3, &[0, 1, 2]);
    let requests = 1_000u64;
    for _ in 0..requests {
        m.tick(Duration::from_millis(1));
        assert_eq!(m.request(&L4), Ended::Failed);
    }
    (m, requests)
}

#[test]
fn panic_mode_keeps_a_fully_dead_service_reachable() {
    let (m, requests) = fully_dead_service();
    // Every request still reached an endpoint (panic mode).
    assert!(m.attempts >= requests, "{} attempts", m.attempts);
}

#[test]
fn the_budget_caps_retries_to_a_fully_dead_service() {
    let (m, requests) = fully_dead_service();
    // Retries stayed within the budget: 20 % of the requests in the window plus 10 per second
    // of it (the whole run fits in one 10 s window, so at most 200 + 100).
    let retries = m.attempts - requests;
    assert!(retries <= 300, "{retries} retries for {requests} requests");
    assert!(
        retries >= 200,
        "{retries}: the budget should have been used"
    );
}

#[test]
fn a_healthy_service_spends_no_budget() {
    let mut m = Mesh::new(2, &[]);
    for _ in 0..100 {
        assert_eq!(m.request(&L4), Ended::Served);
    }
    assert_eq!(m.attempts, 100);
}
