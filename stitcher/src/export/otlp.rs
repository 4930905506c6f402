//! OTLP export: completed traces → `ExportTraceServiceRequest`s to `--otlp-endpoint`.
//!
//! In: completed traces (through [`TraceSink`]). Out: OTLP over gRPC (default) or HTTP
//! with protobuf bodies (`/v1/traces`).
//!
//! Why hand-built OTLP protobuf (`opentelemetry-proto`, the messages and tonic client that
//! `opentelemetry-otlp` itself uses) rather than the SDK's `SpanExporter`: every id,
//! timestamp and parent is ours, not a live tracer's, and Weft exports *one resource per
//! workload* in the same request; the SDK exporter carries one resource per exporter. The
//! generated `TraceServiceClient` speaks exactly the same wire protocol.
//!
//! Mapping: spans are grouped by the workload they belong to (the caller for a CLIENT
//! span, the callee for a SERVER span) and its pod: resource attributes `service.name`
//! (workload, or the IP when unnamed), `service.namespace`, `k8s.namespace.name`,
//! `k8s.pod.name`, `k8s.node.name`, `k8s.deployment.name` (for Deployments). Span: name
//! `METHOD route`, kind CLIENT/SERVER, attributes `http.request.method`, `url.path`,
//! `http.response.status_code`, `server.address`, `server.port`, `client.address`,
//! `client.port`, `network.peer.address`, `weft.link` (absent on roots), `weft.joined`, `weft.node`;
//! status ERROR for 5xx (SERVER) and 4xx/5xx (CLIENT).
//!
//! Delivery: a queue bounded in spans ([`sink_queue`]: each pipeline turn's traces go in
//! with one send, one wake-up of the worker; what does not fit is dropped and counted in
//! `export.otlp.dropped_queue_full`), a worker that
//! batches up to `max_batch_spans` spans or `max_batch_bytes` bytes or `flush_interval`,
//! keeps up to `max_in_flight` requests out at once (over one HTTP/2 connection for
//! gRPC), retries retryable failures with exponential backoff and jitter, and counts what
//! it finally drops (`export.otlp.dropped`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode,
};
use prost::Message;
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use weft_proto::v1::Side;

use super::wire::{RawCodec, WireEncoder};
use super::{LogOnce, owner, peer};

/// The generated service's method path.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
use crate::metrics::{Counter, Registry};
use crate::model::{CompletedTrace, FastMap, LinkKind, SpanRecord, TraceSink};
use crate::resolve::Identity;
use crate::sink_queue::{self, TraceQueue, TraceQueueReceiver};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
}

