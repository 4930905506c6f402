//! The shipper's bounded queue: events not yet acknowledged by the stitcher.
//!
//! In: events ([`Outbox::push`]) and acks ([`Outbox::ack`]). Out: numbered batches to send
//! ([`Outbox::next_to_send`]), retransmitted after a reconnect ([`Outbox::requeue`]).
//!
//! The queue holds three kinds of events, oldest first: batches sent on the live stream
//! and not yet acknowledged (*in flight*), sealed batches waiting to be sent (*unsent*,
//! including every batch that was in flight when a stream broke), and *pending* events not
//! yet sealed into a batch. Its depth (all three) never exceeds `bound`: an event that
//! would exceed it pushes out the oldest event that is not in flight, or, if every queued
//! event is in flight (the stitcher holds them and will ack them), the new event itself.
//! Either way exactly one event is dropped and counted as `queue_full`. In-flight events are
//! spared because the stitcher most likely has them already: dropping them would count
//! events that were in fact delivered.
//!
//! Seqs start at 1 and grow by 1 per sealed batch. When the collector gives up a whole
//! batch (trimmed to nothing, or rejected), the stitcher learns it from the low-water seq
//! sent with every batch: all lower seqs are acknowledged or given up.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use weft_proto::v1;

use super::Event;
use super::wire::{EncodedExchanges, SealedEvents, WireBatch};

/// A sealed batch. Its message is immutable and shared with the sender while it is encoded;
/// events pushed out by the bound are skipped from the front (`skip_*`), never removed.
#[derive(Debug)]
struct Batch {
    seq: u64,
    msg: Arc<SealedEvents>,
    skip_exchanges: usize,
    skip_connections: usize,
    /// Sent on the live stream and waiting for its ack.
    in_flight: bool,
    sent_at: Option<Instant>,
    /// Sent at least once before (a later send is a retransmission).
    was_sent: bool,
}

impl Batch {
    fn len(&self) -> usize {
        self.msg.exchanges.len() - self.skip_exchanges + self.msg.connections.len()
            - self.skip_connections
    }

    /// Drops the oldest remaining event (exchanges are dropped before connections).
    fn drop_front(&mut self) {
        if self.skip_exchanges < self.msg.exchanges.len() {
            self.skip_exchanges += 1;
        } else if self.skip_connections < self.msg.connections.len() {
            self.skip_connections += 1;
        }
    }

    fn exchange_ids(&self) -> Vec<u64> {
        self.msg.exchanges.ids(self.skip_exchanges).to_vec()
    }
}

/// What [`Outbox::push`] did, so the caller wakes the right task.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// A batch was sealed (the sender has work).
    pub sealed: bool,
    /// The pending buffer was empty before (the batcher must start its timer).
    pub first_pending: bool,
    /// An event was dropped because of the bound.
    pub dropped: bool,
}

/// A batch ready to be sent, detached from the queue so it is encoded outside the lock.
pub struct Outgoing {
    pub seq: u64,
    pub msg: Arc<SealedEvents>,
    pub skip_exchanges: usize,
    pub skip_connections: usize,
    pub low_water_seq: u64,
    pub retransmission: bool,
}

impl Outgoing {
    /// What to put on the wire: the events still queued, shared, not copied.
    pub fn to_wire(&self, node: &str, instance: &str, info: v1::CollectorInfo) -> WireBatch {
        WireBatch {
            node_name: node.to_string(),
            instance_id: instance.to_string(),
            seq: self.seq,
            events: self.msg.clone(),
            skip_exchanges: self.skip_exchanges,
            skip_connections: self.skip_connections,
            info,
            low_water_seq: self.low_water_seq,
        }
    }
}

/// One acknowledged batch, for [`super::ShipConfig::on_ack`] (tests prove delivery with it).
#[derive(Debug, Clone)]
pub struct AckRecord {
    pub seq: u64,
    /// Ids of the exchanges the stitcher acknowledged with this batch.
    pub exchange_ids: Vec<u64>,
    pub duplicate: bool,
    pub at: Instant,
}

/// Counters kept with the queue (under the same lock, so they agree with it).
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent_batches: u64,
    pub sent_events: u64,
    pub retransmitted_batches: u64,
    pub acked_batches: u64,
    pub acked_events: u64,
    pub duplicate_acks: u64,
    pub dropped: BTreeMap<&'static str, u64>,
    pub max_depth: usize,
}

