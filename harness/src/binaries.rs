//! Where a test finds another package's binary of this workspace.
//!
//! In: a binary's name (`weft-collector`). Out: the path of that binary as the workspace build
//! left it, next to the calling test executable.
//!
//! Cargo exposes `CARGO_BIN_EXE_<name>` only to the tests of the binary's own package, and a
//! test that runs `cargo build -p <other>` builds that package with other feature unification
//! than the workspace build: the collector (and its eBPF object) would be rebuilt once per
//! such test. `cargo xtask test` runs `cargo build --all-targets` before `cargo nextest run`,
//! so every binary is already in `<target>/<profile>/`; [`path`] takes it from there and
//! calls cargo only when it is missing or older than a source file it was built from (someone
//! running one test alone after an edit), so a stale binary is never picked silently.
//!
//! Order: `WEFT_<NAME>_BIN` (e.g. `WEFT_COLLECTOR_BIN`) if set; else
//! `<target>/<profile>/<name>` if up to date; else `cargo build --bin <name>` (the workspace's
//! default members, the same profile and target directory), then that path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

/// The path of the workspace binary `name`, built first if missing or stale (see the module
/// docs). Cargo's build lock serialises concurrent callers.
pub fn path(name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var(name)) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("test executable path")?;
    let layout = Layout::of_test_exe(&exe)?;
    let bin = layout.profile_dir.join(name);
    match staleness(&bin) {
        Freshness::UpToDate => return Ok(bin),
        Freshness::Missing => eprintln!("weft-harness: {} is missing: building it", bin.display()),
        Freshness::Unknown => eprintln!(
            "weft-harness: {} has no dep-info (.d) to check it against: rebuilding it",
            bin.display()
        ),
        Freshness::OlderThan(src) => eprintln!(
            "weft-harness: {} is older than {}: rebuilding it",
            bin.display(),
            src.display()
        ),
    }
    build(name, &layout)?;
    if !bin.is_file() {
        bail!("cargo build --bin {name} did not produce {}", bin.display());
    }
    Ok(bin)
}

/// `weft-demo-app` → `WEFT_DEMO_APP_BIN`.
pub fn env_var(name: &str) -> String {
    format!("{}_BIN", name.to_uppercase().replace('-', "_"))
}

/// Where cargo put the calling test: `<target>/<profile>/deps/<test exe>`.
#[derive(Debug, PartialEq)]
struct Layout {
    target_dir: PathBuf,
    profile_dir: PathBuf,
    profile: String,
}

impl Layout {
    fn of_test_exe(exe: &Path) -> Result<Layout> {
        let deps = exe.parent().filter(|d| d.ends_with("deps"));
        let profile_dir = deps
            .and_then(Path::parent)
            .with_context(|| format!("{} is not in <target>/<profile>/deps", exe.display()))?;
        let target_dir = profile_dir
            .parent()
            .context("the profile directory has no parent")?;
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_owned(),
            Some(p) => p.to_owned(),
            None => bail!("no profile name in {}", profile_dir.display()),
        };
        Ok(Layout {
            target_dir: target_dir.to_path_buf(),
            profile_dir: profile_dir.to_path_buf(),
            profile,
        })
    }
}

#[derive(Debug, PartialEq)]
enum Freshness {
    UpToDate,
    Missing,
    /// No dep-info file next to it: its inputs are unknown.
    Unknown,
    /// A source file (from cargo's dep-info `<bin>.d`) newer than the binary.
    OlderThan(PathBuf),
}

/// Compares the binary with the files cargo says it was built from (`<bin>.d`: the
/// workspace's sources, proto files, the eBPF crate's directory). Manifests are not listed
/// there; a changed `Cargo.toml` needs `cargo build` (as `cargo xtask test` does).
fn staleness(bin: &Path) -> Freshness {
    let Some(built) = mtime(bin) else {
        return Freshness::Missing;
    };
    let dep_info = bin.with_extension("d");
    let Ok(text) = std::fs::read_to_string(&dep_info) else {
        // No record of the inputs: rebuild rather than trust it.
        return Freshness::Unknown;
    };
    let mut budget = 10_000usize;
    for src in dep_info_sources(&text) {
        if let Some(newer) = newer_than(&src, built, &mut budget) {
            return Freshness::OlderThan(newer);
        }
    }
    Freshness::UpToDate
}

