//! Acceptance: `weft-demo --duration 20s` run as a user would, non-interactively.
//!
//! Checks what the user sees and what leaves the stitcher, never the stitcher's insides:
//! - the printed traces: whole 6-span traces client → frontend → backend → store, each
//!   SERVER span under the CLIENT span that called it, each inner CLIENT span under the
//!   SERVER span that made the call, with the workloads' names (`frontend.demo`, ...);
//! - the OTLP receiver (rotel, its raw output) got the same traces: same span ids, parents,
//!   kinds and `service.name`;
//! - the grpcurl `ListTraces` command the demo printed, run as printed while the demo runs,
//!   returns traces that were printed, with the same span counts;
//! - afterwards nothing of the run is left: network namespaces, interfaces (and with them
//!   qdiscs/filters), the run directory, processes.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_demo::live::{PREFIX, SpanLine};
use weft_demo::receiver;

const DEMO: &str = env!("CARGO_BIN_EXE_weft-demo");
/// The run's bound: 20 s of traffic plus start-up and teardown.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// The directory holding the binaries the demo runs: the workspace build's, next to weft-demo
/// (`weft_harness::binaries`: built if missing or stale).
fn bin_dir() -> PathBuf {
    let dir = Path::new(DEMO).parent().unwrap().to_path_buf();
    for name in ["weft-collector", "weft-stitcher", "weft-demo-app"] {
        let bin = weft_harness::binaries::path(name).expect(name);
        assert_eq!(
            bin.parent(),
            Some(dir.as_path()),
            "{name} must be next to weft-demo (or set WEFT_DEMO_BIN_DIR)"
        );
    }
    dir
}

