//! Acceptance on the harness: real collectors (eBPF on the pods' veths, one per node) ship
//! to this test's stitcher (ingest → resolve → join → link → assemble → OTLP/gRPC) over
//! real sockets; a real OTLP receiver gets the traces; the checks read only the receiver.
//!
//! Cluster: node-a runs `client-0` and `backend-0`, node-b runs `frontend-0` and
//! `store-0`; the client calls the `frontend` Service, frontend calls `backend`, backend
//! calls `store`: every hop crosses nodes, through ClusterIP DNAT. Servers are
//! `weft-demo-app serve` (thread per connection). Names from the static inventory.
//!
//! Ground truth comes from the applications' own logs: every load request has a path of its
//! own (`/api/front/<load>/<k>`); the frontend logs its request number `n` with that path and
//! calls `/api/items/{n}`; the backend logs its `n` with the path it served, and calls
//! `/store/{n}`. So a CLIENT span's correct parent is known without trusting the stitcher.
//! (Not by the caller's address: with a connection per request the loader reuses ports.)
//!
//! Needs root (namespaces, BPF) and the `weft-collector` and `weft-demo-app` binaries of the
//! workspace build (`weft_harness::binaries`).

mod stitch_common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use stitch_common::{Got, Received, by_trace, grpc_receiver};
use tokio::sync::mpsc;
use weft_harness::app_log;
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, Proc, ServiceSpec};
use weft_stitcher::export::otlp::{OtlpConfig, OtlpExporter};
use weft_stitcher::ingest::{Ingest, IngestConfig};
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::TraceSink;
use weft_stitcher::pipeline::{self, PipelineConfig, PipelineHandle};
use weft_stitcher::resolve::directory::CacheConfig;
use weft_stitcher::resolve::inventory::StaticInventory;

const PORT: u16 = 8080;

/// The binaries the test runs: the workspace build's (built if missing or stale).
fn binaries() -> (PathBuf, PathBuf) {
    let bin = |name| weft_harness::binaries::path(name).expect(name);
    (bin("weft-collector"), bin("weft-demo-app"))
}

fn spec() -> ClusterSpec {
    let pod = |name: &str, workload: &str| PodSpec {
        name: name.into(),
        namespace: "demo".into(),
        workload: workload.into(),
    };
    let svc = |name: &str| ServiceSpec {
        name: name.into(),
        namespace: "demo".into(),
        port: 80,
        target_port: PORT,
        workload: name.into(),
    };
    ClusterSpec {
        nodes: vec![
            NodeSpec {
                name: "node-a".into(),
                pods: vec![pod("client-0", "client"), pod("backend-0", "backend")],
            },
            NodeSpec {
                name: "node-b".into(),
                pods: vec![pod("frontend-0", "frontend"), pod("store-0", "store")],
            },
        ],
        services: vec![svc("frontend"), svc("backend"), svc("store")],
    }
}

