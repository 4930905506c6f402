//! Thin wrappers over the system: running `ip`/`nft`, listing network namespaces, finding and
//! killing the processes inside one, entering one from a thread.

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::WaitPidFlag;
use nix::unistd::Pid;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where `ip netns` keeps its named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    run_with_stdin(program, args, None)
}

/// Like [`run`], feeding `stdin` to the command (for `nft -f -`, `ip -batch -`).
pub(crate) fn run_with_stdin(program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing stdin of {program}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Names of all named network namespaces.
pub(crate) fn list_netns() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// PIDs of the processes whose network namespace is the named one (like `ip netns pids`),
/// leaving out this process.
pub(crate) fn pids_in_netns(name: &str) -> Vec<i32> {
    let Ok(meta) = std::fs::metadata(Path::new(NETNS_DIR).join(name)) else {
        return Vec::new();
    };
    let target = (meta.dev(), meta.ino());
    let me = std::process::id() as i32;
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| (m.dev(), m.ino()) == target)
                .unwrap_or(false)
        })
        .collect()
}

/// Sends `signal` to each PID (errors ignored: the process may be gone already).
pub(crate) fn signal_all(pids: &[i32], signal: Signal) {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// True while a process exists and is not a zombie (a zombie has left its namespaces).
pub(crate) fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_state(&stat), Some('Z' | 'X')),
        Err(_) => false,
    }
}

/// The state letter of a `/proc/<pid>/stat` line (after the parenthesised command name).
fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The start time (field 22, clock ticks since boot) of a process, to tell a PID's owner from
/// a later process that reused the PID.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    stat_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn stat_start_time(stat: &str) -> Option<u64> {
    // Fields after the command name start with field 3 (state); start time is field 22.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Ends every process inside the namespace: SIGTERM, then SIGKILL for those still running
/// after `grace`. Returns once none is left running (bounded by `grace` + 2 s).
pub(crate) fn kill_netns_processes(name: &str, grace: Duration) {
    stop_all(pids_in_netns(name), grace);
}

/// Ends this process's own children (running or not yet reaped) as
/// [`kill_netns_processes`] does, and reaps them, so that no zombie outlives this process
/// waiting for init to reap it. Their PIDs cannot have been reused by another process: an
/// unreaped child keeps its PID.
/// Returns how many needed SIGKILL.
pub(crate) fn stop_children(grace: Duration) -> usize {
    let me = std::process::id() as i32;
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let children: Vec<i32> = proc_dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| parent_of(pid) == Some(me))
        .collect();
    let killed = stop_all(children.clone(), grace);
    for pid in children {
        // Not running any more (a zombie at most): returns at once.
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
    killed
}

/// The parent PID (field 4) of a process.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_parent(&stat)
}

fn stat_parent(stat: &str) -> Option<i32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// SIGTERM, then SIGKILL for those still running after `grace`; returns once none is left
/// running (bounded by `grace` + 2 s), with how many needed SIGKILL.
fn stop_all(pids: Vec<i32>, grace: Duration) -> usize {
    if pids.is_empty() {
        return 0;
    }
    if !grace.is_zero() {
        signal_all(&pids, Signal::SIGTERM);
        wait_all_gone(&pids, grace);
    }
    let left: Vec<i32> = pids.into_iter().filter(|&p| is_running(p)).collect();
    signal_all(&left, Signal::SIGKILL);
    wait_all_gone(&left, Duration::from_secs(2));
    left.len()
}

fn wait_all_gone(pids: &[i32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while pids.iter().any(|&p| is_running(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills what runs inside a namespace and deletes it. Errors are ignored: clean-up is best
/// effort and must go on with the next item.
pub(crate) fn destroy_netns(name: &str, grace: Duration) {
    kill_netns_processes(name, grace);
    delete_netns(name);
}

/// What `ip netns delete` does, but idempotent: detach the bind mount, then remove the file.
/// Two cleaners racing (two tests removing the same stale run) both end with the file gone;
/// with `ip netns delete` the loser fails on the unmount and returns before the winner's unlink.
fn delete_netns(name: &str) {
    let path = Path::new(NETNS_DIR).join(name);
    // EINVAL (no longer a mount point) or ENOENT: someone else got there first.
    let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(&path);
}

/// Runs `f` on a new thread that has entered the named network namespace.
pub(crate) fn run_in_netns<R: Send, F: FnOnce() -> R + Send>(name: &str, f: F) -> Result<R> {
    let path = Path::new(NETNS_DIR).join(name);
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<R> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {name}"))?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Writes sysctls (`net.ipv4.ip_forward` style keys) inside a namespace. `/proc/sys/net` shows
/// the namespace of the thread that opens it, so a thread in the namespace suffices.
pub(crate) fn sysctls_in(netns: &str, settings: &[(&str, &str)]) -> Result<()> {
    run_in_netns(netns, || -> Result<()> {
        for (key, value) in settings {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_fields_after_odd_command_names() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 0";
        assert_eq!(stat_state(stat), Some('S'));
        assert_eq!(stat_start_time(stat), Some(987654));
        assert_eq!(stat_parent(stat), Some(1));
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
        assert!(is_running(me));
    }
}