/// The prerequisites of the first rule of a makefile-style dep-info file (`\ ` escapes a
/// space in a path).
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let Some(line) = text.lines().next() else {
        return Vec::new();
    };
    let Some((_, deps)) = line.split_once(": ") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = deps.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ' ' => {
                if !cur.is_empty() {
                    out.push(PathBuf::from(std::mem::take(&mut cur)));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(PathBuf::from(cur));
    }
    out
}

/// The first file at or below `path` modified after `built` (directories are walked, as
/// cargo's `rerun-if-changed` does, skipping `target`; at most `budget` entries in all).
fn newer_than(path: &Path, built: SystemTime, budget: &mut usize) -> Option<PathBuf> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return (meta.modified().ok()? > built).then(|| path.to_path_buf());
    }
    if !meta.is_dir() {
        return None;
    }
    for entry in std::fs::read_dir(path).ok()?.flatten() {
        if *budget == 0 {
            return None;
        }
        *budget -= 1;
        let p = entry.path();
        if p.file_name().is_some_and(|n| n == "target") {
            continue;
        }
        if let Some(newer) = newer_than(&p, built, budget) {
            return Some(newer);
        }
    }
    None
}

fn mtime(p: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(p).ok()?;
    meta.is_file().then(|| meta.modified().ok()).flatten()
}

/// `cargo build --bin <name>` in the workspace root, same profile and target directory.
fn build(name: &str, layout: &Layout) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--bin", name, "--profile", &layout.profile])
        .arg("--target-dir")
        .arg(&layout.target_dir);
    let status = cmd
        .status()
        .with_context(|| format!("running cargo build --bin {name}"))?;
    if !status.success() {
        bail!("cargo build --bin {name} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR"));
    harness.parent().unwrap_or(harness).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn env_var_names_follow_the_binary() {
        assert_eq!(env_var("weft-demo-app"), "WEFT_DEMO_APP_BIN");
        assert_eq!(env_var("weft-collector"), "WEFT_COLLECTOR_BIN");
    }

    #[test]
    fn layout_from_the_test_executable() {
        let l = Layout::of_test_exe(Path::new("/t/release/deps/e2e-0123")).unwrap();
        assert_eq!(
            l,
            Layout {
                target_dir: "/t".into(),
                profile_dir: "/t/release".into(),
                profile: "release".into(),
            }
        );
        let dev = Layout::of_test_exe(Path::new("/t/debug/deps/e2e-0123")).unwrap();
        assert_eq!(dev.profile, "dev");
        assert!(Layout::of_test_exe(Path::new("/usr/bin/e2e")).is_err());
    }

    #[test]
    fn dep_info_lists_the_sources_with_escaped_spaces() {
        let text = "/t/debug/weft-x: /w/a.rs /w/my\\ dir/b.rs /w/ebpf\n\n/w/a.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            vec![
                PathBuf::from("/w/a.rs"),
                PathBuf::from("/w/my dir/b.rs"),
                PathBuf::from("/w/ebpf"),
            ]
        );
        assert!(dep_info_sources("").is_empty());
    }

    /// A binary older than one of its sources (also one inside a listed directory) is stale;
    /// one without dep-info is unknown (rebuilt too); a missing one is missing.
    #[test]
    fn staleness_compares_the_binary_with_its_sources() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let set = |p: &Path, secs: u64| {
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        };
        let bin = d.join("weft-x");
        assert_eq!(staleness(&bin), Freshness::Missing);
        std::fs::create_dir(d.join("ebpf")).unwrap();
        for f in ["weft-x", "a.rs", "ebpf/k.rs"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        set(&bin, 2_000);
        set(&d.join("a.rs"), 1_000);
        set(&d.join("ebpf/k.rs"), 1_000);
        assert_eq!(staleness(&bin), Freshness::Unknown);
        let dep_info = format!(
            "{}: {} {}\n",
            bin.display(),
            d.join("a.rs").display(),
            d.join("ebpf").display()
        );
        std::fs::write(d.join("weft-x.d"), dep_info).unwrap();
        assert_eq!(staleness(&bin), Freshness::UpToDate);
        set(&d.join("ebpf/k.rs"), 3_000);
        assert_eq!(staleness(&bin), Freshness::OlderThan(d.join("ebpf/k.rs")));
        set(&d.join("ebpf/k.rs"), 1_000);
        set(&d.join("a.rs"), 3_000);
        assert_eq!(staleness(&bin), Freshness::OlderThan(d.join("a.rs")));
    }
}
