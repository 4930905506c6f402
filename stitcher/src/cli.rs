//! Command-line flags of `weft-stitcher` (each also read from `WEFT_<FLAG>`), and their
//! translation into the stages' configurations.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use weft_stitcher::export::otlp::{OtlpConfig, OtlpProtocol};
use weft_stitcher::export::printer;
use weft_stitcher::ingest::IngestConfig;
use weft_stitcher::ingest::print::PrintFormat;
use weft_stitcher::pipeline::PipelineConfig;
use weft_stitcher::resolve::ResolveArgs;
use weft_stitcher::store::{StoreConfig, parse_bytes};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// OTLP/gRPC (port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318).
    HttpProtobuf,
}

#[derive(Debug, Parser)]
#[command(
    name = "weft-stitcher",
    version,
    about = "Weaves what every node's collector saw into traces"
)]
pub struct Cli {
    /// gRPC address: Ingest, Query, reflection, health.
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:9400")]
    pub listen: SocketAddr,

    /// Prometheus `/metrics` and `/healthz`.
    #[arg(long, env = "WEFT_METRICS_LISTEN", default_value = "0.0.0.0:9402")]
    pub metrics_listen: SocketAddr,

    /// OTLP endpoint to export traces to (also `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// OTLP transport of `--otlp-endpoint`.
    #[arg(long, env = "WEFT_OTLP_PROTOCOL", value_enum, default_value = "grpc")]
    pub otlp_protocol: Protocol,

    /// Spans of completed traces waiting for OTLP export; beyond it traces are dropped
    /// and counted (export.otlp.dropped_queue_full). The default holds about a second at
    /// 300,000 spans/s (~110 MB when full).
    #[arg(long, env = "WEFT_OTLP_QUEUE_SPANS", default_value_t = OtlpConfig::DEFAULT_QUEUE_SPANS)]
    pub otlp_queue_spans: usize,

    /// Most spans per OTLP export request.
    #[arg(long, env = "WEFT_OTLP_MAX_BATCH_SPANS", default_value_t = 4096)]
    pub otlp_max_batch_spans: usize,

    /// Most bytes per OTLP export request, estimated before encoding (receivers commonly
    /// refuse gRPC messages above 4 MiB; suffixes KiB, MiB).
    #[arg(long, env = "WEFT_OTLP_MAX_BATCH_BYTES", default_value = "3MiB", value_parser = parse_bytes)]
    pub otlp_max_batch_bytes: u64,

    /// OTLP export requests in flight at once.
    #[arg(long, env = "WEFT_OTLP_MAX_IN_FLIGHT", default_value_t = 4)]
    pub otlp_max_in_flight: usize,

    #[command(flatten)]
    pub resolve: ResolveArgs,

    #[command(flatten)]
    pub store: StoreConfig,

    /// Print every exported span on stdout.
    #[arg(long, env = "WEFT_PRINT", value_enum, default_value = "off")]
    pub print: PrintFormat,

    /// A trace is complete after this long without new spans.
    #[arg(long, env = "WEFT_TRACE_IDLE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub trace_idle: Duration,

    /// Memory budget of pending stitch state (halves waiting to join, calls waiting to
    /// link, link candidates, open traces, the late-arrival index); every pending bound is
    /// sized from it (suffixes KiB, MiB, GiB). Past a bound the oldest entries move on
    /// early (join.evicted, link.evicted, link.candidates_evicted, assemble.evicted,
    /// assemble.late_index_evicted). A rate needs ~340 MiB per 100,000 exchanges/s with
    /// the default windows (open traces hold --trace-idle plus the link wait of spans,
    /// ~2.2 s; the budget scales with --trace-idle): the default 1GiB covers ~300,000
    /// exchanges/s. Process memory is at most about this plus --store-max-bytes plus the
    /// export queue (--otlp-queue-spans, ~110 MB full) plus --ingest-buffer batches plus
    /// ~40 MB of runtime; it grows with the load, not at start.
    #[arg(long, env = "WEFT_MAX_PENDING_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub max_pending_memory: u64,

    /// Debug: print every ingested (deduplicated) exchange on stdout, one line each.
    #[arg(long, env = "WEFT_PRINT_EXCHANGES", value_enum, default_value = "off")]
    pub print_exchanges: PrintFormat,

    /// Benchmarking aid: ingest (validate, dedup, ack) and then discard every batch
    /// (counted in ingest.drained_batches) instead of running the pipeline.
    #[arg(long, env = "WEFT_INGEST_ONLY")]
    pub ingest_only: bool,

