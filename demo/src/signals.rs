//! Ctrl-C and SIGTERM: both ask the run to stop; the run then tears down in order.
//!
//! In: SIGINT/SIGTERM. Out: [`stop_requested`] turns true (a counter, so the handler stays
//! async-signal-safe).

use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// Signals received so far.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Installs the handlers for SIGINT and SIGTERM.
pub fn install() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

pub fn stop_requested() -> bool {
    received() > 0
}

/// How many SIGINT/SIGTERM arrived: a second one cuts the wait for the last traces short.
pub fn received() -> usize {
    SIGNALS.load(Ordering::SeqCst)
}
