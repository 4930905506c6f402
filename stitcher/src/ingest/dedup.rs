//! Deduplication of batches by `(instance id, seq)` in bounded memory.
//!
//! In: the identity of a batch about to be forwarded. Out: [`Verdict::New`] (the batch is
//! reserved: forward it, or [`Dedup::release`] it if forwarding fails) or
//! [`Verdict::Duplicate`] (it was forwarded before: acknowledge, do not forward).
//!
//! Per collector instance we keep the highest seq below which every seq was seen
//! (`contiguous`) and a small set of seen seqs above it. Seqs arrive mostly in order, so
//! the set stays tiny; collectors also state a low-water seq with every batch (all lower
//! seqs were acknowledged or given up by the collector), which closes the gaps that the
//! collector's drop-oldest leaves.
//!
//! Bounds and what they cost:
//! - The set above `contiguous` holds at most `max_above` seqs. Beyond that the oldest gap
//!   is skipped (`contiguous` jumps to the smallest seen seq): a batch from that gap that
//!   still arrives later is acknowledged as a duplicate without being forwarded, so it is
//!   lost; every skipped seq is counted (`ingest.dedup.gap_skipped`).
//! - An instance without any batch for `idle_ttl` is forgotten. A retransmission from it
//!   after that (a batch the stitcher took but whose ack the collector never received,
//!   resent after a disconnection longer than the TTL) is forwarded a second time. Acks are
//!   sent right after a batch is taken, so this needs an ack lost exactly then *and* a
//!   collector away for longer than the TTL.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::{Counter, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    Duplicate,
}

#[derive(Debug)]
struct Window {
    /// Every seq `<= contiguous` has been seen (seq 0 is never used).
    contiguous: u64,
    /// Seen seqs above `contiguous + 1`.
    above: BTreeSet<u64>,
    last_seen: Instant,
}

impl Window {
    fn new(now: Instant) -> Self {
        Window {
            contiguous: 0,
            above: BTreeSet::new(),
            last_seen: now,
        }
    }

    fn seen(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.above.contains(&seq)
    }

    /// Seqs below `low_water` will never be sent again: treat them as seen.
    fn raise_floor(&mut self, low_water: u64) {
        if low_water > self.contiguous + 1 {
            self.contiguous = low_water - 1;
            self.above = self.above.split_off(&low_water);
        }
        self.absorb();
    }

    fn insert(&mut self, seq: u64) {
        self.above.insert(seq);
        self.absorb();
    }

    /// Moves `contiguous` up over seqs that are now contiguous.
    fn absorb(&mut self) {
        while self.above.first() == Some(&(self.contiguous + 1)) {
            self.above.pop_first();
            self.contiguous += 1;
        }
    }

    /// Enforces the bound on `above`; returns how many unseen seqs were skipped.
    fn enforce_bound(&mut self, max_above: usize) -> u64 {
        let mut skipped = 0;
        while self.above.len() > max_above {
            let Some(first) = self.above.pop_first() else {
                break;
            };
            skipped += first - self.contiguous - 1;
            self.contiguous = first;
            self.absorb();
        }
        skipped
    }
}

/// The dedup state of every instance (see the module docs for its bounds).
pub struct Dedup {
    windows: Mutex<HashMap<Arc<str>, Window>>,
    max_above: usize,
    idle_ttl: Duration,
    last_sweep: Mutex<Instant>,
    gap_skipped: Counter,
    forgotten: Counter,
    instances: Counter,
}

impl Dedup {
    pub fn new(max_above: usize, idle_ttl: Duration, registry: &Registry) -> Self {
        Dedup {
            windows: Mutex::new(HashMap::new()),
            max_above: max_above.max(1),
            idle_ttl,
            last_sweep: Mutex::new(Instant::now()),
            gap_skipped: registry.counter(
                "ingest.dedup.gap_skipped",
                "batch seqs given up on because the dedup window was full",
            ),
            forgotten: registry.counter(
                "ingest.dedup.instances_forgotten",
                "collector instances forgotten after the idle TTL",
            ),
            instances: registry.counter(
                "ingest.dedup.instances",
                "collector instances with dedup state (gauge)",
            ),
        }
    }

