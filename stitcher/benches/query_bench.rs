//! Query API throughput while the store ingests.
//!
//! ```text
//! cargo bench -p weft-stitcher --bench query_bench -- [--seconds 10] [--rate 100000]
//!     [--concurrency 8] [--connections 2] [--ghz loadtest/ghz] [--addr HOST:PORT]
//! ```
//!
//! Without `--addr`: starts the store and the Query gRPC service on 127.0.0.1 in this
//! process and feeds the store through its `TraceSink` entry point at `--rate` spans per
//! second (each span is one observed exchange; 3-span traces over 20 backend
//! workloads `backend`, `backend-1`..`backend-19`; 1 % failed). With `--addr`: queries a running stitcher (whose ingest is
//! driven by `weft-loadgen`) and feeds nothing.
//!
//! Calls: by default `--concurrency` clients over `--connections` HTTP/2 connections
//! loop over a mix of ListTraces (plain and filtered), GetTrace, ServiceMap,
//! ListCollectors and Stats for `--seconds`. With `--ghz DIR`, each `query-*.json` ghz
//! configuration there (call, data, concurrency, connections) runs in turn for
//! `--seconds`; GetTrace asks for a recently listed trace instead of the file's fixed id.
//!
//! Prints per call: calls, calls per second, latency p50/p99, NOT_FOUND answers (GetTrace
//! of a trace evicted since it was listed: correct under churn) and errors (any other
//! status; the exit code is 1 if there are any); and the ingest rate reached with the
//! time each `on_trace` took (in process).

#[path = "../tests/query_common/mod.rs"]
mod query_common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use weft_proto::v1::{self, query_client::QueryClient};
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::TraceSink;
use weft_stitcher::query::QueryService;
use weft_stitcher::store::{Store, StoreConfig};

use query_common::*;

struct Args {
    seconds: u64,
    rate: u64,
    concurrency: usize,
    connections: usize,
    ghz: Option<PathBuf>,
    addr: Option<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 10,
        rate: 100_000,
        concurrency: 8,
        connections: 2,
        ghz: None,
        addr: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let bad = |e: &dyn std::fmt::Display| format!("{flag}: {e}");
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse().map_err(|e| bad(&e))?,
            "--rate" => args.rate = value()?.parse().map_err(|e| bad(&e))?,
            "--concurrency" => args.concurrency = value()?.parse().map_err(|e| bad(&e))?,
            "--connections" => args.connections = value()?.parse().map_err(|e| bad(&e))?,
            "--ghz" => args.ghz = Some(workspace_path(value()?)),
            "--addr" => args.addr = Some(value()?.parse().map_err(|e| bad(&e))?),
            // cargo bench passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// `cargo bench` runs in the package directory: a relative path that is not there is
/// taken from the workspace root.
fn workspace_path(p: String) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_relative() && !path.exists() {
        return PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(path);
    }
    path
}

/// One kind of call with its request.
#[derive(Debug, Clone)]
enum Call {
    ListTraces(v1::ListTracesRequest),
    /// A trace listed recently (refreshed after NOT_FOUND).
    GetRecentTrace,
    ServiceMap(v1::ServiceMapRequest),
    ListCollectors,
    Stats,
}

#[derive(Debug, Clone)]
struct Workload {
    name: String,
    calls: Vec<Call>,
    concurrency: usize,
    connections: usize,
}

fn default_mix(args: &Args) -> Workload {
    Workload {
        name: "mix".into(),
        calls: vec![
            Call::ListTraces(v1::ListTracesRequest::default()),
            Call::ListTraces(v1::ListTracesRequest {
                service: "backend-3".into(),
                error_only: true,
                ..Default::default()
            }),
            Call::GetRecentTrace,
            Call::ServiceMap(v1::ServiceMapRequest::default()),
            Call::ListCollectors,
            Call::Stats,
        ],
        concurrency: args.concurrency.max(1),
        connections: args.connections.max(1),
    }
}

fn json_u64(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        v => v.as_u64().unwrap_or(0),
    }
}

fn json_str(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// A ghz configuration file as a workload.
fn ghz_workload(path: &std::path::Path) -> Result<Workload, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let data = &cfg["data"];
    let call = match cfg["call"].as_str().unwrap_or_default() {
        "weft.v1.Query.ListTraces" => Call::ListTraces(v1::ListTracesRequest {
            service: json_str(&data["service"]),
            namespace: json_str(&data["namespace"]),
            min_duration_nanos: json_u64(&data["min_duration_nanos"]),
            error_only: data["error_only"].as_bool().unwrap_or(false),
            start_after_unix_nanos: json_u64(&data["start_after_unix_nanos"]),
            start_before_unix_nanos: json_u64(&data["start_before_unix_nanos"]),
            limit: json_u64(&data["limit"]) as u32,
        }),
        "weft.v1.Query.GetTrace" => Call::GetRecentTrace,
        "weft.v1.Query.ServiceMap" => Call::ServiceMap(v1::ServiceMapRequest {
            window_seconds: json_u64(&data["window_seconds"]),
        }),
        "weft.v1.Query.ListCollectors" => Call::ListCollectors,
        "weft.v1.Query.Stats" => Call::Stats,
        other => return Err(format!("{}: unknown call {other:?}", path.display())),
    };
    Ok(Workload {
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        calls: vec![call],
        concurrency: (json_u64(&cfg["concurrency"]) as usize).max(1),
        connections: (json_u64(&cfg["connections"]) as usize).max(1),
    })
}

