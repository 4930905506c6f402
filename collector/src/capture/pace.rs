//! When to read the packet rings next.
//!
//! In: what each read of the packet rings found (records handed on or left waiting).
//! Out: when the next read is due, and whether the rings' doorbells should be armed.
//!
//! The rings wake nobody per record (see [`super::Capture::woken`]), so the collector reads
//! them on a timer. While records come, it reads every [`BASE_INTERVAL`]. An idle node would
//! still wake it 200 times a second, and a wake-up of an idle CPU is dear: 55 µs of the
//! collector's CPU each on the 2-vCPU VMs measured (23 µs of it for any process that sleeps
//! and wakes), 1.1 % of a CPU for reading nothing. So after [`IDLE_READS`] empty reads in a
//! row the interval doubles with each further empty read, up to a bound
//! ([`DEFAULT_MAX_INTERVAL`], `--max-read-interval`); the first read that finds a record
//! brings it back to [`BASE_INTERVAL`]. Connection events do not: they come from every
//! socket of the host (kubelet, scrapes). Each read takes them too, so they wait at most
//! the bound; their ring buffer wakes the collector only when a quarter full.
//!
//! What makes a long bound safe is the doorbell: while the interval is longer than
//! [`BASE_INTERVAL`] ([`ReadPace::backed_off`]), the collector arms every ring's doorbell,
//! and the first record that fills a ring to half wakes it at once (see
//! `RingControl::doorbell`). A burst after a quiet spell is then read within a wake-up's
//! latency, not up to a bound later, whatever the rings hold: before the doorbell the bound
//! had to be a third of what a CPU's rings hold at 150k records/s, which was 20 ms on a
//! small node (about 60 wake-ups a second idle) and nothing at all from 11 CPUs on, whose
//! rings are small (200 a second). What the bound still costs is latency: the first records
//! after a quiet spell (too few to fill half a ring) and connection events wait up to one
//! bound before they are read.

use std::time::Duration;

use tokio::time::Instant;

/// How often the rings are read while records come: in batches, one wake-up per read.
/// An event waits at most this plus `ring::WATERMARK_MARGIN_NANOS`.
pub const BASE_INTERVAL: Duration = Duration::from_millis(5);

/// Empty reads in a row (0.1 s at [`BASE_INTERVAL`]) before the interval grows: the
/// pauses of a steady load change nothing.
pub const IDLE_READS: u32 = 20;

/// The longest interval by default: an idle collector wakes about ten times a second to
/// read, and a lone request is read at most 0.1 s after it was sent.
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_millis(100);

/// The longest bound accepted (`--max-read-interval`): connection events and the first
/// records after a quiet spell wait up to the bound.
pub const MAX_INTERVAL_LIMIT: Duration = Duration::from_secs(60);

/// A reader woken later than this after its due time reads as if due when it woke
/// (tokio's `MissedTickBehavior::Delay` rule).
pub const LATE_TOLERANCE: Duration = Duration::from_millis(5);

/// The read schedule (see the module doc).
#[derive(Debug, Clone)]
pub struct ReadPace {
    interval: Duration,
    max: Duration,
    empty_reads: u32,
}

impl ReadPace {
    /// A schedule that backs off to `max` at most (at least [`BASE_INTERVAL`]).
    pub fn new(max: Duration) -> Self {
        ReadPace {
            interval: BASE_INTERVAL,
            max: max.max(BASE_INTERVAL),
            empty_reads: 0,
        }
    }

    /// The time between reads now.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The longest interval this schedule uses.
    #[cfg(test)]
    fn max_interval(&self) -> Duration {
        self.max
    }

