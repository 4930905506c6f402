//! The stream task: one `Ingest/Stream` at a time to the stitcher.
//!
//! In: batches from the [`Outbox`](super::queue::Outbox). Out: the batches on the wire, and
//! acks applied back to the outbox. A broken stream (connect failure, stitcher gone, ack
//! timeout, status) returns every in-flight batch to the outbox and reconnects after an
//! exponentially growing, jittered delay; the next stream resends them first.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use weft_proto::v1;

use super::wire::{WireBatch, WireCodec};
use super::{Compression, Shared};

/// Reconnect delays: doubled per failure from `min` up to `max`, each drawn uniformly from
/// its upper half so that many collectors do not reconnect in lockstep.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + d.mul_f64(rand::rng().random_range(0.0..=0.5))
    }
}

/// How a stream ended.
enum Ended {
    /// Shutdown finished (everything acknowledged, or the deadline passed).
    Shutdown,
    /// The stream broke; `acked` tells whether it delivered anything.
    Broken { reason: String, acked: bool },
}

pub(super) async fn run(shared: Arc<Shared>, url: String) {
    let endpoint = match endpoint(&shared, &url) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(stitcher = %url, error = %e,
                "invalid stitcher URL; nothing will be shipped (events count as dropped)");
            // Keep the contract: queued events still get counted at shutdown.
            let mut shutdown = shared.shutdown.subscribe();
            let _ = shutdown.wait_for(Option::is_some).await;
            shared.outbox.lock().abandon("invalid_stitcher_url");
            return;
        }
    };
    let mut backoff = Backoff::new(shared.cfg.backoff_min, shared.cfg.backoff_max);
    let mut attempts: u64 = 0;
    let mut unreachable_logged = false;
    loop {
        if attempts > 0 {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        attempts += 1;
        let ended = stream_once(&shared, &endpoint).await;
        shared.connected.store(false, Ordering::Relaxed);
        let requeued = shared.outbox.lock().requeue();
        match ended {
            Ended::Shutdown => return,
            Ended::Broken { reason, acked } => {
                if acked {
                    backoff.reset();
                    unreachable_logged = false;
                }
                if !unreachable_logged {
                    // Once per outage; the next success logs "connected" again.
                    tracing::warn!(stitcher = %url, %reason, requeued,
                        "stream to the stitcher broke; reconnecting with backoff \
                         (unacknowledged batches will be resent)");
                    unreachable_logged = true;
                } else {
                    tracing::debug!(stitcher = %url, %reason, "reconnect failed");
                }
            }
        }
        let delay = backoff.next_delay();
        let deadline = *shared.shutdown.borrow();
        let mut shutdown = shared.shutdown.subscribe();
        if let Some(deadline) = deadline
            && (Instant::now() >= deadline || shared.outbox.lock().is_empty())
        {
            finish_shutdown(&shared);
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            // A shutdown flushes at once instead of waiting out the backoff.
            _ = shutdown.changed() => {}
        }
    }
}

fn endpoint(shared: &Shared, url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(shared.cfg.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20)))
}

/// Opens `weft.v1.Ingest/Stream` as the generated client would, but with batches sent as
/// [`WireBatch`]es (encoded from the queue's shared events, see `wire`).
async fn open_stream(
    shared: &Shared,
    channel: Channel,
    batches: mpsc::Receiver<WireBatch>,
) -> Result<tonic::Streaming<v1::Ack>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc = match shared.cfg.compression {
        Compression::None => grpc,
        Compression::Gzip => grpc.send_compressed(CompressionEncoding::Gzip),
        Compression::Zstd => grpc.send_compressed(CompressionEncoding::Zstd),
    };
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    let mut request = tonic::Request::new(ReceiverStream::new(batches));
    request
        .extensions_mut()
        .insert(tonic::GrpcMethod::new("weft.v1.Ingest", "Stream"));
    let path = PathAndQuery::from_static("/weft.v1.Ingest/Stream");
    Ok(grpc.streaming(request, path, WireCodec).await?.into_inner())
}

/// Counts whatever is still queued as dropped once the shutdown deadline has passed.
fn finish_shutdown(shared: &Shared) {
    let n = shared.outbox.lock().abandon("shutdown");
    if n > 0 {
        tracing::warn!(
            events = n,
            "shutdown deadline passed before the stitcher acknowledged everything; \
             counted as dropped{{reason=shutdown}}"
        );
    }
}

