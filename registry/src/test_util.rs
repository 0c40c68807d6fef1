//! Test harness: a real etcd per test (feature `test-util`).
//!
//! [`EtcdServer::start`] runs the `etcd` binary from PATH with its own temp data dir and random
//! free client and peer ports on 127.0.0.1, waits until `/health` answers, and kills it on drop.
//! [`EtcdServer::stop`] and [`EtcdServer::restart`] keep the ports and the data.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running etcd, killed on drop. Panics (it is test code) when etcd cannot be started.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The address clients reach it at (127.0.0.1 unless [`EtcdServer::start_on`]).
    host: std::net::IpAddr,
    client_port: u16,
    peer_port: u16,
    /// Extra `etcd` flags, kept across restarts.
    flags: Vec<String>,
    /// `root:password` once [`EtcdServer::enable_auth`] ran; `etcdctl` then uses it.
    root: Option<String>,
    /// Serving over TLS with these files ([`EtcdServer::start_tls`]).
    tls: Option<TlsFiles>,
}

/// The files of an etcd served over TLS with client certificates required: a CA, etcd's
/// certificate for 127.0.0.1 and a client certificate, all signed by that CA (ECDSA P-256).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// etcd's serving certificate and key.
    pub server_cert: PathBuf,
    /// etcd's serving key.
    pub server_key: PathBuf,
    /// A client certificate (CN `halyard`) and its key.
    pub client_cert: PathBuf,
    /// The client key.
    pub client_key: PathBuf,
    /// A second CA, unrelated to etcd's (for refusal tests).
    pub other_ca: PathBuf,
}

impl TlsFiles {
    fn create(dir: &std::path::Path) -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let key = || must(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256), "key");
        let ca = |name: &str| {
            let mut params = must(CertificateParams::new(Vec::<String>::new()), "ca params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let k = key();
            let cert = must(params.self_signed(&k), "ca cert");
            (cert.pem(), Issuer::new(params, k))
        };
        let (ca_pem, issuer) = ca("test etcd CA");
        let (other_pem, _) = ca("another CA");
        let leaf = |cn: &str, ip: bool| {
            let mut params = must(CertificateParams::new(Vec::<String>::new()), "leaf params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            if ip {
                params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
            }
            let k = key();
            let cert = must(params.signed_by(&k, &issuer), "leaf cert");
            (cert.pem(), k.serialize_pem())
        };
        let (server_pem, server_key) = leaf("etcd", true);
        let (client_pem, client_key) = leaf("halyard", false);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            must(std::fs::write(&p, text), "write a TLS file");
            p
        };
        TlsFiles {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_pem),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &other_pem),
        }
    }
}

/// A port for etcd, outside the kernel's ephemeral range (see [`crate::ports`]), so a restart
/// finds it still free.
fn free_port() -> u16 {
    match crate::ports::free(crate::ports::Proto::Tcp) {
        Ok(a) => a.port(),
        Err(e) => panic!("cannot pick a free port: {e}"),
    }
}

impl EtcdServer {
    /// Starts etcd on fresh ports, retrying on a port conflict.
    pub fn start() -> EtcdServer {
        Self::start_on(std::net::IpAddr::from([127, 0, 0, 1]))
    }

    /// Starts etcd serving clients on `host` (an address of the calling thread's network
    /// namespace; a test that enters a namespace first runs etcd inside it), peers on 127.0.0.1.
    pub fn start_on(host: std::net::IpAddr) -> EtcdServer {
        Self::start_with(host, &[])
    }

    /// Starts etcd on `host` with extra flags (for example `--auth-token-ttl=2`), kept across
    /// [`EtcdServer::restart`].
    pub fn start_with(host: std::net::IpAddr, flags: &[&str]) -> EtcdServer {
        Self::start_full(host, flags, false)
    }

    /// Starts etcd on 127.0.0.1 serving clients over TLS and requiring a client certificate
    /// (`--client-cert-auth`) signed by its CA; see [`EtcdServer::tls`] for the files.
    pub fn start_tls() -> EtcdServer {
        Self::start_full(std::net::IpAddr::from([127, 0, 0, 1]), &[], true)
    }