/// Kills the demo if the test fails before it ends (its own teardown runs on SIGTERM).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end && self.0.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn demo_traces_the_cluster_end_to_end_and_leaves_nothing() {
    // `WEFT_DEMO_BIN_DIR` (the demo's own variable for --bin-dir) tests other builds.
    let bins = std::env::var_os("WEFT_DEMO_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(bin_dir);
    let tmp = tempfile::tempdir().unwrap();
    let json_out = tmp.path().join("summary.json");
    let rotel_log = tmp.path().join("rotel.txt");
    let stderr = tmp.path().join("stderr.txt");
    let child = Command::new(DEMO)
        .args(["--duration", "20s", "--otlp", "on", "--rate", "2"])
        .arg("--json-out")
        .arg(&json_out)
        .arg("--receiver-log")
        .arg(&rotel_log)
        .arg("--bin-dir")
        .arg(&bins)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut demo = Running(child);
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let out = demo.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };

    // While it runs: once a few traces are out, the printed ListTraces command, as printed.
    let started = Instant::now();
    let mut listed: Option<serde_json::Value> = None;
    let status = loop {
        if let Some(status) = demo.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < RUN_LIMIT,
            "weft-demo still runs after {RUN_LIMIT:?}"
        );
        if listed.is_none() {
            let snapshot = lines.lock().unwrap().clone();
            let traces: HashSet<String> = snapshot
                .iter()
                .filter_map(|l| l.strip_prefix(PREFIX).and_then(SpanLine::parse))
                .map(|s| s.trace_id)
                .collect();
            if traces.len() >= 3 {
                let cmd = snapshot
                    .iter()
                    .filter_map(|l| l.trim_start().strip_prefix("$ "))
                    .find(|c| c.contains("weft.v1.Query/ListTraces") && c.contains("limit"))
                    .expect("the demo printed a ListTraces command")
                    .to_string();
                let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
                assert!(
                    out.status.success(),
                    "`{cmd}` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                listed = Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!(
                        "`{cmd}` printed no JSON ({e}): {}",
                        String::from_utf8_lossy(&out.stdout)
                    )
                }));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    reader.join().unwrap();
    let lines = lines.lock().unwrap().clone();
    let all = lines.join("\n");
    let stderr = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        status.success(),
        "weft-demo failed ({status}):\n{all}\n{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();

    // Printed traces.
    let mut traces: BTreeMap<String, Vec<SpanLine>> = BTreeMap::new();
    for span in lines
        .iter()
        .filter_map(|l| l.strip_prefix(PREFIX).and_then(SpanLine::parse))
    {
        traces.entry(span.trace_id.clone()).or_default().push(span);
    }
    let whole: Vec<&String> = traces
        .iter()
        .filter(|(_, spans)| spans.len() == 6)
        .map(|(id, _)| id)
        .collect();
    // 20 s at 2 requests/s: about 40 traces; a few may be cut at the edges.
    assert!(
        whole.len() >= 20,
        "only {} traces of 6 spans among {} printed:\n{all}",
        whole.len(),
        traces.len()
    );
    assert!(
        whole.len() * 10 >= traces.len() * 9,
        "{} of {} printed traces have 6 spans:\n{all}",
        whole.len(),
        traces.len()
    );
    for id in &whole {
        check_chain(&traces[*id]).unwrap_or_else(|e| panic!("trace {id}: {e}\n{all}"));
    }
    // Every answered request is a trace (the demo waits for the last ones before stopping).
    let answered = summary["traffic"]["ok"].as_u64().unwrap()
        + summary["traffic"]["http_5xx"].as_u64().unwrap();
    assert!(
        whole.len() as u64 * 10 >= answered * 9,
        "{answered} requests answered, {} whole traces printed:\n{all}",
        whole.len()
    );
    // Every process stopped cleanly, every trace came in time.
    assert_eq!(summary["problems"], serde_json::json!([]), "{summary}");
    // The backend answers 500 every 17th request; the frontend then 502.
    let errors = whole
        .iter()
        .filter(|id| traces[**id].iter().any(|s| s.status == 500))
        .count();
    assert!(errors >= 1, "no trace shows the backend's 500:\n{all}");

    // The OTLP receiver got the same traces.
    let received = receiver::parse(&std::fs::read_to_string(&rotel_log).unwrap());
    for id in &whole {
        let got: Vec<&receiver::ReceivedSpan> =
            received.iter().filter(|s| &s.trace_id == *id).collect();
        assert_eq!(got.len(), 6, "rotel got {} spans of trace {id}", got.len());
        for printed in &traces[*id] {
            let r = got
                .iter()
                .find(|r| r.span_id == printed.span_id)
                .unwrap_or_else(|| panic!("rotel lacks span {} of {id}", printed.span_id));
            let parent = if printed.is_root() {
                ""
            } else {
                &printed.parent_id
            };
            assert_eq!(r.parent_id, parent, "parent of {}", printed.span_id);
            let kind = if printed.client {
                "SPAN_KIND_CLIENT"
            } else {
                "SPAN_KIND_SERVER"
            };
            assert_eq!(r.kind, kind, "kind of {}", printed.span_id);
            let workload = printed.service.rsplit('/').next().unwrap();
            assert_eq!(r.service, workload, "service.name of {}", printed.span_id);
        }
    }

    // The printed grpcurl ListTraces answered, while the demo ran, with printed traces.
    let listed = listed.expect("the demo ended before 3 traces were printed");
    let summaries = listed["traces"].as_array().expect("ListTraces has traces");
    assert!(!summaries.is_empty(), "ListTraces returned nothing");
    for t in summaries {
        let id = t["traceId"].as_str().unwrap();
        let printed = traces
            .get(id)
            .unwrap_or_else(|| panic!("ListTraces returned {id}, never printed"));
        assert_eq!(
            t["spanCount"].as_u64(),
            Some(printed.len() as u64),
            "span count of {id}"
        );
    }

    // Nothing left behind.
    let prefix = summary["prefix"].as_str().unwrap();
    assert!(prefix.starts_with("wft"), "{summary}");
    assert_eq!(summary["leftovers"], serde_json::json!([]), "{summary}");
    let netns = run(&["ip", "netns", "list"]);
    assert!(!netns.contains(prefix), "namespaces left: {netns}");
    let links = run(&["ip", "-o", "link", "show"]);
    assert!(!links.contains(prefix), "interfaces left: {links}");
    let qdiscs = run(&["tc", "qdisc", "show"]);
    assert!(!qdiscs.contains(prefix), "qdiscs left: {qdiscs}");
    assert!(!Path::new("/run/weft-harness").join(prefix).exists());
    let pids = summary["pids"].as_array().unwrap();
    assert!(
        pids.len() >= 8,
        "app ×3, receiver, stitcher, collectors ×3: {summary}"
    );
    for p in pids {
        let pid = p["pid"].as_i64().unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .contains("weft"),
            "{} (pid {pid}) still runs",
            p["name"]
        );
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(prefix),
            "process {:?} of the run still runs",
            entry.file_name()
        );
    }
}

