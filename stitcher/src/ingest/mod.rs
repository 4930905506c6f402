//! ingest: the `weft.v1.Ingest/Stream` service.
//!
//! In: gRPC streams of `EventBatch` from collectors. Out: deduplicated
//! [`ObservedBatch`]es into a bounded channel that the pipeline consumes, one `Ack` per
//! batch back to the collector, and per-collector state ([`Collectors`]) for the Query API.
//!
//! A batch is acknowledged only after the pipeline channel took it, so a slow pipeline
//! slows the acks, which fills the collectors' bounded queues, which then drop and count:
//! back-pressure reaches the edge and nothing grows without bound here.
//!
//! Decoding ([`codec`]) sizes each batch's exchange vector once and skips the exchange
//! fields nothing downstream reads (`host`, `request_id`, `tracestate`, `interface`)
//! unless `--print-exchanges` shows them.
//!
//! Per batch: validate ([`validate`]) → dedup by `(instance id, seq)` ([`dedup`]) →
//! forward (new) or skip (duplicate) → ack. A malformed batch ends its stream with
//! `INVALID_ARGUMENT`, an oversized message with `RESOURCE_EXHAUSTED`; both are counted and
//! touch no other stream.

pub mod codec;
pub mod collectors;
pub mod dedup;
pub mod print;
pub mod validate;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use weft_proto::v1;

pub use collectors::Collectors;
use dedup::{Dedup, Verdict};

use crate::metrics::{Counter, Registry};
use crate::model::ObservedBatch;

/// Settings of the ingest service (flags in `cli`).
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Largest accepted (decompressed) `EventBatch`, in bytes.
    pub max_message_bytes: usize,
    /// Most ingest streams served at once; more are refused with `UNAVAILABLE`.
    pub max_streams: usize,
    /// Forget an instance's dedup state and status after this long without batches.
    pub instance_idle_ttl: Duration,
    /// Most out-of-order seqs remembered per instance (see [`dedup`]).
    pub dedup_window: usize,
    /// Acks buffered per stream before we stop reading that stream.
    pub ack_buffer: usize,
    /// Debug: print each new batch's exchanges before acknowledging it.
    pub print_exchanges: print::PrintFormat,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_message_bytes: 16 << 20,
            max_streams: 1024,
            instance_idle_ttl: Duration::from_secs(600),
            dedup_window: 4096,
            ack_buffer: 256,
            print_exchanges: print::PrintFormat::Off,
        }
    }
}

/// Counters of the ingest stage (`ingest.*`).
#[derive(Clone)]
struct Counters {
    batches: Counter,
    exchanges: Counter,
    connections: Counter,
    duplicate_batches: Counter,
    duplicate_exchanges: Counter,
    rejected_invalid: Counter,
    rejected_too_large: Counter,
    stream_errors: Counter,
    streams_opened: Counter,
    streams_active: Counter,
    streams_refused: Counter,
    forward_failed: Counter,
}

impl Counters {
    fn new(r: &Registry) -> Self {
        Counters {
            batches: r.counter("ingest.batches", "new batches forwarded to the pipeline"),
            exchanges: r.counter("ingest.exchanges", "exchanges forwarded to the pipeline"),
            connections: r.counter("ingest.connections", "connection events forwarded"),
            duplicate_batches: r.counter(
                "ingest.duplicate_batches",
                "retransmitted batches acknowledged but not forwarded",
            ),
            duplicate_exchanges: r.counter(
                "ingest.duplicate_exchanges",
                "exchanges in duplicate batches (not forwarded)",
            ),
            rejected_invalid: r.counter(
                "ingest.rejected.invalid",
                "streams ended with INVALID_ARGUMENT (malformed or inconsistent batch)",
            ),
            rejected_too_large: r.counter(
                "ingest.rejected.too_large",
                "streams ended with RESOURCE_EXHAUSTED (message above --max-message-bytes)",
            ),
            stream_errors: r.counter(
                "ingest.stream_errors",
                "streams that ended with a transport error",
            ),
            streams_opened: r.counter("ingest.streams.opened", "ingest streams accepted"),
            streams_active: r.counter("ingest.streams.active", "ingest streams open (gauge)"),
            streams_refused: r.counter(
                "ingest.streams.refused",
                "ingest streams refused because --max-streams were open (load shedding)",
            ),
            forward_failed: r.counter(
                "ingest.forward_failed",
                "batches not acknowledged because the pipeline had stopped",
            ),
        }
    }
}

