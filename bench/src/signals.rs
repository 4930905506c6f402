//! Stopping on a signal without leaving anything behind.
//!
//! In: SIGTERM, SIGINT or SIGHUP, caught by handlers that one thread waits on. Out: this
//! process's children stopped by PID and its harness clusters removed
//! ([`weft_harness::teardown_own`]), then exit with 128 + the signal's number, as a shell
//! reports a process killed by it.
//!
//! Why: the default action ends the process without running any drop, so a stopped
//! benchmark would leave its namespaces, demo apps and collector until the next harness run
//! cleans them up.
//!
//! Handlers, not a blocked mask and `sigwait`: children inherit the signal mask
//! (`std::process::Command` keeps it), and a collector that never sees SIGTERM cannot
//! detach its programs or write its profile.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

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

/// Installs the handlers (before this returns, so no signal is missed after it) and starts
/// the thread that tears down on the first signal.
pub fn stop_cleanly_on_signal() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("building the signal thread's runtime")?;
    let mut streams = Vec::new();
    for (kind, number) in [
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::hangup(), libc::SIGHUP),
    ] {
        // `signal` needs the runtime's reactor: enter it to install the handler now.
        let stream = runtime
            .block_on(async { signal(kind) })
            .with_context(|| format!("installing a handler for signal {number}"))?;
        streams.push((stream, number));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let number = runtime.block_on(first_of(streams));
            teardown_and_exit(number);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// The number of the first signal that arrives on any of `streams`.
async fn first_of(streams: Vec<(tokio::signal::unix::Signal, i32)>) -> i32 {
    let waits = streams.into_iter().map(|(mut stream, number)| {
        Box::pin(async move {
            stream.recv().await;
            number
        })
    });
    futures::future::select_all(waits).await.0
}

fn teardown_and_exit(number: i32) -> ! {
    // Never released: the process exits holding it.
    let _teardown = TEARDOWN.lock();
    let name = nix::sys::signal::Signal::try_from(number).map_or("signal", |s| s.as_str());
    eprintln!("weft-bench: {name}: stopping its processes and removing its harness clusters");
    let done = weft_harness::teardown_own(GRACE);
    if done.killed > 0 {
        eprintln!(
            "weft-bench: {} processes did not stop within {GRACE:?} of SIGTERM: killed",
            done.killed
        );
    }
    if !done.removed.is_empty() {
        eprintln!("weft-bench: removed {}", done.removed.join(", "));
    }
    std::process::exit(128 + number);
}
