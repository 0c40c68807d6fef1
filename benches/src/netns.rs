//! Network namespaces and processes the bench creates, removed on drop (also on error and on
//! panic unwinding): `Pair` is two namespaces joined by a veth pair, `Proc` a child process killed
//! on drop, `in_ns` runs a closure on a thread that entered a namespace (sockets created there
//! stay in that namespace after being handed to tokio).

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use nix::sched::{setns, CloneFlags};

/// A network namespace created by the bench (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        // A namespace left by an interrupted run is removed first.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.into() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace and fails when it fails.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that will run inside the namespace (`ip netns exec` execs it, so the child's
    /// pid is the program's own pid, as /proc accounting needs).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2; make deps)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Two namespaces joined by a veth pair (MTU 1500): `a` has 10.77.<net>.1, `b` 10.77.<net>.2.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub a_ip: String,
    pub b_ip: String,
}

impl Pair {
    pub fn veth(prefix: &str, net: u8) -> anyhow::Result<Pair> {
        let a = Netns::create(&format!("{prefix}-a"))?;
        let b = Netns::create(&format!("{prefix}-b"))?;
        let (va, vb) = (format!("{prefix}va"), format!("{prefix}vb"));
        a.exec(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ])?;
        a.exec(&["ip", "link", "set", &vb, "netns", &b.name])?;
        let (a_ip, b_ip) = (format!("10.77.{net}.1"), format!("10.77.{net}.2"));
        for (ns, dev, addr) in [(&a, &va, &a_ip), (&b, &vb, &b_ip)] {
            ns.exec(&["ip", "link", "set", dev, "mtu", "1500"])?;
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ns.exec(&["ip", "link", "set", dev, "up"])?;
        }
        Ok(Pair { a, b, a_ip, b_ip })
    }
}

impl Pair {
    /// Two namespaces with addresses 10.77.<net>.1 and .2 planned but no link: the caller joins
    /// them (the link emulator's TUN devices).
    pub fn bare(prefix: &str, net: u8) -> anyhow::Result<Pair> {
        Ok(Pair {
            a: Netns::create(&format!("{prefix}-a"))?,
            b: Netns::create(&format!("{prefix}-b"))?,
            a_ip: format!("10.77.{net}.1"),
            b_ip: format!("10.77.{net}.2"),
        })
    }
}

/// Runs `f` on a new thread that has entered namespace `ns`; returns its result.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    let handle = std::thread::spawn(move || -> anyhow::Result<T> {
        enter(&path)?;
        f()
    });
    match handle.join() {
        Ok(r) => r,
        Err(_) => bail!("thread in namespace {ns} panicked"),
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {path}"))?;
    Ok(())
}

/// Spawns a thread in namespace `ns` running a current-thread tokio runtime on `fut`.
pub fn spawn_rt<F>(
    ns: &str,
    make: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        if let Err(e) = enter(&path) {
            eprintln!("bench: {e:#}");
            return;
        }
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(make()),
            Err(e) => eprintln!("bench: runtime: {e}"),
        }
    })
}

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.into(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process already exited (a bad config, a port in use).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holds /dev/cpu_dma_latency at 0 while alive, so idle CPUs do not sleep deeply between
/// packets (an idle CPU here takes ~40 µs to wake, which would swamp round-trip figures).
pub struct DmaLatency {
    _file: Option<File>,
}

impl DmaLatency {
    pub fn hold() -> DmaLatency {
        use std::io::Write as _;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
        match file {
            Ok(f) => DmaLatency { _file: Some(f) },
            Err(e) => {
                eprintln!("bench: /dev/cpu_dma_latency not held: {e}");
                DmaLatency { _file: None }
            }
        }
    }

    pub fn held(&self) -> bool {
        self._file.is_some()
    }
}

/// Waits until `f` succeeds, up to `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

/// Runs the future made by `make` on a current-thread runtime in namespace `ns`; its result.
pub fn block_in<T, F>(ns: &str, make: impl FnOnce() -> F + Send + 'static) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    in_ns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(make())
    })
}
