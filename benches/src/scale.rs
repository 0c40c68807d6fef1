//! Scenario 5, scale: (a) RSS per idle tunnelled flow with 10,000 flows open through each proxy
//! pair; (b) RSS of a sidecar whose directory registry holds 10,000 endpoints, beside one with an
//! empty registry; (c) time from a registry write of a Route weight change (a put to a real etcd
//! the bench starts) to the change applied by each of 20 sidecars, read from the `appliedAt` the
//! sidecars write to `status/<id>` (millisecond resolution).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lab::{apply, http_get_local, issue_identities, Lab, Route, Target};
use crate::netns::{wait_for, Proc};
use crate::stats::{rss_bytes, status_bytes, Machine, Percentiles};

const FLOWS: usize = 10_000;
const ENDPOINTS: usize = 10_000;
const FLEET: usize = 20;
const CHANGES: usize = 10;

#[derive(Debug, Serialize)]
struct IdleFlows {
    route: Route,
    flows: usize,
    rss_before_mib: Vec<f64>,
    rss_after_mib: Vec<f64>,
    kib_per_flow: f64,
}

#[derive(Debug, Serialize)]
struct RegistryRss {
    endpoints: usize,
    rss_mib: f64,
    /// The part of RSS that is the process's own memory (heap, stacks): `RssAnon`.
    anon_mib: f64,
    /// The part of RSS mapped from files, mostly the executable's code: `RssFile`. Clean pages
    /// of the page cache, shared by every process running the same binary on a host.
    file_mib: f64,
}

#[derive(Debug, Serialize)]
struct Propagation {
    sidecars: usize,
    changes: usize,
    registry: &'static str,
    applied: Percentiles,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    nofile: u64,
    idle: Vec<IdleFlows>,
    registry: Vec<RegistryRss>,
    propagation: Option<Propagation>,
    propagation_error: Option<String>,
}

pub fn main() -> anyhow::Result<()> {
    crate::setup::check_root()?;
    let nofile = crate::setup::raise_nofile()?;
    let mut idle = Vec::new();
    {
        // 10,000 flows on one peer connection: room for them all.
        let lab = Lab::up_with_streams("hb5", 5, 20_000)?;
        for route in [Route::HalyardL4, Route::H2Tunnel, Route::Stunnel] {
            match idle_flows(&lab, route) {
                Ok(row) => idle.push(row),
                Err(e) => eprintln!("bench: idle flows {}: {e:#}", route.name()),
            }
        }
    }
    let registry = registry_rss()?;
    let (propagation, propagation_error) = match propagation(FLEET) {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let report = Report {
        machine: Machine::probe(),
        nofile,
        idle,
        registry,
        propagation,
        propagation_error,
    };
    crate::stats::write_report("scale", &markdown(&report), &report)
}

/// `halyard-benches registry-rss`: only the registry-size rows of the scale scenario, printed
/// as they are measured (the report is not replaced).
pub fn registry_rss_main() -> anyhow::Result<()> {
    registry_rss().map(drop)
}

fn mib(pids: &[u32]) -> Vec<f64> {
    pids.iter()
        .map(|&p| rss_bytes(p) as f64 / 1048576.0)
        .collect()
}

fn idle_flows(lab: &Lab, route: Route) -> anyhow::Result<IdleFlows> {
    let pids = lab.pids(route);
    let addr = lab.addr(route, Target::Echo);
    // stunnel caps its clients at 125/256 of RLIMIT_NOFILE (20,000 here, not raisable without
    // CAP_SYS_RESOURCE): it gets 9,000 flows; the figure is per flow.
    let flows = if route == Route::Stunnel {
        9_000
    } else {
        FLOWS
    };
    let before = mib(&pids);
    // The client side of the flows lives in a child process (in namespace a): the server apps
    // in this process need another 10,000 descriptors, and the hard limit may not be raisable.
    let mut cmd = lab.pair.a.command(&std::env::current_exe()?);
    cmd.args(["hold-flows", &addr.to_string(), &flows.to_string()])
        .stdout(std::process::Stdio::piped());
    let mut holder = Proc::spawn("hold-flows", cmd)?;
    let out = holder.child.stdout.take().context("holder stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    anyhow::ensure!(line.trim() == "ready", "hold-flows: {}", line.trim());
    std::thread::sleep(Duration::from_secs(1));
    let after = mib(&pids);
    drop(holder);
    let grown: f64 = after.iter().sum::<f64>() - before.iter().sum::<f64>();
    let kib_per_flow = grown * 1024.0 / flows as f64;
    eprintln!(
        "idle flows {}: {kib_per_flow:.1} KiB per flow (both proxies)",
        route.name()
    );
    std::thread::sleep(Duration::from_secs(2));
    Ok(IdleFlows {
        route,
        flows,
        rss_before_mib: before,
        rss_after_mib: after,
        kib_per_flow,
    })
}

/// `hold-flows ADDR N`: opens N flows to ADDR, prints `ready` (or the error), holds them until
/// killed.
pub fn hold_main(args: &[String]) -> anyhow::Result<()> {
    let [addr, n] = args else {
        anyhow::bail!("usage: hold-flows ADDR N");
    };
    let (addr, n): (SocketAddr, usize) = (addr.parse()?, n.parse()?);
    crate::setup::raise_nofile()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match open_flows(addr, n).await {
            Ok(conns) => {
                println!("ready");
                std::future::pending::<()>().await;
                drop(conns);
            }
            Err(e) => println!("error: {e:#}"),
        }
        Ok(())
    })
}