/// Connects, opens one stream and runs it until it breaks or shutdown completes.
async fn stream_once(shared: &Arc<Shared>, endpoint: &Endpoint) -> Ended {
    let broken = |reason: String| Ended::Broken {
        reason,
        acked: false,
    };
    let channel = tokio::select! {
        c = endpoint.connect() => match c {
            Ok(c) => c,
            Err(e) => return broken(format!("connect: {e}")),
        },
        () = sleep_until_opt(*shared.shutdown.borrow()) => {
            finish_shutdown(shared);
            return Ended::Shutdown;
        }
    };
    let (tx, rx) = mpsc::channel::<WireBatch>(2);
    let mut acks = match open_stream(shared, channel, rx).await {
        Ok(acks) => acks,
        Err(status) => return broken(format!("open stream: {status}")),
    };
    shared.connected.store(true, Ordering::Relaxed);
    let mut shutdown = shared.shutdown.subscribe();
    tracing::info!(instance = %shared.instance_id, "connected to the stitcher");
    let mut acked = false;
    let cfg = &shared.cfg;
    let max_in_flight = cfg.max_in_flight_batches.max(1);
    loop {
        let (sendable, oldest, empty) = {
            let q = shared.outbox.lock();
            (
                q.has_sendable(max_in_flight),
                q.oldest_in_flight(),
                q.is_empty(),
            )
        };
        let deadline = *shutdown.borrow();
        if let Some(deadline) = deadline {
            if empty {
                return Ended::Shutdown;
            }
            if Instant::now() >= deadline {
                finish_shutdown(shared);
                return Ended::Shutdown;
            }
        }
        let ack_deadline = oldest.map(|t| t + cfg.ack_timeout);
        let shutdown_deadline = deadline.unwrap_or_else(far_future);
        tokio::select! {
            permit = tx.reserve(), if sendable => {
                let Ok(permit) = permit else {
                    return Ended::Broken { reason: "request stream closed".into(), acked };
                };
                let outgoing = shared.outbox.lock().next_to_send(max_in_flight, Instant::now());
                if let Some(o) = outgoing {
                    // Encoded outside the lock: the capture loop keeps pushing meanwhile.
                    permit.send(o.to_wire(&cfg.node_name, &shared.instance_id, shared.info()));
                }
            }
            msg = acks.message() => match msg {
                Ok(Some(ack)) => {
                    acked = true;
                    apply_ack(shared, &ack);
                }
                Ok(None) => return Ended::Broken { reason: "stitcher closed the stream".into(), acked },
                Err(status) => {
                    reject_on(shared, &status);
                    return Ended::Broken { reason: format!("status {status}"), acked };
                }
            },
            () = shared.wake_sender.notified() => {}
            () = sleep_until_opt(ack_deadline) => {
                return Ended::Broken {
                    reason: format!("no ack within {:?}", cfg.ack_timeout),
                    acked,
                };
            }
            () = tokio::time::sleep_until(shutdown_deadline.into()) => {}
            _ = shutdown.changed() => {}
        }
    }
}

fn apply_ack(shared: &Shared, ack: &v1::Ack) {
    if ack.instance_id != shared.instance_id {
        tracing::warn!(got = %ack.instance_id, "ack for another instance ignored");
        return;
    }
    let want_record = shared.cfg.on_ack.is_some();
    let record = shared
        .outbox
        .lock()
        .ack(ack.seq, ack.duplicate, want_record);
    if let (Some(hook), Some(r)) = (&shared.cfg.on_ack, record) {
        hook(&r);
    }
}

/// The stitcher refuses a batch with INVALID_ARGUMENT or RESOURCE_EXHAUSTED: resending it
/// would fail forever, so the oldest in-flight batch (the stitcher answers in order) is
/// given up and counted.
fn reject_on(shared: &Shared, status: &tonic::Status) {
    let reason = match status.code() {
        Code::InvalidArgument => "rejected_invalid",
        Code::ResourceExhausted => "rejected_too_large",
        _ => return,
    };
    tracing::error!(error = %status.message(), "stitcher refused a batch");
    shared.outbox.lock().reject_oldest_in_flight(reason);
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_max_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let bases = [100, 200, 400, 800, 800];
        for base in bases {
            let d = b.next_delay();
            let base = Duration::from_millis(base);
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} not in [{:?}, {base:?}]",
                base / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