struct Shared {
    out: mpsc::Sender<ObservedBatch>,
    dedup: Dedup,
    collectors: Collectors,
    counters: Counters,
    streams: Arc<Semaphore>,
    tap: print::Tap,
    cfg: IngestConfig,
}

impl Shared {
    fn update_active_gauge(&self) {
        let active = self.cfg.max_streams - self.streams.available_permits();
        self.counters.streams_active.set(active as u64);
    }
}

/// The `weft.v1.Ingest` service. Build it with [`Ingest::new`], serve [`Ingest::server`].
#[derive(Clone)]
pub struct Ingest {
    shared: Arc<Shared>,
}

impl Ingest {
    /// `out` is the pipeline's input; its capacity is the stitcher's ingest buffer.
    pub fn new(cfg: IngestConfig, out: mpsc::Sender<ObservedBatch>, registry: &Registry) -> Self {
        let shared = Shared {
            out,
            dedup: Dedup::new(cfg.dedup_window, cfg.instance_idle_ttl, registry),
            collectors: Collectors::new(cfg.instance_idle_ttl),
            counters: Counters::new(registry),
            streams: Arc::new(Semaphore::new(cfg.max_streams)),
            tap: print::Tap::new(cfg.print_exchanges, registry),
            cfg,
        };
        Ingest {
            shared: Arc::new(shared),
        }
    }

    /// Per-collector state for the Query API.
    pub fn collectors(&self) -> Collectors {
        self.shared.collectors.clone()
    }

    /// The tonic service, with the message size limit and compression (gzip, zstd) set,
    /// decoding batches with [`codec::BatchCodec`].
    pub fn server(self) -> codec::IngestService {
        codec::IngestService {
            max_message_bytes: self.shared.cfg.max_message_bytes,
            keep_all: self.shared.cfg.print_exchanges != print::PrintFormat::Off,
            ingest: self,
        }
    }
}

