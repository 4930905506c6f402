//! Run ownership: claiming a unique prefix, recording the owner process, and removing what
//! runs whose owner died left behind.
//!
//! In: nothing (the machine's state). Out: a [`RunDir`] owned by this process, or clean-up of
//! stale runs' namespaces (and with them their veths, nft tables and processes).

use crate::sys;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Parent of every run directory.
pub(crate) const RUNS_DIR: &str = "/run/weft-harness";
/// Every prefix starts with this, followed by 4 hex digits.
const PREFIX_HEAD: &str = "wft";
const OWNER_FILE: &str = "owner";
/// How long the logs of a run that failed (panicked) are kept.
const KEEP_LOGS_FOR: Duration = Duration::from_secs(24 * 3600);

/// The directory `/run/weft-harness/<prefix>/` a live run owns.
#[derive(Debug)]
pub(crate) struct RunDir {
    pub prefix: String,
    pub path: PathBuf,
}

impl RunDir {
    /// Claims a fresh prefix: `mkdir` is atomic, so two runs never get the same one.
    pub fn claim() -> Result<RunDir> {
        std::fs::create_dir_all(RUNS_DIR).with_context(|| format!("creating {RUNS_DIR}"))?;
        for _ in 0..100 {
            let prefix = format!("{PREFIX_HEAD}{:04x}", rand::random::<u16>());
            let path = Path::new(RUNS_DIR).join(&prefix);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let pid = std::process::id() as i32;
                    let start = sys::start_time(pid).context("reading own start time")?;
                    // Written aside and renamed: a cleaner must never read a half-written
                    // owner file and take a live run for a dead one.
                    let aside = path.join(format!("{OWNER_FILE}.new"));
                    std::fs::write(&aside, format!("{pid} {start}\n"))?;
                    std::fs::rename(&aside, path.join(OWNER_FILE))?;
                    std::fs::create_dir(path.join("logs"))?;
                    return Ok(RunDir { prefix, path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        bail!("no free run prefix after 100 tries: clean {RUNS_DIR}")
    }

    pub fn logs(&self) -> PathBuf {
        self.path.join("logs")
    }
}

/// True if `name` is `wft` + 4 hex digits.
fn is_prefix(name: &str) -> bool {
    name.len() == PREFIX_HEAD.len() + 4
        && name.starts_with(PREFIX_HEAD)
        && name[PREFIX_HEAD.len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The run prefix a namespace name belongs to, if it looks like one of ours.
fn netns_prefix(netns: &str) -> Option<&str> {
    let (prefix, _) = netns.split_once('-')?;
    is_prefix(prefix).then_some(prefix)
}

/// The PID and start time the run `prefix`'s owner file names, if it is readable.
fn owner(prefix: &str) -> Option<(i32, u64)> {
    let path = Path::new(RUNS_DIR).join(prefix).join(OWNER_FILE);
    let text = std::fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace();
    let pid = fields.next()?.parse::<i32>().ok()?;
    let start = fields.next()?.parse::<u64>().ok()?;
    Some((pid, start))
}

/// Whether the run `prefix` has a live owner: its owner file names a process that still runs
/// with the same start time (a reused PID does not count) and is not a zombie.
fn owner_alive(prefix: &str) -> bool {
    let Some((pid, start)) = owner(prefix) else {
        return false;
    };
    // A zombie owner (killed, not yet reaped) is dead too.
    sys::start_time(pid) == Some(start) && sys::is_running(pid)
}

/// The prefixes of the runs this process owns.
fn own_runs() -> Vec<String> {
    let me = std::process::id() as i32;
    let Some(my_start) = sys::start_time(me) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir(RUNS_DIR) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| is_prefix(name) && owner(name) == Some((me, my_start)))
        .collect()
}

/// What [`teardown_own`] did.
#[derive(Debug, Default)]
pub struct Teardown {
    /// The prefixes of the runs removed.
    pub removed: Vec<String>,
    /// Child processes that did not exit within the grace after SIGTERM and were killed.
    pub killed: usize,
}

/// What a process that is about to exit without unwinding (on a signal, say) calls instead
/// of its clusters' drops: stops its own child processes by PID (SIGTERM, then SIGKILL after
/// `grace`), then removes every run it owns (the processes inside their namespaces, the
/// namespaces, the run directories).
///
/// Without it such a process leaves its runs until the next [`cleanup_stale`]. Safe beside
/// other runs: only runs whose owner file names this process, and only its own children,
/// are touched. A cluster still being built by another thread may add a namespace after
/// this; the next [`cleanup_stale`] removes that.
pub fn teardown_own(grace: Duration) -> Teardown {
    let mut killed = sys::stop_children(grace);
    let removed = own_runs();
    for prefix in &removed {
        destroy_run_netns(prefix, grace);
        let _ = std::fs::remove_dir_all(Path::new(RUNS_DIR).join(prefix));
    }
    // Reaps what another thread started in the meantime (and the namespaces' removal ended).
    killed += sys::stop_children(grace);
    Teardown { removed, killed }
}

fn older_than(path: &Path, age: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}

/// Removes every namespace of a run (killing the processes inside first).
pub(crate) fn destroy_run_netns(prefix: &str, grace: Duration) {
    let head = format!("{prefix}-");
    for ns in sys::list_netns() {
        if ns.starts_with(&head) {
            sys::destroy_netns(&ns, grace);
        }
    }
}

/// Removes the leftovers of runs whose owning process is dead: their processes (by PID),
/// network namespaces (and with them every veth, bridge and nft table inside) and run
/// directories; and, after a day, the logs that failed runs kept. Runs with a live owner are
/// never touched, so this is safe to call while other tests run. Returns the prefixes it
/// cleaned.
pub fn cleanup_stale() -> Vec<String> {
    let mut stale: Vec<String> = Vec::new();
    // Runs whose owner file names a dead process.
    if let Ok(dir) = std::fs::read_dir(RUNS_DIR) {
        for entry in dir.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !is_prefix(&name) {
                continue;
            }
            if entry.path().join(OWNER_FILE).exists() {
                if !owner_alive(&name) {
                    stale.push(name);
                }
            } else if older_than(&entry.path(), KEEP_LOGS_FOR) {
                // Logs a failed run kept; younger ones (and a run being created this
                // instant, which has no owner file for a moment) are left alone.
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    // Namespaces of a run without a live owner whose run directory is gone (removed by
    // hand, say). Drop removes namespaces before the owner file, so a finished run never
    // leaves namespaces that look like this.
    for ns in sys::list_netns() {
        if let Some(prefix) = netns_prefix(&ns)
            && !owner_alive(prefix)
            && !stale.iter().any(|s| s == prefix)
        {
            stale.push(prefix.to_string());
        }
    }
    for prefix in &stale {
        destroy_run_netns(prefix, Duration::ZERO);
        let _ = std::fs::remove_dir_all(Path::new(RUNS_DIR).join(prefix));
    }
    stale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_prefixes_and_their_namespaces() {
        assert!(is_prefix("wft3a7f"));
        assert!(!is_prefix("wft3A7f"));
        assert!(!is_prefix("wft3a7"));
        assert!(!is_prefix("abc3a7f"));
        assert_eq!(netns_prefix("wft3a7f-node-a"), Some("wft3a7f"));
        assert_eq!(netns_prefix("wft3a7f"), None);
        assert_eq!(netns_prefix("cni-1234-5678"), None);
    }
}
