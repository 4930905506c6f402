//! The collector's shipper as the overhead bench sees it from outside: its running totals
//! in the collector's `/metrics` (stage `ship` of `weft_collector_stage_events`, published
//! on the collector's one-second tick, see its `pipeline::tick`), and the wait, after a
//! load, until it has delivered what the load produced.
//!
//! In: `/metrics` texts. Out: [`ShipCounters`] (sent, acknowledged, dropped by reason, and
//! the queue depth, `weft_collector_ship_queue_events`) and what they say about delivery;
//! [`wait_flushed`] returns the counters once final, with how the wait ended.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::prom;
use crate::report;

/// The shipper's running totals, from the collector's `/metrics`: the `stage="ship"`
/// samples of `weft_collector_stage_events` (see the collector's `pipeline::tick`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShipCounters {
    /// Events put on a stream, retransmissions included.
    pub sent_events: f64,
    /// Events the stitcher acknowledged (each batch once).
    pub acked_events: f64,
    pub retransmitted_batches: f64,
    pub reconnects: f64,
    /// Events given up, by reason (every other kind of the stage).
    pub drops: BTreeMap<String, f64>,
    /// Events the shipper still holds (sent and unacknowledged, unsent, not yet batched):
    /// `sent - acked` is no measure of that, as a retransmitted batch counts twice in sent.
    pub queued_events: f64,
}

impl ShipCounters {
    /// The ship counters in a collector's `/metrics` text (all zero when it has none).
    pub fn parse(metrics: &str) -> ShipCounters {
        let mut c = ShipCounters::default();
        let samples = prom::samples(metrics, "weft_collector_stage_events_total")
            .chain(prom::samples(metrics, "weft_collector_stage_events"));
        for (labels, value) in samples {
            let label = |key: &str| {
                labels
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
            };
            if label("stage") != Some("ship") {
                continue;
            }
            let Some(kind) = label("kind") else { continue };
            let slot = match kind {
                "sent_events" => &mut c.sent_events,
                "acked_events" => &mut c.acked_events,
                "retransmitted_batches" => &mut c.retransmitted_batches,
                "reconnects" => &mut c.reconnects,
                reason => c.drops.entry(reason.to_owned()).or_default(),
            };
            *slot += value;
        }
        c.queued_events =
            prom::sum(metrics, "weft_collector_ship_queue_events", &[]).unwrap_or(0.0);
        c
    }

    pub fn dropped(&self) -> f64 {
        // Not `sum()`: an empty f64 sum is -0.0, printed "-0".
        self.drops.values().fold(0.0, |a, b| a + b)
    }

    /// Nothing given up and at most [`QUEUE_QUIET`] events still held: what the load
    /// produced was delivered (what trickles in after it keeps the queue from staying empty).
    pub fn delivered(&self) -> bool {
        self.dropped() == 0.0 && self.queued_events <= QUEUE_QUIET
    }

