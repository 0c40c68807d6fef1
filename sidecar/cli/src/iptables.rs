//! `halyard iptables install|remove`: transparent capture of the app's outbound TCP, and a
//! kernel rate on QUIC Initials to the sidecar's port, in the current network namespace.
//!
//! Each part lives in a chain of its own, jumped to from the top of its built-in chain (so an
//! operator's earlier ACCEPT, such as a conntrack `ESTABLISHED` rule, cannot step around it),
//! and `install` replaces only the parts it is asked for: capture unless `--no-capture`, the
//! Initial limit with `--initial-rate`. `remove` deletes exactly those chains and their jumps
//! and leaves every other rule as it was. Capture, in the nat table:
//!
//! ```text
//! -I OUTPUT 1 -p tcp -j HALYARD_OUTPUT
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
//! The Initial limit, in the filter table: QUIC Initial packets (RFC 9000 §17.2.2: long header,
//! type 0 in QUIC version 1) to the sidecar's QUIC port past N per second per source address
//! are dropped in the kernel, before they reach the socket's receive queue. The kernel may
//! hand netfilter many datagrams of one sender as one buffer (UDP GSO from a local sender, GRO
//! on receive), which a packet rate would charge once: a buffer that starts with an Initial
//! and is longer than an Ethernet MTU's packet is such a batch (a client's Initial datagram is
//! 1,200 bytes, RFC 9000 §14.1, and never needs more than the path's MTU) and is dropped whole.
//!
//! ```text
//! -I INPUT 1 -p udp --dport QUIC -j HALYARD_INPUT
//! -A HALYARD_INPUT -m u32 --u32 "0>>22&0x3C@8>>24&0xB0=0x80" -m length --length 1501:65535 -j DROP
//! -A HALYARD_INPUT -m u32 --u32 "0>>22&0x3C@8>>24&0xB0=0x80"    first payload byte 1.00 ....
//!     -m hashlimit --hashlimit-above N/sec --hashlimit-burst B --hashlimit-mode srcip
//!     --hashlimit-name halyard_initial --hashlimit-htable-expire 2000 -j DROP
//! ```
//!
//! The sidecar's own per-source handshake rate and Retry already refuse such a flood, but only
//! once a datagram has been read from the socket: a flood of raw datagrams fills the one UDP
//! receive queue first, and the established peers' packets (short header, never matched here)
//! wait behind it. What the rule does not see: a batch whose first datagram is not an Initial
//! (u32 reads the first only), packets other than Initials, and IPv6 (the u32 expression
//! follows the IPv4 header length to the UDP payload; IPv4 only, like the capture rules). The
//! kernel's table of sources holds at most its `htable-max` entries (65,536 on a host with
//! enough memory); while a flood from that many spoofed addresses fills it, Initials from new
//! sources are dropped without being counted, until entries expire (2 s without a packet).

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

/// IP packet lengths no single Initial datagram has on an Ethernet path: a buffer of that
/// length that starts with an Initial is a GSO/GRO batch of them.
const BATCH_LENGTHS: &str = "1501:65535";

/// How long the kernel keeps a source that sends nothing, milliseconds.
const HTABLE_EXPIRE_MS: &str = "2000";

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
    /// Add the capture rules and, with --initial-rate, the Initial limit (each replacing its
    /// earlier Halyard rules; a part not asked for is left as it is).
    Install(InstallArgs),
    /// Remove exactly the rules `install` added (both parts unless one is named).
    Remove(RemoveArgs),
    /// Print the rules `install` would add, without touching anything.
    Show(InstallArgs),
}

/// Which parts `remove` deletes; neither flag: both.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoveArgs {
    /// Remove the capture rules.
    #[arg(long)]
    pub capture: bool,
    /// Remove the Initial limit.
    #[arg(long)]
    pub initial_limit: bool,
}

/// The capture port when `--capture-port` is not given.
const DEFAULT_CAPTURE_PORT: u16 = 15001;