#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// `http://host:4317` (gRPC) or `http://host:4318` (HTTP; `/v1/traces` is appended
    /// unless present).
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Spans waiting for export; beyond it new traces are dropped and counted.
    pub queue_spans: usize,
    /// A request carries at most this many spans...
    pub max_batch_spans: usize,
    /// ...and about this many bytes at most (estimated before encoding; receivers
    /// commonly refuse gRPC messages above 4 MiB).
    pub max_batch_bytes: usize,
    /// A partial batch is sent after waiting this long for more spans.
    pub flush_interval: Duration,
    /// Requests in flight at once. One request at a time waits a full round trip (the
    /// receiver decodes megabytes) per batch; several keep the receiver busy.
    pub max_in_flight: usize,
    pub timeout: Duration,
    /// Attempts per request (the first included).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl OtlpConfig {
    /// About a second of spans at 300,000 spans/s (~110 MB when full, shared with the
    /// store's queue, which holds the same traces): room for the bursts an idle sweep
    /// completes at once, still bounded.
    pub const DEFAULT_QUEUE_SPANS: usize = 300_000;

    pub fn new(endpoint: impl Into<String>) -> Self {
        OtlpConfig {
            endpoint: endpoint.into(),
            protocol: OtlpProtocol::Grpc,
            queue_spans: Self::DEFAULT_QUEUE_SPANS,
            max_batch_spans: 4096,
            max_batch_bytes: 3 << 20,
            flush_interval: Duration::from_millis(200),
            max_in_flight: 4,
            timeout: Duration::from_secs(10),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
struct Counters {
    sent: Counter,
    requests: Counter,
    retries: Counter,
    dropped_queue: Counter,
    dropped_failed: Counter,
    rejected: Counter,
    in_flight: Counter,
}

/// A [`TraceSink`] that exports over OTLP. Create inside a tokio runtime.
pub struct OtlpExporter {
    queue: TraceQueue,
    counters: Counters,
    log: LogOnce,
}

impl OtlpExporter {
    /// Starts the export worker on the current tokio runtime.
    pub fn spawn(cfg: OtlpConfig, metrics: &Registry) -> anyhow::Result<Arc<OtlpExporter>> {
        let c = |name: &str, help| metrics.counter(name, help);
        let counters = Counters {
            sent: c("export.otlp.spans", "spans accepted by the OTLP endpoint"),
            requests: c("export.otlp.requests", "OTLP export requests sent"),
            retries: c("export.otlp.retries", "OTLP export attempts retried"),
            dropped_queue: c(
                "export.otlp.dropped_queue_full",
                "spans dropped because the OTLP export queue was full",
            ),
            dropped_failed: c(
                "export.otlp.dropped",
                "spans dropped after the OTLP endpoint failed every attempt",
            ),
            rejected: c(
                "export.otlp.rejected",
                "spans the OTLP endpoint reported as rejected (partial success)",
            ),
            in_flight: c(
                "export.otlp.in_flight",
                "OTLP export requests in flight (gauge)",
            ),
        };
        let transport = Transport::new(&cfg)?;
        let (queue, rx) = sink_queue::channel(cfg.queue_spans);
        tokio::spawn(run(cfg, transport, rx, counters.clone()));
        Ok(Arc::new(OtlpExporter {
            queue,
            counters,
            log: LogOnce::default(),
        }))
    }
}

impl TraceSink for OtlpExporter {
    fn on_trace(&self, trace: &Arc<CompletedTrace>) {
        self.on_traces(std::slice::from_ref(trace));
    }

    /// One send (one wake-up of the worker) per pipeline turn.
    fn on_traces(&self, traces: &[Arc<CompletedTrace>]) {
        if let Err(rejected) = self.queue.send(traces) {
            self.counters.dropped_queue.add(rejected.spans());
            self.log.warn("OTLP export drops spans", rejected.reason);
        }
    }
}

/// The traces of the next request, and its size so far.
#[derive(Default)]
struct Batch {
    traces: Vec<Arc<CompletedTrace>>,
    spans: usize,
    bytes: usize,
}

impl Batch {
    /// Whether `trace` would push this batch past a bound (an empty batch takes any trace:
    /// a single trace larger than the bounds goes alone).
    fn would_overflow(&self, cfg: &OtlpConfig, spans: usize, bytes: usize) -> bool {
        !self.traces.is_empty()
            && (self.spans + spans > cfg.max_batch_spans
                || self.bytes + bytes > cfg.max_batch_bytes)
    }

    fn push(&mut self, trace: Arc<CompletedTrace>, spans: usize, bytes: usize) {
        self.traces.push(trace);
        self.spans += spans;
        self.bytes += bytes;
    }

    fn is_full(&self, cfg: &OtlpConfig) -> bool {
        self.spans >= cfg.max_batch_spans || self.bytes >= cfg.max_batch_bytes
    }
}

/// What every request task shares.
struct Shared {
    cfg: OtlpConfig,
    counters: Counters,
    log_failed: LogOnce,
}

impl Shared {
    fn update_in_flight(&self, permits: &Semaphore) {
        let out = self.cfg.max_in_flight.max(1) - permits.available_permits();
        self.counters.in_flight.set(out as u64);
    }
}

/// The worker: batch (bounded by spans and bytes), encode, and hand each request to a
/// task of its own; at most `max_in_flight` requests are out at once. While all are out,
/// the worker waits, its queue fills, and further traces are dropped and counted
/// (`export.otlp.dropped_queue_full`): memory stays bounded by the queue, the turn's
/// traces the worker took from it, the batch and the requests in flight.
async fn run(
    cfg: OtlpConfig,
    transport: Transport,
    mut rx: TraceQueueReceiver,
    counters: Counters,
) {
    let in_flight = cfg.max_in_flight.max(1);
    let permits = Arc::new(Semaphore::new(in_flight));
    let shared = Arc::new(Shared {
        cfg,
        counters,
        log_failed: LogOnce::default(),
    });
    let cfg = &shared.cfg;
    let mut encoder = WireEncoder::default();
    let mut batch = Batch::default();
    loop {
        let next = if batch.traces.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(cfg.flush_interval, rx.recv()).await {
                Ok(t) => t,
                Err(_) => {
                    dispatch(&mut encoder, &mut batch, &transport, &shared, &permits).await;
                    continue;
                }
            }
        };
        let Some(traces) = next else {
            break;
        };
        for trace in traces {
            let spans = trace.spans.len();
            let bytes: usize = trace.spans.iter().map(WireEncoder::estimate).sum();
            if batch.would_overflow(cfg, spans, bytes) {
                dispatch(&mut encoder, &mut batch, &transport, &shared, &permits).await;
            }
            batch.push(trace, spans, bytes);
            if batch.is_full(cfg) {
                dispatch(&mut encoder, &mut batch, &transport, &shared, &permits).await;
            }
        }
    }
    // The pipeline stopped: send what is left and wait for every request to finish.
    dispatch(&mut encoder, &mut batch, &transport, &shared, &permits).await;
    let _ = permits.acquire_many(in_flight as u32).await;
}

/// Encodes the batch into one request and starts sending it once a request slot is free.
async fn dispatch(
    encoder: &mut WireEncoder,
    batch: &mut Batch,
    transport: &Transport,
    shared: &Arc<Shared>,
    permits: &Arc<Semaphore>,
) {
    if batch.traces.is_empty() {
        return;
    }
    let spans = batch.spans as u64;
    let mut bytes = Vec::with_capacity(batch.bytes);
    encoder.encode(&batch.traces, &mut bytes);
    *batch = Batch::default();
    let request = Bytes::from(bytes);
    let Ok(permit) = permits.clone().acquire_owned().await else {
        return;
    };
    shared.update_in_flight(permits);
    let (transport, shared, permits) = (transport.clone(), shared.clone(), permits.clone());
    tokio::spawn(async move {
        send_with_retries(transport, &request, spans, &shared).await;
        drop(permit);
        shared.update_in_flight(&permits);
    });
}

/// Sends one request, retrying retryable failures with exponential backoff (with jitter,
/// so that requests failing together do not retry together); counts the outcome.
async fn send_with_retries(mut transport: Transport, request: &Bytes, n: u64, shared: &Shared) {
    let (cfg, counters) = (&shared.cfg, &shared.counters);
    let mut backoff = cfg.initial_backoff;
    for attempt in 1..=cfg.max_attempts.max(1) {
        counters.requests.inc();
        match transport.send(request, cfg.timeout).await {
            Ok(rejected) => {
                counters.rejected.add(rejected);
                counters.sent.add(n.saturating_sub(rejected));
                return;
            }
            Err(e) if e.retryable && attempt < cfg.max_attempts => {
                counters.retries.inc();
                tracing::debug!(error = %e.message, attempt, "OTLP export failed, retrying");
                let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(cfg.max_backoff);
            }
            Err(e) => {
                counters.dropped_failed.add(n);
                shared
                    .log_failed
                    .warn("OTLP export drops spans", &e.message);
                return;
            }
        }
    }
}

struct SendError {
    retryable: bool,
    message: String,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

#[derive(Clone)]
enum Transport {
    Grpc(tonic::client::Grpc<Channel>),
    Http {
        client: Box<HttpClient>,
        uri: hyper::Uri,
    },
}

impl Transport {
    fn new(cfg: &OtlpConfig) -> anyhow::Result<Transport> {
        match cfg.protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
                    .map_err(|e| anyhow::anyhow!("bad OTLP endpoint {:?}: {e}", cfg.endpoint))?
                    .connect_timeout(cfg.timeout)
                    .timeout(cfg.timeout)
                    .connect_lazy();
                Ok(Transport::Grpc(tonic::client::Grpc::new(channel)))
            }
            OtlpProtocol::HttpProtobuf => {
                let base = cfg.endpoint.trim_end_matches('/');
                let url = if base.ends_with("/v1/traces") {
                    base.to_string()
                } else {
                    format!("{base}/v1/traces")
                };
                let uri: hyper::Uri = url
                    .parse()
                    .map_err(|e| anyhow::anyhow!("bad OTLP endpoint {url:?}: {e}"))?;
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http();
                Ok(Transport::Http {
                    client: Box::new(client),
                    uri,
                })
            }
        }
    }

    /// Sends one encoded request; returns the number of spans the endpoint rejected.
    async fn send(&mut self, body: &Bytes, timeout: Duration) -> Result<u64, SendError> {
        match self {
            Transport::Grpc(grpc) => {
                grpc.ready().await.map_err(|e| SendError {
                    retryable: true,
                    message: e.to_string(),
                })?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(EXPORT_PATH);
                match grpc
                    .unary(tonic::Request::new(body.clone()), path, RawCodec)
                    .await
                {
                    Ok(resp) => Ok(resp
                        .into_inner()
                        .partial_success
                        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))),
                    Err(status) => Err(SendError {
                        retryable: matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::ResourceExhausted
                                | tonic::Code::DeadlineExceeded
                                | tonic::Code::Aborted
                                | tonic::Code::Cancelled
                                | tonic::Code::Unknown
                                | tonic::Code::Internal
                        ),
                        message: format!("{}: {}", status.code(), status.message()),
                    }),
                }
            }
            Transport::Http { client, uri } => {
                let body = Full::new(body.clone());
                let request = hyper::Request::post(uri.clone())
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .map_err(|e| SendError {
                        retryable: false,
                        message: e.to_string(),
                    })?;
                let resp = tokio::time::timeout(timeout, client.request(request))
                    .await
                    .map_err(|_| SendError {
                        retryable: true,
                        message: "timed out".into(),
                    })?
                    .map_err(|e| SendError {
                        retryable: true,
                        message: e.to_string(),
                    })?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if status.is_success() {
                    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
                    let rejected = ExportTraceServiceResponse::decode(body)
                        .ok()
                        .and_then(|r| r.partial_success)
                        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                    Ok(rejected)
                } else {
                    Err(SendError {
                        retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                        message: format!("HTTP {status}"),
                    })
                }
            }
        }
    }
}

