//! The demo's child processes: every sample app and sidecar is `halyard` itself, started
//! through `halyard demo --exec-child PID -- <subcommand...>`, which asks the kernel to kill it
//! when the demo dies (PR_SET_PDEATHSIG, kept across exec) and then execs the subcommand. So
//! nothing outlives the demo, even a `kill -9` of it. A clean stop sends SIGTERM (sidecars
//! drain), waits, then SIGKILLs what is left; dropping [`Children`] kills whatever still runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// One running child.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
}

/// Every child of the demo.
#[derive(Debug, Default)]
pub struct Children {
    procs: Vec<Proc>,
    logs: Option<PathBuf>,
}

impl Children {
    /// Children whose stdout and stderr go to `<logs>/<name>.log`.
    pub fn new(logs: &Path) -> Children {
        Children {
            procs: Vec::new(),
            logs: Some(logs.to_owned()),
        }
    }

    /// Starts `halyard <args...>` as child `name`; returns its pid.
    ///
    /// Must be called from the thread that lives as long as the demo: the parent-death signal
    /// fires when the thread that forked the child ends.
    pub fn spawn(&mut self, name: &str, args: &[String]) -> anyhow::Result<u32> {
        let exe = std::env::current_exe().context("locating the halyard binary")?;
        let (out, err) = self.log_files(name)?;
        let child = Command::new(exe)
            .arg("demo")
            .arg("--exec-child")
            .arg(std::process::id().to_string())
            .arg("--")
            .args(args)
            .env("HALYARD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
        });
        Ok(pid)
    }

    fn log_files(&self, name: &str) -> anyhow::Result<(Stdio, Stdio)> {
        let Some(dir) = &self.logs else {
            return Ok((Stdio::null(), Stdio::null()));
        };
        let path = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
        Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
    }

    /// Pids of the children still running.
    pub fn pids(&mut self) -> Vec<(String, u32)> {
        self.procs
            .iter_mut()
            .filter_map(|p| running(p).then(|| (p.name.clone(), p.child.id())))
            .collect()
    }

    /// Names of children that exited on their own.
    pub fn exited(&mut self) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter_map(|p| (!running(p)).then(|| p.name.clone()))
            .collect()
    }

    /// SIGKILLs child `name` (no goodbye, as a crash) and reaps it.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(p) = self.procs.iter_mut().find(|p| p.name == name) else {
            bail!("no child named {name}");
        };
        p.child.kill().with_context(|| format!("killing {name}"))?;
        p.child.wait()?;
        Ok(())
    }

    /// SIGTERM to every child, then waits up to `grace` for them, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) {
        for p in &mut self.procs {
            if matches!(p.child.try_wait(), Ok(None)) {
                signal(&p.child, Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.pids().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill_all();
    }

    fn kill_all(&mut self) {
        for p in &mut self.procs {
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn running(p: &mut Proc) -> bool {
    matches!(p.child.try_wait(), Ok(None))
}

fn signal(child: &Child, sig: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// `halyard demo --exec-child PARENT -- ARGS...`: die with the parent, then become `halyard
/// ARGS...`.
pub fn exec_child(parent: u32, args: &[String]) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return anyhow::anyhow!("PR_SET_PDEATHSIG: {e}");
    }
    // The parent may have died before the signal was armed.
    if std::os::unix::process::parent_id() != parent {
        return anyhow::anyhow!("the demo (pid {parent}) is gone");
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return anyhow::anyhow!("locating the halyard binary: {e}"),
    };
    let err = Command::new(exe).args(args).exec();
    anyhow::anyhow!("exec halyard {}: {err}", args.join(" "))
}
