//! Debug sink for ingested batches (`--print-exchanges`): one line per exchange on stdout.
//!
//! In: [`ObservedBatch`]es (what ingest forwards). Out: lines on stdout, flushed per
//! batch, so a test can count exactly which exchanges this stitcher process took:
//!
//! ```text
//! json: {"node":"node-a","instance":"5b0c…","seq":12,"id":11001}
//! text: node-a 5b0c… seq=12 id=11001 CLIENT GET /api/items 200
//! ```
//!
//! It is also the stand-in consumer while no pipeline is wired: with format `off` it only
//! drains the channel (and counts).

use std::io::Write;

use tokio::sync::mpsc;

use crate::metrics::Registry;
use crate::model::ObservedBatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrintFormat {
    Off,
    Text,
    Json,
}

/// Consumes `rx` until every sender is gone, printing each exchange in `format`.
pub fn spawn(
    format: PrintFormat,
    mut rx: mpsc::Receiver<ObservedBatch>,
    registry: &Registry,
) -> tokio::task::JoinHandle<()> {
    let printed = registry.counter(
        "ingest.printed_exchanges",
        "exchanges printed by --print-exchanges",
    );
    let write_errors = registry.counter(
        "ingest.print_errors",
        "batches whose lines could not be written to stdout",
    );
    tokio::task::spawn_blocking(move || {
        let stdout = std::io::stdout();
        let mut buf = Vec::with_capacity(64 << 10);
        let mut logged_error = false;
        while let Some(batch) = rx.blocking_recv() {
            if format == PrintFormat::Off {
                continue;
            }
            buf.clear();
            render(format, &batch, &mut buf);
            let mut out = stdout.lock();
            match out.write_all(&buf).and_then(|()| out.flush()) {
                Ok(()) => printed.add(batch.exchanges.len() as u64),
                Err(e) => {
                    write_errors.inc();
                    if !logged_error {
                        tracing::error!(error = %e, "cannot write exchanges to stdout (logged once)");
                        logged_error = true;
                    }
                }
            }
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