/// A cluster with the chain's apps, collectors on every node, and the stitcher in process.
struct Stack {
    cluster: Cluster,
    app: PathBuf,
    apps: HashMap<&'static str, Proc>,
    _collectors: Vec<Proc>,
    received: Received,
    metrics: Registry,
    pipeline: Option<PipelineHandle>,
    idle: Duration,
    /// Loads run so far: each one's paths are `/api/front/<load>/<k>`.
    loads: AtomicU32,
    _lock: std::fs::File,
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The two acceptance runs take one at a time (each loads both cores); nextest runs tests
/// in separate processes, so the lock is a file lock, released when the process ends.
fn one_at_a_time() -> std::fs::File {
    let path = std::env::temp_dir().join("weft-stitch-e2e.lock");
    let f = std::fs::File::create(path).expect("lock file");
    f.lock().expect("taking the e2e lock");
    f
}

impl Stack {
    async fn up(propagate: bool) -> Stack {
        let lock = one_at_a_time();
        let (collector, app) = binaries();
        let cluster = Cluster::up(&spec()).expect("cluster up");

        // The stitcher: ingest listens in the control namespace (on the underlay, where
        // collectors reach it); everything else runs in this process.
        let metrics = Registry::new();
        let resolver =
            StaticInventory::from_yaml(&cluster.inventory_yaml(), CacheConfig::default(), &metrics)
                .expect("inventory");
        let listener = cluster.run_in(cluster.control_netns(), || {
            std::net::TcpListener::bind((cluster.control_ip(), 0))
        });
        let listener = listener.expect("binding the ingest listener");
        listener.set_nonblocking(true).unwrap();
        let ingest_addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (endpoint, received) = grpc_receiver().await;
        let exporter: Arc<dyn TraceSink> =
            OtlpExporter::spawn(OtlpConfig::new(endpoint), &metrics).unwrap();
        let (tx, rx) = mpsc::channel(256);
        // Generous windows: collectors on a loaded 2-core machine ship late.
        let cfg = PipelineConfig {
            join_window: Duration::from_secs(2),
            link_wait: Duration::from_millis(100),
            link_max_wait: Duration::from_millis(1500),
            trace_idle: Duration::from_secs(3),
            ..PipelineConfig::default()
        };
        let idle = cfg.trace_idle;
        let pipeline = pipeline::spawn(cfg, resolver, metrics.clone(), rx, vec![exporter]);
        let ingest = Ingest::new(IngestConfig::default(), tx, &metrics);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ingest.server())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });

        let mut apps = HashMap::new();
        let url = |svc: &str, path: &str| {
            let s = cluster.service(svc);
            format!("http://{}:{}{path}", s.cluster_ip(), s.port())
        };
        let listen = format!("0.0.0.0:{PORT}");
        for (pod, name, call) in [
            ("store-0", "store", None),
            ("backend-0", "backend", Some(url("store", "/store/{n}"))),
            (
                "frontend-0",
                "frontend",
                Some(url("backend", "/api/items/{n}")),
            ),
        ] {
            let mut cmd = Command::new(&app);
            cmd.args(["serve", "--name", name, "--listen", &listen]);
            if let Some(c) = call {
                cmd.args(["--call", &c]);
            }
            if propagate {
                cmd.arg("--propagate");
            }
            let proc = cluster.spawn(cluster.pod(pod).netns(), &mut cmd).unwrap();
            wait_until("an app to listen", Duration::from_secs(10), || {
                proc.stdout_text().contains("\"listening\"")
            });
            apps.insert(name, proc);
        }

        let mut collectors = Vec::new();
        for node in cluster.nodes() {
            let mut cmd = Command::new(&collector);
            cmd.args(["--node-name", node.name()])
                .arg("--stitcher")
                .arg(format!("http://{ingest_addr}"))
                .args(["--interfaces", &format!("veth{}-*", cluster.prefix())])
                .args(["--metrics-listen", "127.0.0.1:9401"])
                .args(["--batch-max-delay", "50ms"]);
            collectors.push(cluster.spawn(node.netns(), &mut cmd).unwrap());
        }
        for c in &collectors {
            wait_until("a collector to run", Duration::from_secs(30), || {
                assert!(
                    c.try_wait().unwrap().is_none(),
                    "collector exited: {}",
                    c.stderr_text()
                );
                c.stderr_text().contains(" running")
            });
        }
        let m = metrics.clone();
        wait_until("collectors to connect", Duration::from_secs(30), || {
            m.snapshot()
                .get("ingest.streams.active")
                .copied()
                .unwrap_or(0)
                >= 2
        });
        Stack {
            cluster,
            app,
            apps,
            _collectors: collectors,
            received,
            metrics,
            pipeline: Some(pipeline),
            idle,
            loads: AtomicU32::new(0),
            _lock: lock,
        }
    }

    /// Runs `weft-demo-app load` against the frontend Service from `netns`.
    fn load(&self, netns: &str, requests: u64, concurrency: u32, traceparent: bool) {
        let svc = self.cluster.service("frontend");
        let run = self.loads.fetch_add(1, Ordering::Relaxed) + 1;
        let mut cmd = Command::new(&self.app);
        cmd.args(["load", "--url"])
            .arg(format!(
                "http://{}:{}/api/front/{run}/{{n}}",
                svc.cluster_ip(),
                svc.port()
            ))
            .args(["--requests", &requests.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .arg("--no-keepalive");
        if traceparent {
            cmd.arg("--traceparent");
        }
        let p = self.cluster.spawn(netns, &mut cmd).unwrap();
        let status = p
            .wait_timeout(Duration::from_secs(120))
            .unwrap()
            .expect("load finished in time");
        assert!(status.success(), "load failed: {}", p.stdout_text());
    }

    /// Waits for `spans` spans (and one more idle window, so duplicates would show); takes them.
    async fn take(&self, spans: usize) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.received.len() < spans && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(self.idle * 2).await;
        let got = self.received.drain();
        assert_eq!(
            got.len(),
            spans,
            "spans received; metrics {:?}",
            self.metrics.snapshot()
        );
        got
    }

    /// Request numbers from an app's log, by the path served (unique, or the truth is not).
    fn numbers_by_path(&self, app: &str) -> HashMap<String, u64> {
        let served = app_log::served(&self.apps[app].stdout_text());
        let count = served.len();
        let by_path: HashMap<String, u64> = served.into_iter().map(|r| (r.path, r.n)).collect();
        assert_eq!(by_path.len(), count, "{app} served a path twice");
        by_path
    }

    fn frontend_traceparents(&self) -> HashSet<String> {
        app_log::served(&self.apps["frontend"].stdout_text())
            .iter()
            .filter_map(|r| Some(r.trace_id()?.to_string()))
            .collect()
    }

    async fn stop(mut self) {
        if let Some(p) = self.pipeline.take() {
            drop(p);
        }
    }
}

