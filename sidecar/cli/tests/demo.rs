//! `halyard demo` as a user runs it: the whole story in quick mode, to the end, with each step's
//! numbers showing its effect; and Ctrl-C in the middle, after which no child process is left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// One demo at a time: each is some fifteen processes, and the story's figures need the CPU.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_demo() -> (Child, mpsc::Receiver<String>) {
    spawn_demo_with(&[])
}

fn spawn_demo_with(extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args(["demo", "--quick", "--rps", "30"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Reads lines until `want` appears (returns everything read) or `limit` passes.
fn read_until(rx: &mpsc::Receiver<String>, want: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(want);
                lines.push(line);
                if found {
                    return lines;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no {want:?} within {limit:?}:\n{}", lines.join("\n"));
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `result KEY: a=1 b=0.50 c=3/4` → KEY → {a: "1", ...}.
fn results(lines: &[String]) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for line in lines {
        let Some(rest) = line.trim().strip_prefix("result ") else {
            continue;
        };
        let (key, fields) = rest.split_once(": ").unwrap();
        let map = fields
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        out.insert(key.to_owned(), map);
    }
    out
}

fn num(r: &BTreeMap<String, BTreeMap<String, String>>, step: &str, field: &str) -> f64 {
    let v = &r[step][field];
    v.parse()
        .unwrap_or_else(|_| panic!("{step}.{field} = {v:?} is not a number"))
}

// Every step's effect and the story's end are checked on one run of the demo, too costly to
// repeat: the two-cluster run, whose story is the one-cluster story and one step more.
#[test]
fn every_step_of_the_story_shows_its_effect() {
    let _one = serial();
    let (mut child, rx) = spawn_demo_with(&["--clusters", "2"]);
    let lines = read_until(&rx, "every process stopped", Duration::from_secs(240));
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let text = lines.join("\n");
    assert!(status.success(), "exit {status}:\n{text}");
    for heading in [
        "== (a) baseline",
        "== (b) canary",
        "== (c) header routing",
        "== (d) policy",
        "== (e) a reviews instance dies",
        "== (f) lossy link",
        "== (g) another cluster",
        "== summary",
    ] {
        assert!(text.contains(heading), "no {heading:?} in:\n{text}");
    }
    let r = results(&lines);
    for step in ["a", "b1", "b2", "c", "d1", "d2", "e", "f", "g"] {
        assert!(num(&r, step, "pages") >= 10.0, "{step}: {:?}", r[step]);
        assert_eq!(num(&r, step, "failed"), 0.0, "{step}: {:?}", r[step]);
    }
    assert_eq!(num(&r, "a", "v1"), 1.0, "baseline: every review from v1");
    let canary = num(&r, "b1", "v2");
    assert!((0.03..=0.2).contains(&canary), "90/10 gave v2 {canary}");
    let half = num(&r, "b2", "v2");
    assert!((0.35..=0.65).contains(&half), "50/50 gave v2 {half}");
    let (seen, asked) = r["c"]["tester_v3"].split_once('/').unwrap();
    assert!(
        asked != "0" && seen == asked,
        "tester saw v3 on {seen}/{asked}"
    );
    assert!(num(&r, "d1", "denials") > 0.0, "{:?}", r["d1"]);
    assert!(num(&r, "d1", "degraded") > 0.0, "{:?}", r["d1"]);
    assert!(num(&r, "d2", "degraded") * 10.0 <= num(&r, "d2", "pages"));
    assert_eq!(
        num(&r, "d2", "denials"),
        0.0,
        "policy removed: {:?}",
        r["d2"]
    );
    assert!(num(&r, "e", "retries") >= 1.0, "kill: {:?}", r["e"]);
    assert!(num(&r, "f", "link_drops") > 0.0, "{:?}", r["f"]);
    // (g): ratings lost in A, served by cluster B through its gateway; the pages caught in the
    // moment of the kill (a per-try timeout each) are few.
    assert!(
        num(&r, "g", "degraded") * 10.0 <= num(&r, "g", "pages"),
        "{:?}",
        r["g"]
    );
    let g = lines
        .iter()
        .find(|l| l.contains("cluster B's ratings answered"))
        .expect("step g's effect");
    let answered: f64 = g
        .split("answered ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(answered > 0.0, "{g}");
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Fields after the command name: state, ppid.
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

fn is_halyard(pid: u32) -> bool {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmd).contains("halyard")
}

#[test]
fn ctrl_c_mid_run_stops_every_child_process() {
    let _one = serial();
    let (mut child, rx) = spawn_demo();
    read_until(&rx, "== (b) canary", Duration::from_secs(120));
    let kids = children_of(child.id());
    assert!(kids.len() >= 13, "children: {kids:?}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(
        !status.success(),
        "an interrupted demo reports it: {status}"
    );
    let left: Vec<u32> = kids.into_iter().filter(|p| is_halyard(*p)).collect();
    assert!(left.is_empty(), "still running after Ctrl-C: {left:?}");
}

/// Every sidecar made its own key (0600) and holds a 24 h leaf chained to the demo's root through
/// the CA server's intermediate; the demo itself wrote only tokens and the root.
fn identities_were_enrolled(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let ids: Vec<_> = std::fs::read_dir(dir.join("id"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(ids.len(), 7, "one folder per workload: {ids:?}");
    let root = dir.join("root").join("ca.crt");
    for id in ids {
        let mode = std::fs::metadata(id.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", id.display());
        let chain = std::fs::read_to_string(id.join("cert.pem")).unwrap();
        let (leaf, rest) = chain.split_at(chain.find("-----END CERTIFICATE-----").unwrap() + 25);
        let untrusted = id.join("intermediate.pem");
        std::fs::write(&untrusted, rest.trim_start()).unwrap();
        let leaf_file = id.join("leaf.pem");
        std::fs::write(&leaf_file, leaf).unwrap();
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&root)
            .arg("-untrusted")
            .arg(&untrusted)
            .arg(&leaf_file)
            .output()
            .unwrap();
        assert!(verify.status.success(), "{}: {verify:?}", id.display());
        // Issued moments ago for 24 h: still valid in 23.5 h, expired in 25 h.
        let valid_for = |secs: u32| {
            Command::new("openssl")
                .args(["x509", "-noout", "-checkend", &secs.to_string(), "-in"])
                .arg(&leaf_file)
                .status()
                .unwrap()
                .success()
        };
        assert!(
            valid_for(23 * 3600 + 1800),
            "{}: shorter than 24 h",
            id.display()
        );
        assert!(!valid_for(25 * 3600), "{}: longer than 24 h", id.display());
    }
    let issued: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !issued.contains(&"ca".to_owned()),
        "no central identity folder: {issued:?}"
    );
}

#[test]
fn children_die_with_a_killed_demo() {
    let _one = serial();
    let (mut child, rx) = spawn_demo();
    let lines = read_until(&rx, "== (a) baseline", Duration::from_secs(120));
    // A killed demo cannot remove its work dir: the test does.
    let dir = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("work dir "))
        .and_then(|rest| rest.split(' ').next())
        .map(std::path::PathBuf::from)
        .unwrap();
    identities_were_enrolled(&dir);
    let kids = children_of(child.id());
    assert!(kids.len() >= 13, "children: {kids:?}");
    child.kill().unwrap(); // SIGKILL: the demo cleans nothing up itself.
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<u32> = kids.iter().copied().filter(|p| is_halyard(*p)).collect();
        if left.is_empty() {
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        assert!(Instant::now() < deadline, "outlived the demo: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
