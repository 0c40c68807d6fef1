//! Figures from /proc (CPU time and RSS of a process) and percentiles of samples.

use serde::Serialize;

/// Clock ticks per second of /proc/PID/stat times (USER_HZ; 100 on Linux x86-64 and arm64).
const TICKS: f64 = 100.0;

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / TICKS
}

/// Resident set size of a process in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `RssAnon:`, `RssFile:`), bytes; 0 if the
/// process is gone.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| status_field(&status, field))
        .map_or(0, |kb| kb * 1024)
}

/// The number in a `/proc/.../status` line starting with `field` (`"VmRSS:"`), without its
/// `kB` unit.
fn status_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
}

/// Voluntary context switches of a process, all its threads summed (`voluntary_ctxt_switches`
/// of each `/proc/PID/task/TID/status`): how often it went to sleep waiting for an event, so
/// the number of wake-ups; 0 if the process is gone.
pub fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| status_field(&s, "voluntary_ctxt_switches:"))
        .sum()
}

/// Summed wake-ups ([`wakeups`]) of several processes.
pub fn wakeups_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| wakeups(p)).sum()
}

/// Summed CPU seconds of several processes.
pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// Percentiles of latency samples, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// From samples in nanoseconds (sorted here).
    pub fn of(mut ns: Vec<u64>) -> Percentiles {
        ns.sort_unstable();
        let at = |q: f64| {
            if ns.is_empty() {
                return 0.0;
            }
            let i = ((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1;
            ns[i] as f64 / 1000.0
        };
        Percentiles {
            n: ns.len(),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: at(1.0),
        }
    }
}

/// The machine and versions a report was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub rustc: String,
    pub stunnel: String,
    pub halyard: String,
    pub date_utc: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: run_line("uname", &["-r"]),
            rustc: run_line("rustc", &["--version"]),
            stunnel: stunnel_version(),
            halyard: env!("CARGO_PKG_VERSION").to_owned(),
            date_utc: run_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        }
    }

    pub fn markdown(&self) -> String {
        format!(
            "Machine: {} vCPU, {}, Linux {}; {}; {}; halyard {}; measured {}.\n",
            self.nproc,
            self.cpu,
            self.kernel,
            self.rustc,
            self.stunnel,
            self.halyard,
            self.date_utc
        )
    }
}

fn run_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn stunnel_version() -> String {
    // stunnel prints its version banner on stderr.
    std::process::Command::new("stunnel4")
        .arg("-version")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            text.lines()
                .find(|l| l.contains("stunnel"))
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Writes `benches/results/NAME.md` and `NAME.json`.
pub fn write_report(name: &str, md: &str, json: &impl Serialize) -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.md")), md)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(json)? + "\n",
    )?;
    println!("{md}");
    Ok(())
}
