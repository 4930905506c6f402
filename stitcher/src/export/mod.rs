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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics::Registry;
use crate::model::{SpanRecord, TraceSink};
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

/// The export sinks the command line asks for: OTLP (when an endpoint is given) and the
/// trace printer on stdout (when a format is given). Call inside a tokio runtime.
pub fn sinks(
    otlp: Option<otlp::OtlpConfig>,
    print: Option<printer::PrintFormat>,
    metrics: &Registry,
) -> anyhow::Result<Vec<Arc<dyn TraceSink>>> {
    let mut out: Vec<Arc<dyn TraceSink>> = Vec::new();
    if let Some(cfg) = otlp {
        out.push(otlp::OtlpExporter::spawn(cfg, metrics)?);
    }
    if let Some(format) = print {
        out.push(printer::Printer::spawn(
            format,
            Box::new(std::io::stdout()),
            metrics,
        ));
    }
    Ok(out)
}
