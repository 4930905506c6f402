//! sink_queue: the stitch thread's hand-off of completed traces to a sink's worker.
//!
//! In: the batch of [`CompletedTrace`]s one pipeline turn completed (`&[Arc<_>]`).
//! Out: the same traces, as `Vec`s, on the worker's side (async or blocking receive).
//!
//! Why batches: one channel send per turn wakes the parked worker once (a futex wake)
//! instead of once per trace. The queue is bounded in traces, not batches: a batch that
//! does not fit whole is cut at what fits, and what does not is handed back to the caller
//! to count and log ([`TraceQueue::send`] never blocks).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::model::CompletedTrace;

/// The sending side (the stitch thread).
pub struct TraceQueue {
    tx: mpsc::Sender<Vec<Arc<CompletedTrace>>>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

/// The receiving side (the sink's worker).
pub struct TraceQueueReceiver {
    rx: mpsc::Receiver<Vec<Arc<CompletedTrace>>>,
    queued: Arc<AtomicUsize>,
}

/// Traces a [`TraceQueue::send`] could not enqueue, and why.
pub struct Rejected<'a> {
    pub traces: &'a [Arc<CompletedTrace>],
    pub reason: &'static str,
}

impl Rejected<'_> {
    pub fn spans(&self) -> u64 {
        self.traces.iter().map(|t| t.spans.len() as u64).sum()
    }
}

/// A queue holding at most `capacity` traces (at least one).
pub fn channel(capacity: usize) -> (TraceQueue, TraceQueueReceiver) {
    let capacity = capacity.max(1);
    // Every batch holds at least one trace, so `capacity` batches never run out before
    // `capacity` traces do.
    let (tx, rx) = mpsc::channel(capacity);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        TraceQueue {
            tx,
            queued: queued.clone(),
            capacity,
        },
        TraceQueueReceiver { rx, queued },
    )
}

impl TraceQueue {
    /// Enqueues as many of `traces` as fit, in order, with one send. Returns the rest.
    pub fn send<'a>(&self, traces: &'a [Arc<CompletedTrace>]) -> Result<(), Rejected<'a>> {
        if traces.is_empty() {
            return Ok(());
        }
        let n = traces.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        let room = self.capacity.saturating_sub(before).min(n);
        if room < n {
            self.queued.fetch_sub(n - room, Ordering::AcqRel);
        }
        let (taken, rest) = traces.split_at(room);
        if taken.is_empty() {
            return Err(Rejected {
                traces: rest,
                reason: "queue full",
            });
        }
        if let Err(e) = self.tx.try_send(taken.to_vec()) {
            self.queued.fetch_sub(room, Ordering::AcqRel);
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "worker stopped",
            };
            return Err(Rejected { traces, reason });
        }
        if rest.is_empty() {
            Ok(())
        } else {
            Err(Rejected {
                traces: rest,
                reason: "queue full",
            })
        }
    }
}

impl TraceQueueReceiver {
    /// The next batch; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Vec<Arc<CompletedTrace>>> {
        let batch = self.rx.recv().await?;
        self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        Some(batch)
    }

    /// As [`TraceQueueReceiver::recv`], for a worker on a thread of its own.
    pub fn blocking_recv(&mut self) -> Option<Vec<Arc<CompletedTrace>>> {
        let batch = self.rx.blocking_recv()?;
        self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TraceId;

    fn traces(n: usize) -> Vec<Arc<CompletedTrace>> {
        (0..n)
            .map(|i| {
                Arc::new(CompletedTrace {
                    trace_id: TraceId([i as u8; 16]),
                    spans: Vec::new(),
                    late: false,
                })
            })
            .collect()
    }

    #[test]
    fn a_batch_is_cut_at_the_capacity_and_the_rest_handed_back() {
        let (q, mut rx) = channel(5);
        let all = traces(3);
        assert!(q.send(&all).is_ok());
        let more = traces(4);
        let rejected = q.send(&more).expect_err("two do not fit");
        assert_eq!(rejected.traces.len(), 2);
        assert_eq!(rejected.reason, "queue full");
        assert_eq!(rx.blocking_recv().map(|b| b.len()), Some(3));
        assert_eq!(rx.blocking_recv().map(|b| b.len()), Some(2));
        // Received traces free their room.
        assert!(q.send(&traces(5)).is_ok());
        assert!(q.send(&traces(1)).is_err());
    }

    #[test]
    fn a_stopped_worker_hands_every_trace_back() {
        let (q, rx) = channel(5);
        drop(rx);
        let all = traces(2);
        let rejected = q.send(&all).expect_err("no worker");
        assert_eq!(rejected.traces.len(), 2);
        assert_eq!(rejected.reason, "worker stopped");
        // Its room is given back: the count of queued traces stays true.
        assert_eq!(q.queued.load(Ordering::Relaxed), 0);
    }
}
