//! `weft-bench --only idle --quick` runs on the debug binaries and reports what it measured:
//! every figure with a value, an idle collector that wakes for its ten reads a second and
//! little else, no connection event lost, and no wake-up per event under churn (the
//! collector reads connection events on its timer).

mod common;

use std::process::{Command, Stdio};

use common::bin_dir;

fn figure<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["figures"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == name))
        .unwrap_or_else(|| panic!("no figure {name:?} in {report:#}"))
}

fn value(report: &serde_json::Value, name: &str) -> f64 {
    figure(report, name)["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("figure {name:?} has no value: {report:#}"))
}

#[test]
fn the_idle_benchmark_measures_an_idle_collector_and_connection_churn() {
    let out = tempfile::tempdir().expect("tempdir");
    let path = out.path().join("report.json");
    let run = Command::new(env!("CARGO_BIN_EXE_weft-bench"))
        .args(["--only", "idle", "--quick", "--bin-dir"])
        .arg(bin_dir())
        .arg("--out")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("running weft-bench");
    assert!(
        run.status.success(),
        "weft-bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("report")).expect("JSON");
    let idle = value(&report, "collector wake-ups per second, idle");
    // Ten reads and a tick a second, one wake-up each (about 11): 21 on tokio's timer,
    // which woke twice for a deadline over 64 ms away; 65 with the bound the reader had
    // before the doorbell; 200 reading every 5 ms.
    assert!(
        idle > 0.0 && idle < 16.0,
        "an idle collector reads on a timer, ten times a second: {idle} wake-ups a second"
    );
    assert!(value(&report, "collector CPU, idle") > 0.0);
    // 4,000 connections, four events each.
    assert!(value(&report, "connection events per second (churn)") > 0.0);
    assert_eq!(value(&report, "connection events lost"), 0.0);
    assert_eq!(figure(&report, "connection events lost")["verdict"], "met");
    // Waking for every event was about 470 per 1,000.
    let per_1k = value(&report, "collector wake-ups per 1,000 connection events");
    assert!(
        per_1k < 100.0,
        "{per_1k} wake-ups per 1,000 connection events"
    );
    assert!(value(&report, "collector CPU per 1,000 connection events") > 0.0);
}
