//! Export throughput alone: synthetic completed traces (3-hop chains, 6 spans each, 64
//! caller workloads) fed at a fixed rate into the real [`OtlpExporter`] (queue, batching,
//! requests in flight, retries), exporting OTLP/gRPC to `--target`.
//!
//! ```text
//! cargo run --release -p weft-stitcher --example export_bench -- --target http://127.0.0.1:4317 \
//!     [--spans-per-second 300000] [--seconds 10] [--max-in-flight 4]
//! ```
//! (`loadtest/bench-export.sh` starts a receiver and runs this.)
//!
//! Prints spans offered, accepted by the receiver, dropped (queue full, failed, rejected),
//! and the exporter's CPU time per span: the process's CPU minus the thread that makes the
//! traces (`/proc/thread-self/schedstat`), so the figure holds on a shared machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_proto::v1::Side;
use weft_stitcher::export::otlp::{OtlpConfig, OtlpExporter};
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::{CompletedTrace, LinkKind, SpanId, SpanRecord, TraceId, TraceSink};
use weft_stitcher::resolve::{Identity, PeerKind, PeerMeta};

#[path = "../benches/support/cpu.rs"]
mod cpu;
use cpu::{process_cpu_nanos, thread_cpu_nanos};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn identity(kind: PeerKind, addr: &str, workload: &str) -> Identity {
    let addr: SocketAddr = addr.parse().expect("address");
    Identity {
        kind,
        addr,
        meta: Some(Arc::new(PeerMeta {
            namespace: "demo".into(),
            workload: workload.into(),
            workload_kind: "Deployment".into(),
            pod: Some(format!("{workload}-0")),
            pod_uid: None,
            node: Some("node-a".into()),
            service: None,
        })),
    }
}

/// One 3-hop chain: caller → svc0 → svc1 → svc2, a CLIENT and a SERVER span per hop.
/// `count` identities of one kind, the i-th at `addr(i)` named `{prefix}{i}`.
fn identities(
    kind: PeerKind,
    count: usize,
    addr: impl Fn(usize) -> String,
    prefix: &str,
) -> Vec<Identity> {
    (0..count)
        .map(|i| identity(kind, &addr(i), &format!("{prefix}{i}")))
        .collect()
}

fn chain(caller: &Identity, pods: &[Identity], services: &[Identity], n: u64) -> CompletedTrace {
    let trace_id = TraceId::random();
    let start = 1_795_341_600_000_000_000 + n * 1_000;
    let mut spans = Vec::with_capacity(6);
    let mut parent = None;
    let mut from = caller;
    for hop in 0..3 {
        let client_id = SpanId::random();
        let server_id = SpanId::random();
        let path = format!("/api/v1/items/{}", n % 100_000);
        let base = SpanRecord {
            trace_id,
            span_id: client_id,
            parent,
            link: if parent.is_none() {
                LinkKind::Root
            } else {
                LinkKind::Timing
            },
            side: Side::Client,
            name: "GET /api/v1/items/{id}".into(),
            start_unix_nanos: start + hop * 100_000,
            end_unix_nanos: start + 5_000_000 - hop * 100_000,
            method: "GET".into(),
            path,
            status: 200,
            error: false,
            client: from.clone(),
            server: services[hop as usize].clone(),
            joined: true,
            node: Arc::from("node-a"),
            source: (Arc::from("instance-a"), n),
            request_bytes: 0,
            response_bytes: 512,
        };
        let server = SpanRecord {
            span_id: server_id,
            parent: Some(client_id),
            link: LinkKind::Join,
            side: Side::Server,
            server: pods[hop as usize].clone(),
            node: Arc::from("node-b"),
            ..base.clone()
        };
        spans.push(base);
        spans.push(server);
        parent = Some(server_id);
        from = &pods[hop as usize];
    }
    CompletedTrace {
        trace_id,
        spans,
        late: false,
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let target: String = arg(&args, "--target", "http://127.0.0.1:4317".to_string());
    let rate: f64 = arg(&args, "--spans-per-second", 300_000.0);
    let seconds: f64 = arg(&args, "--seconds", 10.0);
    let mut cfg = OtlpConfig::new(target.clone());
    cfg.max_in_flight = arg(&args, "--max-in-flight", cfg.max_in_flight);
    cfg.max_batch_spans = arg(&args, "--max-batch-spans", cfg.max_batch_spans);
    let in_flight = cfg.max_in_flight;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let metrics = Registry::new();
    let exporter = runtime.block_on(async { OtlpExporter::spawn(cfg, &metrics) })?;

    let callers = identities(
        PeerKind::Pod,
        64,
        |i| format!("10.244.1.{}:40000", i + 2),
        "caller",
    );
    let pods = identities(
        PeerKind::Pod,
        3,
        |i| format!("10.244.2.{}:8080", i + 2),
        "svc",
    );
    let services = identities(
        PeerKind::Service,
        3,
        |i| format!("10.96.0.{}:80", i + 10),
        "svc",
    );

    // The producer: traces at the given span rate, in 1 ms slices.
    let producer = std::thread::spawn(move || {
        let cpu0 = thread_cpu_nanos();
        let started = Instant::now();
        let (mut offered, mut n) = (0u64, 0u64);
        while started.elapsed().as_secs_f64() < seconds {
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            while offered < due {
                let t = Arc::new(chain(&callers[(n % 64) as usize], &pods, &services, n));
                offered += t.spans.len() as u64;
                n += 1;
                exporter.on_trace(&t);
            }
            std::thread::sleep(Duration::from_micros(1000));
        }
        (offered, started.elapsed(), thread_cpu_nanos() - cpu0)
    });
    let cpu0 = process_cpu_nanos();
    let (offered, elapsed, producer_cpu) = producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))?;
    // Let the last batches go out.
    let m = || metrics.snapshot();
    let settle = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let s = m();
        let done = s["export.otlp.spans"]
            + s["export.otlp.dropped"]
            + s["export.otlp.dropped_queue_full"]
            + s["export.otlp.rejected"];
        if done >= offered || settle.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    let export_cpu = process_cpu_nanos()
        .saturating_sub(cpu0)
        .saturating_sub(producer_cpu);
    let s = m();
    let sent = s["export.otlp.spans"];
    let dropped =
        s["export.otlp.dropped"] + s["export.otlp.dropped_queue_full"] + s["export.otlp.rejected"];
    let secs = elapsed.as_secs_f64();
    println!(
        "export_bench: {target}, {in_flight} requests in flight, offered {rate:.0} spans/s for {secs:.1} s"
    );
    println!(
        "  offered        {offered} spans ({:.0}/s)",
        offered as f64 / secs
    );
    println!(
        "  accepted       {sent} spans ({:.0}/s), {} requests, {} retries",
        sent as f64 / secs,
        s["export.otlp.requests"],
        s["export.otlp.retries"]
    );
    println!(
        "  dropped        {dropped} (queue full {}, failed {}, rejected {})",
        s["export.otlp.dropped_queue_full"], s["export.otlp.dropped"], s["export.otlp.rejected"]
    );
    println!(
        "  exporter CPU   {:.2} s = {:.2} µs per span offered (batch, encode, send, free; producer thread excluded)",
        export_cpu as f64 / 1e9,
        export_cpu as f64 / 1e3 / offered.max(1) as f64
    );
    Ok(())
}
