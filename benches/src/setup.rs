//! What the bench needs from the machine: root, stunnel4 (installed from the Debian package when
//! missing and running as root), and a high open-file limit for the scale scenario.

use std::process::Command;

use anyhow::bail;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The stunnel binary name (Debian ships `stunnel4`, with `stunnel` as an alternative).
pub fn stunnel_bin() -> &'static str {
    if which("stunnel4") {
        "stunnel4"
    } else {
        "stunnel"
    }
}

fn which(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes sure stunnel is installed: `apt-get install stunnel4` when missing and root.
pub fn check_stunnel() -> anyhow::Result<()> {
    if which("stunnel4") || which("stunnel") {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("stunnel4 missing: run `sudo apt-get install -y stunnel4` (or `make deps`)");
    }
    eprintln!("bench: installing stunnel4");
    let ok = Command::new("sh")
        .args([
            "-c",
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends stunnel4",
        ])
        .status()?
        .success();
    if !ok {
        bail!("apt-get install stunnel4 failed");
    }
    Ok(())
}

/// Network namespaces need root.
pub fn check_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the bench creates network namespaces: run it as root");
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE (soft and, as root, hard) (children inherit it); returns the new soft limit.
pub fn raise_nofile() -> anyhow::Result<u64> {
    // Root may raise the hard limit too (up to fs.nr_open); 10,000 flows need ~4 fds each
    // across the bench's client and server apps.
    let want = 1 << 20;
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}
