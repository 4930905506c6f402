//! `cargo xtask pgo`: the collector's profile-guided release build.
//!
//! The collector shares every node's CPUs with the pods it traces, so its CPU per request is
//! Weft's cost. A build optimised with a profile of its own run used a third to two fifths
//! less CPU per request than the plain release build (README, "Load and benchmarks"). Only the
//! collector is built this way.
//!
//! 1. An instrumented collector (`-Cprofile-generate`) in `target/pgo/gen`.
//! 2. `weft-bench --train-collector` runs it through varied traffic in a harness cluster
//!    (needs root, like every harness run) and stops it; it writes `target/pgo/raw/`.
//! 3. `llvm-profdata-22 merge` makes `collector/pgo/weft-collector.profdata` (the profile
//!    tool must read what rustc's LLVM, 22, wrote), where `collector/Dockerfile` takes it
//!    from (not in git: it belongs to the sources it was made from). Beside it,
//!    `weft-collector.sources` holds those sources' fingerprint (`collector/pgo-sources.sh`,
//!    taken before the first build), which the Dockerfile checks.
//! 4. The optimised collector (`-Cprofile-use`) in `target/pgo/use`, and `target/pgo/bin/`:
//!    it beside links to the other binaries, for `weft-bench --bin-dir`.
//!
//! Nothing is kept between runs: every step starts from what the sources give.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, root, run, setup};

const COLLECTOR: &str = "weft-collector";
const PROFDATA_TOOL: &str = "llvm-profdata-22";
/// Where the merged profile goes, relative to the root (collector/Dockerfile reads it).
pub const PROFILE: &str = "collector/pgo/weft-collector.profdata";
/// The fingerprint of the sources the profile was made from, relative to the root.
pub const SOURCES: &str = "collector/pgo/weft-collector.sources";
/// Prints the fingerprint of the collector's sources (collector/Dockerfile runs it too).
pub const FINGERPRINT: &str = "collector/pgo-sources.sh";

/// Builds the profile-guided collector. `tools` holds weft-bench, weft-demo-app and
/// weft-stitcher for the training run (`target/release` or `target/debug`). Returns
/// `target/pgo/bin`: the optimised collector and links to every other `weft-*` of `tools`.
pub fn build(tools: &Path) -> Result<PathBuf, String> {
    let rustc = setup::output(Command::new("rustc").arg("-vV")).ok_or("`rustc -vV` failed")?;
    check_llvm(&rustc)?;
    // Before the first build: the sources the profile is made from.
    let sources = fingerprint()?;
    let dir = root().join("target/pgo");
    let raw = dir.join("raw");
    // A profile left by another build of the collector would merge stale counts.
    let _ = fs::remove_dir_all(&raw);
    let host = host_triple(&rustc)?;
    let generate = format!("-Cprofile-generate={}", raw.display());
    let gen_bin = build_collector(&dir.join("gen"), &host, &generate)?;

    let train_bin = bin_dir(&dir.join("train-bin"), tools, &gen_bin)?;
    let mut train = Command::new(tools.join("weft-bench"));
    train
        .arg("--train-collector")
        .arg("--bin-dir")
        .arg(&train_bin)
        .arg("--out")
        .arg(dir.join("train/report.json"))
        .env("PATH", setup::tool_path());
    run(&mut train)?;

    let profile = root().join(PROFILE);
    if let Some(parent) = profile.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    run(Command::new(PROFDATA_TOOL)
        .arg("merge")
        .arg("-o")
        .arg(&profile)
        .arg(&raw))?;
    check_profile(&profile)?;
    let sources_file = root().join(SOURCES);
    fs::write(&sources_file, format!("{sources}\n"))
        .map_err(|e| format!("writing {}: {e}", sources_file.display()))?;
    let use_flag = format!("-Cprofile-use={}", profile.display());
    let pgo_bin = build_collector(&dir.join("use"), &host, &use_flag)?;
    let out = bin_dir(&dir.join("bin"), tools, &pgo_bin)?;
    eprintln!(
        "xtask: profile-guided collector: {} (profile {})",
        pgo_bin.display(),
        profile.display()
    );
    Ok(out)
}

