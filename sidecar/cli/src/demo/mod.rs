//! `halyard demo`: the whole mesh on one machine, and a walk through what it does.
//!
//! An offline root and a CA server (`halyard ca serve`) from which every sidecar enrolls with a
//! one-use token, making its own key; a registry (a directory in a temp dir, or `--registry
//! etcd://...`); per workload a `halyard sample-app` and a `halyard sidecar` as separate
//! processes on loopback; a load generator; then the story (`story.rs`), every change written
//! to the registry through the same admin API as `halyard ctl`. Ctrl-C stops everything; the
//! children also die with the demo if it is killed (`child.rs`).

mod child;
mod link;
mod load;
mod mesh;
pub mod stats;
mod story;
mod view;

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use self::mesh::{Mesh, MeshOptions};
use self::story::{Pace, Story};

/// Arguments of `halyard demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Trust domain of the demo mesh.
    #[arg(long, default_value = "mesh.local")]
    pub trust_domain: String,
    /// Registry: etcd://host:port[,...]; default: a directory registry in a temp dir.
    #[arg(long)]
    pub registry: Option<String>,
    /// Mesh name (registry prefix /halyard/<mesh>/).
    #[arg(long, default_value = "demo")]
    pub mesh: String,
    /// Protocol of the sample services' ports: http (L7) or tcp (L4).
    #[arg(long, default_value = "http", value_parser = ["http", "tcp"])]
    pub protocol: String,
    /// Short steps (2 s each): for tests and the impatient.
    #[arg(long)]
    pub quick: bool,
    /// Length of each step's measurement window.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub step: Option<Duration>,
    /// Pages per second sent to productpage.
    #[arg(long, default_value_t = 40)]
    pub rps: u32,
    /// 2 adds a second cluster (own registry, a ratings instance, an east-west gateway) and a
    /// last step: ratings lost here, served from there through the gateway.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub clusters: u8,
    /// After the story, leave the mesh up and print its URLs until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Internal: become `halyard ARGS...`, dying with process PID.
    #[arg(long, hide = true)]
    pub exec_child: Option<u32>,
    /// Internal: the arguments for `--exec-child`.
    #[arg(last = true, hide = true)]
    pub child_args: Vec<String>,
}

/// Runs `halyard demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(parent) = args.exec_child {
        return Err(child::exec_child(parent, &args.child_args));
    }
    // One thread: children are spawned from it, and their parent-death signal is tied to it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo(args))
}

fn pace(args: &DemoArgs) -> Pace {
    let step = args.step.unwrap_or(if args.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(8)
    });
    Pace {
        step,
        settle: if args.quick {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(1)
        },
        live: std::io::stdout().is_terminal(),
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("halyard-demo-")
        .tempdir()
        .context("creating a work dir")?;
    let opts = MeshOptions {
        registry: args.registry.clone(),
        mesh: args.mesh.clone(),
        trust_domain: args.trust_domain.clone(),
        protocol: args.protocol.clone(),
        clusters: args.clusters,
    };
    let stop = CancellationToken::new();
    halyard_sidecar::signal::cancel_on_signal(&stop);
    println!("== Halyard demo: the sample application on a mesh of sidecars, on this machine");
    println!(
        "   work dir {} (CA, identities, configs, logs)",
        dir.path().display()
    );
    let result = run_mesh(&args, &opts, dir.path(), &stop).await;
    if result.is_err() && !stop.is_cancelled() {
        let kept = dir.keep();
        eprintln!("halyard demo: logs kept in {}", kept.join("logs").display());
    }
    result
}

async fn run_mesh(
    args: &DemoArgs,
    opts: &MeshOptions,
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mesh = tokio::select! {
        m = Mesh::start(opts, dir) => m?,
        _ = stop.cancelled() => anyhow::bail!("interrupted"),
    };
    println!(
        "   registry {} (mesh {}); {} workloads started, each a sample app and a sidecar process",
        mesh.registry,
        opts.mesh,
        mesh.workloads.len()
    );
    println!(
        "   CA server on {}: every sidecar made its own key and enrolled with a one-use token (24 h leaves, renewed at half-life)",
        mesh.ca
    );
    if let Some(b) = &mesh.cluster_b {
        println!(
            "   cluster b: registry {}, ratings behind its east-west gateway on {} (linked from here by a ClusterLink)",
            b.registry, b.gateway
        );
    }
    let load = story::Load::start(mesh.entry_url()?, args.rps);
    let mut s = Story {
        mesh,
        load,
        pace: pace(args),
        results: Vec::new(),
    };
    let outcome = tokio::select! {
        r = s.run() => r,
        _ = stop.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    if outcome.is_err() {
        // A terminal's Ctrl-C reaches the children too; their exit may be seen first.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcome = match outcome {
        Err(_) if stop.is_cancelled() => Err(anyhow::anyhow!("interrupted")),
        o => o,
    };
    if outcome.is_ok() && args.keep_running {
        keep_running(&s, stop).await;
    }
    drop(s.load);
    println!();
    println!("== stopping: SIGTERM to every sidecar (they drain) and app");
    s.mesh.children.stop(Duration::from_secs(3)).await;
    println!("   every process stopped");
    outcome
}

async fn keep_running(s: &Story, stop: &CancellationToken) {
    println!();
    println!("== the mesh keeps running (Ctrl-C stops it)");
    if let Ok(url) = s.mesh.entry_url() {
        println!("   curl -H 'x-user: tester' {url}");
    }
    for w in &s.mesh.workloads {
        let app = w
            .app
            .map(|a| format!("app http://{a}/"))
            .unwrap_or_default();
        println!("   {:<14} admin http://{}/metrics  {app}", w.name, w.admin);
    }
    println!(
        "   change it: halyard ctl --registry {} --mesh {} apply -f deploy/examples/reviews-canary.yaml",
        s.mesh.registry,
        s.mesh.admin.mesh()
    );
    stop.cancelled().await;
}