fn ghz_workloads(dir: &std::path::Path) -> Result<Vec<Workload>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("query-") && n.ends_with(".json"))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(format!(
            "{}: no query-*.json ghz configurations",
            dir.display()
        ));
    }
    paths.iter().map(|p| ghz_workload(p)).collect()
}

/// Starts the in-process server; returns its address.
async fn serve(store: Arc<Store>, registry: Registry) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let collectors = || Vec::<v1::CollectorStatus>::new();
        tonic::transport::Server::builder()
            .add_service(QueryService::new(store, Arc::new(collectors), registry))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await
            .expect("serve");
    });
    addr
}

/// What the feeder did: spans fed, for how long, and how long each `on_trace` took.
struct Fed {
    spans: u64,
    took: Duration,
    on_trace_ns: Vec<u64>,
}

/// Feeds traces of 3 spans at `rate` spans per second until `stop`.
fn feed(store: Arc<Store>, rate: u64, stop: Arc<AtomicBool>) -> Fed {
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (rate / 100 / 3).max(1);
    let backends: Vec<Arc<weft_stitcher::resolve::PeerMeta>> = (0..20)
        .map(|k| {
            Arc::new(weft_stitcher::resolve::PeerMeta {
                namespace: "demo".into(),
                // `backend` is what loadtest/ghz/query-list-traces-filtered.json asks for.
                workload: if k == 0 {
                    "backend".to_string()
                } else {
                    format!("backend-{k}")
                },
                workload_kind: "Deployment".into(),
                ..Default::default()
            })
        })
        .collect();
    let mut on_trace_ns = Vec::new();
    let started = Instant::now();
    let mut fed = 0u64;
    let mut tick = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let now = now_unix_nanos();
        for i in 0..per_tick {
            let status = if i % 100 == 0 { 500 } else { 200 };
            let mut trace = demo_trace(now, (1 + i % 50) * MS, status);
            // 20 backends, so filters and the map have work to do.
            trace.spans[2].server.meta = Some(backends[i as usize % 20].clone());
            let trace = Arc::new(trace);
            let t0 = Instant::now();
            store.on_trace(&trace);
            on_trace_ns.push(t0.elapsed().as_nanos() as u64);
            fed += 3;
        }
        tick += 1;
        let due = started + TICK * tick;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Fed {
        spans: fed,
        took: started.elapsed(),
        on_trace_ns,
    }
}

#[derive(Default)]
struct CallStats {
    latencies_us: Vec<u64>,
    not_found: u64,
    errors: u64,
}

impl CallStats {
    fn merge(&mut self, other: CallStats) {
        self.latencies_us.extend(other.latencies_us);
        self.not_found += other.not_found;
        self.errors += other.errors;
    }
}

async fn recent_trace(client: &mut QueryClient<Channel>) -> Option<String> {
    let req = v1::ListTracesRequest {
        limit: 1,
        ..Default::default()
    };
    let list = client.list_traces(req).await.ok()?.into_inner();
    list.traces.first().map(|t| t.trace_id.clone())
}

