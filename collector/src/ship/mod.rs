//! ship: the collector's gRPC shipper to the stitcher.
//!
//! In: [`Event`]s (`Exchange`s and `Connection`s from `parse`) through an [`EventSender`],
//! which never blocks the capture loop. Out: numbered `EventBatch`es on the
//! `weft.v1.Ingest/Stream` stream, each kept until the stitcher acknowledges it. An
//! Exchange is queued as its protobuf encoding ([`wire::EncodedExchanges`]) and its
//! struct goes straight back to the parser for reuse.
//!
//! ```text
//! EventSender::try_send ─▶ queue::Outbox (bounded: pending ▸ unsent ▸ in flight)
//!                             ▲ seal by time (batcher task)   │ next_to_send
//!                             └──── acks ◀── conn (stream task: connect, send, ack,
//!                                                 reconnect with backoff + jitter)
//! ```
//!
//! Guarantees: every event is either acknowledged by the stitcher or counted as dropped,
//! by reason (`queue_full` when the bound forced it, `rejected_*` when the stitcher refused
//! a batch, `shutdown` when the flush deadline passed). A broken stream loses nothing:
//! every batch not yet acknowledged is resent, with the same instance id and seq, on the
//! next stream, and the stitcher deduplicates. The instance id is a new UUID v4 per
//! [`Shipper::spawn`].

mod conn;
pub mod queue;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use weft_proto::v1;

pub use queue::AckRecord;
use queue::Outbox;

/// One observation to ship. An Exchange is boxed: the queue keeps its encoding and gives
/// the box back for the parser to write the next one into (see `parse::spare`); moved by
/// value, its ~300 bytes were copied several times on the way.
#[derive(Debug, Clone)]
pub enum Event {
    Exchange(Box<v1::Exchange>),
    Connection(v1::Connection),
}

impl Event {
    fn into_exchange(self) -> Option<Box<v1::Exchange>> {
        match self {
            Event::Exchange(x) => Some(x),
            Event::Connection(_) => None,
        }
    }
}

/// Wire compression of batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Called with every acknowledged batch (in ack order), from the shipper's task.
pub type AckHook = Arc<dyn Fn(&AckRecord) + Send + Sync>;

/// Shipper settings. [`ShipArgs`] builds one from flags.
#[derive(Clone)]
pub struct ShipConfig {
    /// Stitcher URL (`http://host:9400`); `None`: local only, events are not shipped.
    pub stitcher: Option<String>,
    pub node_name: String,
    /// Seal a batch at this many events...
    pub batch_max_events: usize,
    /// ...or when its oldest event has waited this long.
    pub batch_max_delay: Duration,
    /// Bound on queued events (unacknowledged + not yet sent + not yet batched).
    pub queue_max_events: usize,
    /// Batches sent and not yet acknowledged on one stream.
    pub max_in_flight_batches: usize,
    pub compression: Compression,
    /// Reconnect backoff: first delay, doubled per failure up to `backoff_max`, jittered.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// A stream whose oldest batch waits longer than this for its ack is torn down.
    pub ack_timeout: Duration,
    /// How long [`Shipper::shutdown`] keeps trying to deliver what is queued.
    pub shutdown_timeout: Duration,
    /// Observes every acknowledged batch (tests use it as the ack log).
    pub on_ack: Option<AckHook>,
}

impl std::fmt::Debug for ShipConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShipConfig")
            .field("stitcher", &self.stitcher)
            .field("node_name", &self.node_name)
            .field("batch_max_events", &self.batch_max_events)
            .field("batch_max_delay", &self.batch_max_delay)
            .field("queue_max_events", &self.queue_max_events)
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl ShipConfig {
    pub fn new(stitcher: Option<String>, node_name: impl Into<String>) -> Self {
        ShipConfig {
            stitcher,
            node_name: node_name.into(),
            batch_max_events: 1000,
            batch_max_delay: Duration::from_millis(50),
            queue_max_events: 100_000,
            max_in_flight_batches: 32,
            compression: Compression::Zstd,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(5),
            on_ack: None,
        }
    }
}

