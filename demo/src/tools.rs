//! Finding the programs the demo runs.
//!
//! In: `--bin-dir` (or this binary's own directory) and `PATH`. Out: [`Tools`]: Weft's
//! binaries (required), grpcurl and rotel (optional, each absence said once).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Weft's binaries and the optional tools.
#[derive(Debug, Clone)]
pub struct Tools {
    pub collector: PathBuf,
    pub stitcher: PathBuf,
    pub demo_app: PathBuf,
    /// `grpcurl`, used only to show the printed commands work (the demo itself uses tonic).
    pub grpcurl: Option<PathBuf>,
    /// rotel's `rotel-agent`, the OTLP receiver.
    pub rotel: Option<PathBuf>,
}

impl Tools {
    /// Finds Weft's binaries in `bin_dir` (default: next to this executable).
    pub fn find(bin_dir: Option<&Path>) -> Result<Tools> {
        let dir = match bin_dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_exe()
                .context("locating weft-demo itself")?
                .parent()
                .map(Path::to_path_buf)
                .context("weft-demo has no parent directory")?,
        };
        let weft = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if !path.is_file() {
                bail!(
                    "{} not found: build the workspace's binaries first \
                     (`cargo build --release --bins`, or `cargo xtask demo` which does it), \
                     or point --bin-dir at them",
                    path.display()
                );
            }
            Ok(path)
        };
        Ok(Tools {
            collector: weft("weft-collector")?,
            stitcher: weft("weft-stitcher")?,
            demo_app: weft("weft-demo-app")?,
            grpcurl: in_path("grpcurl"),
            rotel: find_rotel(),
        })
    }
}

/// The first executable `name` in `PATH`.
pub fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `rotel-agent` from `PATH`, else from the Python package `rotel` (`pip install rotel`).
fn find_rotel() -> Option<PathBuf> {
    if let Some(p) = in_path("rotel-agent") {
        return Some(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import rotel, os; print(os.path.dirname(rotel.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let agent = Path::new(&dir).join("rotel-agent");
    is_executable(&agent).then_some(agent)
}
