//! When to read the packet rings next.
//!
//! In: what each read of the packet rings found (records handed on or left waiting).
//! Out: when the next read is due.
//!
//! The rings wake nobody (see [`super::Capture::drain`]), so the collector reads them on a
//! timer. While records come, it reads every [`BASE_INTERVAL`]. An idle node would still
//! wake it 200 times a second, and a wake-up of an idle CPU is dear: 55 µs of the
//! collector's CPU each on the 2-vCPU VMs measured (23 µs of it for any process that
//! sleeps and wakes), 1.1 % of a CPU for reading nothing. So after [`IDLE_READS`] empty
//! reads in a row the interval doubles with each further empty read, up to a bound; the
//! first read that finds a record brings it back to [`BASE_INTERVAL`]. Connection events
//! do not: they come from every socket of the host (kubelet, scrapes). Each read takes them
//! too, so they wait at most [`MAX_IDLE_INTERVAL`]; their ring buffer wakes the collector
//! only when a quarter full.
//!
//! Measured there (`/proc/<pid>/schedstat` over 10 s of an idle collector): 31–38 ms of
//! CPU and about 60 wake-ups a second, against 117 ms and 200 reading every 5 ms.
//!
//! What backing off costs: the first records after a quiet spell are read up to one
//! bound late, the fast ring may spill for that one read (see `ring`), and every later
//! read is on the base schedule again. The bound is a third of what a CPU's rings (fast
//! and spill; every CPU has the same) hold at [`PEAK_RECORDS_PER_SEC`]: on a small node
//! 20.48 ms of 61 ms, which leaves 41 ms for the reader to be late before a record is
//! lost (at 5 ms, 56 ms were left). Measured there: 12 saturating bursts (h2load, 32
//! connections) each after 1.2 s of quiet, 733,109 requests, 0 ring drops, about 2,000
//! records spilled per burst. The bound shrinks as more CPUs share the rings' budget:
//! 20.48 ms up to 2 CPUs, 11.4 ms up to 5, 5.7 ms up to 10, and from 11 CPUs on, whose
//! rings are small, [`BASE_INTERVAL`]: no backing off.

use std::time::Duration;

use tokio::time::Instant;

/// How often the rings are read while records come: in batches, one wake-up per read.
/// An event waits at most this plus `ring::WATERMARK_MARGIN_NANOS`.
pub const BASE_INTERVAL: Duration = Duration::from_millis(5);

/// Empty reads in a row (0.1 s at [`BASE_INTERVAL`]) before the interval grows: the
/// pauses of a steady load change nothing.
pub const IDLE_READS: u32 = 20;

/// The interval never grows beyond this, whatever the rings hold (latency of the first
/// records after a quiet spell). Rings as sized today (at most 9,216 slots per CPU) give a
/// bound of 20.48 ms at most: this only caps bigger rings.
pub const MAX_IDLE_INTERVAL: Duration = Duration::from_millis(40);

/// A reader woken later than this after its due time reads as if due when it woke
/// (tokio's `MissedTickBehavior::Delay` rule).
pub const LATE_TOLERANCE: Duration = Duration::from_millis(5);

/// The busiest CPU's record rate assumed when sizing the bound: a saturated 2-vCPU node
/// tracing both halves of pod-to-pod requests writes about 110k records per second on
/// one CPU (see `ring`).
pub const PEAK_RECORDS_PER_SEC: u64 = 150_000;

/// The read schedule (see the module doc).
#[derive(Debug, Clone)]
pub struct ReadPace {
    interval: Duration,
    max: Duration,
    empty_reads: u32,
}

impl ReadPace {
    /// A schedule for rings of `slots_per_cpu` slots per CPU (fast and spill together).
    pub fn new(slots_per_cpu: u64) -> Self {
        ReadPace {
            interval: BASE_INTERVAL,
            max: idle_bound(slots_per_cpu),
            empty_reads: 0,
        }
    }

    /// The time between reads now.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The longest interval this schedule uses.
    pub fn max_interval(&self) -> Duration {
        self.max
    }