    /// The TLS files of an etcd from [`EtcdServer::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn start_full(host: std::net::IpAddr, flags: &[&str], tls: bool) -> EtcdServer {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("cannot create a temp dir: {e}"),
        };
        let tls = tls.then(|| TlsFiles::create(dir.path()));
        let mut server = EtcdServer {
            child: None,
            dir,
            host,
            client_port: 0,
            peer_port: 0,
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            root: None,
            tls,
        };
        for _ in 0..5 {
            server.client_port = free_port();
            server.peer_port = free_port();
            if server.spawn() {
                return server;
            }
            let _ = std::fs::remove_dir_all(server.data_dir());
        }
        panic!("etcd did not start; see {}", server.log_file().display());
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Spawns etcd and waits for health; false if it exited or never became healthy.
    fn spawn(&mut self) -> bool {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}", self.endpoint());
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file());
        let Ok(log) = log else { return false };
        let Ok(log2) = log.try_clone() else {
            return false;
        };
        let child = etcd_command("t", &self.data_dir(), &client, &peer, &format!("t={peer}"))
            .args(&self.flags)
            .args(self.tls_flags())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        if self.wait_healthy() {
            return true;
        }
        self.stop();
        false
    }

    fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if self.healthy() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn healthy(&self) -> bool {
        if self.tls.is_some() {
            return self
                .etcdctl(&["endpoint", "health", "--command-timeout=1s"])
                .status
                .success();
        }
        healthy_at(std::net::SocketAddr::new(self.host, self.client_port))
    }

    /// etcd's flags for serving clients over TLS with client certificates required.
    fn tls_flags(&self) -> Vec<std::ffi::OsString> {
        let Some(t) = &self.tls else {
            return Vec::new();
        };
        let mut out: Vec<std::ffi::OsString> = Vec::new();
        for (flag, path) in [
            ("--cert-file", &t.server_cert),
            ("--key-file", &t.server_key),
            ("--trusted-ca-file", &t.ca),
        ] {
            out.push(flag.into());
            out.push(path.into());
        }
        out.push("--client-cert-auth".into());
        out
    }

    /// `host:port` of the client URL.
    pub fn endpoint(&self) -> String {
        std::net::SocketAddr::new(self.host, self.client_port).to_string()
    }

    /// The registry URL, `etcd://HOST:PORT` (`etcds://` when serving over TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoint())
    }

    /// Kills etcd (SIGKILL) and waits for it to exit. The data dir stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not restart; see {}", self.log_file().display());
    }

    /// Turns on etcd authentication with a `root` user (password `root_password`, role
    /// `root`); later `etcdctl` calls authenticate as root.
    pub fn enable_auth(&mut self, root_password: &str) {
        self.etcdctl_ok(&["user", "add", &format!("root:{root_password}")]);
        self.etcdctl_ok(&["user", "grant-role", "root", "root"]);
        self.etcdctl_ok(&["auth", "enable"]);
        self.root = Some(format!("root:{root_password}"));
    }

    /// Adds `user` with `password` and a role of the same name that may read (`read`) or
    /// read and write (`readwrite`) the keys under `prefix`.
    pub fn add_user(&self, user: &str, password: &str, permission: &str, prefix: &str) {
        self.etcdctl_ok(&["role", "add", user]);
        self.etcdctl_ok(&[
            "role",
            "grant-permission",
            user,
            permission,
            "--prefix=true",
            prefix,
        ]);
        self.etcdctl_ok(&["user", "add", &format!("{user}:{password}")]);
        self.etcdctl_ok(&["user", "grant-role", user, user]);
    }

    /// Runs `etcdctl` (API v3) against this server (as root once authentication is on).
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("etcdctl");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={scheme}://{}", self.endpoint()));
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        if let Some(root) = &self.root {
            cmd.arg(format!("--user={root}"));
        }
        let out = cmd.args(args).output();
        match out {
            Ok(o) => o,
            Err(e) => panic!("cannot run etcdctl: {e}"),
        }
    }

    /// Runs `etcdctl` and returns its stdout, panicking if it fails.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        if !out.status.success() {
            panic!(
                "etcdctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three etcd members on 127.0.0.1 (random client and peer ports), each with its own data dir;
/// killed on drop. Members can be killed and started again to lose and regain quorum.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    /// (client port, peer port) per member.
    ports: Vec<(u16, u16)>,
    children: Vec<Option<Child>>,
}

/// An `etcd` command for one member named `name`: its data dir, client and peer URLs, the
/// initial cluster, warnings only.
fn etcd_command(
    name: &str,
    data_dir: &std::path::Path,
    client: &str,
    peer: &str,
    initial_cluster: &str,
) -> Command {
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", name, "--data-dir"])
        .arg(data_dir)
        .args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", initial_cluster])
        .args(["--logger", "zap", "--log-level", "warn"]);
    cmd
}

/// Whether the etcd member on 127.0.0.1:`port` reports healthy (`/health`: it has a leader).
fn healthy(port: u16) -> bool {
    healthy_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

fn healthy_at(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// The value of `r`, or a panic naming `what` (test harness code).
fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

impl EtcdCluster {
    /// Starts three members and waits until each is healthy.
    pub fn start() -> EtcdCluster {
        let ports = (0..3).map(|_| (free_port(), free_port())).collect();
        let mut c = EtcdCluster {
            dir: must(tempfile::tempdir(), "cannot create a temp dir"),
            ports,
            children: vec![None, None, None],
        };
        for i in 0..3 {
            c.spawn(i);
        }
        for i in 0..3 {
            c.wait_healthy(i);
        }
        c
    }

    fn initial_cluster(&self) -> String {
        let members: Vec<String> = (0..3)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", self.ports[i].1))
            .collect();
        members.join(",")
    }

    /// Starts member `i` (0..3) again, with its data.
    pub fn spawn(&mut self, i: usize) {
        let (client, peer) = self.ports[i];
        let client = format!("http://127.0.0.1:{client}");
        let peer = format!("http://127.0.0.1:{peer}");
        let log = must(
            std::fs::File::create(self.dir.path().join(format!("m{i}.log"))),
            "cannot create the member's log",
        );
        let child = etcd_command(
            &format!("m{i}"),
            &self.dir.path().join(format!("m{i}")),
            &client,
            &peer,
            &self.initial_cluster(),
        )
        .args(["--initial-cluster-state", "new"])
        .stdin(Stdio::null())
        .stdout(must(log.try_clone(), "cannot share the log"))
        .stderr(log)
        .spawn();
        self.children[i] = Some(must(child, "cannot start etcd"));
    }

    /// Waits until member `i` reports healthy (it has a leader); panics after 30 s.
    pub fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if healthy(self.ports[i].0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd member {i} never became healthy");
    }

    /// SIGKILL for member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcd://` URL naming all three members.
    pub fn url(&self) -> String {
        let eps: Vec<String> = self
            .ports
            .iter()
            .map(|(c, _)| format!("127.0.0.1:{c}"))
            .collect();
        format!("etcd://{}", eps.join(","))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}
