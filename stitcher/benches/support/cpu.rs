//! CPU time from procfs for the stitcher's benches and examples (included with `#[path]`:
//! each bench and example is its own crate).

/// CPU time this thread has run, in nanoseconds (`/proc/thread-self/schedstat`).
pub fn thread_cpu_nanos() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time of the whole process, exited threads included, in nanoseconds
/// (`/proc/self/stat` utime + stime, 10 ms ticks).
pub fn process_cpu_nanos() -> u64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name: state is the 3rd, utime the 14th, stime the 15th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        });
    ticks.unwrap_or(0) * 10_000_000
}
