//! sink_queue: the stitch thread's hand-off of completed traces to a sink's worker.
//!
//! In: the batch of [`CompletedTrace`]s one pipeline turn completed (`&[Arc<_>]`).
//! Out: the same traces, as `Vec`s, on the worker's side (async or blocking receive).
//!
//! Why batches: one channel send per turn wakes the parked worker once (a futex wake)
//! instead of once per trace. The queue is bounded in spans (a trace without spans
//! counts as one), not batches or traces: memory follows spans, and a burst of small
//! traces (an idle sweep completing thousands at once) fits where its spans do. A batch
//! that does not fit whole is cut at what fits, and what does not is handed back to the
//! caller to count and log ([`TraceQueue::send`] never blocks).

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

/// What a trace takes of the queue's capacity: its spans, at least one.
fn weight(trace: &CompletedTrace) -> usize {
    trace.spans.len().max(1)
}

fn weight_of(traces: &[Arc<CompletedTrace>]) -> usize {
    traces.iter().map(|t| weight(t)).sum()
}

/// A queue holding at most `capacity` spans (at least one).
pub fn channel(capacity: usize) -> (TraceQueue, TraceQueueReceiver) {
    let capacity = capacity.max(1);
    // Every batch weighs at least one, so `capacity` batches never run out before
    // `capacity` spans do (tokio's bounded channel does not allocate its capacity).
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
        let n = weight_of(traces);
        // Reserve all, then give back what does not fit (the receiver only ever lowers
        // the count, so what was free at the reservation stays free).
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        let room = self.capacity.saturating_sub(before).min(n);
        let (mut fit, mut taken_weight) = (0, 0);
        for t in traces {
            if taken_weight + weight(t) > room {
                break;
            }
            taken_weight += weight(t);
            fit += 1;
        }
        if taken_weight < n {
            self.queued.fetch_sub(n - taken_weight, Ordering::AcqRel);
        }
        let (taken, rest) = traces.split_at(fit);
        if taken.is_empty() {
            let reason = if weight(&rest[0]) > self.capacity {
                "trace larger than the whole queue"
            } else {
                "queue full"
            };
            return Err(Rejected {
                traces: rest,
                reason,
            });
        }
        if let Err(e) = self.tx.try_send(taken.to_vec()) {
            self.queued.fetch_sub(taken_weight, Ordering::AcqRel);
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
        self.queued.fetch_sub(weight_of(&batch), Ordering::AcqRel);
        Some(batch)
    }

    /// As [`TraceQueueReceiver::recv`], for a worker on a thread of its own.
    pub fn blocking_recv(&mut self) -> Option<Vec<Arc<CompletedTrace>>> {
        let batch = self.rx.blocking_recv()?;
        self.queued.fetch_sub(weight_of(&batch), Ordering::AcqRel);
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LinkKind, SpanId, SpanRecord, TraceId};
    use crate::resolve::Identity;
    use weft_proto::v1::Side;

    /// `n` traces of `spans` spans each.
    fn traces(n: usize, spans: usize) -> Vec<Arc<CompletedTrace>> {
        (0..n)
            .map(|i| {
                let trace_id = TraceId([i as u8 + 1; 16]);
                Arc::new(CompletedTrace {
                    trace_id,
                    spans: (0..spans).map(|_| span(trace_id)).collect(),
                    late: false,
                })
            })
            .collect()
    }

    fn span(trace_id: TraceId) -> SpanRecord {
        let peer = Identity::external("192.0.2.1:80".parse().unwrap());
        SpanRecord {
            trace_id,
            span_id: SpanId::random(),
            parent: None,
            link: LinkKind::Root,
            side: Side::Client,
            name: "GET /".into(),
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            error: false,
            client: peer.clone(),
            server: peer,
            joined: false,
            node: Arc::from("n"),
            source: (Arc::from("i"), 1),
            request_bytes: 0,
            response_bytes: 0,
        }
    }

    #[test]
    fn a_batch_is_cut_at_the_capacity_in_spans_and_the_rest_handed_back() {
        let (q, mut rx) = channel(10);
        assert!(q.send(&traces(2, 3)).is_ok());
        // 4 spans of room: one 3-span trace fits, the next does not, nor any after it.
        let more = traces(3, 3);
        let rejected = q.send(&more).expect_err("two do not fit");
        assert_eq!(rejected.traces.len(), 2);
        assert_eq!(rejected.spans(), 6);
        assert_eq!(rejected.reason, "queue full");
        assert_eq!(q.queued.load(Ordering::Relaxed), 9);
        assert_eq!(rx.blocking_recv().map(|b| b.len()), Some(2));
        assert_eq!(rx.blocking_recv().map(|b| b.len()), Some(1));
        // Received spans free their room; many small traces fit where few large did.
        assert!(q.send(&traces(10, 1)).is_ok());
        assert!(q.send(&traces(1, 1)).is_err());
        assert_eq!(rx.blocking_recv().map(|b| b.len()), Some(10));
        // A trace without spans still takes one.
        assert!(q.send(&traces(10, 0)).is_ok());
        assert_eq!(q.queued.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_trace_larger_than_the_queue_is_refused_with_its_reason() {
        let (q, _rx) = channel(4);
        let big = traces(1, 5);
        let rejected = q.send(&big).expect_err("never fits");
        assert_eq!(rejected.reason, "trace larger than the whole queue");
        assert_eq!(q.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_stopped_worker_hands_every_trace_back() {
        let (q, rx) = channel(5);
        drop(rx);
        let all = traces(2, 2);
        let rejected = q.send(&all).expect_err("no worker");
        assert_eq!(rejected.traces.len(), 2);
        assert_eq!(rejected.reason, "worker stopped");
        // Its room is given back: the count of queued spans stays true.
        assert_eq!(q.queued.load(Ordering::Relaxed), 0);
    }
}