/// FLOWS connections, each proven through with one echoed byte, 100 opening at a time.
async fn open_flows(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..100.min(n - all.len()) {
            set.spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await??;
                anyhow::Ok(s)
            });
        }
        while let Some(r) = set.join_next().await {
            let n = all.len();
            all.push(r?.with_context(|| format!("flow {n}"))?);
        }
    }
    Ok(all)
}

/// RSS of a sidecar (loopback, root namespace) on a directory registry with 0 and ENDPOINTS
/// endpoints of one service.
fn registry_rss() -> anyhow::Result<Vec<RegistryRss>> {
    let halyard = crate::lab::halyard_bin()?;
    let mut out = Vec::new();
    for n in [0, ENDPOINTS] {
        let dir = tempfile::tempdir()?;
        issue_identities(&halyard, dir.path())?;
        let reg = dir.path().join("registry");
        std::fs::create_dir_all(reg.join("default"))?;
        apply(&halyard, &reg, "kind: MeshConfig\ndefaultPolicy: allow\ntrustDomain: mesh.local\n---\nkind: Service\nname: big\nports:\n  - { name: tcp, port: 9000, protocol: tcp, targetPort: 9000 }\n")?;
        write_endpoints(&reg, n)?;
        let p = start_sidecar(
            &halyard,
            dir.path(),
            "client",
            &format!("file://{}", reg.display()),
            &[("big", 9000)],
        )?;
        std::thread::sleep(Duration::from_secs(2));
        let pid = p.0.pid();
        let rss_mib = rss_bytes(pid) as f64 / 1048576.0;
        let anon_mib = status_bytes(pid, "RssAnon:") as f64 / 1048576.0;
        let file_mib = status_bytes(pid, "RssFile:") as f64 / 1048576.0;
        eprintln!(
            "registry of {n} endpoints: sidecar RSS {rss_mib:.1} MiB (anonymous {anon_mib:.1}, file {file_mib:.1})"
        );
        out.push(RegistryRss {
            endpoints: n,
            rss_mib,
            anon_mib,
            file_mib,
        });
    }
    Ok(out)
}

fn write_endpoints(reg: &Path, n: usize) -> anyhow::Result<()> {
    let dir = reg.join("default").join("endpoints").join("big");
    std::fs::create_dir_all(&dir)?;
    for i in 0..n {
        let json = serde_json::json!({
            "id": format!("big-{i}"),
            "service": "big",
            "address": format!("10.{}.{}.{}:15443", i / 65536 % 256, i / 256 % 256, i % 256),
            "identity": "spiffe://mesh.local/ns/default/sa/big",
            "labels": { "version": if i % 2 == 0 { "v1" } else { "v2" } },
            "cluster": "local",
            "zone": format!("z{}", i % 3),
            "weight": 1,
        });
        std::fs::write(dir.join(format!("big-{i}.json")), json.to_string())?;
    }
    Ok(())
}

/// A `halyard sidecar` process on loopback, killed on drop.
struct Sidecar(Proc);

