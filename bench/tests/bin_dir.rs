//! `weft-bench --bin-dir` names a directory of binaries; one the chosen benchmark needs
//! but that is missing stops it before it starts anything, with the missing binary named
//! (the overhead benchmark's shipping run, which needs `weft-stitcher`, comes last).

mod common;

use std::process::{Command, Stdio};

use common::bin_dir;

#[test]
fn overhead_without_a_stitcher_in_bin_dir_fails_before_starting_a_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    for bin in ["weft-collector", "weft-demo-app"] {
        std::os::unix::fs::symlink(bin_dir().join(bin), dir.path().join(bin)).expect("symlink");
    }
    let run = Command::new(env!("CARGO_BIN_EXE_weft-bench"))
        .args(["--only", "overhead", "--overhead-rounds", "1", "--bin-dir"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("report.json"))
        .stdin(Stdio::null())
        .output()
        .expect("running weft-bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "weft-bench succeeded: {stderr}");
    assert!(
        stderr.contains("weft-stitcher not found"),
        "the missing binary is named: {stderr}"
    );
    assert!(
        !stderr.contains("cluster"),
        "nothing was started before the check: {stderr}"
    );
}
