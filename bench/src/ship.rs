//! The collector's shipper as the overhead bench sees it from outside: its running totals
//! in the collector's `/metrics` (stage `ship` of `weft_collector_stage_events`, published
//! on the collector's one-second tick, see its `pipeline::tick`), and the wait, after a
//! load, until it has delivered what the load produced.
//!
//! In: `/metrics` texts. Out: [`ShipCounters`] (sent, acknowledged, dropped by reason) and
//! what they say about delivery; [`wait_flushed`] returns the counters once final.

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
        c
    }

    pub fn dropped(&self) -> f64 {
        // Not `sum()`: an empty f64 sum is -0.0, printed "-0".
        self.drops.values().fold(0.0, |a, b| a + b)
    }

    /// Everything sent was acknowledged and nothing was given up.
    pub fn delivered(&self) -> bool {
        self.dropped() == 0.0 && self.acked_events >= self.sent_events
    }

    /// What the note says about delivery: the counts, and what is wrong if anything is.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "events sent {}, acknowledged {}, ship drops {}",
            report::number(self.sent_events),
            report::number(self.acked_events),
            report::number(self.dropped()),
        );
        if self.acked_events < self.sent_events {
            s += &format!(
                "; NOT ALL ACKNOWLEDGED: {} unacknowledged ({} retransmitted batches count twice in sent)",
                report::number(self.sent_events - self.acked_events),
                report::number(self.retransmitted_batches),
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
/// ([`Flush::Stuck`]) or [`FLUSH_LIMIT`] passed. `quiet` is the trickle of events still
/// sent per tick that counts as caught up (see [`Flush::after`]). Returns the last counters.
pub fn wait_flushed(
    mut last: ShipCounters,
    quiet: f64,
    scrape: &dyn Fn() -> Result<String>,
) -> Result<ShipCounters> {
    let deadline = Instant::now() + FLUSH_LIMIT;
    let mut stalled = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1100));
        let now = ShipCounters::parse(&scrape()?);
        let state = Flush::after(&last, &now, quiet, &mut stalled);
        last = now;
        if state != Flush::Going {
            break;
        }
    }
    Ok(last)
}

/// Longest wait for the shipper to flush after the load.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(15);
/// Ticks without a new acknowledgement after which an incomplete delivery is final.
pub const STUCK_TICKS: u32 = 3;

/// Where the shipper is, from two scrapes one tick apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Every event sent is acknowledged, none dropped, and at most `quiet` events were sent
    /// in the tick: caught up. Not "nothing sent": events keep trickling after the load
    /// (connection events of the bench's own scrapes, the parser's timeouts), so waiting
    /// for silence would mostly measure the collector idling.
    Done,
    /// Not all acknowledged and no new acknowledgement for [`STUCK_TICKS`] ticks.
    Stuck,
    Going,
}

impl Flush {
    /// `stalled` counts the ticks in a row without a new acknowledgement.
    pub fn after(prev: &ShipCounters, now: &ShipCounters, quiet: f64, stalled: &mut u32) -> Flush {
        *stalled = if now.acked_events > prev.acked_events {
            0
        } else {
            *stalled + 1
        };
        if now.delivered() && now.sent_events - prev.sent_events <= quiet {
            Flush::Done
        } else if !now.delivered() && *stalled >= STUCK_TICKS {
            Flush::Stuck
        } else {
            Flush::Going
        }
    }
}

/// The events per tick that count as a trickle: 1 % of the rate shipped during the load
/// (at least 10).
pub fn quiet_events(sent_during_load: f64, load_seconds: f64) -> f64 {
    if load_seconds <= 0.0 {
        return 10.0;
    }
    (sent_during_load / load_seconds * 0.01).max(10.0)
}

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
    fn delivery_needs_every_event_acknowledged_and_no_drop() {
        let ok = ShipCounters {
            sent_events: 500.0,
            acked_events: 500.0,
            drops: BTreeMap::from([("queue_full".to_owned(), 0.0)]),
            ..ShipCounters::default()
        };
        assert!(ok.delivered());
        let no_drop_kinds = ShipCounters {
            drops: BTreeMap::new(),
            ..ok.clone()
        };
        assert!(no_drop_kinds.delivered());
        assert!(
            no_drop_kinds.describe().ends_with("ship drops 0"),
            "{}",
            no_drop_kinds.describe()
        );
        assert!(!ok.describe().contains("NOT"), "{}", ok.describe());
        assert!(!ok.describe().contains("DROPPED"), "{}", ok.describe());

        let unacked = ShipCounters {
            acked_events: 480.0,
            ..ok.clone()
        };
        assert!(!unacked.delivered());
        assert!(
            unacked
                .describe()
                .contains("NOT ALL ACKNOWLEDGED: 20 unacknowledged"),
            "{}",
            unacked.describe()
        );

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
    fn flush_is_done_when_caught_up_and_stuck_without_acks() {
        let at = |sent: f64, acked: f64| ShipCounters {
            sent_events: sent,
            acked_events: acked,
            ..ShipCounters::default()
        };
        let mut stalled = 0;
        // Still catching up: more than the trickle sent in the tick.
        assert_eq!(
            Flush::after(&at(1000.0, 900.0), &at(2000.0, 2000.0), 50.0, &mut stalled),
            Flush::Going
        );
        // A trickle, all acknowledged: done.
        assert_eq!(
            Flush::after(&at(2000.0, 2000.0), &at(2004.0, 2004.0), 50.0, &mut stalled),
            Flush::Done
        );
        // All acknowledged but something dropped: not done, and no new ack counts as stalled.
        let mut dropped = at(2004.0, 2004.0);
        dropped.drops.insert("queue_full".into(), 3.0);
        stalled = 0;
        let states: Vec<Flush> = (0..STUCK_TICKS)
            .map(|_| Flush::after(&dropped, &dropped, 50.0, &mut stalled))
            .collect();
        assert_eq!(states.last(), Some(&Flush::Stuck));
        assert!(
            states[..states.len() - 1]
                .iter()
                .all(|s| *s == Flush::Going)
        );
        // Acks arriving reset the stall count.
        stalled = STUCK_TICKS;
        assert_eq!(
            Flush::after(&at(3000.0, 2000.0), &at(3000.0, 2500.0), 50.0, &mut stalled),
            Flush::Going
        );
        assert_eq!(stalled, 0);
    }

    #[test]
    fn trickle_is_one_percent_of_the_load_rate() {
        assert_eq!(quiet_events(1_000_000.0, 10.0), 1000.0);
        assert_eq!(quiet_events(100.0, 10.0), 10.0);
        assert_eq!(quiet_events(100.0, 0.0), 10.0);
    }
}