pub type AckStream = Pin<Box<dyn Stream<Item = Result<v1::Ack, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::ingest_server::Ingest for Ingest {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<v1::EventBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let c = &self.shared.counters;
        let Ok(permit) = self.shared.streams.clone().try_acquire_owned() else {
            c.streams_refused.inc();
            return Err(Status::unavailable(format!(
                "stitcher is serving its maximum of {} ingest streams; retry later",
                self.shared.cfg.max_streams
            )));
        };
        c.streams_opened.inc();
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (acks, rx) = mpsc::channel(self.shared.cfg.ack_buffer);
        let task = StreamTask {
            shared: self.shared.clone(),
            inbound: request.into_inner(),
            acks,
            peer,
            permit,
        };
        tokio::spawn(task.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One collector stream: reads batches in order, acks each after it was taken.
struct StreamTask {
    shared: Arc<Shared>,
    inbound: Streaming<v1::EventBatch>,
    acks: mpsc::Sender<Result<v1::Ack, Status>>,
    peer: String,
    /// Held while the stream lives: `--max-streams`.
    permit: OwnedSemaphorePermit,
}

/// Why a stream ended.
enum End {
    /// The collector closed its side, or went away.
    Closed,
    /// The stream must end with this status (sent to the collector).
    Fail(Status),
}

impl StreamTask {
    async fn run(mut self) {
        let c = self.shared.counters.clone();
        self.shared.update_active_gauge();
        let mut identity: Option<(Arc<str>, Arc<str>, collectors::StreamGuard)> = None;
        let end = loop {
            let batch = tokio::select! {
                m = self.inbound.message() => m,
                // The collector stopped reading acks and went away.
                () = self.acks.closed() => break End::Closed,
            };
            let batch = match batch {
                Ok(Some(b)) => b,
                Ok(None) => break End::Closed,
                Err(status) => break self.inbound_error(status),
            };
            let stream_id = identity.as_ref().map(|(n, i, _)| (&**n, &**i));
            if let Err(e) = validate::batch(&batch, stream_id) {
                c.rejected_invalid.inc();
                tracing::warn!(peer = %self.peer, node = %batch.node_name,
                    instance = %batch.instance_id, seq = batch.seq, error = %e,
                    "rejecting malformed batch; ending this stream with INVALID_ARGUMENT");
                break End::Fail(Status::invalid_argument(e.to_string()));
            }
            if identity.is_none() {
                let node: Arc<str> = batch.node_name.as_str().into();
                let instance: Arc<str> = batch.instance_id.as_str().into();
                tracing::info!(peer = %self.peer, %node, %instance, "collector stream opened");
                let guard = self.shared.collectors.connect(&node, &instance);
                identity = Some((node, instance, guard));
            }
            let Some((node, instance, _)) = identity.as_ref() else {
                break End::Closed;
            };
            let Some(ack) = self.take(node, instance, batch).await else {
                break End::Fail(Status::unavailable("stitcher is shutting down"));
            };
            if self.acks.send(Ok(ack)).await.is_err() {
                break End::Closed;
            }
        };
        if let End::Fail(status) = end {
            // Best effort: the collector may already be gone.
            let _ = self.acks.send(Err(status)).await;
        }
        if let Some((node, instance, _)) = &identity {
            tracing::info!(peer = %self.peer, %node, %instance, "collector stream closed");
        }
        drop(self.permit);
        self.shared.update_active_gauge();
    }

    /// Dedups and forwards one valid batch; returns its ack, or `None` when the pipeline
    /// is gone (then the batch is not acknowledged and the collector will resend it).
    async fn take(
        &self,
        node: &Arc<str>,
        instance: &Arc<str>,
        b: v1::EventBatch,
    ) -> Option<v1::Ack> {
        let c = &self.shared.counters;
        let verdict = self.shared.dedup.check(instance, b.seq, b.low_water_seq);
        let exchanges = b.exchanges.len() as u64;
        let connections = b.connections.len() as u64;
        let seen = |duplicate| collectors::BatchSeen {
            seq: b.seq,
            exchanges,
            connections,
            duplicate,
            info: b.info.as_ref(),
        };
        self.shared
            .collectors
            .record(instance, seen(verdict == Verdict::Duplicate));
        let seq = b.seq;
        if verdict == Verdict::Duplicate {
            c.duplicate_batches.inc();
            c.duplicate_exchanges.add(exchanges);
        } else {
            let observed = ObservedBatch {
                node: node.clone(),
                instance: instance.clone(),
                seq,
                exchanges: b.exchanges,
                connections: b.connections,
            };
            self.shared.tap.write(&observed);
            if self.shared.out.send(observed).await.is_err() {
                self.shared.dedup.release(instance, seq);
                c.forward_failed.inc();
                return None;
            }
            c.batches.inc();
            c.exchanges.add(exchanges);
            c.connections.add(connections);
        }
        Some(v1::Ack {
            instance_id: instance.to_string(),
            seq,
            duplicate: verdict == Verdict::Duplicate,
        })
    }

    /// Maps an error of the inbound stream to the status the collector gets.
    fn inbound_error(&self, status: Status) -> End {
        let c = &self.shared.counters;
        let msg = status.message();
        let too_large = matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted)
            && (msg.contains("too large") || msg.contains("size limit"));
        // Errors produced by decoding what the client sent (bad protobuf, a message cut
        // short by the end of the stream, bad framing or compression) as opposed to the
        // transport failing under us.
        let malformed = status.code() == Code::Internal
            && [
                "failed to decode",
                "Unexpected EOF",
                "protocol error",
                "decompress",
            ]
            .iter()
            .any(|m| msg.contains(m));
        if too_large {
            c.rejected_too_large.inc();
            tracing::warn!(peer = %self.peer, error = %msg,
                "rejecting oversized batch; ending this stream with RESOURCE_EXHAUSTED");
            End::Fail(Status::resource_exhausted(format!(
                "batch larger than --max-message-bytes ({} bytes): {msg}",
                self.shared.cfg.max_message_bytes
            )))
        } else if malformed {
            c.rejected_invalid.inc();
            tracing::warn!(peer = %self.peer, error = %msg,
                "rejecting undecodable message; ending this stream with INVALID_ARGUMENT");
            End::Fail(Status::invalid_argument(format!(
                "malformed EventBatch: {msg}"
            )))
        } else {
            c.stream_errors.inc();
            tracing::debug!(peer = %self.peer, error = %status, "ingest stream ended by transport error");
            End::Closed
        }
    }
}
