//! Scenario 6, micro: runs the criterion benches (`benches/micro.rs`: route selection, policy
//! evaluation, snapshot apply and the endpoint index at 10,000 endpoints, the east-west
//! gateway's decision per datagram) and collects their estimates into the report.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use serde::Serialize;

use crate::stats::Machine;

const BENCHES: [(&str, &str); 9] = [
    (
        "route_selection_10k_endpoints",
        "route selection: rule, weighted subset, endpoint among 10,000 (subset, health, locality, P2C) through the per-snapshot endpoint index",
    ),
    (
        "route_selection_10k_endpoints_retry_100_ejected",
        "the same for a retry: 2 endpoints tried, 100 of the service ejected",
    ),
    (
        "route_selection_10k_endpoints_linear",
        "the same choice by the linear reference (`candidates`/`choose`: every endpoint filtered per pick), as before the index",
    ),
    (
        "policy_evaluation_100_rules",
        "policy evaluation: 100 rules, HTTP request admitted by the last allow rule",
    ),
    (
        "snapshot_apply/dir_registry_10k_endpoints",
        "snapshot apply: open a directory registry of 10,000 endpoint files, build the snapshot",
    ),
    (
        "snapshot_apply/dir_registry_10k_endpoints_indexed",
        "the same plus the sidecar's endpoint index of the snapshot",
    ),
    (
        "endpoint_index_10k_endpoints",
        "the endpoint index alone: 10,000 endpoints, a route of 3 subsets",
    ),
    (
        "gateway_decision/unencrypted",
        "east-west gateway: route one 1-RTT datagram by its connection ID among 10,000 exported endpoints, unencrypted QUIC-LB IDs",
    ),
    (
        "gateway_decision/encrypted",
        "the same with a QUIC-LB key: one AES-128 block decrypted per datagram",
    ),
];

#[derive(Debug, Serialize)]
struct Row {
    name: &'static str,
    what: &'static str,
    median_ns: f64,
    mean_ns: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    rows: Vec<Row>,
}

pub fn main() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["bench", "-p", "halyard-benches", "--bench", "micro", "--"])
        .args(["--warm-up-time", "1", "--measurement-time", "3"])
        .status()
        .context("running cargo bench")?;
    anyhow::ensure!(status.success(), "cargo bench failed: {status}");
    let mut rows = Vec::new();
    for (name, what) in BENCHES {
        let (median_ns, mean_ns) = estimates(name)?;
        rows.push(Row {
            name,
            what,
            median_ns,
            mean_ns,
        });
    }
    let report = Report {
        machine: Machine::probe(),
        rows,
    };
    crate::stats::write_report("micro", &markdown(&report), &report)
}

fn estimates(name: &str) -> anyhow::Result<(f64, f64)> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let path = target
        .join("criterion")
        .join(name)
        .join("new/estimates.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let at = |k: &str| v[k]["point_estimate"].as_f64().unwrap_or(0.0);
    Ok((at("median"), at("mean")))
}

fn human(ns: f64) -> String {
    match ns {
        n if n >= 1e6 => format!("{:.2} ms", n / 1e6),
        n if n >= 1e3 => format!("{:.2} µs", n / 1e3),
        n => format!("{n:.0} ns"),
    }
}

fn markdown(r: &Report) -> String {
    let mut md = String::from("# Scenario 6: micro benchmarks (criterion)\n\n");
    md += &r.machine.markdown();
    md += "\n`cargo bench -p halyard-benches --bench micro` (1 s warm-up, 3 s measurement; snapshot apply: 10 samples). \
           Pure functions of the sidecar crate, one thread.\n\n| bench | what | median | mean |\n|---|---|---|---|\n";
    for row in &r.rows {
        md += &format!(
            "| `{}` | {} | {} | {} |\n",
            row.name,
            row.what,
            human(row.median_ns),
            human(row.mean_ns)
        );
    }
    md
}