/// The six spans of one request, each where it belongs.
fn check_chain(spans: &[SpanLine]) -> Result<(), String> {
    let find = |client: bool, service: &str| -> Result<&SpanLine, String> {
        let found: Vec<&SpanLine> = spans
            .iter()
            .filter(|s| s.client == client && s.service == service)
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            _ => Err(format!(
                "{} {} spans of {service}",
                found.len(),
                if client { "CLIENT" } else { "SERVER" }
            )),
        }
    };
    let root = find(true, "demo/client")?;
    let front_in = find(false, "demo/frontend")?;
    let front_out = find(true, "demo/frontend")?;
    let back_in = find(false, "demo/backend")?;
    let back_out = find(true, "demo/backend")?;
    let store_in = find(false, "demo/store")?;
    let expect = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
    expect(root.is_root(), "the client's CLIENT span is the root")?;
    expect(
        spans.iter().filter(|s| s.is_root()).count() == 1,
        "one root",
    )?;
    // Each SERVER under the CLIENT that called it, each inner CLIENT under its SERVER.
    for (child, parent, what) in [
        (front_in, root, "frontend SERVER under client CLIENT"),
        (front_out, front_in, "frontend CLIENT under frontend SERVER"),
        (back_in, front_out, "backend SERVER under frontend CLIENT"),
        (back_out, back_in, "backend CLIENT under backend SERVER"),
        (store_in, back_out, "store SERVER under backend CLIENT"),
    ] {
        expect(child.parent_id == parent.span_id, what)?;
    }
    // Names as the printer shows them: who called whom.
    for (span, from, to) in [
        (root, "client.demo", "frontend.demo"),
        (front_in, "client.demo", "frontend.demo"),
        (front_out, "frontend.demo", "backend.demo"),
        (back_in, "frontend.demo", "backend.demo"),
        (back_out, "backend.demo", "store.demo"),
        (store_in, "backend.demo", "store.demo"),
    ] {
        expect(
            span.client_name() == Some(from) && span.server_name() == Some(to),
            &format!(
                "span {} goes [{}]->[{}], not {from} -> {to}",
                span.span_id, span.from, span.to
            ),
        )?;
    }
    expect(
        root.path == "/api/items" && front_out.path.starts_with("/api/items/"),
        "frontend paths",
    )?;
    expect(back_out.path.starts_with("/store/"), "backend → store path")?;
    Ok(())
}

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chain check fails on what it must catch (so the acceptance test can fail).
#[test]
fn chain_check_rejects_wrong_links_and_names() {
    let line = |kind: &str, from: &str, to: &str, svc: &str, id: &str, parent: &str| {
        let text = format!(
            "2026-11-22 10:00:00.000000001 (1.00ms[1.00ms]) {kind} 200 GET /api/items \
             [10.0.0.1 as {from}:1000]->[10.0.0.2 as {to}:80] size:0B svc=[{svc}] \
             traceparent=[00-0af7651916cd43dd8448eb211c80319c-{id}[{parent}]-01]"
        );
        let mut s = SpanLine::parse(&text).unwrap();
        if to == "backend.demo" {
            s.path = "/api/items/1".into();
        }
        if to == "store.demo" {
            s.path = "/store/1".into();
        }
        s
    };
    let good = vec![
        line(
            "HTTPClient",
            "client.demo",
            "frontend.demo",
            "demo/client",
            "0000000000000001",
            "0000000000000000",
        ),
        line(
            "HTTP",
            "client.demo",
            "frontend.demo",
            "demo/frontend",
            "0000000000000002",
            "0000000000000001",
        ),
        line(
            "HTTPClient",
            "frontend.demo",
            "backend.demo",
            "demo/frontend",
            "0000000000000003",
            "0000000000000002",
        ),
        line(
            "HTTP",
            "frontend.demo",
            "backend.demo",
            "demo/backend",
            "0000000000000004",
            "0000000000000003",
        ),
        line(
            "HTTPClient",
            "backend.demo",
            "store.demo",
            "demo/backend",
            "0000000000000005",
            "0000000000000004",
        ),
        line(
            "HTTP",
            "backend.demo",
            "store.demo",
            "demo/store",
            "0000000000000006",
            "0000000000000005",
        ),
    ];
    check_chain(&good).unwrap();
    // The backend's call attached to the frontend's server span instead of the backend's.
    let mut wrong_parent = good.clone();
    wrong_parent[4].parent_id = "0000000000000002".into();
    assert!(check_chain(&wrong_parent).is_err());
    // A peer left unnamed.
    let mut unnamed = good.clone();
    unnamed[3].from = "10.0.0.1 as 10.0.0.1:1000".into();
    assert!(check_chain(&unnamed).is_err());
    // A span missing.
    assert!(check_chain(&good[..5]).is_err());
}