fn start_sidecar(
    halyard: &Path,
    dir: &Path,
    id: &str,
    registry: &str,
    upstreams: &[(&str, u16)],
) -> anyhow::Result<Sidecar> {
    let admin = free_port()?;
    let ids = dir.join("id").join("client");
    let mut t = format!(
        "mesh = \"default\"\nregistry = \"{registry}\"\nid = \"{id}\"\nlease_ttl = \"30s\"\n\
         [identity]\ncert = \"{i}/cert.pem\"\nkey = \"{i}/key.pem\"\nbundle = \"{i}/bundle.pem\"\n\
         [service]\nname = \"fleet\"\nversion = \"v1\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"{admin}\"\n",
        i = ids.display()
    );
    for (svc, port) in upstreams {
        t += &format!("[[outbound.upstreams]]\nservice = \"{svc}\"\nport = {port}\nlisten = \"127.0.0.1:0\"\n");
    }
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, t)?;
    let mut cmd = std::process::Command::new(halyard);
    cmd.args(["sidecar", "--config"])
        .arg(&path)
        .env("HALYARD_LOG", "warn");
    cmd.stdout(std::process::Stdio::null());
    let mut p = Proc::spawn(id, cmd)?;
    wait_for("sidecar ready", Duration::from_secs(30), || {
        http_get_local(admin, "/readyz").is_ok_and(|r| r.contains(" 200 "))
    })?;
    p.check_alive()?;
    Ok(Sidecar(p))
}

/// A port for a sidecar process's admin listener (see `halyard_registry::ports`).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(halyard_registry::ports::free(
        halyard_registry::ports::Proto::Tcp,
    )?)
}

const ROUTE_KEY: &str = "/halyard/default/routes/target";

/// FLEET sidecars on a real etcd; CHANGES weight changes put one by one; for each, the delay
/// until every sidecar's status shows a revision at least the put's.
/// `propagation`: the propagation step alone, for 20 and then 50 sidecars, written to
/// `results/propagation.{md,json}`.
pub fn propagation_main() -> anyhow::Result<()> {
    crate::setup::raise_nofile()?;
    let mut rows = Vec::new();
    for fleet in [FLEET, 50] {
        let p = propagation(fleet)?;
        eprintln!(
            "propagation {fleet}: p50 {:.1} ms p99 {:.1} ms",
            p.applied.p50_us / 1000.0,
            p.applied.p99_us / 1000.0
        );
        rows.push(p);
    }
    let machine = Machine::probe();
    let mut md = String::from(
        "# Registry propagation: a Route put in etcd, applied by every sidecar

",
    );
    md += &machine.markdown();
    md += &format!(
        "
N `halyard sidecar` processes on one real etcd (single member, loopback); {CHANGES} Route weight \
         changes put one at a time, 300 ms apart once all applied the last; delay from the put to each \
         sidecar's `appliedAt` in `status/<id>` (when the sidecar built the snapshot; ms resolution).\n\n\
         | sidecars | samples | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n"
    );
    for p in &rows {
        md += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            p.sidecars,
            p.applied.n,
            p.applied.p50_us / 1000.0,
            p.applied.p90_us / 1000.0,
            p.applied.p99_us / 1000.0,
            p.applied.max_us / 1000.0
        );
    }
    #[derive(Serialize)]
    struct Report {
        machine: Machine,
        rows: Vec<Propagation>,
    }
    crate::stats::write_report("propagation", &md, &Report { machine, rows })
}

fn propagation(fleet: usize) -> anyhow::Result<Propagation> {
    let halyard = crate::lab::halyard_bin()?;
    let etcd = halyard_registry::test_util::EtcdServer::start();
    let dir = tempfile::tempdir()?;
    issue_identities(&halyard, dir.path())?;
    let url = etcd.url();
    let objects = "kind: MeshConfig\ndefaultPolicy: allow\ntrustDomain: mesh.local\n---\n\
        kind: Service\nname: target\nports:\n  - { name: tcp, port: 9000, protocol: tcp, targetPort: 9000 }\n---\n\
        kind: Route\nservice: target\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 50 }\n      - { subset: { version: v2 }, weight: 50 }\n";
    crate::lab::apply_url(&halyard, &url, objects)?;
    let stored = etcd.etcdctl_ok(&["get", ROUTE_KEY, "--print-value-only"]);
    let size = fleet;
    let mut sidecars = Vec::new();
    for i in 0..size {
        sidecars.push(start_sidecar(
            &halyard,
            dir.path(),
            &format!("fleet-{i}"),
            &url,
            &[("target", 9000)],
        )?);
    }
    let endpoint = etcd.endpoint();
    let samples = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(changes(endpoint, stored.trim().to_owned(), size))?;
    drop(sidecars);
    Ok(Propagation {
        sidecars: size,
        changes: CHANGES,
        registry: "etcd",
        applied: Percentiles::of(samples),
    })
}

