//! Stopping on a signal without leaving anything behind.
//!
//! In: SIGTERM, SIGINT or SIGHUP, taken by one thread (`sigwait`). Out: this process's
//! children stopped by PID and its harness clusters removed ([`weft_harness::teardown_own`]),
//! then exit with 128 + the signal's number, as a shell reports a process killed by it.
//!
//! Why: the default action ends the process without running any drop, so a stopped
//! benchmark would leave its namespaces, demo apps and collector until the next harness run
//! cleans them up.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};

/// How long children get to exit on SIGTERM before SIGKILL (a collector detaches its
/// programs on SIGTERM, well within this).
const GRACE: Duration = Duration::from_secs(3);

/// Held by the signal thread from the signal to its exit, and taken by [`finish`]: the main
/// thread, whose children the teardown stops, would otherwise fail its benchmark, return
/// from `main` and end the process halfway through the teardown.
static TEARDOWN: Mutex<()> = Mutex::new(());

/// `main`'s last step: its exit code, unless a signal's teardown is under way (then that
/// ends the process, with the signal's code).
pub fn finish(code: ExitCode) -> ExitCode {
    let _no_teardown = TEARDOWN.lock();
    code
}

/// Blocks the signals in this thread, so in every thread started after it, and starts the
/// thread that waits for them. Call first in `main`, before any other thread exists:
/// a thread started earlier would keep them unblocked and could take the signal itself.
/// Children are unaffected: `std::process::Command` clears the mask in the child.
pub fn stop_cleanly_on_signal() -> Result<()> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(signal);
    }
    set.thread_block()
        .context("blocking SIGTERM, SIGINT and SIGHUP")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(signal) = set.wait() else {
                return;
            };
            // Never released: the process exits holding it.
            let _teardown = TEARDOWN.lock();
            eprintln!(
                "weft-bench: {signal}: stopping its processes and removing its harness clusters"
            );
            let removed = weft_harness::teardown_own(GRACE);
            if !removed.is_empty() {
                eprintln!("weft-bench: removed {}", removed.join(", "));
            }
            std::process::exit(128 + signal as i32);
        })
        .context("starting the signal thread")?;
    Ok(())
}
