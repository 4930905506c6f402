//! `weft-bench` stopped by SIGTERM mid-benchmark leaves nothing behind: not its harness
//! cluster (namespaces, run directory), nor the processes in it (demo app, collector,
//! h2load), nor its own children; and each of them got a SIGTERM it could act on.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bin_dir;

const RUNS_DIR: &str = "/run/weft-harness";

/// Prefixes of the harness runs whose owner file names `pid`.
fn runs_owned_by(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(RUNS_DIR) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("owner"))
                .is_ok_and(|t| t.split_whitespace().next() == Some(&pid.to_string()))
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

fn namespaces_of(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

/// `(pid, parent, command name)` of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let parent = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        out.push((pid, parent, comm));
    }
    out
}

/// Kills the benchmark if an assertion fails before the test sends its signal.
struct Bench(std::process::Child);

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        weft_harness::cleanup_stale();
    }
}

#[test]
fn sigterm_mid_benchmark_removes_the_cluster_and_every_process() {
    assert!(
        which_h2load(),
        "h2load is needed (cargo xtask setup installs nghttp2-client)"
    );
    let out = tempfile::tempdir().expect("tempdir");
    let child = Command::new(env!("CARGO_BIN_EXE_weft-bench"))
        .args(["--only", "overhead", "--quick", "--overhead-client", "pod"])
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path().join("report.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting weft-bench");
    let mut bench = Bench(child);
    let pid = bench.0.id();

    // Until a load runs against the collector: the cluster, the demo app, the collector and
    // h2load exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (prefix, collector, h2load) = loop {
        assert!(
            bench.0.try_wait().expect("try_wait").is_none(),
            "weft-bench ended before its collector started"
        );
        let child = |name: &str| {
            let found = processes()
                .into_iter()
                .find(|(_, parent, comm)| *parent == pid as i32 && comm == name);
            found.map(|(p, _, _)| p)
        };
        if let (Some(prefix), Some(collector), Some(h2load)) = (
            runs_owned_by(pid).pop(),
            child("weft-collector"),
            child("h2load"),
        ) {
            break (prefix, collector, h2load);
        }
        assert!(
            Instant::now() < deadline,
            "no collector and load under weft-bench after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let namespaces = namespaces_of(&prefix);
    assert!(
        namespaces.iter().any(|n| n.ends_with("-pod-server")),
        "{namespaces:?}"
    );
    let children: Vec<i32> = processes()
        .into_iter()
        .filter(|(_, parent, _)| *parent == pid as i32)
        .map(|(p, _, _)| p)
        .collect();
    assert!(children.contains(&collector) && children.contains(&h2load));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = bench.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "weft-bench still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read as _;
    let _ = bench
        .0
        .stderr
        .take()
        .map(|mut e| e.read_to_string(&mut stderr));

    assert_eq!(status.code(), Some(128 + 15), "{stderr}");
    // Every child saw its SIGTERM: the collector detached by itself, none needed SIGKILL.
    assert!(!stderr.contains("did not stop"), "{stderr}");
    assert!(stderr.contains("SIGTERM: stopping"), "{stderr}");
    // Removed by the teardown, or by the cluster's drop when the benchmark failed first
    // (its load stopped): either way, gone.
    assert_eq!(namespaces_of(&prefix), Vec::<String>::new());
    assert!(!Path::new(RUNS_DIR).join(&prefix).exists());
    // Gone, not even zombies: weft-bench reaps what it stopped.
    let left: Vec<i32> = children
        .into_iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn which_h2load() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("h2load").is_file()))
}
