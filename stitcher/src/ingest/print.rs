//! Debug tap of ingested batches (`--print-exchanges`): one line per exchange on stdout.
//!
//! In: each new (deduplicated) [`ObservedBatch`], written by the ingest stream *before* the
//! batch is forwarded and acknowledged. Out: lines on stdout, flushed per batch. So every
//! acknowledged exchange has been printed, and a test can count exactly which exchanges
//! each stitcher process took, also across a SIGKILL:
//!
//! ```text
//! json: {"node":"node-a","instance":"5b0c…","seq":12,"id":11001}
//! text: node-a 5b0c… seq=12 id=11001 CLIENT GET /api/items 200
//! ```
//!
//! [`spawn_drain`] consumes and discards batches instead of the pipeline
//! (`--ingest-only`, to benchmark ingest alone).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use crate::metrics::{Counter, Registry};
use crate::model::ObservedBatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrintFormat {
    Off,
    Text,
    Json,
}

/// Writes the lines of one batch to stdout and flushes, before the batch is acknowledged.
pub struct Tap {
    format: PrintFormat,
    printed: Counter,
    write_errors: Counter,
    logged_error: AtomicBool,
}

impl Tap {
    pub fn new(format: PrintFormat, registry: &Registry) -> Self {
        Tap {
            format,
            printed: registry.counter(
                "ingest.printed_exchanges",
                "exchanges printed by --print-exchanges",
            ),
            write_errors: registry.counter(
                "ingest.print_errors",
                "batches whose lines could not be written to stdout",
            ),
            logged_error: AtomicBool::new(false),
        }
    }

    pub fn enabled(&self) -> bool {
        self.format != PrintFormat::Off
    }

    /// Blocking write (a debug mode: a slow reader of stdout slows ingest down).
    pub fn write(&self, batch: &ObservedBatch) {
        if !self.enabled() {
            return;
        }
        let mut buf = Vec::with_capacity(64 * batch.exchanges.len());
        render(self.format, batch, &mut buf);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        match out.write_all(&buf).and_then(|()| out.flush()) {
            Ok(()) => self.printed.add(batch.exchanges.len() as u64),
            Err(e) => {
                self.write_errors.inc();
                if !self.logged_error.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "cannot write exchanges to stdout (logged once)");
                }
            }
        }
    }
}

/// Consumer for `--ingest-only`: takes every batch, counts it, discards it.
pub fn spawn_drain(
    mut rx: mpsc::Receiver<ObservedBatch>,
    registry: &Registry,
) -> tokio::task::JoinHandle<()> {
    let drained = registry.counter(
        "ingest.drained_batches",
        "batches discarded after ingest (--ingest-only)",
    );
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            drained.inc();
        }
    })
}

fn render(format: PrintFormat, b: &ObservedBatch, buf: &mut Vec<u8>) {
    for x in &b.exchanges {
        // Formatting into a Vec cannot fail.
        let _ = match format {
            PrintFormat::Json => writeln!(
                buf,
                "{}",
                serde_json::json!({"node": &*b.node, "instance": &*b.instance, "seq": b.seq, "id": x.id})
            ),
            PrintFormat::Text => writeln!(
                buf,
                "{} {} seq={} id={} {} {} {} {}",
                b.node,
                b.instance,
                b.seq,
                x.id,
                x.side().as_str_name(),
                x.method,
                x.path,
                x.status
            ),
            PrintFormat::Off => Ok(()),
        };
    }
}
