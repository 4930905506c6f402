//! tracefs for the `sock/inet_sock_set_state` tracepoint.
//!
//! aya looks the tracepoint up under `/sys/kernel/tracing`. Where tracefs is not mounted, the
//! collector mounts it in a private mount namespace of its own, so the host's mounts stay as
//! they were. Must run before any thread is started (`unshare` affects the calling thread).

use std::path::Path;

use anyhow::Context as _;
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};

const TRACEFS: &str = "/sys/kernel/tracing";

fn mounted() -> bool {
    [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .iter()
    .any(|p| Path::new(p).is_dir())
}

/// Returns whether tracefs had to be mounted.
pub fn ensure() -> anyhow::Result<bool> {
    if mounted() {
        return Ok(false);
    }
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS) to mount tracefs privately")?;
    // Stop our mounts from propagating back to the host's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private in our mount namespace")?;
    mount(
        Some("nodev"),
        TRACEFS,
        Some("tracefs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting tracefs on {TRACEFS}"))?;
    Ok(true)
}
