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
//!
//! With `--initial-rate N`, a second chain in the filter table, `HALYARD_INPUT`, drops QUIC
//! Initial packets (RFC 9000 §17.2.2: long header, type 0 in QUIC version 1) to the sidecar's
//! QUIC port past N per second per source address, in the kernel, before they reach the
//! socket's receive queue:
//!
//! ```text
//! -A INPUT -p udp --dport QUIC -j HALYARD_INPUT
//! -A HALYARD_INPUT -m u32 --u32 "0>>22&0x3C@8>>24&0xB0=0x80"    first payload byte 1.00 ....
//!     -m hashlimit --hashlimit-above N/sec --hashlimit-burst B --hashlimit-mode srcip
//!     --hashlimit-name halyard_initial -j DROP
//! ```
//!
//! The sidecar's own per-source handshake rate and Retry already refuse such a flood, but only
//! once a datagram has been read from the socket: a flood of raw datagrams fills the one UDP
//! receive queue first, and the established peers' packets (short header, never matched here)
//! wait behind it. The u32 expression follows the IPv4 header length to the UDP payload; IPv4
//! only, like the capture rules.

use std::process::Command;

use anyhow::{bail, Context};

/// The chain holding every capture rule (nat table).
pub const CHAIN: &str = "HALYARD_OUTPUT";

/// The chain holding the QUIC Initial rate limit (filter table).
pub const INPUT_CHAIN: &str = "HALYARD_INPUT";

/// The kernel's name for the per-source table of the Initial limit
/// (`/proc/net/ipt_hashlimit/halyard_initial`; at most 15 bytes).
const HASHLIMIT_NAME: &str = "halyard_initial";

/// Matches a UDP datagram to the QUIC port whose first payload byte has the long-header bit set
/// and packet type 0 (Initial): `first & 0xB0 == 0x80` (RFC 9000 §17.2, §17.2.2).
const QUIC_INITIAL_U32: &str = "0>>22&0x3C@8>>24&0xB0=0x80";

/// Most Initials per second per source the rule accepts as `--initial-rate`.
const MAX_INITIAL_RATE: u32 = 100_000;

/// Largest `--initial-burst` (the kernel's hashlimit caps bursts at 10,000).
const MAX_INITIAL_BURST: u32 = 10_000;

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
    /// Install no capture rules (only the Initial limit below).
    #[arg(long)]
    pub no_capture: bool,
    /// Drop QUIC Initial packets past this many per second per source address, in the kernel
    /// (1-100000; none by default).
    #[arg(long)]
    pub initial_rate: Option<u32>,
    /// How many Initials a source may send at once before the rate applies (1-10000; default
    /// twice the rate, at most 10000).
    #[arg(long)]
    pub initial_burst: Option<u32>,
    /// The sidecar's QUIC port the Initial limit guards (`transport.listen`'s port).
    #[arg(long, default_value_t = 15443)]
    pub quic_port: u16,
}

impl InstallArgs {
    /// Checks the arguments together; the error names the flag at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.no_capture && self.capture_port == 0 {
            bail!("--capture-port must be 1-65535");
        }
        if self.no_capture && self.initial_rate.is_none() {
            bail!("--no-capture without --initial-rate installs nothing");
        }
        match (self.initial_rate, self.initial_burst) {
            (Some(r), _) if r == 0 || r > MAX_INITIAL_RATE => {
                bail!("--initial-rate must be 1-{MAX_INITIAL_RATE} Initials per second, not {r}")
            }
            (_, Some(b)) if b == 0 || b > MAX_INITIAL_BURST => {
                bail!("--initial-burst must be 1-{MAX_INITIAL_BURST}, not {b}")
            }
            (None, Some(_)) => bail!("--initial-burst needs --initial-rate"),
            _ => {}
        }
        if self.initial_rate.is_some() && self.quic_port == 0 {
            bail!("--quic-port must be 1-65535");
        }
        Ok(())
    }

    /// The burst the Initial limit uses: as given, or twice the rate (at most 10,000).
    fn burst(&self, rate: u32) -> u32 {
        self.initial_burst
            .unwrap_or_else(|| rate.saturating_mul(2).min(MAX_INITIAL_BURST))
    }
}

/// The filter-table `iptables` argument lists of the Initial limit, in order (after
/// [`INPUT_CHAIN`] exists); none without `--initial-rate`.
pub fn input_rules(args: &InstallArgs) -> Vec<Vec<String>> {
    let Some(rate) = args.initial_rate else {
        return Vec::new();
    };
    let port = args.quic_port.to_string();
    vec![
        s(&[
            "-A",
            INPUT_CHAIN,
            "-m",
            "u32",
            "--u32",
            QUIC_INITIAL_U32,
            "-m",
            "hashlimit",
            "--hashlimit-above",
            &format!("{rate}/sec"),
            "--hashlimit-burst",
            &args.burst(rate).to_string(),
            "--hashlimit-mode",
            "srcip",
            "--hashlimit-name",
            HASHLIMIT_NAME,
            "-j",
            "DROP",
        ]),
        s(&[
            "-A",
            "INPUT",
            "-p",
            "udp",
            "--dport",
            &port,
            "-j",
            INPUT_CHAIN,
        ]),
    ]
}