#[derive(Debug)]
pub struct Outbox {
    bound: usize,
    batch_max: usize,
    /// Encoded as they come (see `wire`), so that each Exchange goes back to the parser.
    pending_exchanges: EncodedExchanges,
    /// Pending exchanges pushed out by the bound (skipped from the front when sealed).
    pending_skip: usize,
    pending_connections: Vec<v1::Connection>,
    pending_since: Option<Instant>,
    batches: VecDeque<Batch>,
    next_seq: u64,
    depth: usize,
    in_drop_episode: bool,
    episode_drops: u64,
    pub tally: Tally,
}

impl Outbox {
    pub fn new(bound: usize, batch_max: usize) -> Self {
        Outbox {
            bound: bound.max(1),
            batch_max: batch_max.max(1),
            pending_exchanges: EncodedExchanges::default(),
            pending_skip: 0,
            pending_connections: Vec::new(),
            pending_since: None,
            batches: VecDeque::new(),
            next_seq: 1,
            depth: 0,
            in_drop_episode: false,
            episode_drops: 0,
            tally: Tally::default(),
        }
    }

    /// Events queued (in flight + unsent + pending).
    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn queued_batches(&self) -> usize {
        self.batches.len()
    }

    pub fn pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    pub fn is_empty(&self) -> bool {
        self.depth == 0
    }

    /// Queues one event (an Exchange as its encoding), dropping one if the bound requires
    /// it.
    pub fn push(&mut self, event: &Event, now: Instant) -> Pushed {
        let mut out = Pushed::default();
        if self.depth >= self.bound {
            out.dropped = true;
            self.count_drop("queue_full", 1);
            if !self.drop_oldest_unsent() {
                // Everything queued is in flight: the new event is the one to go.
                return out;
            }
        }
        out.first_pending = self.pending_since.is_none();
        if out.first_pending {
            self.pending_since = Some(now);
        }
        match event {
            Event::Exchange(x) => self.pending_exchanges.push(x),
            Event::Connection(c) => self.pending_connections.push(c.clone()),
        }
        self.depth += 1;
        self.tally.max_depth = self.tally.max_depth.max(self.depth);
        if self.pending_len() >= self.batch_max {
            out.sealed = self.seal();
        }
        out
    }

    /// Pending events (not yet sealed, not pushed out).
    fn pending_len(&self) -> usize {
        self.pending_exchanges.len() - self.pending_skip + self.pending_connections.len()
    }

    /// Seals the pending events into the next batch; false if there were none.
    pub fn seal(&mut self) -> bool {
        self.pending_since = None;
        let skip_exchanges = std::mem::take(&mut self.pending_skip);
        if self.pending_exchanges.len() == skip_exchanges && self.pending_connections.is_empty() {
            self.pending_exchanges = EncodedExchanges::default();
            return false;
        }
        // The next batch starts with room for as many exchanges as this one had: a full
        // batch then fills without growing (each growth copied every exchange).
        let room = EncodedExchanges::with_capacity(
            self.pending_exchanges.len().min(self.batch_max),
            self.pending_exchanges.byte_len(),
        );
        let msg = SealedEvents {
            exchanges: std::mem::replace(&mut self.pending_exchanges, room),
            connections: std::mem::take(&mut self.pending_connections),
        };
        self.batches.push_back(Batch {
            seq: self.next_seq,
            msg: Arc::new(msg),
            skip_exchanges,
            skip_connections: 0,
            in_flight: false,
            sent_at: None,
            was_sent: false,
        });
        self.next_seq += 1;
        true
    }

    /// Drops the oldest event that is not in flight; false if there is none.
    fn drop_oldest_unsent(&mut self) -> bool {
        if let Some(i) = self.batches.iter().position(|b| !b.in_flight) {
            let b = &mut self.batches[i];
            b.drop_front();
            if b.len() == 0 {
                self.batches.remove(i);
            }
        } else if self.pending_skip < self.pending_exchanges.len() {
            self.pending_skip += 1;
        } else if !self.pending_connections.is_empty() {
            // Rare (bound smaller than a batch): O(n), acceptable.
            self.pending_connections.remove(0);
        } else {
            return false;
        }
        self.depth -= 1;
        if self.pending_len() == 0 {
            self.pending_since = None;
        }
        true
    }

