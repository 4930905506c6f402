//! export: completed traces → OTLP and the trace printer.
//!
//! In: [`CompletedTrace`](crate::model::CompletedTrace)s, shared (`Arc`) with every sink.
//! Out: OTLP `ExportTraceServiceRequest`s to `--otlp-endpoint` ([`otlp`]), and one line
//! per span on stdout (`--print text|json`, [`printer`]).
//!
//! Both sinks implement [`TraceSink`](crate::model::TraceSink): `on_trace` never blocks
//! the pipeline. Each has a bounded queue in front of its own worker; a full queue drops
//! the trace and counts its spans (`export.otlp.dropped` / `export.print.dropped`),
//! logged once per reason.

pub mod otlp;
pub mod printer;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::model::SpanRecord;
use crate::resolve::Identity;
use weft_proto::v1::Side;

/// The identity a span belongs to: the caller for a CLIENT span, the callee for a SERVER span.
pub fn owner(span: &SpanRecord) -> &Identity {
    match span.side {
        Side::Client => &span.client,
        _ => &span.server,
    }
}

/// The identity at the other end of the span.
pub fn peer(span: &SpanRecord) -> &Identity {
    match span.side {
        Side::Client => &span.server,
        _ => &span.client,
    }
}

/// Logs a warning the first time a drop reason occurs; counters carry the rest.
#[derive(Default)]
pub(crate) struct LogOnce(AtomicBool);

impl LogOnce {
    pub(crate) fn warn(&self, what: &str, reason: &str) {
        if !self.0.swap(true, Ordering::Relaxed) {
            tracing::warn!(reason, "{what} (logged once; see the counters for totals)");
        }
    }
}