/// Per inner CLIENT span: is its parent the server span that really made the call?
struct LinkStats {
    total: usize,
    correct: usize,
    timing: usize,
    timing_correct: usize,
    ambiguous: usize,
    traceparent: usize,
}

fn link_stats(stack: &Stack, spans: &[Got]) -> LinkStats {
    let frontend = stack.numbers_by_path("frontend");
    let backend = stack.numbers_by_path("backend");
    let by_id: HashMap<&str, &Got> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut st = LinkStats {
        total: 0,
        correct: 0,
        timing: 0,
        timing_correct: 0,
        ambiguous: 0,
        traceparent: 0,
    };
    for c in spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client && s.service != "client")
    {
        st.total += 1;
        let parent = by_id.get(c.parent.as_str());
        // The number the parent server span's app gave its request.
        let parent_n = parent.and_then(|p| match p.service.as_str() {
            "frontend" => frontend.get(p.path()).copied(),
            "backend" => backend.get(p.path()).copied(),
            _ => None,
        });
        // The number in the call's own path.
        let call_n: Option<u64> = c.path().rsplit('/').next().and_then(|n| n.parse().ok());
        let ok = parent.is_some_and(|p| p.kind == SpanKind::Server && p.service == c.service)
            && parent_n.is_some()
            && parent_n == call_n;
        st.correct += usize::from(ok);
        match c.link() {
            "timing" => {
                st.timing += 1;
                st.timing_correct += usize::from(ok);
            }
            "ambiguous" => st.ambiguous += 1,
            "traceparent" => st.traceparent += 1,
            _ => {}
        }
    }
    st
}

