//! `halyard iptables install|remove`: transparent capture of the app's outbound TCP in the
//! current network namespace.
//!
//! All rules live in one chain of the nat table, `HALYARD_OUTPUT`, jumped to from `OUTPUT`, so
//! `remove` deletes exactly what `install` added and leaves every other rule as it was:
//!
//! ```text
//! -A OUTPUT -p tcp -j HALYARD_OUTPUT
//! -A HALYARD_OUTPUT -o lo -j RETURN                          loopback: the sidecar's own hops
//! -A HALYARD_OUTPUT -d 127.0.0.0/8 -j RETURN
//! -A HALYARD_OUTPUT -m owner --uid-owner UID -j RETURN       per --exclude-uid (the sidecar)
//! -A HALYARD_OUTPUT -p tcp --dport P -j RETURN               per --exclude-ports
//! -A HALYARD_OUTPUT -p tcp -j REDIRECT --to-ports CAPTURE
//! ```
//!
//! A virtual IP (a Service's `vip`) is routed out of a real interface, so REDIRECT catches it;
//! the sidecar's QUIC is UDP and never matches.

use std::process::Command;

use anyhow::{bail, Context};

/// The chain holding every capture rule.
pub const CHAIN: &str = "HALYARD_OUTPUT";

/// Arguments of `halyard iptables`.
#[derive(Debug, clap::Args)]
pub struct IptablesArgs {
    #[command(subcommand)]
    command: IptablesCommand,
}

#[derive(Debug, clap::Subcommand)]
enum IptablesCommand {
    /// Add the capture rules (replacing any earlier Halyard rules).
    Install(InstallArgs),
    /// Remove exactly the rules `install` added.
    Remove,
    /// Print the rules `install` would add, without touching anything.
    Show(InstallArgs),
}

/// What to capture.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// The sidecar's transparent listener port (REDIRECT target).
    #[arg(long, default_value_t = 15001)]
    pub capture_port: u16,
    /// A user id whose traffic is never captured (run the sidecar as this user).
    #[arg(long)]
    pub exclude_uid: Vec<u32>,
    /// Destination ports never captured, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
}

/// The `iptables` argument lists `install` runs, in order (after the chain exists).
pub fn rules(args: &InstallArgs) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = vec![
        s(&["-A", CHAIN, "-o", "lo", "-j", "RETURN"]),
        s(&["-A", CHAIN, "-d", "127.0.0.0/8", "-j", "RETURN"]),
    ];
    for uid in &args.exclude_uid {
        out.push(s(&[
            "-A",
            CHAIN,
            "-m",
            "owner",
            "--uid-owner",
            &uid.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    for port in &args.exclude_ports {
        out.push(s(&[
            "-A",
            CHAIN,
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    let capture = args.capture_port.to_string();
    out.push(s(&[
        "-A",
        CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &capture,
    ]));
    out.push(s(&["-A", "OUTPUT", "-p", "tcp", "-j", CHAIN]));
    out
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| (*p).to_owned()).collect()
}

fn iptables(args: &[String]) -> anyhow::Result<std::process::Output> {
    Command::new("iptables")
        .arg("-w")
        .args(["-t", "nat"])
        .args(args)
        .output()
        .context("running iptables (is the iptables package installed?)")
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let out = iptables(args)?;
    if !out.status.success() {
        bail!(
            "iptables -t nat {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes the jump and the chain; absent rules are not an error.
pub fn remove() -> anyhow::Result<()> {
    let jump = s(&["-D", "OUTPUT", "-p", "tcp", "-j", CHAIN]);
    while iptables(&jump)?.status.success() {}
    if iptables(&s(&["-S", CHAIN]))?.status.success() {
        run(&s(&["-F", CHAIN]))?;
        run(&s(&["-X", CHAIN]))?;
    }
    Ok(())
}

/// Installs the capture rules; on any failure the partial rules are removed again.
pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    if args.capture_port == 0 {
        bail!("--capture-port must be 1-65535");
    }
    remove()?;
    run(&s(&["-N", CHAIN]))?;
    for rule in rules(args) {
        if let Err(e) = run(&rule) {
            let _ = remove();
            return Err(e);
        }
    }
    Ok(())
}

/// Runs `halyard iptables`.
pub fn cli(args: IptablesArgs) -> anyhow::Result<()> {
    match args.command {
        IptablesCommand::Install(a) => {
            install(&a)?;
            println!(
                "capture installed: outbound TCP -> 127.0.0.1:{}",
                a.capture_port
            );
        }
        IptablesCommand::Remove => {
            remove()?;
            println!("capture removed");
        }
        IptablesCommand::Show(a) => {
            println!("iptables -t nat -N {CHAIN}");
            for r in rules(&a) {
                println!("iptables -t nat {}", r.join(" "));
            }
        }
    }
    Ok(())
}