    fn count_drop(&mut self, reason: &'static str, n: u64) {
        *self.tally.dropped.entry(reason).or_default() += n;
        if reason == "queue_full" {
            if !self.in_drop_episode {
                self.in_drop_episode = true;
                tracing::warn!(
                    bound = self.bound,
                    "ship queue full (stitcher unreachable or slow): dropping the oldest \
                     unsent events and counting them as dropped{{reason=queue_full}} \
                     until the queue drains"
                );
            }
            self.episode_drops += n;
        }
    }

    /// Ends a drop episode once the queue has room again (logs the episode's total).
    fn maybe_end_episode(&mut self) {
        if self.in_drop_episode && self.depth <= self.bound / 2 {
            tracing::warn!(
                dropped = self.episode_drops,
                "ship queue has room again; events dropped in this episode"
            );
            self.in_drop_episode = false;
            self.episode_drops = 0;
        }
    }

    /// Seq below which every batch is acknowledged or given up.
    fn low_water_seq(&self) -> u64 {
        self.batches.front().map_or(self.next_seq, |b| b.seq)
    }

    /// Whether a batch is waiting to be sent and the in-flight window has room.
    pub fn has_sendable(&self, max_in_flight: usize) -> bool {
        let in_flight = self.batches.iter().take_while(|b| b.in_flight).count();
        in_flight < max_in_flight && self.batches.len() > in_flight
    }

    /// Takes the oldest unsent batch and marks it in flight.
    pub fn next_to_send(&mut self, max_in_flight: usize, now: Instant) -> Option<Outgoing> {
        let low_water_seq = self.low_water_seq();
        let in_flight = self.batches.iter().take_while(|b| b.in_flight).count();
        if in_flight >= max_in_flight {
            return None;
        }
        let b = self.batches.get_mut(in_flight)?;
        b.in_flight = true;
        b.sent_at = Some(now);
        let retransmission = b.was_sent;
        b.was_sent = true;
        let len = b.len() as u64;
        let out = Outgoing {
            seq: b.seq,
            msg: b.msg.clone(),
            skip_exchanges: b.skip_exchanges,
            skip_connections: b.skip_connections,
            low_water_seq,
            retransmission,
        };
        self.tally.sent_batches += 1;
        self.tally.sent_events += len;
        self.tally.retransmitted_batches += u64::from(retransmission);
        Some(out)
    }

    /// When the oldest in-flight batch was sent (for the ack timeout).
    pub fn oldest_in_flight(&self) -> Option<Instant> {
        self.batches
            .front()
            .filter(|b| b.in_flight)
            .and_then(|b| b.sent_at)
    }

    /// Forgets the acknowledged batch `seq`. Returns its record when `want_record`.
    pub fn ack(&mut self, seq: u64, duplicate: bool, want_record: bool) -> Option<AckRecord> {
        let i = self
            .batches
            .iter()
            .position(|b| b.seq == seq && b.in_flight)?;
        let b = self.batches.remove(i)?;
        let len = b.len();
        self.depth -= len;
        self.tally.acked_batches += 1;
        self.tally.acked_events += len as u64;
        self.tally.duplicate_acks += u64::from(duplicate);
        self.maybe_end_episode();
        want_record.then(|| AckRecord {
            seq,
            exchange_ids: b.exchange_ids(),
            duplicate,
            at: Instant::now(),
        })
    }

    /// The stitcher refused the oldest in-flight batch (it answers in order): give it up.
    pub fn reject_oldest_in_flight(&mut self, reason: &'static str) -> Option<u64> {
        if !self.batches.front().is_some_and(|b| b.in_flight) {
            return None;
        }
        let b = self.batches.pop_front()?;
        let len = b.len();
        self.depth -= len;
        self.count_drop(reason, len as u64);
        tracing::error!(
            seq = b.seq,
            events = len,
            reason,
            "stitcher rejected a batch; its events are dropped"
        );
        Some(b.seq)
    }

    /// The stream broke: everything in flight goes back to unsent, to be retransmitted
    /// (same seq) on the next stream.
    pub fn requeue(&mut self) -> usize {
        let mut n = 0;
        for b in self.batches.iter_mut().filter(|b| b.in_flight) {
            b.in_flight = false;
            n += 1;
        }
        n
    }