/// The fingerprint of the collector's sources in this checkout ([`FINGERPRINT`]).
fn fingerprint() -> Result<String, String> {
    let out = setup::output(Command::new("sh").arg(root().join(FINGERPRINT)).arg(root()))
        .ok_or_else(|| format!("{FINGERPRINT} failed"))?;
    let hash = out.trim();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{FINGERPRINT} printed {hash:?}, not a SHA-256"));
    }
    Ok(hash.to_owned())
}

/// A release build of the collector alone with `flag` added to RUSTFLAGS. `--target` keeps
/// the flag off build scripts (and so off the kernel programs' nested build).
fn build_collector(target_dir: &Path, host: &str, flag: &str) -> Result<PathBuf, String> {
    let rustflags = match std::env::var("RUSTFLAGS") {
        Ok(existing) if !existing.trim().is_empty() => format!("{existing} {flag}"),
        _ => flag.to_owned(),
    };
    run(cargo()
        .args(["build", "--release", "--locked", "-p", COLLECTOR])
        .args(["--bin", COLLECTOR, "--target", host])
        .arg("--target-dir")
        .arg(target_dir)
        .env("RUSTFLAGS", rustflags))?;
    Ok(target_dir.join(host).join("release").join(COLLECTOR))
}

/// `dir` made afresh: `collector` as weft-collector, and links to every other `weft-*`
/// binary of `tools`.
fn bin_dir(dir: &Path, tools: &Path, collector: &Path) -> Result<PathBuf, String> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let entries = fs::read_dir(tools).map_err(|e| format!("reading {}: {e}", tools.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if name.starts_with("weft-") && name != COLLECTOR && !name.contains('.') && is_file {
            link(&entry.path(), &dir.join(&*name))?;
        }
    }
    link(collector, &dir.join(COLLECTOR))?;
    Ok(dir.to_path_buf())
}

fn link(from: &Path, to: &Path) -> Result<(), String> {
    symlink(from, to).map_err(|e| format!("linking {} to {}: {e}", to.display(), from.display()))
}

/// The host triple from `rustc -vV`'s output.
fn host_triple(vv: &str) -> Result<String, String> {
    vv.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "`rustc -vV` names no host".into())
}

/// The profile tool must be the LLVM that rustc uses (`vv`: `rustc -vV`'s output), or it
/// cannot read the profile.
fn check_llvm(vv: &str) -> Result<(), String> {
    if !vv.contains("LLVM version: 22.") {
        return Err(format!(
            "rustc's LLVM is not 22 ({}): {PROFDATA_TOOL} cannot read its profiles",
            vv.lines()
                .find(|l| l.starts_with("LLVM"))
                .unwrap_or("unknown")
        ));
    }
    if setup::output(Command::new(PROFDATA_TOOL).arg("--version")).is_none() {
        return Err(format!(
            "{PROFDATA_TOOL} not found (Debian package llvm-22; `cargo xtask setup` installs it)"
        ));
    }
    Ok(())
}

/// The merged profile must hold counts for the collector's own code, else the training
/// did not run what it should have.
fn check_profile(profile: &Path) -> Result<(), String> {
    let show = setup::output(
        Command::new(PROFDATA_TOOL)
            .args(["show", "--function=on_captured"])
            .arg(profile),
    )
    .ok_or_else(|| format!("`{PROFDATA_TOOL} show` failed on {}", profile.display()))?;
    let counted = show
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maximum function count: "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if counted == 0 {
        return Err(format!(
            "{} has no counts for the collector's data path (Pipeline::on_captured): the training captured nothing",
            profile.display()
        ));
    }
    eprintln!("xtask: profile: Pipeline::on_captured ran {counted} times in training");
    Ok(())
}