/// The shape of one chain trace: 6 spans, SERVER under its CLIENT, inner CLIENT under the
/// enclosing SERVER, the right workloads, nothing twice.
fn check_chain(spans: &[Got]) {
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(ids.len(), 6);
    let get = |kind: SpanKind, service: &str| {
        let v: Vec<&Got> = spans
            .iter()
            .filter(|s| s.kind == kind && s.service == service)
            .collect();
        assert_eq!(v.len(), 1, "one {kind:?} span of {service}: {spans:#?}");
        v[0]
    };
    let chain = [
        ("client", "frontend"),
        ("frontend", "backend"),
        ("backend", "store"),
    ];
    let mut enclosing: Option<&Got> = None;
    for (caller, callee) in chain {
        let c = get(SpanKind::Client, caller);
        let s = get(SpanKind::Server, callee);
        assert_eq!(s.parent, c.span_id, "SERVER span under its CLIENT span");
        assert_eq!(s.path(), c.path());
        assert_eq!(s.attrs["weft.joined"], "true");
        match enclosing {
            None => assert_eq!(c.parent, "", "the client's call is the root"),
            Some(e) => assert_eq!(c.parent, e.span_id, "CLIENT under the enclosing SERVER"),
        }
        enclosing = Some(s);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_without_propagation_sequential_concurrent_and_unknown_caller() {
    let stack = Stack::up(false).await;
    let client = stack.cluster.pod("client-0").netns().to_string();

    // 1. 500 sequential requests: 500 traces of exactly 6 spans, links all right.
    stack.load(&client, 500, 1, false);
    let spans = stack.take(500 * 6).await;
    let traces = by_trace(&spans);
    assert_eq!(traces.len(), 500);
    traces.values().for_each(|t| check_chain(t));
    let st = link_stats(&stack, &spans);
    assert_eq!(
        (st.total, st.correct),
        (1000, 1000),
        "concurrency 1: every link right"
    );

    // 3. Concurrency 8: shares reported; `timing` links right in ≥ 99%.
    stack.load(&client, 800, 8, false);
    let spans = stack.take(800 * 6).await;
    let st = link_stats(&stack, &spans);
    println!(
        "concurrency 8: {}/{} links correct ({:.1}%), ambiguous {} ({:.1}%), timing {}/{} right",
        st.correct,
        st.total,
        100.0 * st.correct as f64 / st.total as f64,
        st.ambiguous,
        100.0 * st.ambiguous as f64 / st.total as f64,
        st.timing_correct,
        st.timing
    );
    assert_eq!(st.total, 1600);
    assert!(
        st.timing_correct * 100 >= st.timing * 99,
        "timing links right: {}/{}",
        st.timing_correct,
        st.timing
    );

    // 4. A caller outside the inventory (the control namespace's address) still yields
    // its server span, named by IP, counted as unmatched on the client side.
    let unmatched_before = stack.metrics.snapshot()["join.unmatched.client"];
    let control = stack.cluster.control_netns().to_string();
    stack.load(&control, 20, 1, false);
    let spans = stack.take(20 * 5).await;
    let roots: Vec<&Got> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 20);
    for r in &roots {
        assert_eq!(r.kind, SpanKind::Server);
        assert_eq!(r.service, "frontend");
        assert_eq!(
            r.attrs["client.address"],
            stack.cluster.control_ip().to_string()
        );
        assert_eq!(r.attrs["weft.joined"], "false");
    }
    assert_eq!(by_trace(&spans).len(), 20);
    let unmatched = stack.metrics.snapshot()["join.unmatched.client"] - unmatched_before;
    assert_eq!(unmatched, 20);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_with_propagated_traceparent_32_concurrent_callers() {
    let stack = Stack::up(true).await;
    let client = stack.cluster.pod("client-0").netns().to_string();
    stack.load(&client, 2000, 32, true);
    let spans = stack.take(2000 * 6).await;
    let traces = by_trace(&spans);
    let st = link_stats(&stack, &spans);
    println!(
        "propagated, 32 callers: {}/{} links correct, {} by traceparent, {} timing, {} ambiguous; link counters {:?}",
        st.correct,
        st.total,
        st.traceparent,
        st.timing,
        st.ambiguous,
        stack
            .metrics
            .snapshot()
            .into_iter()
            .filter(|(k, _)| k.starts_with("link.") || k.starts_with("join."))
            .collect::<Vec<_>>()
    );
    assert_eq!(traces.len(), 2000);
    traces.values().for_each(|t| check_chain(t));
    assert_eq!((st.total, st.correct, st.traceparent), (4000, 4000, 4000));
    // The application's own trace ids are kept.
    let app_ids = stack.frontend_traceparents();
    let ids: HashSet<String> = traces.keys().cloned().collect();
    assert_eq!(ids, app_ids);
    stack.stop().await;
}
