//! weft-otlp: the two ends of an OTLP/gRPC trace export, for measuring export throughput.
//!
//! - `weft-otlp sink`: a minimal OTLP/gRPC receiver (`TraceService/Export`) that counts
//!   requests, spans and bytes and does nothing else. `--decode count` (default) walks
//!   each request's protobuf framing (resource spans → scope spans → spans, every length
//!   checked) and counts the spans without building them: the least a receiver must do.
//!   `--decode full` decodes every request into the `opentelemetry-proto` types, as a
//!   typical Rust receiver does. It prints `listening <addr>` first, then one JSON line of
//!   totals per `--report-every`, and a final line on SIGINT/SIGTERM.
//! - `weft-otlp send`: a client that sends one pre-encoded request of synthetic spans over
//!   and over, `--concurrency` requests in flight on one HTTP/2 connection, for `--duration`.
//!   It measures what a receiver (rotel, this sink) accepts per second independently of
//!   Weft's own encoder and pipeline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod count;

use anyhow::Context;
use clap::{Parser, Subcommand};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

#[derive(Debug, Parser)]
#[command(
    name = "weft-otlp",
    version,
    about = "OTLP/gRPC trace sink and sender for export benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Decode {
    /// Walk the framing and count spans.
    Count,
    /// Decode into the opentelemetry-proto types.
    Full,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive OTLP/gRPC traces, decode and count them.
    Sink {
        #[arg(long, default_value = "127.0.0.1:4317")]
        listen: SocketAddr,
        /// Print totals this often.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        report_every: Duration,
        /// Largest accepted request (after decompression).
        #[arg(long, default_value_t = 64 << 20)]
        max_message_bytes: usize,
        #[arg(long, value_enum, default_value = "count")]
        decode: Decode,
    },
    /// Send synthetic spans as fast as the receiver takes them.
    Send {
        #[arg(long, default_value = "http://127.0.0.1:4317")]
        target: String,
        #[arg(long, default_value_t = 4096)]
        spans_per_request: usize,
        /// Requests in flight at once.
        #[arg(long, short = 'c', default_value_t = 4)]
        concurrency: usize,
        #[arg(long, short = 'z', default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Sink {
            listen,
            report_every,
            max_message_bytes,
            decode,
        } => sink(listen, report_every, max_message_bytes, decode).await,
        Command::Send {
            target,
            spans_per_request,
            concurrency,
            duration,
        } => send(&target, spans_per_request, concurrency, duration).await,
    }
}

#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) requests: AtomicU64,
    pub(crate) spans: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

impl Totals {
    fn line(&self, started: Instant) -> String {
        let secs = started.elapsed().as_secs_f64();
        let spans = self.spans.load(Ordering::Relaxed);
        format!(
            "{{\"seconds\":{secs:.3},\"requests\":{},\"spans\":{spans},\"bytes\":{},\"cpu_seconds\":{:.3}}}",
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            cpu_seconds(),
        )
    }
}

struct CountingSink(Arc<Totals>);

