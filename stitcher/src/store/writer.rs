//! The store's sink in the pipeline: completed traces → [`Store::insert_at`] on a thread
//! of its own.
//!
//! In: each pipeline turn's completed traces ([`TraceSink::on_traces`] on the stitch
//! thread). Out: the same traces inserted into the [`Store`], in order, by the
//! `weft-store` thread, shortly after (queries see a trace once its batch is inserted).
//!
//! Why a thread: merging a trace into the table, summarizing it and recording its edges
//! in the service map cost about as much as stitching it; done on the stitch thread they
//! were a third of its time. The hand-off never blocks the stitch thread: a full queue
//! drops the traces that do not fit, counted in `store.dropped` and logged once.

use std::sync::Arc;

use super::{Store, now_unix_nanos};
use crate::export::LogOnce;
use crate::metrics::{Counter, Registry};
use crate::model::{CompletedTrace, TraceSink};
use crate::sink_queue::{self, TraceQueue};

/// A [`TraceSink`] that inserts into a [`Store`] on the `weft-store` thread.
pub struct StoreWriter {
    queue: TraceQueue,
    dropped: Counter,
    log: LogOnce,
}

impl StoreWriter {
    /// Spans waiting to be inserted; beyond it new traces are dropped and counted. About
    /// a second at 300,000 spans/s (the queue holds the same traces as the export queue,
    /// so the two share their memory).
    pub const DEFAULT_QUEUE_SPANS: usize = 300_000;

    /// Starts the `weft-store` thread. It stops once the writer is dropped and its queue
    /// is inserted; the handle waits for that.
    pub fn spawn(
        store: Arc<Store>,
        queue_spans: usize,
        metrics: &Registry,
    ) -> std::io::Result<(Arc<StoreWriter>, std::thread::JoinHandle<()>)> {
        let (queue, mut rx) = sink_queue::channel(queue_spans);
        let thread = std::thread::Builder::new()
            .name("weft-store".into())
            .spawn(move || {
                while let Some(batch) = rx.blocking_recv() {
                    for trace in &batch {
                        store.insert_at(trace, now_unix_nanos());
                    }
                }
            })?;
        let writer = StoreWriter {
            queue,
            dropped: metrics.counter(
                "store.dropped",
                "traces not stored: the store's insert queue was full",
            ),
            log: LogOnce::default(),
        };
        Ok((Arc::new(writer), thread))
    }
}

impl TraceSink for StoreWriter {
    fn on_trace(&self, trace: &Arc<CompletedTrace>) {
        self.on_traces(std::slice::from_ref(trace));
    }

    fn on_traces(&self, traces: &[Arc<CompletedTrace>]) {
        if let Err(rejected) = self.queue.send(traces) {
            self.dropped.add(rejected.traces.len() as u64);
            self.log.warn("the store drops traces", rejected.reason);
        }
    }
}