async fn changes(endpoint: String, stored: String, fleet: usize) -> anyhow::Result<Vec<u64>> {
    let mut client = etcd_client::Client::connect([endpoint], None).await?;
    let mut samples = Vec::new();
    for k in 0..CHANGES {
        let w = 10 + k as u32;
        let value = stored.replacen("\"weight\":50", &format!("\"weight\":{w}"), 1);
        anyhow::ensure!(value != stored, "route JSON has no weight 50: {stored}");
        let put_at = SystemTime::now();
        let rev = client
            .put(ROUTE_KEY, value, None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        samples.extend(wait_applied(&mut client, rev, put_at, fleet).await?);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(samples)
}

/// Polls `status/` until all `fleet` sidecars applied revision `rev`; delays since `put_at` in ns.
async fn wait_applied(
    client: &mut etcd_client::Client,
    rev: i64,
    put_at: SystemTime,
    fleet: usize,
) -> anyhow::Result<Vec<u64>> {
    let opts = etcd_client::GetOptions::new().with_prefix();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = client
            .get("/halyard/default/status/", Some(opts.clone()))
            .await?;
        let mut delays = Vec::new();
        for kv in resp.kvs() {
            let v: serde_json::Value = serde_json::from_slice(kv.value())?;
            let applied_rev = v["revision"].as_i64().unwrap_or(0);
            let at = v["appliedAt"]
                .as_str()
                .and_then(|s| humantime::parse_rfc3339(s).ok());
            if let (true, Some(at)) = (applied_rev >= rev, at) {
                delays.push(at.duration_since(put_at).unwrap_or_default().as_nanos() as u64);
            }
        }
        if delays.len() >= fleet {
            return Ok(delays);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {fleet} sidecars applied revision {rev}",
            delays.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn markdown(r: &Report) -> String {
    let mut md = String::from("# Scenario 5: scale\n\n");
    md += &r.machine.markdown();
    md += &format!(
        "\nIdle flows: {FLOWS} TCP connections (stunnel: 9,000, its client cap at this fd limit) through each proxy pair (namespaces a/b, veth), each proven with one echoed byte, then held idle; \
         RSS (VmRSS) of client-side / server-side proxy before and 1 s after. RLIMIT_NOFILE raised to {} for the bench and its children.\n\n",
        r.nofile
    );
    md += "| path | flows | RSS before MiB | RSS after MiB | KiB per flow (both proxies) | vs stunnel | vs h2-tunnel |\n|---|---|---|---|---|---|---|\n";
    let per = |route| {
        r.idle
            .iter()
            .find(|x| x.route == route)
            .map_or(0.0, |x| x.kib_per_flow)
    };
    for i in &r.idle {
        let j = |v: &[f64]| {
            v.iter()
                .map(|m| format!("{m:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let ratio = |b: f64| {
            if b > 0.0 {
                format!("{:.2}×", i.kib_per_flow / b)
            } else {
                "–".into()
            }
        };
        md += &format!(
            "| {} | {} | {} | {} | {:.1} | {} | {} |\n",
            i.route.name(),
            i.flows,
            j(&i.rss_before_mib),
            j(&i.rss_after_mib),
            i.kib_per_flow,
            ratio(per(Route::Stunnel)),
            ratio(per(Route::H2Tunnel))
        );
    }
    md += "\nRegistry size: one `halyard sidecar` (loopback) on a directory registry holding one Service with N endpoint files, RSS 2 s after ready, split into the process's own memory (`RssAnon`: heap, stacks) and pages mapped from files (`RssFile`: mostly the executable's code, clean page-cache pages shared by every sidecar running the same binary on a host).\n\n| endpoints | sidecar RSS MiB | of which anonymous | of which file-backed |\n|---|---|---|---|\n";
    for g in &r.registry {
        md += &format!(
            "| {} | {:.1} | {:.1} | {:.1} |\n",
            g.endpoints, g.rss_mib, g.anon_mib, g.file_mib
        );
    }
    match (&r.propagation, &r.propagation_error) {
        (Some(p), _) => md += &format!(
            "\nPropagation: {} sidecars on a real etcd (single member, loopback); {} Route weight changes put one at a time; \
             delay from the put to each sidecar's `appliedAt` in `status/<id>` (ms resolution), {} samples: \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms.\n",
            p.sidecars, p.changes, p.applied.n, p.applied.p50_us / 1000.0, p.applied.p99_us / 1000.0, p.applied.max_us / 1000.0
        ),
        (None, Some(e)) => md += &format!("\nPropagation: not measured: {e}\n"),
        _ => {}
    }
    md
}
