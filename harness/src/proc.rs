//! Processes started inside a namespace of the cluster.
//!
//! In: a `std::process::Command` and a namespace name. Out: a [`Proc`] whose stdout and stderr
//! go to log files in the run directory and which is killed by PID when dropped.

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a dropped [`Proc`] gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_millis(1500);

/// A process running inside a namespace; SIGTERM then SIGKILL (after a short grace) on drop.
#[derive(Debug)]
pub struct Proc {
    child: Mutex<Child>,
    pid: i32,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// Signals accepted by [`Proc::signal`]: a `nix` [`Signal`] or a raw `libc::SIG*` number.
pub trait IntoSignal {
    fn into_signal(self) -> Result<Signal>;
}

impl IntoSignal for Signal {
    fn into_signal(self) -> Result<Signal> {
        Ok(self)
    }
}

impl IntoSignal for i32 {
    fn into_signal(self) -> Result<Signal> {
        Signal::try_from(self).with_context(|| format!("{self} is not a signal"))
    }
}

impl Proc {
    /// Starts `cmd` inside `netns` through `ip netns exec` (which execs the program, so the
    /// PID is the program's). Keeps the command's arguments, environment changes and working
    /// directory (not `env_clear`, which `Command` does not expose); `label` names the log files `<label>.stdout` / `<label>.stderr` in `logs`.
    pub(crate) fn spawn(netns: &str, cmd: &Command, logs: &Path, label: &str) -> Result<Proc> {
        let program = Path::new(cmd.get_program());
        // `ip netns exec` would start fine and then fail to exec: report it here instead.
        anyhow::ensure!(
            program.components().count() == 1 || program.exists(),
            "cannot start {}: no such file",
            program.display()
        );
        let stdout = logs.join(format!("{label}.stdout"));
        let stderr = logs.join(format!("{label}.stderr"));
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", netns])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?);
        let child = wrapped
            .spawn()
            .with_context(|| format!("starting {:?} in netns {netns}", cmd.get_program()))?;
        Ok(Proc {
            pid: child.id() as i32,
            child: Mutex::new(child),
            stdout,
            stderr,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The file the process's stdout goes to.
    pub fn log_path(&self) -> &Path {
        &self.stdout
    }

    /// The file the process's stderr goes to.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        read_lossy(&self.stdout)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// Waits up to `limit` for the process to exit; `None` if it still runs.
    pub fn wait_timeout(&self, limit: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        Ok(child.try_wait()?)
    }

    /// Sends a signal to the process (unless it has already been reaped).
    pub fn signal(&self, sig: impl IntoSignal) -> Result<()> {
        let sig = sig.into_signal()?;
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        // Once reaped, the PID may belong to someone else: never signal it then.
        if child.try_wait()?.is_none() {
            kill(Pid::from_raw(self.pid), sig)
                .with_context(|| format!("sending {sig} to {}", self.pid))?;
        }
        Ok(())
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; returns the exit status.
    pub fn stop(&self, grace: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        Ok(child.wait()?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop(GRACE);
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}