/// The shipper's flags, for the collector's `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShipArgs {
    /// Stitcher URL, e.g. `http://10.0.0.1:9400`; without it nothing is shipped.
    #[arg(long, env = "WEFT_STITCHER")]
    pub stitcher: Option<String>,
    /// Seal a batch at this many events.
    #[arg(long, env = "WEFT_BATCH_MAX_EVENTS", default_value_t = 1000)]
    pub batch_max_events: usize,
    /// Seal a batch when its oldest event has waited this long (part of every trace's
    /// export delay; at high rates batches fill by count first).
    #[arg(long, env = "WEFT_BATCH_MAX_DELAY", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub batch_max_delay: Duration,
    /// Most events held for the stitcher (unacknowledged included); beyond it the oldest
    /// unsent events are dropped and counted.
    #[arg(long, env = "WEFT_QUEUE_MAX_EVENTS", default_value_t = 100_000)]
    pub queue_max_events: usize,
    /// Compression of batches on the wire. zstd shrinks them for the network at about
    /// 0.35 µs of collector CPU per exchange shipped (1.5 against 1.15 µs per exchange in
    /// all, capture to wire, at 80k exchanges/s); `none` where a node's CPU is scarcer than
    /// the bytes to the stitcher.
    #[arg(
        long,
        env = "WEFT_SHIP_COMPRESSION",
        value_enum,
        default_value = "zstd"
    )]
    pub ship_compression: Compression,
    /// Longest wait between reconnect attempts.
    #[arg(long, env = "WEFT_SHIP_BACKOFF_MAX", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ship_backoff_max: Duration,
    /// How long shutdown keeps delivering what is queued.
    #[arg(long, env = "WEFT_SHIP_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ship_shutdown_timeout: Duration,
}

impl ShipArgs {
    pub fn config(&self, node_name: impl Into<String>) -> ShipConfig {
        ShipConfig {
            batch_max_events: self.batch_max_events.max(1),
            batch_max_delay: self.batch_max_delay,
            queue_max_events: self.queue_max_events.max(1),
            compression: self.ship_compression,
            backoff_max: self.ship_backoff_max,
            shutdown_timeout: self.ship_shutdown_timeout,
            ..ShipConfig::new(self.stitcher.clone(), node_name)
        }
    }
}

/// What the shipper did so far.
#[derive(Debug, Clone, Default)]
pub struct ShipStats {
    pub instance_id: String,
    /// Batches and events put on a stream (retransmissions included).
    pub sent_batches: u64,
    pub sent_events: u64,
    pub retransmitted_batches: u64,
    /// Batches and events the stitcher acknowledged (each batch once).
    pub acked_batches: u64,
    pub acked_events: u64,
    /// Acks that said the stitcher already had the batch.
    pub duplicate_acks: u64,
    /// Events given up, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Events queued now, and the most ever queued (never above the bound).
    pub queue_depth: usize,
    pub queue_max_depth: usize,
    pub queued_batches: usize,
    /// Connection attempts after the first.
    pub reconnects: u64,
    pub connected: bool,
}

/// State shared by the sender handles and the shipper's tasks.
struct Shared {
    cfg: ShipConfig,
    instance_id: String,
    outbox: Mutex<Outbox>,
    /// Pending went from empty to non-empty: the batcher arms its timer.
    wake_batcher: Notify,
    /// A batch was sealed (or an ack made room): the sender may send.
    wake_sender: Notify,
    info: Mutex<v1::CollectorInfo>,
    reconnects: AtomicU64,
    connected: AtomicBool,
    /// `Some(deadline)` once shutdown began.
    shutdown: watch::Sender<Option<Instant>>,
}

impl Shared {
    /// The info sent with every batch: the collector's own, plus the shipper's drops.
    fn info(&self) -> v1::CollectorInfo {
        let mut info = self.info.lock().clone();
        let dropped = self.outbox.lock().tally.dropped.clone();
        for (reason, n) in dropped {
            *info.drops.entry(format!("ship_{reason}")).or_default() += n;
        }
        info
    }
}

/// Cheap handle for the capture loop.
#[derive(Clone)]
pub struct EventSender {
    shared: Option<Arc<Shared>>,
}

impl EventSender {
    /// Queues an event; never blocks (beyond a short lock) and never fails: beyond the
    /// queue bound the oldest unsent event is dropped and counted instead. An Exchange is
    /// given back once queued (the queue keeps its encoding) or discarded (local-only),
    /// for reuse.
    pub fn try_send(&self, event: Event) -> Option<Box<v1::Exchange>> {
        let Some(shared) = &self.shared else {
            return event.into_exchange();
        };
        let pushed = shared.outbox.lock().push(&event, Instant::now());
        if pushed.sealed {
            shared.wake_sender.notify_one();
        }
        if pushed.first_pending {
            shared.wake_batcher.notify_one();
        }
        event.into_exchange()
    }
}