/// Builds one OTLP request: one `ResourceSpans` per workload pod.
pub fn to_request(traces: &[Arc<CompletedTrace>]) -> ExportTraceServiceRequest {
    // Keyed by the resolver's shared metadata (one pointer per pod), or by the IP.
    let mut by_resource: FastMap<ResourceId, (&Identity, Vec<Span>)> = FastMap::default();
    for trace in traces {
        for s in &trace.spans {
            let id = owner(s);
            by_resource
                .entry(ResourceId::of(id))
                .or_insert_with(|| (id, Vec::new()))
                .1
                .push(to_span(s));
        }
    }
    let scope = InstrumentationScope {
        name: "weft".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: by_resource
            .into_values()
            .map(|(id, spans)| ResourceSpans {
                resource: Some(resource(id)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Which resource a span belongs to.
#[derive(Hash, PartialEq, Eq)]
pub(crate) enum ResourceId {
    Meta(usize),
    Ip(std::net::IpAddr),
}

impl ResourceId {
    pub(crate) fn of(id: &Identity) -> ResourceId {
        match &id.meta {
            Some(m) => ResourceId::Meta(Arc::as_ptr(m) as usize),
            None => ResourceId::Ip(id.addr.ip()),
        }
    }
}

/// The resource of a workload pod (or of an unnamed address).
fn resource(id: &Identity) -> Resource {
    let mut attributes = Vec::with_capacity(6);
    match id.meta.as_deref() {
        Some(m) => {
            attributes.push(kv("service.name", s(m.workload.clone())));
            if !m.namespace.is_empty() {
                attributes.push(kv("service.namespace", s(m.namespace.clone())));
                attributes.push(kv("k8s.namespace.name", s(m.namespace.clone())));
            }
            if let Some(p) = &m.pod {
                attributes.push(kv("k8s.pod.name", s(p.clone())));
            }
            if let Some(n) = &m.node {
                attributes.push(kv("k8s.node.name", s(n.clone())));
            }
            if m.workload_kind == "Deployment" {
                attributes.push(kv("k8s.deployment.name", s(m.workload.clone())));
            }
        }
        None => attributes.push(kv("service.name", s(id.addr.ip().to_string()))),
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(v: impl Into<String>) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn i(v: i64) -> any_value::Value {
    any_value::Value::IntValue(v)
}

fn b(v: bool) -> any_value::Value {
    any_value::Value::BoolValue(v)
}

/// One span in OTLP form.
pub fn to_span(r: &SpanRecord) -> Span {
    let mut attributes = vec![
        kv("http.request.method", s(r.method.clone())),
        kv("url.path", s(r.path.clone())),
        kv("http.response.status_code", i(i64::from(r.status))),
        kv("server.address", s(r.server.addr.ip().to_string())),
        kv("server.port", i(i64::from(r.server.addr.port()))),
        kv("client.address", s(r.client.addr.ip().to_string())),
        kv("client.port", i(i64::from(r.client.addr.port()))),
        kv("network.peer.address", s(peer(r).addr.ip().to_string())),
        kv("weft.joined", b(r.joined)),
        kv("weft.node", s(r.node.to_string())),
    ];
    if r.link != LinkKind::Root {
        attributes.push(kv("weft.link", s(r.link.as_str())));
    }
    if let Some(name) = peer(r).meta.as_ref().map(|_| peer(r).name()) {
        attributes.push(kv("weft.peer.name", s(name)));
    }
    Span {
        trace_id: r.trace_id.0.to_vec(),
        span_id: r.span_id.0.to_vec(),
        parent_span_id: r.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        name: r.name.clone(),
        kind: match r.side {
            Side::Client => SpanKind::Client,
            _ => SpanKind::Server,
        } as i32,
        start_time_unix_nano: r.start_unix_nanos,
        end_time_unix_nano: r.end_unix_nanos,
        attributes,
        status: Some(Status {
            message: if r.error {
                format!("HTTP {}", r.status)
            } else {
                String::new()
            },
            code: if r.error {
                StatusCode::Error
            } else {
                StatusCode::Unset
            } as i32,
        }),
        // W3C trace flags: sampled.
        flags: 0x01,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::printer::tests::example_trace;

    fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[test]
    fn one_resource_per_workload_pod_with_semantic_attributes() {
        let mut t = example_trace();
        t.spans[1].status = 503;
        t.spans[1].error = true;
        let req = to_request(&[Arc::new(t)]);
        assert_eq!(req.resource_spans.len(), 2);
        let backend = req
            .resource_spans
            .iter()
            .find(|r| {
                attr(&r.resource.as_ref().unwrap().attributes, "service.name")
                    == Some(&s("backend"))
            })
            .unwrap();
        let res = &backend.resource.as_ref().unwrap().attributes;
        assert_eq!(attr(res, "k8s.namespace.name"), Some(&s("demo")));
        assert_eq!(attr(res, "k8s.pod.name"), Some(&s("backend-0")));
        assert_eq!(attr(res, "k8s.deployment.name"), Some(&s("backend")));
        let span = &backend.scope_spans[0].spans[0];
        assert_eq!(span.kind, SpanKind::Server as i32);
        assert_eq!(span.name, "GET /api/items");
        assert_eq!(hex::encode(&span.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(attr(&span.attributes, "weft.link"), Some(&s("join")));
        assert_eq!(
            attr(&span.attributes, "http.response.status_code"),
            Some(&i(503))
        );
        assert_eq!(
            attr(&span.attributes, "network.peer.address"),
            Some(&s("10.244.1.9"))
        );
        assert_eq!(span.status.as_ref().unwrap().code, StatusCode::Error as i32);
        let frontend = req
            .resource_spans
            .iter()
            .find(|r| !std::ptr::eq(*r, backend))
            .unwrap();
        let client = &frontend.scope_spans[0].spans[0];
        assert!(client.parent_span_id.is_empty());
        assert_eq!(
            attr(&client.attributes, "weft.link"),
            None,
            "roots carry no link"
        );
        assert_eq!(
            attr(&client.attributes, "server.address"),
            Some(&s("10.96.0.20"))
        );
        assert_eq!(
            client.status.as_ref().unwrap().code,
            StatusCode::Unset as i32
        );
    }

    #[test]
    fn client_spans_are_errors_from_4xx_server_spans_from_5xx() {
        let mut t = example_trace();
        t.spans[0].status = 404;
        t.spans[0].error = true;
        let span = to_span(&t.spans[0]);
        assert_eq!(span.status.unwrap().code, StatusCode::Error as i32);
    }
}
