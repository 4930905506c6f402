//! Processes the benchmarks start outside the harness's namespaces (a stitcher on
//! loopback, the load generator, an OTLP sink), and tiny HTTP helpers to scrape them.
//!
//! In: a `Command`. Out: a [`Child`] killed by its PID (SIGTERM, then SIGKILL) when dropped,
//! so an error or a panic in a benchmark leaves nothing running.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Child {
    inner: std::process::Child,
    label: String,
    stderr: Option<PathBuf>,
}

impl Child {
    /// Starts `cmd` with stdout as given and stderr to `stderr_file` (if any).
    pub fn spawn(
        label: &str,
        cmd: &mut Command,
        stdout: Stdio,
        stderr_file: Option<&Path>,
    ) -> Result<Child> {
        let stderr = match stderr_file {
            Some(p) => Stdio::from(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            ),
            None => Stdio::null(),
        };
        let inner = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {label} ({:?})", cmd.get_program()))?;
        Ok(Child {
            inner,
            label: label.into(),
            stderr: stderr_file.map(Path::to_path_buf),
        })
    }

    pub fn pid(&self) -> i32 {
        self.inner.id() as i32
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.inner.stdout.take()
    }

    /// The last lines the process wrote to stderr (for error messages).
    pub fn stderr_tail(&self) -> String {
        let Some(p) = &self.stderr else {
            return String::new();
        };
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Fails if the process has already exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.inner.try_wait()? {
            bail!(
                "{} exited with {status}: {}",
                self.label,
                self.stderr_tail()
            );
        }
        Ok(())
    }

    /// Waits for the process to end by itself, up to `limit`.
    pub fn wait_timeout(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.inner.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {limit:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.inner.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the PID of our own unreaped child.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.inner.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.inner.kill();
        let _ = self.inner.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: good enough for a child to bind next).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET path` over HTTP/1.1 with `Connection: close`; the body of a 200 response.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {addr}{path}: malformed response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {addr}{path}: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_owned())
}

/// Polls `GET /healthz` until it answers 200 or `limit` passes; checks `child` is alive.
pub fn wait_healthy(child: &mut Child, addr: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        child.ensure_running()?;
        if http_get(addr, "/healthz").is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} not healthy on {addr} after {limit:?}", child.label);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where [`sibling_binary`] looks, when set (`--bin-dir`).
pub static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// A binary of the workspace: in `--bin-dir`, else next to this one (`target/release/`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let path = match BIN_DIR.get() {
        Some(dir) => dir.join(name),
        None => std::env::current_exe()
            .context("locating weft-bench")?
            .with_file_name(name),
    };
    if !path.exists() {
        bail!(
            "{} not found (build it: cargo build --release --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// The rotel OTLP agent installed by `cargo xtask setup` (pip), if present.
pub fn rotel_agent() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import rotel, os; print(os.path.dirname(rotel.__file__))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let path = Path::new(dir.trim()).join("rotel-agent");
    path.exists().then_some(path)
}