/// One client task: loops over `calls` (starting at `first`) until `deadline`.
async fn client_loop(
    mut client: QueryClient<Channel>,
    calls: Vec<Call>,
    first: usize,
    deadline: Instant,
) -> Vec<CallStats> {
    let mut stats: Vec<CallStats> = calls.iter().map(|_| CallStats::default()).collect();
    let mut trace_id: Option<String> = None;
    let mut n = first;
    while Instant::now() < deadline {
        let which = n % calls.len();
        n += 1;
        if matches!(calls[which], Call::GetRecentTrace) && trace_id.is_none() {
            trace_id = recent_trace(&mut client).await;
            if trace_id.is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        let t0 = Instant::now();
        let result = match &calls[which] {
            Call::ListTraces(r) => client.list_traces(r.clone()).await.map(drop),
            Call::GetRecentTrace => {
                let trace_id = trace_id.clone().unwrap_or_default();
                client
                    .get_trace(v1::GetTraceRequest { trace_id })
                    .await
                    .map(drop)
            }
            Call::ServiceMap(r) => client.service_map(*r).await.map(drop),
            Call::ListCollectors => client
                .list_collectors(v1::ListCollectorsRequest {})
                .await
                .map(drop),
            Call::Stats => client.stats(v1::StatsRequest {}).await.map(drop),
        };
        let s = &mut stats[which];
        match result {
            Ok(()) => s.latencies_us.push(t0.elapsed().as_micros() as u64),
            Err(e) if e.code() == tonic::Code::NotFound => {
                s.not_found += 1;
                trace_id = None;
            }
            Err(e) => {
                if s.errors == 0 {
                    eprintln!("{:?}: {e}", calls[which]);
                }
                s.errors += 1;
            }
        }
    }
    stats
}

/// Runs `w` for `seconds` against `addr`; per-call statistics and the elapsed time.
async fn run_workload(addr: SocketAddr, w: &Workload, seconds: u64) -> (Vec<CallStats>, f64) {
    let mut channels = Vec::new();
    for _ in 0..w.connections {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .tcp_nodelay(true);
        match endpoint.connect().await {
            Ok(c) => channels.push(c),
            Err(e) => {
                eprintln!("connect {addr}: {e}");
                std::process::exit(1);
            }
        }
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..w.concurrency)
        .map(|i| {
            let client = QueryClient::new(channels[i % channels.len()].clone());
            tokio::spawn(client_loop(client, w.calls.clone(), i, deadline))
        })
        .collect();
    let mut total: Vec<CallStats> = w.calls.iter().map(|_| CallStats::default()).collect();
    for t in tasks {
        for (acc, s) in total.iter_mut().zip(t.await.expect("client task")) {
            acc.merge(s);
        }
    }
    (total, started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn call_name(c: &Call) -> String {
    match c {
        Call::ListTraces(r) if r.service.is_empty() && !r.error_only => {
            format!("ListTraces(limit {})", r.limit)
        }
        Call::ListTraces(r) => format!("ListTraces({}, filtered)", r.service),
        Call::GetRecentTrace => "GetTrace".into(),
        Call::ServiceMap(r) => format!("ServiceMap({}s)", r.window_seconds),
        Call::ListCollectors => "ListCollectors".into(),
        Call::Stats => "Stats".into(),
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("query_bench: {e}");
            std::process::exit(2);
        }
    };
    let workloads = match &args.ghz {
        Some(dir) => ghz_workloads(dir).unwrap_or_else(|e| {
            eprintln!("query_bench: {e}");
            std::process::exit(2);
        }),
        None => vec![default_mix(&args)],
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let registry = Registry::new();
    let store = Arc::new(Store::new(StoreConfig::default(), &registry));
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, feeder) = match args.addr {
        Some(addr) => (addr, None),
        None => {
            let addr = rt.block_on(serve(store.clone(), registry.clone()));
            let (s, st, rate) = (store.clone(), stop.clone(), args.rate);
            let feeder = std::thread::spawn(move || feed(s, rate, st));
            // Let the store fill before measuring.
            std::thread::sleep(Duration::from_secs(2));
            (addr, Some(feeder))
        }
    };
    println!(
        "query_bench: {addr}{}, {} s per workload",
        if args.addr.is_some() {
            " (external stitcher)"
        } else {
            " (in-process store + Query service)"
        },
        args.seconds
    );
    println!(
        "{:<56} {:>5} {:>9} {:>9} {:>8} {:>8} {:>9} {:>6}",
        "workload / call", "conc", "calls", "calls/s", "p50 µs", "p99 µs", "not_found", "errors"
    );
    let mut errors = 0u64;
    for w in &workloads {
        let (stats, elapsed) = rt.block_on(run_workload(addr, w, args.seconds));
        let mut all = 0usize;
        for (call, mut s) in w.calls.iter().zip(stats) {
            s.latencies_us.sort_unstable();
            errors += s.errors;
            all += s.latencies_us.len();
            println!(
                "{:<56} {:>5} {:>9} {:>9.0} {:>8} {:>8} {:>9} {:>6}",
                format!("{} / {}", w.name, call_name(call)),
                w.concurrency,
                s.latencies_us.len(),
                s.latencies_us.len() as f64 / elapsed,
                percentile(&s.latencies_us, 0.5),
                percentile(&s.latencies_us, 0.99),
                s.not_found,
                s.errors
            );
        }
        if w.calls.len() > 1 {
            println!(
                "{:<56} {:>5} {all:>9} {:>9.0}",
                format!("{} / all", w.name),
                w.concurrency,
                all as f64 / elapsed
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(feeder) = feeder {
        let Fed {
            spans,
            took,
            mut on_trace_ns,
        } = feeder.join().expect("feeder");
        on_trace_ns.sort_unstable();
        let snap = registry.snapshot();
        println!(
            "ingest: target {} spans/s, reached {:.0} spans/s ({spans} spans in {:.1} s); \
             store holds {} traces, {} MiB, evicted {}",
            args.rate,
            spans as f64 / took.as_secs_f64(),
            took.as_secs_f64(),
            snap.get("store.traces").copied().unwrap_or(0),
            snap.get("store.bytes").copied().unwrap_or(0) >> 20,
            snap.get("store.evicted").copied().unwrap_or(0),
        );
        println!(
            "ingest: on_trace (3-span trace) p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            percentile(&on_trace_ns, 0.5) / 1000,
            percentile(&on_trace_ns, 0.99) / 1000,
            percentile(&on_trace_ns, 0.999) / 1000,
            on_trace_ns.last().copied().unwrap_or(0) / 1000,
        );
    }
    if errors > 0 {
        std::process::exit(1);
    }
}
