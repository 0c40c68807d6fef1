//! A mesh on loopback for integration tests: a CA, a registry (directory or a real etcd),
//! echo apps and sidecars, in-process or as `halyard sidecar` processes.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use halyard_certs::ca::write_identity;
use halyard_certs::{MeshCa, SpiffeId, TrustDomain};
use halyard_registry::admin::Admin;
use halyard_registry::model::parse_documents;
use halyard_sidecar::config::Config;
use halyard_sidecar::run::{run_until, Started};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const TD: &str = "mesh.local";

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub ca: MeshCa,
    pub registry: String,
    admin: Admin,
}

/// What one sidecar serves and calls.
#[derive(Clone, Default)]
pub struct Spec {
    pub service: String,
    pub version: String,
    pub app_host: Option<IpAddr>,
    pub upstreams: Vec<(String, u16)>,
    pub transparent: bool,
    /// Extra TOML appended to the config.
    pub extra: String,
    /// Top-level TOML put before the first table.
    pub prefix: String,
}

impl Spec {
    pub fn new(service: &str, version: &str) -> Spec {
        Spec {
            service: service.into(),
            version: version.into(),
            ..Spec::default()
        }
    }
    pub fn app_host(mut self, ip: IpAddr) -> Spec {
        self.app_host = Some(ip);
        self
    }
    pub fn upstream(mut self, service: &str, port: u16) -> Spec {
        self.upstreams.push((service.into(), port));
        self
    }
}

/// An in-process sidecar.
pub struct Sidecar {
    pub config: Arc<Config>,
    pub started: Started,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Sidecar {
    pub fn upstream(&self, i: usize) -> SocketAddr {
        self.started.upstreams[i]
    }

    /// Waits until this sidecar's snapshot satisfies `f`.
    pub async fn wait_snapshot(&self, what: &str, f: impl Fn(&halyard_registry::Snapshot) -> bool) {
        let mut rx = self.started.snapshot.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
            .await
            .unwrap_or_else(|_| panic!("snapshot never showed {what}"))
            .unwrap();
    }

    pub async fn wait_endpoints(&self, service: &str, n: usize) {
        self.wait_snapshot(&format!("{n} endpoints of {service}"), |s| {
            s.endpoints_of(service).count() == n
        })
        .await;
    }

    /// Waits until this sidecar has recorded `n` finished flows.
    pub async fn wait_flows(&self, n: u64) {
        let mut rx = self.started.metrics.finished();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|&done| done >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} flows recorded"))
            .unwrap();
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

impl Mesh {
    pub async fn with_dir() -> Mesh {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry");
        std::fs::create_dir_all(reg.join("default")).unwrap();
        let url = format!("file://{}", reg.display());
        Self::with_url(dir, url).await
    }

    pub async fn with_url(dir: tempfile::TempDir, url: String) -> Mesh {
        let ca = MeshCa::create(&TrustDomain::new(TD).unwrap()).unwrap();
        let admin = Admin::connect(&url, "default", Duration::from_secs(3))
            .await
            .unwrap();
        Mesh {
            dir,
            ca,
            registry: url,
            admin,
        }
    }

    pub async fn apply(&self, yaml: &str) {
        let objects = parse_documents("test", yaml).unwrap();
        self.admin.apply(&objects).await.unwrap();
    }

    /// Writes cert.pem, key.pem and bundle.pem for `account` into a fresh folder.
    pub fn identity(&self, account: &str) -> PathBuf {
        let out = self
            .dir
            .path()
            .join(format!("id-{account}-{}", rand_suffix()));
        let id = SpiffeId::workload(self.ca.trust_domain(), "default", account).unwrap();
        let leaf = self.ca.issue(&id, Duration::from_secs(3600)).unwrap();
        write_identity(&out, &leaf, self.ca.cert_pem()).unwrap();
        out
    }

    pub fn config_text(&self, spec: &Spec) -> String {
        let id = self.identity(&spec.service);
        let mut t = spec.prefix.clone();
        t += &format!(
            "registry = {:?}\nstate_dir = {:?}\n[identity]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\nreload_interval = \"200ms\"\n\
             [service]\nname = {:?}\nversion = {:?}\n[inbound]\nlisten = \"127.0.0.1:0\"\napp_host = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            self.registry,
            self.dir.path().join(format!("state-{}", rand_suffix())),
            id.join("cert.pem"),
            id.join("key.pem"),
            id.join("bundle.pem"),
            spec.service,
            spec.version,
            spec.app_host.unwrap_or(IpAddr::from([127, 0, 0, 1])),
        );
        for (svc, port) in &spec.upstreams {
            t += &format!("[[outbound.upstreams]]\nservice = {svc:?}\nport = {port}\nlisten = \"127.0.0.1:0\"\n");
        }
        if spec.transparent {
            t += "[outbound.transparent]\nlisten = \"127.0.0.1:0\"\n";
        }
        t += "[failure]\nconnect_timeout = \"1s\"\ndrain_timeout = \"5s\"\n";
        t += &spec.extra;
        t
    }

    pub fn write_config(&self, spec: &Spec) -> PathBuf {
        let path = self.dir.path().join(format!(
            "{}-{}-{}.toml",
            spec.service,
            spec.version,
            rand_suffix()
        ));
        std::fs::write(&path, self.config_text(spec)).unwrap();
        path
    }

    pub async fn start(&self, spec: &Spec) -> Sidecar {
        let path = self.write_config(spec);
        let config = Arc::new(Config::load(&path).unwrap());
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_until(config.clone(), stop.clone(), Some(tx)));
        let started = match rx.await {
            Ok(s) => s,
            Err(_) => panic!("sidecar failed to start: {:?}", task.await),
        };
        Sidecar {
            config,
            started,
            stop,
            task,
        }
    }
}

/// Logs to the test's output when `HALYARD_TEST_LOG` is set (e.g. `debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("HALYARD_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub fn rand_suffix() -> u64 {
    rand::random::<u64>() % 1_000_000_000
}

/// An app that reads until the client half-closes, then answers `<tag>:<what it read>`.
pub struct Echo {
    pub addr: SocketAddr,
    /// One message per accepted connection.
    pub accepted: tokio::sync::mpsc::UnboundedReceiver<()>,
    _task: tokio::task::JoinHandle<()>,
}

pub async fn tagged_echo(addr: SocketAddr, tag: &str) -> Echo {
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    let tag = tag.to_owned();
    let (tx, accepted) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tx.send(());
            let tag = tag.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if tcp.read_to_end(&mut buf).await.is_ok() {
                    let mut reply = format!("{tag}:").into_bytes();
                    reply.extend_from_slice(&buf);
                    let _ = tcp.write_all(&reply).await;
                    let _ = tcp.shutdown().await;
                }
            });
        }
    });
    Echo {
        addr: local,
        accepted,
        _task: task,
    }
}

/// Sends `msg`, half-closes, and reads the whole answer.
pub async fn call(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(msg).await?;
    tcp.shutdown().await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(out)
}

/// The value of one Prometheus sample in `text`, matched by name and every label given.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