    /// Largest accepted EventBatch (after decompression); larger ones end their stream
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "WEFT_MAX_MESSAGE_BYTES", default_value_t = 16 << 20)]
    pub max_message_bytes: usize,

    /// Most collector streams served at once; more are refused with UNAVAILABLE.
    #[arg(long, env = "WEFT_MAX_STREAMS", default_value_t = 1024)]
    pub max_streams: usize,

    /// Batches buffered between ingest and the pipeline; when full, acks wait
    /// (back-pressure to the collectors).
    #[arg(long, env = "WEFT_INGEST_BUFFER", default_value_t = 64)]
    pub ingest_buffer: usize,

    /// Forget a collector instance (dedup state, status) after this long without batches.
    #[arg(long, env = "WEFT_INSTANCE_IDLE_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub instance_idle_ttl: Duration,

    /// Out-of-order batch seqs remembered per collector instance for deduplication.
    #[arg(long, env = "WEFT_DEDUP_WINDOW", default_value_t = 4096)]
    pub dedup_window: usize,

    /// Deadline of unary gRPC calls (Query); exceeded calls end with CANCELLED.
    #[arg(long, env = "WEFT_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// gRPC calls in progress at once before new ones are shed with UNAVAILABLE.
    #[arg(long, env = "WEFT_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
}

impl Cli {
    /// `--otlp-endpoint`, else the OpenTelemetry standard variable.
    pub fn otlp_endpoint(&self) -> Option<String> {
        self.otlp_endpoint.clone().or_else(|| {
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .ok()
                .filter(|s| !s.is_empty())
        })
    }

    pub fn otlp(&self) -> Option<OtlpConfig> {
        let mut cfg = OtlpConfig::new(self.otlp_endpoint()?);
        cfg.protocol = match self.otlp_protocol {
            Protocol::Grpc => OtlpProtocol::Grpc,
            Protocol::HttpProtobuf => OtlpProtocol::HttpProtobuf,
        };
        cfg.queue_spans = self.otlp_queue_spans.max(1);
        cfg.max_batch_spans = self.otlp_max_batch_spans.max(1);
        cfg.max_batch_bytes = usize::try_from(self.otlp_max_batch_bytes).unwrap_or(usize::MAX);
        cfg.max_in_flight = self.otlp_max_in_flight.max(1);
        Some(cfg)
    }

    /// The span printer's format (`--print`), if any.
    pub fn printer(&self) -> Option<printer::PrintFormat> {
        match self.print {
            PrintFormat::Off => None,
            PrintFormat::Text => Some(printer::PrintFormat::Text),
            PrintFormat::Json => Some(printer::PrintFormat::Json),
        }
    }

    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig::default()
            .with_trace_idle(self.trace_idle)
            .with_memory_budget(self.max_pending_memory)
    }

    pub fn ingest(&self) -> IngestConfig {
        IngestConfig {
            max_message_bytes: self.max_message_bytes,
            max_streams: self.max_streams.max(1),
            instance_idle_ttl: self.instance_idle_ttl,
            dedup_window: self.dedup_window.max(1),
            print_exchanges: self.print_exchanges,
            ..IngestConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_parse_with_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["weft-stitcher", "--listen", "127.0.0.1:0"]).unwrap();
        assert_eq!(cli.trace_idle, Duration::from_secs(2));
        assert_eq!(cli.print_exchanges, PrintFormat::Off);
        assert_eq!(cli.ingest().max_message_bytes, 16 << 20);
        assert_eq!(cli.max_pending_memory, 1 << 30);
        assert_eq!(
            cli.pipeline().max_pending_spans,
            PipelineConfig::default().max_pending_spans,
            "the flag's default is the pipeline's"
        );
        let budget = Cli::try_parse_from(["weft-stitcher", "--max-pending-memory", "64MiB"])
            .unwrap()
            .pipeline();
        assert!(budget.max_pending_spans < cli.pipeline().max_pending_spans);
        let otlp = Cli::try_parse_from([
            "weft-stitcher",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--otlp-max-batch-bytes",
            "1MiB",
            "--otlp-max-in-flight",
            "8",
        ])
        .unwrap()
        .otlp()
        .unwrap();
        assert_eq!(otlp.max_batch_bytes, 1 << 20);
        assert_eq!(otlp.max_in_flight, 8);
        assert_eq!(otlp.max_batch_spans, 4096);
        assert_eq!(otlp.queue_spans, 300_000);
    }
}
