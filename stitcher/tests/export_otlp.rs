//! OTLP export delivery: the real `OtlpExporter` against an in-process OTLP/gRPC receiver
//! on loopback that can be slow and can fail. Checks that requests are bounded in spans,
//! that several are in flight at once but never more than configured, that retryable
//! failures are retried and permanent ones dropped, and that every span ends up counted
//! exactly once: accepted, dropped after failing, or dropped at the full queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use weft_proto::v1::Side;
use weft_stitcher::export::otlp::{OtlpConfig, OtlpExporter};
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::{CompletedTrace, LinkKind, SpanId, SpanRecord, TraceId, TraceSink};
use weft_stitcher::resolve::Identity;

/// What the receiver does and saw.
#[derive(Default)]
struct Receiver {
    delay: Duration,
    /// Answer this many requests with UNAVAILABLE (retryable) first.
    fail_first: AtomicU64,
    /// Answer every request with INVALID_ARGUMENT (not retryable).
    refuse_all: bool,
    spans: AtomicU64,
    requests: AtomicU64,
    largest_request: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

struct Service(Arc<Receiver>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let r = &self.0;
        let now = r.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        r.most_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(r.delay).await;
        r.in_flight.fetch_sub(1, Ordering::SeqCst);
        if r.refuse_all {
            return Err(tonic::Status::invalid_argument("refused by the test"));
        }
        if r.fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(tonic::Status::unavailable("failing on purpose"));
        }
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        r.requests.fetch_add(1, Ordering::SeqCst);
        r.spans.fetch_add(spans as u64, Ordering::SeqCst);
        r.largest_request.fetch_max(spans, Ordering::SeqCst);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn serve(receiver: Arc<Receiver>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Service(receiver)))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    addr
}

/// A trace of `spans` spans (a client/server chain) between two unnamed addresses.
fn trace(spans: usize) -> Arc<CompletedTrace> {
    let trace_id = TraceId::random();
    let client = Identity::external("10.244.1.9:37450".parse().unwrap());
    let server = Identity::external("10.244.2.5:8080".parse().unwrap());
    let mut parent = None;
    let spans = (0..spans)
        .map(|i| {
            let span_id = SpanId::random();
            let s = SpanRecord {
                trace_id,
                span_id,
                parent,
                link: if parent.is_some() {
                    LinkKind::Join
                } else {
                    LinkKind::Root
                },
                side: if i % 2 == 0 {
                    Side::Client
                } else {
                    Side::Server
                },
                name: "GET /api/items/{id}".into(),
                start_unix_nanos: 1_795_341_600_000_000_000,
                end_unix_nanos: 1_795_341_600_005_000_000,
                method: "GET".into(),
                path: format!("/api/items/{i}"),
                status: 200,
                error: false,
                client: client.clone(),
                server: server.clone(),
                joined: true,
                node: Arc::from("node-a"),
                source: (Arc::from("instance"), i as u64),
                request_bytes: 0,
                response_bytes: 10,
            };
            parent = Some(span_id);
            s
        })
        .collect();
    Arc::new(CompletedTrace {
        trace_id,
        spans,
        late: false,
    })
}

fn config(addr: SocketAddr) -> OtlpConfig {
    let mut cfg = OtlpConfig::new(format!("http://{addr}"));
    cfg.flush_interval = Duration::from_millis(20);
    cfg.initial_backoff = Duration::from_millis(10);
    cfg.max_backoff = Duration::from_millis(40);
    cfg.timeout = Duration::from_secs(5);
    cfg
}