    /// Decides whether batch `seq` of `instance` is new, and reserves it if so.
    pub fn check(&self, instance: &Arc<str>, seq: u64, low_water: u64) -> Verdict {
        let now = Instant::now();
        self.sweep_if_due(now);
        let mut windows = self.windows.lock();
        let window = match windows.get_mut(instance) {
            Some(w) => w,
            None => {
                self.instances.set(windows.len() as u64 + 1);
                windows
                    .entry(instance.clone())
                    .or_insert_with(|| Window::new(now))
            }
        };
        window.last_seen = now;
        window.raise_floor(low_water);
        if window.seen(seq) {
            return Verdict::Duplicate;
        }
        window.insert(seq);
        let skipped = window.enforce_bound(self.max_above);
        if skipped > 0 {
            self.gap_skipped.add(skipped);
            tracing::warn!(
                %instance, skipped, max = self.max_above,
                "dedup window full: skipping missing batch seqs (a late one would be lost)"
            );
        }
        Verdict::New
    }

    /// Undoes the reservation of a batch that could not be forwarded, so that its
    /// retransmission is taken.
    pub fn release(&self, instance: &Arc<str>, seq: u64) {
        let mut windows = self.windows.lock();
        if let Some(w) = windows.get_mut(instance)
            && !w.above.remove(&seq)
            && seq <= w.contiguous
        {
            // Absorbed into the contiguous range: split it back out (the seq was reserved
            // just now, so it sits near the top and this range is short).
            let old = w.contiguous;
            w.contiguous = seq - 1;
            w.above.extend(seq + 1..=old);
        }
    }

    fn sweep_if_due(&self, now: Instant) {
        {
            let mut last = self.last_sweep.lock();
            if now.duration_since(*last) < self.idle_ttl / 4 {
                return;
            }
            *last = now;
        }
        let mut windows = self.windows.lock();
        let before = windows.len();
        windows.retain(|_, w| now.duration_since(w.last_seen) < self.idle_ttl);
        self.forgotten.add((before - windows.len()) as u64);
        self.instances.set(windows.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dedup(max_above: usize) -> (Dedup, Registry) {
        let r = Registry::new();
        (Dedup::new(max_above, Duration::from_secs(600), &r), r)
    }

    #[test]
    fn in_order_and_out_of_order_seqs_are_new_once() {
        let (d, _) = dedup(16);
        let i: Arc<str> = "a".into();
        for s in [1, 2, 4, 3, 5] {
            assert_eq!(d.check(&i, s, 0), Verdict::New, "seq {s}");
        }
        for s in 1..=5 {
            assert_eq!(d.check(&i, s, 0), Verdict::Duplicate, "seq {s}");
        }
        let other: Arc<str> = "b".into();
        assert_eq!(d.check(&other, 1, 0), Verdict::New);
        assert_eq!(d.windows.lock()[&i].contiguous, 5);
        assert!(d.windows.lock()[&i].above.is_empty());
    }

    #[test]
    fn low_water_closes_gaps_left_by_collector_drops() {
        let (d, _) = dedup(16);
        let i: Arc<str> = "a".into();
        assert_eq!(d.check(&i, 1, 0), Verdict::New);
        // Seqs 2..=9 were dropped by the collector; it says so with low water 10.
        assert_eq!(d.check(&i, 10, 10), Verdict::New);
        let w = &d.windows.lock()[&i];
        assert_eq!((w.contiguous, w.above.len()), (10, 0));
    }

    #[test]
    fn full_window_skips_the_oldest_gap_and_counts_it() {
        let (d, r) = dedup(3);
        let i: Arc<str> = "a".into();
        for s in [3, 4, 5, 6] {
            assert_eq!(d.check(&i, s, 0), Verdict::New);
        }
        assert_eq!(r.snapshot()["ingest.dedup.gap_skipped"], 2);
        assert_eq!(d.check(&i, 1, 0), Verdict::Duplicate);
    }

    #[test]
    fn release_makes_a_seq_new_again() {
        let (d, _) = dedup(16);
        let i: Arc<str> = "a".into();
        for s in 1..=3 {
            d.check(&i, s, 0);
        }
        d.release(&i, 2);
        assert_eq!(d.check(&i, 2, 0), Verdict::New);
        assert_eq!(d.check(&i, 3, 0), Verdict::Duplicate);
        assert_eq!(d.check(&i, 2, 0), Verdict::Duplicate);
    }

    #[test]
    fn idle_instances_are_forgotten() {
        let r = Registry::new();
        let d = Dedup::new(16, Duration::from_millis(40), &r);
        let i: Arc<str> = "a".into();
        d.check(&i, 1, 0);
        std::thread::sleep(Duration::from_millis(60));
        let j: Arc<str> = "b".into();
        d.check(&j, 1, 0);
        assert_eq!(r.snapshot()["ingest.dedup.instances_forgotten"], 1);
        // Documented consequence: a late duplicate from a forgotten instance is new again.
        assert_eq!(d.check(&i, 1, 0), Verdict::New);
    }
}