    /// What the note says about delivery: the counts, and what is wrong if anything is.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "events sent {}, acknowledged {}, still queued {}, ship drops {}",
            report::number(self.sent_events),
            report::number(self.acked_events),
            report::number(self.queued_events),
            report::number(self.dropped()),
        );
        if self.retransmitted_batches > 0.0 {
            s += &format!(
                "; {} retransmitted batches (counted again in sent)",
                report::number(self.retransmitted_batches)
            );
        }
        if self.dropped() > 0.0 {
            s += &format!(
                "; EVENTS DROPPED by reason: {}",
                self.drops
                    .iter()
                    .filter(|(_, n)| **n > 0.0)
                    .map(|(r, n)| format!("{r} {}", report::number(*n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if self.reconnects > 0.0 {
            s += &format!("; {} reconnects", report::number(self.reconnects));
        }
        s
    }
}

/// Scrapes the collector once per metrics tick (its counters are published on its
/// one-second tick) until the shipper has caught up ([`Flush::Done`]), is stuck
/// ([`Flush::Stuck`]) or [`FLUSH_LIMIT`] passed. Returns the last counters and how the
/// wait ended ([`Flush::Going`]: at the limit).
pub fn wait_flushed(
    mut last: ShipCounters,
    scrape: &dyn Fn() -> Result<String>,
) -> Result<(ShipCounters, Flush)> {
    let deadline = Instant::now() + FLUSH_LIMIT;
    let mut stalled = 0;
    let mut state = Flush::Going;
    while Instant::now() < deadline {
        // At least one tick: the counters at the load's end may predate its last second.
        std::thread::sleep(Duration::from_millis(1100));
        let now = ShipCounters::parse(&scrape()?);
        state = Flush::after(&last, &now, &mut stalled);
        last = now;
        if state != Flush::Going {
            break;
        }
    }
    Ok((last, state))
}

/// Longest wait for the shipper to flush after the load.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(15);
/// Ticks without the queue shrinking after which an incomplete delivery is final.
pub const STUCK_TICKS: u32 = 3;

/// Where the shipper is, from two scrapes one tick apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Flush {
    /// At most [`QUEUE_QUIET`] events still queued: caught up. Not "nothing queued": events keep
    /// trickling in after the load (connection events of the bench's own scrapes, the
    /// parser's timeouts), so waiting for an empty queue would mostly measure the collector
    /// idling. Drops do not hold it up: they are final, and reported.
    Done,
    /// More than [`QUEUE_QUIET`] queued, and the queue did not shrink for [`STUCK_TICKS`] ticks.
    Stuck,
    #[default]
    Going,
}

impl Flush {
    /// `stalled` counts the ticks in a row in which the queue did not shrink.
    pub fn after(prev: &ShipCounters, now: &ShipCounters, stalled: &mut u32) -> Flush {
        if now.queued_events <= QUEUE_QUIET {
            *stalled = 0;
            return Flush::Done;
        }
        *stalled = if now.queued_events < prev.queued_events {
            0
        } else {
            *stalled + 1
        };
        if *stalled >= STUCK_TICKS {
            Flush::Stuck
        } else {
            Flush::Going
        }
    }
}

/// Events still queued that count as caught up: what trickles in after the load (a few
/// events a second) waits in a batch for up to the collector's `--batch-max-delay`.
pub const QUEUE_QUIET: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    /// The collector's `/metrics` as prometheus_client writes the ship stage (with the
    /// parse stage's samples of the same family around it).
    const SHIP_METRICS: &str = "# HELP weft_collector_stage_events Counters of the parse and ship stages.\n\
        # TYPE weft_collector_stage_events counter\n\
        weft_collector_stage_events_total{stage=\"parse\",kind=\"sent_events\"} 999\n\
        weft_collector_stage_events_total{stage=\"ship\",kind=\"sent_events\"} 1200\n\
        weft_collector_stage_events_total{stage=\"ship\",kind=\"acked_events\"} 1100\n\
        weft_collector_stage_events_total{stage=\"ship\",kind=\"retransmitted_batches\"} 1\n\
        weft_collector_stage_events_total{stage=\"ship\",kind=\"reconnects\"} 2\n\
        weft_collector_stage_events_total{stage=\"ship\",kind=\"queue_full\"} 30\n\
        weft_collector_stage_events_total{stage=\"ship\",kind=\"rejected_invalid\"} 0\n\
        weft_collector_exchanges_total 1180\n";

    #[test]
    fn ship_counters_come_from_the_ship_stage_only() {
        let c = ShipCounters::parse(SHIP_METRICS);
        assert_eq!(c.sent_events, 1200.0);
        assert_eq!(c.acked_events, 1100.0);
        assert_eq!(c.retransmitted_batches, 1.0);
        assert_eq!(c.reconnects, 2.0);
        assert_eq!(
            c.drops,
            BTreeMap::from([
                ("queue_full".to_owned(), 30.0),
                ("rejected_invalid".to_owned(), 0.0)
            ])
        );
        assert_eq!(c.dropped(), 30.0);
        let none = ShipCounters::parse("weft_collector_exchanges_total 5\n");
        assert_eq!(none, ShipCounters::default());
    }

    #[test]
    fn queue_depth_comes_from_its_gauge() {
        let text = format!("{SHIP_METRICS}weft_collector_ship_queue_events 734\n");
        assert_eq!(ShipCounters::parse(&text).queued_events, 734.0);
        assert_eq!(ShipCounters::parse(SHIP_METRICS).queued_events, 0.0);
    }

    #[test]
    fn delivery_needs_the_queue_drained_and_no_drop() {
        let ok = ShipCounters {
            sent_events: 1500.0,
            acked_events: 500.0,
            retransmitted_batches: 1.0,
            queued_events: 4.0,
            drops: BTreeMap::from([("queue_full".to_owned(), 0.0)]),
            ..ShipCounters::default()
        };
        // A retransmitted batch counts twice in sent: sent - acked is not what is missing.
        assert!(ok.delivered());
        let text = ok.describe();
        assert!(text.contains("still queued 4, ship drops 0"), "{text}");
        assert!(text.contains("1 retransmitted batches"), "{text}");
        assert!(!text.contains("DROPPED"), "{text}");

        let queued = ShipCounters {
            queued_events: QUEUE_QUIET + 1.0,
            ..ok.clone()
        };
        assert!(!queued.delivered());

        let dropped = ShipCounters::parse(SHIP_METRICS);
        assert!(!dropped.delivered());
        let text = dropped.describe();
        assert!(
            text.contains("EVENTS DROPPED by reason: queue_full 30"),
            "{text}"
        );
        assert!(!text.contains("rejected_invalid"), "{text}");
        assert!(text.contains("2 reconnects"), "{text}");
    }

    #[test]
    fn flush_is_done_when_the_queue_drained_and_stuck_when_it_stops_shrinking() {
        let queued = |n: f64| ShipCounters {
            queued_events: n,
            ..ShipCounters::default()
        };
        let mut stalled = 0;
        assert_eq!(
            Flush::after(&queued(5000.0), &queued(2000.0), &mut stalled),
            Flush::Going
        );
        assert_eq!(
            Flush::after(&queued(2000.0), &queued(QUEUE_QUIET), &mut stalled),
            Flush::Done
        );
        // Drops are final and do not hold the wait up.
        let mut dropped = queued(3.0);
        dropped.drops.insert("queue_full".into(), 3.0);
        assert_eq!(Flush::after(&dropped, &dropped, &mut stalled), Flush::Done);
        // A queue that stays put: stuck after STUCK_TICKS ticks.
        stalled = 0;
        let states: Vec<Flush> = (0..STUCK_TICKS)
            .map(|_| Flush::after(&queued(800.0), &queued(800.0), &mut stalled))
            .collect();
        assert_eq!(states.last(), Some(&Flush::Stuck));
        assert!(
            states[..states.len() - 1]
                .iter()
                .all(|s| *s == Flush::Going)
        );
        // Shrinking again resets the count.
        assert_eq!(
            Flush::after(&queued(800.0), &queued(700.0), &mut stalled),
            Flush::Going
        );
        assert_eq!(stalled, 0);
    }
}