/// The running shipper (see the module docs).
pub struct Shipper {
    shared: Option<Arc<Shared>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Shipper {
    /// Starts the shipper's tasks (needs a Tokio runtime). Without a stitcher URL the
    /// shipper is inert: events are accepted and discarded (local-only mode).
    pub fn spawn(cfg: ShipConfig) -> Shipper {
        let Some(url) = cfg.stitcher.clone() else {
            return Shipper {
                shared: None,
                tasks: Vec::new(),
            };
        };
        let instance_id = uuid::Uuid::new_v4().to_string();
        tracing::info!(stitcher = %url, %instance_id, ?cfg, "shipping to the stitcher");
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox::new(cfg.queue_max_events, cfg.batch_max_events)),
            cfg,
            instance_id,
            wake_batcher: Notify::new(),
            wake_sender: Notify::new(),
            info: Mutex::new(v1::CollectorInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                ..Default::default()
            }),
            reconnects: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            shutdown: watch::channel(None).0,
        });
        let tasks = vec![
            tokio::spawn(batcher(shared.clone())),
            tokio::spawn(conn::run(shared.clone(), url)),
        ];
        Shipper {
            shared: Some(shared),
            tasks,
        }
    }

    pub fn sender(&self) -> EventSender {
        EventSender {
            shared: self.shared.clone(),
        }
    }

    /// Replaces what the collector reports of itself (sent with every batch).
    pub fn set_info(&self, info: v1::CollectorInfo) {
        if let Some(s) = &self.shared {
            *s.info.lock() = info;
        }
    }

    pub fn instance_id(&self) -> Option<&str> {
        self.shared.as_deref().map(|s| s.instance_id.as_str())
    }

    pub fn stats(&self) -> ShipStats {
        let Some(s) = &self.shared else {
            return ShipStats::default();
        };
        let q = s.outbox.lock();
        ShipStats {
            instance_id: s.instance_id.clone(),
            sent_batches: q.tally.sent_batches,
            sent_events: q.tally.sent_events,
            retransmitted_batches: q.tally.retransmitted_batches,
            acked_batches: q.tally.acked_batches,
            acked_events: q.tally.acked_events,
            duplicate_acks: q.tally.duplicate_acks,
            dropped: q
                .tally
                .dropped
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            queue_depth: q.depth(),
            queue_max_depth: q.tally.max_depth,
            queued_batches: q.queued_batches(),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            connected: s.connected.load(Ordering::Relaxed),
        }
    }

    /// Seals what is pending and keeps delivering until everything queued is acknowledged
    /// or `shutdown_timeout` passed; what is left then is counted as dropped (`shutdown`).
    /// Returns the final figures.
    pub async fn shutdown(self) -> ShipStats {
        let Shipper { shared, tasks } = self;
        let Some(shared) = shared else {
            return ShipStats::default();
        };
        let deadline = Instant::now() + shared.cfg.shutdown_timeout;
        shared.shutdown.send_replace(Some(deadline));
        shared.wake_batcher.notify_one();
        shared.wake_sender.notify_one();
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "shipper task failed");
            }
        }
        let stats = Shipper {
            shared: Some(shared),
            tasks: Vec::new(),
        }
        .stats();
        tracing::info!(acked_events = stats.acked_events, dropped = ?stats.dropped, "shipper stopped");
        stats
    }
}

/// Seals the pending events into a batch when the oldest has waited `batch_max_delay`
/// (count-triggered sealing happens in `try_send`).
async fn batcher(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if shutdown.borrow().is_some() {
            // Seal the rest; the sender delivers it.
            shared.outbox.lock().seal();
            shared.wake_sender.notify_one();
            return;
        }
        let since = shared.outbox.lock().pending_since();
        match since {
            None => {
                tokio::select! {
                    () = shared.wake_batcher.notified() => {}
                    _ = shutdown.changed() => {}
                }
            }
            Some(t) => {
                let due = t + shared.cfg.batch_max_delay;
                tokio::select! {
                    () = tokio::time::sleep_until(due.into()) => {
                        let sealed = {
                            let mut q = shared.outbox.lock();
                            // Sealed by count meanwhile if pending_since changed.
                            q.pending_since() == Some(t) && q.seal()
                        };
                        if sealed {
                            shared.wake_sender.notify_one();
                        }
                    }
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}