    /// Gives up everything still queued (shutdown deadline passed).
    pub fn abandon(&mut self, reason: &'static str) -> usize {
        self.seal();
        let n = self.depth;
        self.batches.clear();
        self.depth = 0;
        if n > 0 {
            self.count_drop(reason, n as u64);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: u64) -> Event {
        Event::Exchange(Box::new(v1::Exchange {
            id,
            ..Default::default()
        }))
    }

    fn ids(o: &Outgoing) -> Vec<u64> {
        o.msg.exchanges.ids(o.skip_exchanges).to_vec()
    }

    #[test]
    fn seals_by_count_and_numbers_batches_from_one() {
        let mut q = Outbox::new(100, 3);
        let now = Instant::now();
        let p = q.push(&ex(1), now);
        assert!(p.first_pending && !p.sealed);
        q.push(&ex(2), now);
        assert!(q.push(&ex(3), now).sealed);
        q.push(&ex(4), now);
        assert!(q.seal());
        let a = q.next_to_send(8, now).unwrap();
        let b = q.next_to_send(8, now).unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(ids(&a), [1, 2, 3]);
        assert_eq!(ids(&b), [4]);
        assert!(q.next_to_send(8, now).is_none());
        assert_eq!(q.depth(), 4);
        assert_eq!(q.ack(1, false, true).unwrap().exchange_ids, [1, 2, 3]);
        assert_eq!(q.depth(), 1);
    }

    #[test]
    fn a_bound_below_the_batch_size_drops_the_oldest_pending_events() {
        let mut q = Outbox::new(3, 10);
        let now = Instant::now();
        for id in 1..=5 {
            q.push(&ex(id), now);
        }
        q.push(&Event::Connection(v1::Connection::default()), now);
        assert_eq!((q.depth(), q.tally.dropped["queue_full"]), (3, 3));
        assert!(q.seal());
        let b = q.next_to_send(8, now).expect("batch");
        assert_eq!(ids(&b), [4, 5]);
        assert_eq!(b.msg.connections.len(), 1);
        // Everything pending pushed out: nothing to seal.
        let mut q = Outbox::new(1, 10);
        q.push(&ex(1), now);
        q.push(&ex(2), now);
        assert!(q.seal());
        let b = q.next_to_send(8, now).expect("batch");
        assert_eq!(ids(&b), [2]);
        assert!(!q.seal());
    }

    #[test]
    fn beyond_the_bound_drops_exactly_the_oldest_unsent_events() {
        let mut q = Outbox::new(5, 2);
        let now = Instant::now();
        for id in 1..=12 {
            q.push(&ex(id), now);
            assert!(q.depth() <= 5);
        }
        assert_eq!(q.tally.dropped["queue_full"], 7);
        assert_eq!(q.tally.max_depth, 5);
        q.seal();
        let mut sent = vec![];
        while let Some(o) = q.next_to_send(100, now) {
            sent.extend(ids(&o));
        }
        assert_eq!(sent, [8, 9, 10, 11, 12]);
    }

    #[test]
    fn in_flight_events_are_spared_and_the_new_event_goes_instead() {
        let mut q = Outbox::new(4, 2);
        let now = Instant::now();
        for id in 1..=4 {
            q.push(&ex(id), now);
        }
        q.next_to_send(8, now).unwrap();
        q.next_to_send(8, now).unwrap();
        let p = q.push(&ex(5), now);
        assert!(p.dropped);
        assert_eq!(q.depth(), 4);
        // After the stream breaks they are unsent again, and the oldest may go.
        assert_eq!(q.requeue(), 2);
        q.push(&ex(6), now);
        q.seal();
        let first = q.next_to_send(8, now).unwrap();
        assert!(first.retransmission);
        assert_eq!((first.seq, ids(&first)), (1, vec![2]));
        assert_eq!(q.tally.dropped["queue_full"], 2);
    }

    #[test]
    fn low_water_moves_past_batches_given_up() {
        let mut q = Outbox::new(2, 2);
        let now = Instant::now();
        for id in 1..=6 {
            q.push(&ex(id), now);
        }
        // Batches 1 and 2 were pushed out entirely; batch 3 holds 5 and 6.
        let o = q.next_to_send(8, now).unwrap();
        assert_eq!((o.seq, o.low_water_seq), (3, 3));
        q.reject_oldest_in_flight("rejected_invalid");
        assert_eq!(q.tally.dropped["rejected_invalid"], 2);
        assert!(q.is_empty());
    }
}