    /// Whether the reader reads less often than every [`BASE_INTERVAL`] now: the rings'
    /// doorbells must then wake it when a burst comes.
    pub fn backed_off(&self) -> bool {
        self.interval > BASE_INTERVAL
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

    /// After a read the kernel woke the reader for at `woke`: when the next read is due,
    /// or `None` when it found no packet record. The kernel then woke it for connection
    /// events alone, which every socket of the host makes: the schedule stays as it was.
    pub fn after_woken_read(&mut self, woke: Instant, records: u64) -> Option<Instant> {
        (records > 0).then(|| self.after_read(woke, woke, records))
    }
}

/// Parses `--max-read-interval` (humantime: `100ms`, `2s`), within [`BASE_INTERVAL`] and
/// [`MAX_INTERVAL_LIMIT`].
pub fn parse_max_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < BASE_INTERVAL || d > MAX_INTERVAL_LIMIT {
        return Err(format!(
            "{s:?}: must be between {BASE_INTERVAL:?} (the interval under traffic) and {MAX_INTERVAL_LIMIT:?}"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut pace = ReadPace::new(DEFAULT_MAX_INTERVAL);
        let mut at = Instant::now();
        let start = at;
        assert_eq!(reads(&mut pace, &mut at, 1000, 3), BASE_INTERVAL);
        assert_eq!(at - start, BASE_INTERVAL * 1000);
        assert!(!pace.backed_off());
    }

    #[test]
    fn a_short_pause_changes_nothing() {
        let mut pace = ReadPace::new(DEFAULT_MAX_INTERVAL);
        let mut at = Instant::now();
        assert_eq!(reads(&mut pace, &mut at, IDLE_READS, 0), BASE_INTERVAL);
        assert!(!pace.backed_off());
        assert_eq!(reads(&mut pace, &mut at, 1, 1), BASE_INTERVAL);
        // The count of empty reads started again.
        assert_eq!(reads(&mut pace, &mut at, IDLE_READS, 0), BASE_INTERVAL);
    }

    #[test]
    fn an_idle_node_backs_off_to_the_bound_and_the_first_record_returns() {
        let mut pace = ReadPace::new(DEFAULT_MAX_INTERVAL);
        let mut at = Instant::now();
        reads(&mut pace, &mut at, IDLE_READS, 0);
        assert_eq!(reads(&mut pace, &mut at, 1, 0), BASE_INTERVAL * 2);
        assert!(
            pace.backed_off(),
            "the doorbells must be armed from here on"
        );
        assert_eq!(reads(&mut pace, &mut at, 1, 0), BASE_INTERVAL * 4);
        assert_eq!(reads(&mut pace, &mut at, 100, 0), DEFAULT_MAX_INTERVAL);
        let due = at;
        let next = pace.after_read(due, due, 7);
        assert_eq!(pace.interval(), BASE_INTERVAL);
        assert!(!pace.backed_off());
        assert_eq!(next, due + BASE_INTERVAL);
    }

    #[test]
    fn a_read_the_kernel_woke_for_is_due_when_it_woke() {
        let mut pace = ReadPace::new(Duration::from_secs(2));
        let mut at = Instant::now();
        assert_eq!(reads(&mut pace, &mut at, 100, 0), Duration::from_secs(2));
        // A doorbell half-way through the interval: the next read 5 ms after it.
        let rung = at - Duration::from_secs(1);
        assert_eq!(pace.after_woken_read(rung, 512), Some(rung + BASE_INTERVAL));
        assert!(!pace.backed_off());
    }

    #[test]
    fn a_wake_up_for_connection_events_alone_keeps_the_schedule() {
        let mut pace = ReadPace::new(DEFAULT_MAX_INTERVAL);
        let mut at = Instant::now();
        assert_eq!(reads(&mut pace, &mut at, 100, 0), DEFAULT_MAX_INTERVAL);
        assert_eq!(pace.after_woken_read(at, 0), None);
        assert_eq!(pace.interval(), DEFAULT_MAX_INTERVAL);
        // Nor did it count as an empty read: one record still returns to the base.
        assert_eq!(reads(&mut pace, &mut at, 1, 1), BASE_INTERVAL);
    }

    #[test]
    fn the_bound_is_never_below_the_base_interval() {
        let mut pace = ReadPace::new(Duration::ZERO);
        let mut at = Instant::now();
        assert_eq!(pace.max_interval(), BASE_INTERVAL);
        assert_eq!(reads(&mut pace, &mut at, 10 * IDLE_READS, 0), BASE_INTERVAL);
        assert!(!pace.backed_off());
    }

    #[test]
    fn reads_keep_a_fixed_rate_unless_the_reader_woke_too_late() {
        let mut pace = ReadPace::new(DEFAULT_MAX_INTERVAL);
        let due = Instant::now();
        // Woken a little late: still one interval after the due time.
        let woke = due + Duration::from_millis(2);
        assert_eq!(pace.after_read(due, woke, 1), due + BASE_INTERVAL);
        // Woken later than the tolerance: an interval after it woke, not at once.
        let late = due + LATE_TOLERANCE + Duration::from_millis(1);
        assert_eq!(pace.after_read(due, late, 1), late + BASE_INTERVAL);
    }

    #[test]
    fn the_bound_flag_takes_durations_within_limits() {
        assert_eq!(parse_max_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_max_interval("2s"), Ok(Duration::from_secs(2)));
        for bad in ["1ms", "2m", "soon", ""] {
            let err = parse_max_interval(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
