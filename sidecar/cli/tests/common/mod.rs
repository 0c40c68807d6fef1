//! Network namespaces for the tests that need them (root only; CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::process::Command;

/// A network namespace that exists while this value lives.
pub struct NetNs(pub String);

impl NetNs {
    /// A new namespace named `<prefix>-<random>`.
    pub fn named(prefix: &str) -> NetNs {
        let name = format!(
            "{prefix}-{}",
            halyard_sidecar::test_util::rand_suffix() % 100_000
        );
        run(&["ip", "netns", "add", &name]);
        NetNs(name)
    }

    /// Runs a command inside; its stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Moves the calling thread into the namespace: every socket it opens from now on lives there.
    pub fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    }

    /// Enters and leaves the namespace to its owner (the thread stays inside).
    pub fn enter_and_forget(self) {
        self.enter();
        std::mem::forget(self);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs a command that must succeed; its stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether this process is root and has every tool in `tools`; says why not.
pub fn can_run(tools: &[&str], what: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let have = tools.iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !(root && have) {
        eprintln!("SKIPPED: {what} needs root and {tools:?} (make deps; CI runs as root)");
    }
    root && have
}
