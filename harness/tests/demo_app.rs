//! `weft-demo-app` on loopback: keep-alive, error injection, downstream calls with and without
//! `traceparent` propagation, and a load run bounded in time.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_harness::app_log;

const DEMO_APP: &str = env!("CARGO_BIN_EXE_weft-demo-app");

/// A `serve` process on 127.0.0.1 (port chosen by the kernel), killed on drop.
struct Server {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    addr: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(DEMO_APP)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Server {
            child,
            lines,
            addr: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        server.addr = loop {
            if let Some(v) = server.events("listening").first() {
                break v["addr"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(10));
        };
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Logged JSON lines with this `event`.
    fn events(&self, event: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// The whole log so far.
    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until `n` requests are logged (the log line follows the response by a moment).
    fn requests(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.events("request");
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `load`; returns (exit success, summary, wall time).
fn load(args: &[&str]) -> (bool, Value, Duration) {
    let start = Instant::now();
    let out = Command::new(DEMO_APP)
        .arg("load")
        .args(args)
        .output()
        .expect("run load");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "summary {text:?} ({e}); stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), summary, start.elapsed())
}

fn peer_port(request: &Value) -> String {
    request["peer"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string()
}

#[test]
fn keepalive_reuses_one_connection_and_no_keepalive_opens_one_per_request() {
    let server = Server::start(&["--name", "kept"]);
    let url = server.url("/a");
    let (ok, summary, _) = load(&["--url", &url, "--requests", "20", "--keepalive"]);
    assert!(ok, "{summary}");
    assert_eq!(summary["ok"], 20);
    let mut ports: Vec<String> = server.requests(20).iter().map(peer_port).collect();
    ports.dedup();
    assert_eq!(
        ports.len(),
        1,
        "keep-alive used several connections: {ports:?}"
    );

    let (ok, summary, _) = load(&["--url", &url, "--requests", "20", "--no-keepalive"]);
    assert!(ok, "{summary}");
    let mut ports: Vec<String> = server.requests(40)[20..].iter().map(peer_port).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(
        ports.len(),
        20,
        "expected a connection per request: {ports:?}"
    );
}

#[test]
fn load_numbers_its_requests_in_the_path() {
    let server = Server::start(&["--name", "numbered"]);
    let url = server.url("/r/{n}");
    let (ok, summary, _) = load(&["--url", &url, "--requests", "30", "--concurrency", "4"]);
    assert!(ok, "{summary}");
    assert_eq!(server.requests(30).len(), 30);
    let mut paths: Vec<String> = app_log::served(&server.log())
        .into_iter()
        .map(|r| r.path)
        .collect();
    paths.sort();
    let mut want: Vec<String> = (1..=30).map(|n| format!("/r/{n}")).collect();
    want.sort();
    assert_eq!(paths, want);
}

#[test]
fn error_every_fails_every_nth_request_and_load_reports_it() {
    let server = Server::start(&["--error-every", "5"]);
    let url = server.url("/e");
    let (ok, summary, _) = load(&["--url", &url, "--requests", "50", "--concurrency", "4"]);
    assert!(!ok, "load must fail when requests fail: {summary}");
    assert_eq!(summary["http_5xx"], 10, "{summary}");
    assert_eq!(summary["ok"], 40, "{summary}");
    assert_eq!(summary["errors"], 10, "{summary}");
    let statuses: Vec<u64> = server
        .requests(50)
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), 10);

    let (ok, summary, _) = load(&["--url", &url, "--requests", "10", "--allow-http-errors"]);
    assert!(ok, "--allow-http-errors: {summary}");
    assert_eq!(summary["http_5xx"], 2, "{summary}");
}

#[test]
fn calls_downstream_and_propagates_traceparent_only_when_asked() {
    let backend = Server::start(&["--name", "backend"]);
    let call = backend.url("/items/{n}");
    let frontend = Server::start(&["--name", "frontend", "--call", &call, "--propagate"]);
    let (ok, summary, _) = load(&[
        "--url",
        &frontend.url("/api"),
        "--requests",
        "5",
        "--traceparent",
    ]);
    assert!(ok, "{summary}");
    let incoming = frontend.requests(5);
    let downstream = backend.requests(5);
    assert_eq!(downstream.len(), 5);
    let paths: Vec<&str> = downstream
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["/items/1", "/items/2", "/items/3", "/items/4", "/items/5"]
    );
    for (front, back) in incoming.iter().zip(&downstream) {
        let front_tp = front["traceparent"]
            .as_str()
            .expect("load sent a traceparent");
        let back_tp = back["traceparent"]
            .as_str()
            .expect("frontend propagated it");
        let (f, b): (Vec<&str>, Vec<&str>) =
            (front_tp.split('-').collect(), back_tp.split('-').collect());
        assert_eq!(f[1], b[1], "same trace id");
        assert_ne!(f[2], b[2], "a new span id for the call");
        assert_eq!(front["calls"], serde_json::json!([200]));
    }
    // The shared reader of this log (what tests and benchmarks score against) sees the same.
    let (front, back) = (
        app_log::served(&frontend.log()),
        app_log::served(&backend.log()),
    );
    let calls: Vec<(u64, &str)> = back.iter().map(|s| (s.n, s.path.as_str())).collect();
    assert_eq!(
        calls,
        [
            (1, "/items/1"),
            (2, "/items/2"),
            (3, "/items/3"),
            (4, "/items/4"),
            (5, "/items/5")
        ]
    );
    assert_eq!(front.len(), 5);
    for (f, b) in front.iter().zip(&back) {
        assert!(f.trace_id().is_some_and(|t| t.len() == 32), "{f:?}");
        assert_eq!(f.trace_id(), b.trace_id());
        assert_eq!((f.status, b.status), (200, 200));
        assert!(b.peer.starts_with("127.0.0.1:"), "{b:?}");
    }

    // Without --propagate the downstream call carries no traceparent.
    let quiet = Server::start(&["--name", "quiet", "--call", &call]);
    let (ok, _, _) = load(&["--url", &quiet.url("/"), "--requests", "3", "--traceparent"]);
    assert!(ok);
    let downstream = backend.requests(8);
    assert_eq!(downstream.len(), 8);
    assert!(downstream[5..].iter().all(|r| r["traceparent"].is_null()));
}

#[test]
fn failed_downstream_call_answers_502() {
    // A port nobody listens on: bind, note the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let call = format!("http://127.0.0.1:{port}/gone");
    let frontend = Server::start(&["--call", &call]);
    let (ok, summary, _) = load(&["--url", &frontend.url("/"), "--requests", "2"]);
    assert!(!ok);
    assert_eq!(summary["http_5xx"], 2, "{summary}");
    assert!(frontend.requests(2).iter().all(|r| r["status"] == 502));
}

#[test]
fn load_is_bounded_by_its_timeout() {
    let slow = Server::start(&["--delay-ms", "3000"]);
    let (ok, summary, took) = load(&[
        "--url",
        &slow.url("/"),
        "--requests",
        "4",
        "--timeout-s",
        "0.5",
    ]);
    assert!(!ok);
    assert_eq!(summary["ok"], 0, "{summary}");
    assert_eq!(summary["transport_errors"], 4, "{summary}");
    assert!(
        took < Duration::from_secs(3),
        "load ran {took:?} past a 0.5 s timeout"
    );
}

#[test]
fn head_gets_the_length_without_a_body_on_a_kept_alive_connection() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let responses: Vec<&str> = out.split("HTTP/1.1 ").filter(|r| !r.is_empty()).collect();
    assert_eq!(responses.len(), 2, "{out}");
    assert!(
        responses[0].ends_with("\r\n\r\n"),
        "HEAD answer has a body: {out}"
    );
    let (_, get_body) = responses[1].split_once("\r\n\r\n").unwrap();
    assert!(
        get_body.starts_with('{') && get_body.contains("\"n\":2"),
        "{out}"
    );
}
