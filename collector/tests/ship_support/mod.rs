//! Shared by the `ship_*` tests: a real `weft-stitcher` process on loopback whose
//! `--print-exchanges json` output is collected, and synthetic exchanges.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weft_proto::v1;

/// Path of the `weft-stitcher` binary of the workspace build (Cargo exposes binaries only to
/// their own package's tests): `weft_harness::binaries`, built if missing or stale, or
/// `WEFT_STITCHER_BIN`.
pub fn stitcher_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| weft_harness::binaries::path("weft-stitcher").expect("weft-stitcher"))
        .clone()
}

/// A loopback port that was free a moment ago (the stitcher binds it; restarts reuse it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// One life of a stitcher process. Killed (by PID) when dropped.
pub struct Stitcher {
    child: Child,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
}

impl Stitcher {
    pub fn start(port: u16) -> Stitcher {
        let mut child = Command::new(stitcher_bin())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--print-exchanges", "json"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weft-stitcher");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_pipe = child.stderr.take().expect("stderr");
        let err_sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = err_sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let s = Stitcher {
            child,
            port,
            lines,
            reader: Some(reader),
            stderr,
        };
        s.wait_listening();
        s
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "stitcher not listening on {} after 20 s; stderr:\n{}",
                self.port,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILL, reap, and return every line it printed (all of them: the pipe is read
    /// to its end).
    pub fn kill(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        std::mem::take(&mut *self.lines.lock().unwrap())
    }

    /// SIGSTOP: the process stops reading and acknowledging, while the kernel still takes
    /// what the shipper sends, so batches pile up in flight.
    pub fn freeze(&self) {
        // SAFETY: plain kill(2) on our own child's PID.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGSTOP);
        }
    }

    /// Lines printed so far.
    pub fn lines_so_far(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

impl Drop for Stitcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(instance, id)` of every printed exchange, in print order.
pub fn parse_lines(lines: &[String]) -> Vec<(String, u64)> {
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"));
            (
                v["instance"].as_str().expect("instance").to_string(),
                v["id"].as_u64().expect("id"),
            )
        })
        .collect()
}

/// A well-formed client-side exchange with the given id.
pub fn exchange(id: u64) -> v1::Exchange {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    v1::Exchange {
        id,
        side: v1::Side::Client as i32,
        client: Some(v1::Endpoint {
            ip: vec![10, 244, 1, 9],
            port: 30000 + (id % 30000) as u32,
        }),
        server: Some(v1::Endpoint {
            ip: vec![10, 96, 0, 20],
            port: 80,
        }),
        request_seq: id as u32,
        response_seq: (id as u32).wrapping_mul(7),
        start_unix_nanos: now,
        end_unix_nanos: now + 1_000_000,
        method: "GET".into(),
        path: format!("/api/items/{id}"),
        status: 200,
        connection_id: id / 10,
        ..Default::default()
    }
}

/// Pushes exchanges `ids` at `per_sec`, paced in 10 ms steps; calls `between` after each step.
pub async fn produce(
    sender: &weft_collector::ship::EventSender,
    ids: std::ops::RangeInclusive<u64>,
    per_sec: u64,
    mut between: impl FnMut(u64),
) {
    let start = tokio::time::Instant::now();
    let first = *ids.start();
    for id in ids {
        sender.try_send(weft_collector::ship::Event::Exchange(Box::new(exchange(
            id,
        ))));
        let n = id - first + 1;
        if n.is_multiple_of((per_sec / 100).max(1)) {
            between(id);
            let due = start + Duration::from_secs_f64(n as f64 / per_sec as f64);
            tokio::time::sleep_until(due).await;
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

pub fn set(ids: impl IntoIterator<Item = u64>) -> BTreeSet<u64> {
    ids.into_iter().collect()
}
