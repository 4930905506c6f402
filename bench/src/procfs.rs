//! Resource use of a process from `/proc/<pid>`: CPU time (`stat` utime + stime) and
//! memory (`status` VmRSS, VmHWM), or its threads' CPU nanoseconds and sleeps
//! ([`Threads`]); and of the whole machine from `/proc/stat`.
//!
//! In: a PID (or nothing, for the machine). Out: a [`Sample`] (a [`MachineCpu`]); the
//! difference of two samples over wall time gives cores (the busy fraction).

use std::time::Instant;

use anyhow::{Context, Result};

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    /// Peak RSS so far.
    pub hwm_kib: u64,
}

impl Sample {
    pub fn read(pid: i32) -> Result<Sample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        Ok(Sample {
            at: Instant::now(),
            cpu_ticks: parse_cpu_ticks(&stat).context("malformed /proc/<pid>/stat")?,
            rss_kib: parse_status_number(&status, "VmRSS").unwrap_or(0),
            hwm_kib: parse_status_number(&status, "VmHWM").unwrap_or(0),
        })
    }

    /// CPU used between `earlier` and `self`, in cores (1.0 = one core busy).
    pub fn cores_since(&self, earlier: &Sample) -> f64 {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.cpu_seconds_since(earlier) / secs
    }

    /// CPU seconds used between `earlier` and `self`.
    pub fn cpu_seconds_since(&self, earlier: &Sample) -> f64 {
        self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 / clock_ticks_per_second()
    }
}

/// What all threads of a process did so far, to the nanosecond and the wake-up: `Sample`'s
/// clock ticks (10 ms) cannot see an idle process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Threads {
    /// CPU time on all threads (`/proc/<pid>/task/*/schedstat`, first field).
    pub cpu_ns: u64,
    /// Times a thread went to sleep of its own accord, and so was woken again
    /// (`voluntary_ctxt_switches` of `/proc/<pid>/task/*/status`).
    pub sleeps: u64,
}

impl Threads {
    pub fn read(pid: i32) -> Result<Threads> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("reading /proc/{pid}/task"))?;
        let mut sum = Threads::default();
        for task in tasks {
            let dir = task?.path();
            // A thread that ended since the listing counts no more.
            let (Ok(schedstat), Ok(status)) = (
                std::fs::read_to_string(dir.join("schedstat")),
                std::fs::read_to_string(dir.join("status")),
            ) else {
                continue;
            };
            sum.cpu_ns += parse_schedstat_ns(&schedstat).context("malformed schedstat")?;
            sum.sleeps += parse_status_number(&status, "voluntary_ctxt_switches")
                .context("no voluntary_ctxt_switches in status")?;
        }
        Ok(sum)
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Threads) -> Threads {
        Threads {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            sleeps: self.sleeps.saturating_sub(earlier.sleeps),
        }
    }
}

/// The CPU time (ns) of a `schedstat` line: `run_ns wait_ns timeslices`.
pub fn parse_schedstat_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// The machine's CPU time so far, all CPUs together (the `cpu` line of `/proc/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineCpu {
    pub total_ticks: u64,
    /// idle + iowait.
    pub idle_ticks: u64,
}

impl MachineCpu {
    pub fn read() -> Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_machine_cpu(&stat).context("no cpu line in /proc/stat")
    }

    /// The fraction of CPU time that was busy between `earlier` and `self` (1.0: every CPU
    /// busy all the time).
    pub fn busy_since(&self, earlier: &MachineCpu) -> Option<f64> {
        let total = self.total_ticks.checked_sub(earlier.total_ticks)?;
        let idle = self.idle_ticks.checked_sub(earlier.idle_ticks)?;
        (total > 0).then(|| total.saturating_sub(idle) as f64 / total as f64)
    }
}

/// The first line of `/proc/stat`: `cpu  user nice system idle iowait irq softirq steal ...`.
pub fn parse_machine_cpu(stat: &str) -> Option<MachineCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // Guest time is already counted in user time.
    let counted = &ticks[..ticks.len().min(8)];
    Some(MachineCpu {
        total_ticks: counted.iter().sum(),
        idle_ticks: ticks.get(3)? + ticks.get(4).copied().unwrap_or(0),
    })
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field
/// 2) is in parentheses and may contain spaces and parentheses: count from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14 → index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The number of a `/proc/<pid>/status` line: `Key:   1234 kB` (memory, in KiB) or
/// `Key:\t1234` (a count).
pub fn parse_status_number(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_busy_fraction_counts_everything_but_idle_and_iowait() {
        let before = parse_machine_cpu("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        // +300 busy (user 200, system 60, softirq 40), +100 idle: 75 % busy.
        let after = parse_machine_cpu("cpu  300 0 110 900 50 0 40 0 0 0\n").unwrap();
        assert_eq!(after.busy_since(&before), Some(0.75));
        // A counter that went back (another boot) gives nothing rather than nonsense.
        assert_eq!(before.busy_since(&after), None);
        assert_eq!(parse_machine_cpu("cpu0 1 2 3\n"), None);
        assert_eq!(parse_machine_cpu("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn cpu_ticks_count_fields_after_the_command_name() {
        let stat = "4242 (weft (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 120 30 0 0 20 0 9 0 \
                    100 1000 200 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(150));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_lines_give_kib() {
        let status = "Name:\tweft\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(parse_status_number(status, "VmHWM"), Some(51200));
        assert_eq!(parse_status_number(status, "VmRSS"), Some(40960));
        assert_eq!(parse_status_number(status, "VmSwap"), None);
    }

    #[test]
    fn thread_counters_parse() {
        assert_eq!(parse_schedstat_ns("123456789 42 7\n"), Some(123_456_789));
        assert_eq!(parse_schedstat_ns(""), None);
        let status = "Name:\tweft\nvoluntary_ctxt_switches:\t812\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(
            parse_status_number(status, "voluntary_ctxt_switches"),
            Some(812)
        );
        assert_eq!(
            parse_status_number(status, "nonvoluntary_ctxt_switches"),
            Some(3)
        );
        assert_eq!(parse_status_number(status, "Threads"), None);
        let this = Threads::read(std::process::id() as i32).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = Threads::read(std::process::id() as i32).unwrap();
        assert!(later.since(&this).sleeps >= 1, "{this:?} then {later:?}");
    }

    #[test]
    fn this_process_can_be_sampled() {
        let a = Sample::read(std::process::id() as i32).unwrap();
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = Sample::read(std::process::id() as i32).unwrap();
        assert!(b.cpu_ticks >= a.cpu_ticks);
        assert!(b.hwm_kib > 0 && b.hwm_kib >= b.rss_kib);
    }
}
