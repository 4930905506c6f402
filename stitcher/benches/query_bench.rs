//! Query API throughput while the store ingests.
//!
//! ```text
//! cargo bench -p weft-stitcher --bench query_bench -- [--seconds 10] [--rate 100000]
//!     [--concurrency 8] [--addr HOST:PORT]
//! ```
//!
//! Without `--addr`: starts the store and the Query gRPC service on 127.0.0.1 in this
//! process, feeds the store through its `TraceSink` entry point at `--rate` spans per
//! second (each span is one observed exchange; traces of 3 spans over 20 workloads),
//! and runs `--concurrency` gRPC clients that loop over a mix of ListTraces (plain and
//! filtered), GetTrace, ServiceMap and Stats. With `--addr`: queries a running
//! stitcher (whose ingest is driven by `weft-loadgen`) and feeds nothing.
//!
//! Prints, per call and in total: calls, calls per second, latency p50/p99, errors;
//! and the ingest rate reached. Every response is checked (gRPC status OK).

#[path = "../tests/query_common/mod.rs"]
mod query_common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::server::TcpIncoming;
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
    addr: Option<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 10,
        rate: 100_000,
        concurrency: 8,
        addr: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse().map_err(|e| format!("{e}"))?,
            "--rate" => args.rate = value()?.parse().map_err(|e| format!("{e}"))?,
            "--concurrency" => args.concurrency = value()?.parse().map_err(|e| format!("{e}"))?,
            "--addr" => args.addr = Some(value()?.parse().map_err(|e| format!("{e}"))?),
            // cargo bench passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

const CALLS: [&str; 5] = [
    "ListTraces",
    "ListTraces(service,error_only)",
    "GetTrace",
    "ServiceMap",
    "Stats",
];

#[derive(Default)]
struct CallStats {
    latencies_us: Vec<u64>,
    errors: u64,
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
    let mut on_trace_ns = Vec::new();
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (rate / 100 / 3).max(1);
    let started = Instant::now();
    let mut fed = 0u64;
    let mut tick = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let now = now_unix_nanos();
        for i in 0..per_tick {
            let status = if i % 100 == 0 { 500 } else { 200 };
            let mut trace = demo_trace(now, (1 + i % 50) * MS, status);
            // 20 workloads: rename the backend so filters and the map have work to do.
            let workload = format!("backend-{}", i % 20);
            let meta = Arc::new(weft_stitcher::resolve::PeerMeta {
                namespace: "demo".into(),
                workload,
                workload_kind: "Deployment".into(),
                ..Default::default()
            });
            trace.spans[2].server.meta = Some(meta);
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

async fn client_loop(addr: SocketAddr, deadline: Instant, worker: usize) -> Vec<CallStats> {
    let mut stats: Vec<CallStats> = CALLS.iter().map(|_| CallStats::default()).collect();
    let mut client = match QueryClient::connect(format!("http://{addr}")).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("worker {worker}: connect {addr}: {e}");
            stats[0].errors += 1;
            return stats;
        }
    };
    let mut trace_id = String::new();
    let mut n = worker;
    while Instant::now() < deadline {
        let which = n % CALLS.len();
        n += 1;
        let t0 = Instant::now();
        let ok = match which {
            0 => client
                .list_traces(v1::ListTracesRequest::default())
                .await
                .map(|r| {
                    if let Some(t) = r.into_inner().traces.first() {
                        trace_id = t.trace_id.clone();
                    }
                }),
            1 => client
                .list_traces(v1::ListTracesRequest {
                    service: format!("backend-{}", n % 20),
                    error_only: true,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            2 if !trace_id.is_empty() => client
                .get_trace(v1::GetTraceRequest {
                    trace_id: trace_id.clone(),
                })
                .await
                .map(|_| ())
                // Evicted since it was listed: a correct answer under churn.
                .or_else(|s| {
                    if s.code() == tonic::Code::NotFound {
                        Ok(())
                    } else {
                        Err(s)
                    }
                }),
            2 => continue,
            3 => client
                .service_map(v1::ServiceMapRequest::default())
                .await
                .map(|_| ()),
            _ => client.stats(v1::StatsRequest {}).await.map(|_| ()),
        };
        let s = &mut stats[which];
        match ok {
            Ok(()) => s.latencies_us.push(t0.elapsed().as_micros() as u64),
            Err(e) => {
                if s.errors == 0 {
                    eprintln!("{}: {e}", CALLS[which]);
                }
                s.errors += 1;
            }
        }
    }
    stats
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("query_bench: {e}");
            std::process::exit(2);
        }
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
    let evicted_before = registry
        .snapshot()
        .get("store.evicted")
        .copied()
        .unwrap_or(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let results: Vec<Vec<CallStats>> = rt.block_on(async {
        let tasks: Vec<_> = (0..args.concurrency)
            .map(|w| tokio::spawn(client_loop(addr, deadline, w)))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let snap = registry.snapshot();
    let spans_fed = feeder.map(|f| f.join().expect("feeder"));

    println!(
        "query_bench: {} clients for {elapsed:.1}s against {addr}{}",
        args.concurrency,
        if args.addr.is_some() {
            " (external stitcher)"
        } else {
            " (in-process store + Query service)"
        }
    );
    if let Some(Fed {
        spans: total,
        took: fed_for,
        mut on_trace_ns,
    }) = spans_fed
    {
        on_trace_ns.sort_unstable();
        let evicted = snap.get("store.evicted").copied().unwrap_or(0) - evicted_before;
        println!(
            "ingest: target {} spans/s, reached {:.0} spans/s ({total} spans in {:.1}s; \
             {evicted} traces evicted while measuring); store holds {} traces, {} MiB",
            args.rate,
            total as f64 / fed_for.as_secs_f64(),
            fed_for.as_secs_f64(),
            snap.get("store.traces").copied().unwrap_or(0),
            snap.get("store.bytes").copied().unwrap_or(0) >> 20,
        );
        println!(
            "ingest: on_trace (3-span trace) took p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            percentile(&on_trace_ns, 0.5) / 1000,
            percentile(&on_trace_ns, 0.99) / 1000,
            percentile(&on_trace_ns, 0.999) / 1000,
            on_trace_ns.last().copied().unwrap_or(0) / 1000,
        );
    }
    println!(
        "{:<32} {:>9} {:>10} {:>9} {:>9} {:>7}",
        "call", "calls", "calls/s", "p50 µs", "p99 µs", "errors"
    );
    let mut total_calls = 0usize;
    let mut total_errors = 0u64;
    for (i, name) in CALLS.iter().enumerate() {
        let mut lat: Vec<u64> = results
            .iter()
            .flat_map(|r| r[i].latencies_us.iter().copied())
            .collect();
        lat.sort_unstable();
        let errors: u64 = results.iter().map(|r| r[i].errors).sum();
        total_calls += lat.len();
        total_errors += errors;
        println!(
            "{name:<32} {:>9} {:>10.0} {:>9} {:>9} {errors:>7}",
            lat.len(),
            lat.len() as f64 / elapsed,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
        );
    }
    println!(
        "{:<32} {total_calls:>9} {:>10.0} {:>9} {:>9} {total_errors:>7}",
        "all",
        total_calls as f64 / elapsed,
        "",
        ""
    );
    if total_errors > 0 {
        std::process::exit(1);
    }
}
