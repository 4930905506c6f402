//! weft-stitcher: build the configuration, build the stages, serve.
//!
//! gRPC on `--listen`: `weft.v1.Ingest`, server reflection (v1 and v1alpha, grpcurl 1.8
//! speaks only the latter) and `grpc.health.v1.Health`; Prometheus `/metrics` and
//! `/healthz` on `--metrics-listen`.
//!
//! The data path: ingest → pipeline (resolve, join, link, assemble) → sinks (store behind
//! the Query API, span printer, OTLP). `--print-exchanges` shows what ingest takes.

mod cli;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::server::TcpIncoming;
use tower::ServiceBuilder;

use weft_proto::v1::query_server::QueryServer;
use weft_stitcher::export::otlp::OtlpExporter;
use weft_stitcher::export::printer::Printer;
use weft_stitcher::ingest::codec::IngestService;
use weft_stitcher::ingest::{self, Ingest};
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::TraceSink;
use weft_stitcher::pipeline;
use weft_stitcher::query::QueryService;
use weft_stitcher::resolve;
use weft_stitcher::store::{Store, StoreWriter};

/// mimalloc, not glibc's malloc: the stitch path allocates and frees millions of small
/// objects per second across threads (ingest decodes a batch on a tokio worker, the stitch
/// thread frees it), and glibc's arenas cost a quarter of the stitch thread there
/// (arena locks, consolidation).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    init_tracing();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        ?cli,
        "starting weft-stitcher"
    );
    let registry = Registry::new();

    // Stages, from the end of the data path back to its start.
    let store = Arc::new(Store::new(cli.store.clone(), &registry));
    let sinks = build_sinks(&cli, &store, &registry)?;
    let resolver = resolve::build(&cli.resolve, &registry).await?;
    let (batches_tx, batches_rx) = mpsc::channel(cli.ingest_buffer.max(1));
    let pipeline = if cli.ingest_only {
        tracing::warn!("--ingest-only: batches are discarded after ingest (benchmarking)");
        Stages::Drain(ingest::print::spawn_drain(batches_rx, &registry))
    } else {
        Stages::Pipeline(pipeline::spawn(
            cli.pipeline(),
            resolver,
            registry.clone(),
            batches_rx,
            sinks,
        ))
    };
    let ingest = Ingest::new(cli.ingest(), batches_tx, &registry);
    let query = QueryService::new(store, Arc::new(ingest.collectors()), registry.clone());

    let metrics = TcpListener::bind(cli.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", cli.metrics_listen))?;
    tracing::info!(addr = %metrics.local_addr()?, "serving /metrics and /healthz");
    tokio::spawn(serve_metrics(metrics, registry.clone()));

    serve_grpc(&cli, ingest, query).await?;
    // Ingest is gone (its streams end with their connections): the pipeline delivers what
    // it holds and stops.
    let stopped = async {
        match pipeline {
            Stages::Pipeline(p) => p.stopped().await,
            Stages::Drain(d) => drop(d.await),
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, stopped).await.is_err() {
        tracing::warn!("pipeline still draining after {DRAIN_TIMEOUT:?}; exiting");
    }
    tracing::info!("stopped");
    Ok(())
}

/// What consumes ingested batches.
enum Stages {
    Pipeline(pipeline::PipelineHandle),
    /// `--ingest-only`.
    Drain(tokio::task::JoinHandle<()>),
}

/// How long shutdown waits for open collector streams, then for the pipeline.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where completed traces go: the store (Query API, inserted on its own thread), the
/// printer, OTLP.
fn build_sinks(
    cli: &cli::Cli,
    store: &Arc<Store>,
    registry: &Registry,
) -> anyhow::Result<Vec<Arc<dyn TraceSink>>> {
    // The writer thread stops by itself once the pipeline drops its sinks.
    let (writer, _thread) =
        StoreWriter::spawn(store.clone(), StoreWriter::DEFAULT_QUEUE_SPANS, registry)
            .context("starting the store writer")?;
    let mut sinks: Vec<Arc<dyn TraceSink>> = vec![writer];
    if let Some(format) = cli.printer() {
        sinks.push(Printer::spawn(
            format,
            Box::new(std::io::stdout()),
            registry,
        ));
    }
    if let Some(otlp) = cli.otlp() {
        tracing::info!(endpoint = %otlp.endpoint, protocol = ?otlp.protocol, "exporting OTLP");
        sinks.push(OtlpExporter::spawn(otlp, registry).context("starting the OTLP exporter")?);
    }
    Ok(sinks)
}

/// Serves every gRPC service on `--listen` until SIGINT or SIGTERM.
async fn serve_grpc(
    cli: &cli::Cli,
    ingest: Ingest,
    query: QueryServer<QueryService>,
) -> anyhow::Result<()> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(weft_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("reflection v1alpha")?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<IngestService>().await;
    health.set_serving::<QueryServer<QueryService>>().await;

    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding --listen {}", cli.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving gRPC");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    // Unary calls (Query) are bounded in time and number; beyond the number they are shed
    // with UNAVAILABLE instead of queueing. Ingest streams return their response at once
    // and are bounded by --max-streams inside the service.
    let layers = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(cli.max_concurrent_requests.max(1))
        .into_inner();
    let stop = Arc::new(tokio::sync::Notify::new());
    let server = tonic::transport::Server::builder()
        .timeout(cli.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Batches are large: windows big enough for a few in flight per stream.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .layer(layers)
        .add_service(ingest.server())
        .add_service(query)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, {
            let stop = stop.clone();
            async move {
                shutdown_signal().await;
                stop.notify_one();
            }
        });
    // Graceful shutdown waits for open streams, and collectors keep theirs open: give them
    // DRAIN_TIMEOUT (their unacknowledged batches are resent to the next stitcher).
    tokio::select! {
        r = server => r.context("gRPC server"),
        () = async { stop.notified().await; tokio::time::sleep(DRAIN_TIMEOUT).await } => {
            tracing::warn!("collector streams still open after {DRAIN_TIMEOUT:?}; closing");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}

/// `/metrics` (Prometheus text from the registry) and `/healthz`.
async fn serve_metrics(listener: TcpListener, registry: Registry) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(metrics_response(&req, &registry)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%peer, error = %e, "metrics connection");
            }
        });
    }
}

fn metrics_response<B>(
    req: &hyper::Request<B>,
    registry: &Registry,
) -> hyper::Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4",
            registry.render_prometheus(),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