    /// When the read after one due at `due` is due, given that the timer woke the reader
    /// at `woke` and the read found `records` (handed on or still waiting). As a
    /// fixed-rate timer: one interval after `due`, unless the reader woke more than
    /// [`LATE_TOLERANCE`] late; then one interval after it woke (no burst of reads to
    /// catch up).
    pub fn after_read(&mut self, due: Instant, woke: Instant, records: u64) -> Instant {
        if records > 0 {
            self.empty_reads = 0;
            self.interval = BASE_INTERVAL;
        } else {
            self.empty_reads = self.empty_reads.saturating_add(1);
            if self.empty_reads > IDLE_READS {
                self.interval = (self.interval * 2).min(self.max);
            }
        }
        if woke > due + LATE_TOLERANCE {
            woke + self.interval
        } else {
            due + self.interval
        }
    }
}

/// The longest interval rings of `slots_per_cpu` slots allow (see the module doc).
fn idle_bound(slots_per_cpu: u64) -> Duration {
    let holds = Duration::from_secs_f64(slots_per_cpu as f64 / PEAK_RECORDS_PER_SEC as f64);
    (holds / 3).clamp(BASE_INTERVAL, MAX_IDLE_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small node's rings: 1,024 fast and 8,192 spill slots per CPU.
    const SMALL_NODE: u64 = 9216;

    /// Runs `n` reads that find `records` each, on time; returns the last interval.
    fn reads(pace: &mut ReadPace, at: &mut Instant, n: u32, records: u64) -> Duration {
        for _ in 0..n {
            let next = pace.after_read(*at, *at, records);
            *at = next;
        }
        pace.interval()
    }

    #[test]
    fn reads_stay_at_the_base_interval_while_records_come() {
        let mut pace = ReadPace::new(SMALL_NODE);
        let mut at = Instant::now();
        let start = at;
        assert_eq!(reads(&mut pace, &mut at, 1000, 3), BASE_INTERVAL);
        assert_eq!(at - start, BASE_INTERVAL * 1000);
    }

    #[test]
    fn a_short_pause_changes_nothing() {
        let mut pace = ReadPace::new(SMALL_NODE);
        let mut at = Instant::now();
        assert_eq!(reads(&mut pace, &mut at, IDLE_READS, 0), BASE_INTERVAL);
        assert_eq!(reads(&mut pace, &mut at, 1, 1), BASE_INTERVAL);
        // The count of empty reads started again.
        assert_eq!(reads(&mut pace, &mut at, IDLE_READS, 0), BASE_INTERVAL);
    }

    #[test]
    fn an_idle_node_backs_off_to_the_bound_and_the_first_record_returns() {
        let mut pace = ReadPace::new(SMALL_NODE);
        let mut at = Instant::now();
        reads(&mut pace, &mut at, IDLE_READS, 0);
        assert_eq!(reads(&mut pace, &mut at, 1, 0), BASE_INTERVAL * 2);
        assert_eq!(reads(&mut pace, &mut at, 1, 0), BASE_INTERVAL * 4);
        // 9,216 slots hold 61 ms at 150k records/s: a third of that, 20 ms.
        assert_eq!(pace.max_interval(), Duration::from_micros(20_480));
        assert_eq!(reads(&mut pace, &mut at, 100, 0), pace.max_interval());
        let due = at;
        let next = pace.after_read(due, due, 7);
        assert_eq!(pace.interval(), BASE_INTERVAL);
        assert_eq!(next, due + BASE_INTERVAL);
    }

    #[test]
    fn rings_too_small_to_wait_longer_never_back_off() {
        // A node with many CPUs: 128 fast and 512 spill slots each hold 4 ms.
        let mut pace = ReadPace::new(640);
        let mut at = Instant::now();
        assert_eq!(pace.max_interval(), BASE_INTERVAL);
        assert_eq!(reads(&mut pace, &mut at, 10 * IDLE_READS, 0), BASE_INTERVAL);
        // Huge rings: the interval stays bounded by latency.
        assert_eq!(ReadPace::new(1 << 24).max_interval(), MAX_IDLE_INTERVAL);
    }

    #[test]
    fn reads_keep_a_fixed_rate_unless_the_reader_woke_too_late() {
        let mut pace = ReadPace::new(SMALL_NODE);
        let due = Instant::now();
        // Woken a little late: still one interval after the due time.
        let woke = due + Duration::from_millis(2);
        assert_eq!(pace.after_read(due, woke, 1), due + BASE_INTERVAL);
        // Woken later than the tolerance: an interval after it woke, not at once.
        let late = due + LATE_TOLERANCE + Duration::from_millis(1);
        assert_eq!(pace.after_read(due, late, 1), late + BASE_INTERVAL);
    }
}