#[tonic::async_trait]
impl TraceService for CountingSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let r = request.into_inner();
        let spans: usize = r
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        self.0.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.0
            .bytes
            .fetch_add(r.encoded_len() as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn sink(
    listen: SocketAddr,
    report_every: Duration,
    max_message_bytes: usize,
    decode: Decode,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let reporter = {
        let totals = totals.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(report_every);
            tick.tick().await;
            loop {
                tick.tick().await;
                println!("{}", totals.line(started));
            }
        })
    };
    let mut server = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20));
    let router = match decode {
        Decode::Full => server.add_service(
            TraceServiceServer::new(CountingSink(totals.clone()))
                .max_decoding_message_size(max_message_bytes)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .accept_compressed(tonic::codec::CompressionEncoding::Zstd),
        ),
        Decode::Count => server.add_service(count::CountingService {
            totals: totals.clone(),
            max_message_bytes,
        }),
    };
    router
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown(),
        )
        .await?;
    reporter.abort();
    println!("{}", totals.line(started));
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// User + system CPU time of this process, in seconds.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) end with ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// One request shaped like Weft's: spans of 3-hop chains over 16 workloads, HTTP
/// semantic-convention attributes.
fn synthetic_request(spans: usize) -> ExportTraceServiceRequest {
    let s = |v: &str| {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        })
    };
    let i = |v: i64| {
        Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        })
    };
    let kv = |k: &str, value| KeyValue {
        key: k.into(),
        value,
        ..Default::default()
    };
    let workloads = 16;
    let resource_spans = (0..workloads)
        .map(|w| {
            let name = format!("svc{w}");
            let spans = (0..spans / workloads + usize::from(w < spans % workloads))
                .map(|n| Span {
                    trace_id: (n as u128 * 7919 + w as u128 + 1).to_le_bytes().to_vec(),
                    span_id: (n as u64 * 31 + w as u64 + 1).to_le_bytes().to_vec(),
                    parent_span_id: (n as u64 * 31 + 5).to_le_bytes().to_vec(),
                    name: "GET /api/items/{id}".into(),
                    kind: 2 + (n % 2) as i32,
                    start_time_unix_nano: 1_795_341_600_000_000_000 + n as u64 * 1000,
                    end_time_unix_nano: 1_795_341_600_005_000_000 + n as u64 * 1000,
                    attributes: vec![
                        kv("http.request.method", s("GET")),
                        kv("url.path", s("/api/items/12345")),
                        kv("http.response.status_code", i(200)),
                        kv("server.address", s("10.96.0.20")),
                        kv("server.port", i(80)),
                        kv("client.address", s("10.244.1.9")),
                        kv("client.port", i(37450)),
                        kv("network.peer.address", s("10.244.2.7")),
                        kv("weft.node", s("node-a")),
                        kv("weft.link", s("join")),
                    ],
                    flags: 1,
                    ..Default::default()
                })
                .collect();
            ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", s(&name)),
                        kv("service.namespace", s("demo")),
                        kv("k8s.pod.name", s(&format!("{name}-0"))),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

async fn send(
    target: &str,
    spans_per_request: usize,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(target.to_string())
        .context("--target")?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .connect()
        .await
        .with_context(|| format!("connecting to {target}"))?;
    let request = synthetic_request(spans_per_request.max(1));
    let bytes = request.encoded_len();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let cpu0 = cpu_seconds();
    let deadline = started + duration;
    let body = bytes::Bytes::from(request.encode_to_vec());
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let (body, ok, failed) = (body.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut first_error = None;
            while Instant::now() < deadline {
                let sent = async {
                    grpc.ready()
                        .await
                        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    grpc.unary(
                        tonic::Request::new(body.clone()),
                        tonic::codegen::http::uri::PathAndQuery::from_static(EXPORT_PATH),
                        RawCodec,
                    )
                    .await
                };
                match sent.await {
                    Ok(r) => {
                        let rejected = r
                            .into_inner()
                            .partial_success
                            .map_or(0, |p| p.rejected_spans);
                        if rejected > 0 {
                            failed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(status) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| status.to_string());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            first_error
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        if let Some(e) = t.await? {
            errors.push(e);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    let spans = ok * spans_per_request as u64;
    println!(
        "{{\"seconds\":{secs:.3},\"requests_ok\":{ok},\"requests_failed\":{},\"request_bytes\":{bytes},\"spans_per_second\":{:.0},\"client_cpu_seconds\":{:.3},\"first_error\":{:?}}}",
        failed.load(Ordering::Relaxed),
        spans as f64 / secs,
        cpu_seconds() - cpu0,
        errors.first().cloned().unwrap_or_default(),
    );
    Ok(())
}

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Sends bytes encoded once up front (the client's own encoding cost stays out of the
/// figure), decodes the OTLP response.
#[derive(Clone, Copy)]
struct RawCodec;
struct RawEncoder;
struct ResponseDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, tonic::Status> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}