/// Counters of the exporter, once every offered span is accounted for (bounded wait).
async fn settled(metrics: &Registry, offered: u64) -> std::collections::BTreeMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics.snapshot();
        let done = m["export.otlp.spans"]
            + m["export.otlp.dropped"]
            + m["export.otlp.dropped_queue_full"]
            + m["export.otlp.rejected"];
        if done >= offered && m["export.otlp.in_flight"] == 0 || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded_several_in_flight_retries_deliver_everything() {
    let receiver = Arc::new(Receiver {
        delay: Duration::from_millis(50),
        fail_first: AtomicU64::new(2),
        ..Default::default()
    });
    let addr = serve(receiver.clone()).await;
    let metrics = Registry::new();
    let mut cfg = config(addr);
    cfg.max_batch_spans = 60;
    cfg.max_in_flight = 3;
    let exporter = OtlpExporter::spawn(cfg, &metrics).unwrap();
    // 200 traces of 6 spans: 20 requests of 60 spans at most.
    for _ in 0..200 {
        exporter.on_trace(&trace(6));
    }
    let m = settled(&metrics, 1200).await;
    assert_eq!(receiver.spans.load(Ordering::SeqCst), 1200, "{m:?}");
    assert_eq!(m["export.otlp.spans"], 1200);
    assert_eq!(m["export.otlp.dropped"], 0);
    assert_eq!(m["export.otlp.dropped_queue_full"], 0);
    assert_eq!(m["export.otlp.retries"], 2, "the two UNAVAILABLE answers");
    assert_eq!(
        m["export.otlp.requests"],
        receiver.requests.load(Ordering::SeqCst) + 2
    );
    assert!(receiver.largest_request.load(Ordering::SeqCst) <= 60);
    assert!(receiver.requests.load(Ordering::SeqCst) >= 20);
    let most = receiver.most_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&most),
        "requests in flight at once: {most} (configured 3)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_traces_goes_in_at_once_and_what_overflows_the_queue_is_counted() {
    let receiver = Arc::new(Receiver::default());
    let addr = serve(receiver.clone()).await;
    let metrics = Registry::new();
    let mut cfg = config(addr);
    cfg.queue_spans = 12;
    let exporter = OtlpExporter::spawn(cfg, &metrics).unwrap();
    // One pipeline turn's 10 traces of 3 spans into an empty 12-span queue: the first 4
    // go in, the other 6 are dropped and counted.
    let turn: Vec<_> = (0..10).map(|_| trace(3)).collect();
    exporter.on_traces(&turn);
    let m = settled(&metrics, 30).await;
    assert_eq!(m["export.otlp.dropped_queue_full"], 18, "{m:?}");
    assert_eq!(m["export.otlp.spans"], 12, "{m:?}");
    assert_eq!(receiver.spans.load(Ordering::SeqCst), 12);
    // Once the worker took them, the queue has room for the next turn again.
    let turn: Vec<_> = (0..4).map(|_| trace(3)).collect();
    exporter.on_traces(&turn);
    let m = settled(&metrics, 42).await;
    assert_eq!(m["export.otlp.dropped_queue_full"], 18, "{m:?}");
    assert_eq!(m["export.otlp.spans"], 24, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_and_a_full_queue_drop_and_count_every_span() {
    let receiver = Arc::new(Receiver {
        delay: Duration::from_millis(100),
        refuse_all: true,
        ..Default::default()
    });
    let addr = serve(receiver.clone()).await;
    let metrics = Registry::new();
    let mut cfg = config(addr);
    cfg.max_batch_spans = 10;
    cfg.max_in_flight = 1;
    cfg.queue_spans = 8;
    let exporter = OtlpExporter::spawn(cfg, &metrics).unwrap();
    // Far more than an 8-span (4-trace) queue and one slow request at a time can hold.
    for _ in 0..100 {
        exporter.on_trace(&trace(2));
    }
    let m = settled(&metrics, 200).await;
    assert_eq!(m["export.otlp.spans"], 0, "{m:?}");
    assert!(m["export.otlp.dropped_queue_full"] > 0, "{m:?}");
    assert!(m["export.otlp.dropped"] > 0, "{m:?}");
    assert_eq!(
        m["export.otlp.retries"], 0,
        "INVALID_ARGUMENT is not retried"
    );
    assert_eq!(
        m["export.otlp.dropped"] + m["export.otlp.dropped_queue_full"],
        200,
        "every span counted once: {m:?}"
    );
}