/// The nat-table `iptables` argument lists `install` runs, in order (after [`CHAIN`] exists);
/// none with `--no-capture`.
pub fn rules(args: &InstallArgs) -> Vec<Vec<String>> {
    if args.no_capture {
        return Vec::new();
    }
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

fn iptables(table: &str, args: &[String]) -> anyhow::Result<std::process::Output> {
    Command::new("iptables")
        .arg("-w")
        .args(["-t", table])
        .args(args)
        .output()
        .context("running iptables (is the iptables package installed?)")
}

fn run(table: &str, args: &[String]) -> anyhow::Result<()> {
    let out = iptables(table, args)?;
    if !out.status.success() {
        bail!(
            "iptables -t {table} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes every jump from `from` to `chain` (whatever its match) and the chain itself.
fn remove_chain(table: &str, from: &str, chain: &str) -> anyhow::Result<()> {
    if !iptables(table, &s(&["-S", chain]))?.status.success() {
        return Ok(());
    }
    let listed = iptables(table, &s(&["-S", from]))?;
    let jump = format!("-j {chain}");
    for rule in String::from_utf8_lossy(&listed.stdout).lines() {
        if let Some(spec) = rule.strip_prefix(&format!("-A {from} ")) {
            if spec.ends_with(&jump) {
                let mut args = s(&["-D", from]);
                args.extend(spec.split_whitespace().map(str::to_owned));
                run(table, &args)?;
            }
        }
    }
    run(table, &s(&["-F", chain]))?;
    run(table, &s(&["-X", chain]))
}

/// Removes the jumps and both chains; absent rules are not an error.
pub fn remove() -> anyhow::Result<()> {
    remove_chain("nat", "OUTPUT", CHAIN)?;
    remove_chain("filter", "INPUT", INPUT_CHAIN)
}

/// Installs the rules; on any failure the partial rules are removed again.
pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    args.validate()?;
    remove()?;
    let plan = [
        ("nat", CHAIN, rules(args)),
        ("filter", INPUT_CHAIN, input_rules(args)),
    ];
    for (table, chain, rules) in plan {
        if rules.is_empty() {
            continue;
        }
        let done = run(table, &s(&["-N", chain]))
            .and_then(|()| rules.iter().try_for_each(|rule| run(table, rule)));
        if let Err(e) = done {
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
            if !a.no_capture {
                println!(
                    "capture installed: outbound TCP -> 127.0.0.1:{}",
                    a.capture_port
                );
            }
            if let Some(rate) = a.initial_rate {
                println!(
                    "Initial limit installed: QUIC Initials to UDP port {} past {rate}/s (burst {}) per source dropped",
                    a.quic_port,
                    a.burst(rate)
                );
            }
        }
        IptablesCommand::Remove => {
            remove()?;
            println!("capture removed");
        }
        IptablesCommand::Show(a) => {
            a.validate()?;
            let capture = rules(&a);
            if !capture.is_empty() {
                println!("iptables -t nat -N {CHAIN}");
            }
            for r in capture {
                println!("iptables -t nat {}", r.join(" "));
            }
            let input = input_rules(&a);
            if !input.is_empty() {
                println!("iptables -t filter -N {INPUT_CHAIN}");
            }
            for r in input {
                let quoted: Vec<String> = r
                    .iter()
                    .map(|a| {
                        if a.contains(['>', '&', '@']) {
                            format!("\"{a}\"")
                        } else {
                            a.clone()
                        }
                    })
                    .collect();
                println!("iptables -t filter {}", quoted.join(" "));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> InstallArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: InstallArgs,
        }
        let mut all = vec!["t"];
        all.extend_from_slice(extra);
        T::try_parse_from(all).unwrap().a
    }

    #[test]
    fn the_initial_limit_is_one_chain_of_its_own_in_the_filter_table() {
        let a = args(&["--initial-rate", "64", "--quic-port", "4433"]);
        a.validate().unwrap();
        let input = input_rules(&a);
        assert_eq!(input.len(), 2);
        let drop = input[0].join(" ");
        assert!(drop.starts_with("-A HALYARD_INPUT -m u32"), "{drop}");
        assert!(drop.contains("--hashlimit-above 64/sec --hashlimit-burst 128"));
        assert!(drop.contains("--hashlimit-mode srcip"), "{drop}");
        assert!(drop.ends_with("-j DROP"), "{drop}");
        assert_eq!(
            input[1].join(" "),
            "-A INPUT -p udp --dport 4433 -j HALYARD_INPUT"
        );
        // Capture is still there unless --no-capture.
        assert!(!rules(&a).is_empty());
        let only = args(&["--no-capture", "--initial-rate", "10"]);
        only.validate().unwrap();
        assert!(rules(&only).is_empty());
        assert!(input_rules(&args(&[])).is_empty());
        assert_eq!(only.burst(10), 20);
        assert_eq!(args(&["--initial-rate", "9000"]).burst(9000), 10_000);
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        for (given, named) in [
            (&["--initial-rate", "0"][..], "--initial-rate"),
            (&["--initial-rate", "100001"][..], "--initial-rate"),
            (
                &["--initial-rate", "5", "--initial-burst", "0"][..],
                "--initial-burst",
            ),
            (
                &["--initial-rate", "5", "--initial-burst", "10001"][..],
                "--initial-burst",
            ),
            (
                &["--initial-burst", "5"][..],
                "--initial-burst needs --initial-rate",
            ),
            (&["--no-capture"][..], "installs nothing"),
            (&["--capture-port", "0"][..], "--capture-port"),
            (
                &["--initial-rate", "5", "--quic-port", "0"][..],
                "--quic-port",
            ),
        ] {
            let e = args(given).validate().unwrap_err().to_string();
            assert!(e.contains(named), "{given:?}: {e}");
        }
    }
}