/// What to capture, and the Initial limit.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// The sidecar's transparent listener port (REDIRECT target) [default: 15001].
    #[arg(long)]
    pub capture_port: Option<u16>,
    /// A user id whose traffic is never captured (run the sidecar as this user).
    #[arg(long)]
    pub exclude_uid: Vec<u32>,
    /// Destination ports never captured, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// Leave the capture rules as they are (installed or not): install only the Initial limit.
    #[arg(long)]
    pub no_capture: bool,
    /// Drop QUIC Initial packets to --quic-port past this many per second per source IPv4
    /// address, in the kernel (1-100000; none by default; IPv6 is not covered).
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
        if self.initial_rate.is_none() && self.initial_burst.is_some() {
            bail!("--initial-burst needs --initial-rate");
        }
        if self.no_capture {
            if self.initial_rate.is_none() {
                bail!("--no-capture without --initial-rate installs nothing");
            }
            if self.capture_port.is_some() {
                bail!("--capture-port has no effect with --no-capture");
            }
            if !self.exclude_uid.is_empty() {
                bail!("--exclude-uid has no effect with --no-capture");
            }
            if !self.exclude_ports.is_empty() {
                bail!("--exclude-ports has no effect with --no-capture");
            }
        } else if self.capture_port == Some(0) {
            bail!("--capture-port must be 1-65535");
        }
        if let Some(r) = self.initial_rate {
            if r == 0 || r > MAX_INITIAL_RATE {
                bail!("--initial-rate must be 1-{MAX_INITIAL_RATE} Initials per second, not {r}");
            }
            if self.quic_port == 0 {
                bail!("--quic-port must be 1-65535");
            }
        }
        if let Some(b) = self.initial_burst {
            if b == 0 || b > MAX_INITIAL_BURST {
                bail!("--initial-burst must be 1-{MAX_INITIAL_BURST}, not {b}");
            }
        }
        Ok(())
    }

    /// The REDIRECT target.
    fn capture_port(&self) -> u16 {
        self.capture_port.unwrap_or(DEFAULT_CAPTURE_PORT)
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
    // `-A HALYARD_INPUT -m u32 --u32 <an Initial> <matches> -j DROP`.
    let drop_initials = |matches: &[&str]| {
        let mut rule = s(&["-A", INPUT_CHAIN, "-m", "u32", "--u32", QUIC_INITIAL_U32]);
        rule.extend(s(matches));
        rule.extend(s(&["-j", "DROP"]));
        rule
    };
    vec![
        drop_initials(&["-m", "length", "--length", BATCH_LENGTHS]),
        drop_initials(&[
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
            "--hashlimit-htable-expire",
            HTABLE_EXPIRE_MS,
        ]),
        s(&[
            "-I",
            "INPUT",
            "1",
            "-p",
            "udp",
            "--dport",
            &args.quic_port.to_string(),
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
    let capture = args.capture_port().to_string();
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
    out.push(s(&["-I", "OUTPUT", "1", "-p", "tcp", "-j", CHAIN]));
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

/// Runs `iptables -t table args` that must succeed; its standard output.
fn run(table: &str, args: &[String]) -> anyhow::Result<String> {
    let out = iptables(table, args)?;
    if !out.status.success() {
        bail!(
            "iptables -t {table} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes every jump from `from` to `chain` (whatever its match or comment) and the chain
/// itself; whether there was anything to delete. Jumps are found by their target in the
/// numbered listing and deleted by number, highest first.
fn remove_chain(table: &str, from: &str, chain: &str) -> anyhow::Result<bool> {
    if !iptables(table, &s(&["-S", chain]))?.status.success() {
        return Ok(false);
    }
    let listed = run(table, &s(&["-L", from, "-n", "--line-numbers"]))?;
    // Listed in ascending order; deleted from the last so the numbers before stay valid.
    let jumps: Vec<u32> = listed
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let num = cols.next()?.parse().ok()?;
            (cols.next()? == chain).then_some(num)
        })
        .collect();
    for num in jumps.iter().rev() {
        run(table, &s(&["-D", from, &num.to_string()]))?;
    }
    run(table, &s(&["-F", chain]))?;
    run(table, &s(&["-X", chain]))?;
    Ok(true)
}

/// The two parts `install` and `remove` manage, each a chain of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Capture,
    InitialLimit,
}

impl Part {
    fn table(self) -> &'static str {
        match self {
            Part::Capture => "nat",
            Part::InitialLimit => "filter",
        }
    }

    fn from(self) -> &'static str {
        match self {
            Part::Capture => "OUTPUT",
            Part::InitialLimit => "INPUT",
        }
    }

    fn chain(self) -> &'static str {
        match self {
            Part::Capture => CHAIN,
            Part::InitialLimit => INPUT_CHAIN,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Part::Capture => "capture",
            Part::InitialLimit => "Initial limit",
        }
    }

    /// Removes this part; whether it was there.
    fn remove(self) -> anyhow::Result<bool> {
        remove_chain(self.table(), self.from(), self.chain())
    }

    /// Replaces this part with `rules`; on failure its partial rules are removed again and
    /// the error says so.
    fn install(self, rules: &[Vec<String>]) -> anyhow::Result<()> {
        self.remove()?;
        let done = std::iter::once(&s(&["-N", self.chain()]))
            .chain(rules)
            .try_for_each(|r| run(self.table(), r).map(drop));
        if let Err(e) = done {
            let _ = self.remove();
            return Err(e.context(format!("the {} is not installed", self.name())));
        }
        Ok(())
    }
}

/// Removes the parts named in `args` (both when none is); the parts that were there.
fn remove(args: &RemoveArgs) -> anyhow::Result<Vec<Part>> {
    let both = !args.capture && !args.initial_limit;
    let mut removed = Vec::new();
    for (part, asked) in [
        (Part::Capture, args.capture),
        (Part::InitialLimit, args.initial_limit),
    ] {
        if (both || asked) && part.remove()? {
            removed.push(part);
        }
    }
    Ok(removed)
}

/// Installs the parts `args` asks for, each replacing its earlier rules and leaving the other
/// part as it is. A part that fails leaves none of its rules; a part installed before it stays
/// (the error says which).
pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    args.validate()?;
    let mut installed = Vec::new();
    for (part, rules) in [
        (Part::Capture, rules(args)),
        (Part::InitialLimit, input_rules(args)),
    ] {
        if rules.is_empty() {
            continue;
        }
        if let Err(e) = part.install(&rules) {
            return Err(match installed.as_slice() {
                [] => e,
                done => e.context(format!(
                    "{} installed",
                    done.iter()
                        .map(|p: &Part| p.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            });
        }
        installed.push(part);
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
                    a.capture_port()
                );
            }
            if let Some(rate) = a.initial_rate {
                println!(
                    "Initial limit installed: QUIC Initials to UDP port {} past {rate}/s (burst {}) per source IPv4 address dropped",
                    a.quic_port,
                    a.burst(rate)
                );
            }
        }
        IptablesCommand::Remove(a) => {
            let removed = remove(&a)?;
            if removed.is_empty() {
                println!("nothing to remove");
            }
            for part in removed {
                println!("{} removed", part.name());
            }
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
        assert_eq!(input.len(), 3);
        // A batch of Initials in one buffer (GSO/GRO), longer than one datagram can be.
        let batch = input[0].join(" ");
        assert!(
            batch.contains("-m length --length 1501:65535 -j DROP"),
            "{batch}"
        );
        let packets = input[1].join(" ");
        assert!(packets.starts_with("-A HALYARD_INPUT -m u32"), "{packets}");
        assert!(packets.contains("--hashlimit-above 64/sec --hashlimit-burst 128"));
        assert!(packets.contains("--hashlimit-mode srcip"), "{packets}");
        assert!(packets.ends_with("-j DROP"), "{packets}");
        // The jump goes first in INPUT: an earlier ACCEPT must not step around it.
        assert_eq!(
            input[2].join(" "),
            "-I INPUT 1 -p udp --dport 4433 -j HALYARD_INPUT"
        );
        // Capture too, unless --no-capture; its jump first in OUTPUT.
        let capture = rules(&a);
        assert_eq!(
            capture.last().unwrap().join(" "),
            "-I OUTPUT 1 -p tcp -j HALYARD_OUTPUT"
        );
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
            (
                &["--no-capture", "--initial-burst", "5"][..],
                "--initial-burst needs --initial-rate",
            ),
            (&["--no-capture"][..], "installs nothing"),
            (&["--capture-port", "0"][..], "--capture-port"),
            (
                &["--initial-rate", "5", "--quic-port", "0"][..],
                "--quic-port",
            ),
            (
                &[
                    "--no-capture",
                    "--initial-rate",
                    "5",
                    "--exclude-uid",
                    "1337",
                ][..],
                "--exclude-uid has no effect",
            ),
            (
                &[
                    "--no-capture",
                    "--initial-rate",
                    "5",
                    "--exclude-ports",
                    "22",
                ][..],
                "--exclude-ports has no effect",
            ),
            (
                &[
                    "--no-capture",
                    "--initial-rate",
                    "5",
                    "--capture-port",
                    "15001",
                ][..],
                "--capture-port has no effect",
            ),
        ] {
            let e = args(given).validate().unwrap_err().to_string();
            assert!(e.contains(named), "{given:?}: {e}");
        }
    }
}
