//! The OTLP receiver: rotel, run in the control namespace, printing every span it receives.
//!
//! In: the path of `rotel-agent`. Out: the command that starts it on `127.0.0.1:4317`
//! (gRPC) and `:4318` (HTTP) of the control namespace (private to the run, so fixed ports
//! never collide), and [`parse`] turning its `--debug-log traces --debug-log-verbosity
//! detailed` output into [`ReceivedSpan`]s.

use std::path::Path;
use std::process::Command;

/// The OTLP/gRPC endpoint the stitcher exports to, inside the control namespace.
pub const OTLP_GRPC: &str = "127.0.0.1:4317";
const OTLP_HTTP: &str = "127.0.0.1:4318";

/// `rotel-agent start ...`, its pid and log files inside `run_dir` (not rotel's `/tmp`
/// defaults, which two runs would share).
pub fn command(agent: &Path, run_dir: &Path) -> Command {
    let mut cmd = Command::new(agent);
    cmd.arg("start")
        .args(["--otlp-grpc-endpoint", OTLP_GRPC])
        .args(["--otlp-http-endpoint", OTLP_HTTP])
        .args(["--exporter", "blackhole"])
        .args(["--debug-log", "traces"])
        .args(["--debug-log-verbosity", "detailed"])
        .arg("--pid-file")
        .arg(run_dir.join("rotel.pid"))
        .arg("--log-file")
        .arg(run_dir.join("rotel.log"))
        .env("NO_COLOR", "1");
    cmd
}

/// A span as rotel printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root.
    pub parent_id: String,
    pub name: String,
    /// `SPAN_KIND_CLIENT`, `SPAN_KIND_SERVER`, ...
    pub kind: String,
    /// The `service.name` of the span's resource.
    pub service: String,
}

/// Parses rotel's detailed trace debug log:
///
/// ```text
/// ResourceSpans #0
/// Resource attributes:
///      -> service.name: Str(frontend)
/// ScopeSpans #0
/// Span #0
///     Trace ID       : 5b8efff798038103d269b633813fc60c
///     Parent ID      : eee19b7ec3c1b173
///     ID             : eee19b7ec3c1b174
///     Name           : GET /api
///     Kind           : SPAN_KIND_SERVER
/// ```
pub fn parse(text: &str) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    let mut service = String::new();
    let mut in_resource = false;
    let mut current: Option<ReceivedSpan> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            service.clear();
            in_resource = false;
        } else if trimmed == "Resource attributes:" {
            in_resource = true;
        } else if trimmed.starts_with("ScopeSpans #") {
            spans.extend(current.take());
            in_resource = false;
        } else if trimmed.starts_with("Span #") {
            spans.extend(current.take());
            current = Some(ReceivedSpan {
                service: service.clone(),
                ..ReceivedSpan::default()
            });
        } else if in_resource && let Some(v) = trimmed.strip_prefix("-> service.name: Str(") {
            service = v.strip_suffix(')').unwrap_or(v).to_string();
        } else if let Some(span) = current.as_mut()
            && let Some((key, value)) = trimmed.split_once(':')
        {
            let value = value.trim().to_string();
            match key.trim() {
                "Trace ID" => span.trace_id = value,
                "Parent ID" => span.parent_id = value,
                "ID" => span.span_id = value,
                "Name" => span.name = value,
                "Kind" => span.kind = value,
                _ => {}
            }
        }
    }
    spans.extend(current);
    spans.retain(|s| !s.trace_id.is_empty() && !s.span_id.is_empty());
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from rotel 0.0.1-alpha10 (two resources, the second with two spans).
    const SAMPLE: &str = "\u{1b}[2m2026-11-22T14:59:25.657177Z\u{1b}[0m INFO Starting Rotel.
ResourceSpans #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(frontend)
ScopeSpans #0
ScopeSpans SchemaURL: 
InstrumentationScope weft 
Span #0
    Trace ID       : 5b8efff798038103d269b633813fc60c
    Parent ID      : eee19b7ec3c1b173
    ID             : eee19b7ec3c1b174
    Name           : GET /api
    Kind           : SPAN_KIND_SERVER
Start time: 1544712660000000000
End time: 1544712661000000000
Attributes:
     -> http.response.status_code: Int(200)
ResourceSpans #1
Resource attributes:
     -> service.name: Str(client)
ScopeSpans #0
Span #0
    Trace ID       : 5b8efff798038103d269b633813fc60c
    Parent ID      : 
    ID             : eee19b7ec3c1b173
    Name           : GET /api
    Kind           : SPAN_KIND_CLIENT
Attributes:
     -> service.name: Str(not-a-resource)
Span #1
    Trace ID       : 00000000000000000000000000000001
    Parent ID      : 
    ID             : 0000000000000002
    Name           : GET /x
    Kind           : SPAN_KIND_CLIENT
";

    #[test]
    fn parses_spans_with_their_resource() {
        let spans = parse(SAMPLE);
        assert_eq!(spans.len(), 3);
        assert_eq!(spans[0].service, "frontend");
        assert_eq!(spans[0].span_id, "eee19b7ec3c1b174");
        assert_eq!(spans[0].parent_id, "eee19b7ec3c1b173");
        assert_eq!(spans[0].kind, "SPAN_KIND_SERVER");
        assert_eq!(spans[1].service, "client");
        assert_eq!(spans[1].parent_id, "");
        assert_eq!(spans[2].trace_id, "00000000000000000000000000000001");
        assert_eq!(spans[2].service, "client");
    }

    #[test]
    fn ignores_noise() {
        assert!(parse("").is_empty());
        assert!(parse("Span #0\n    Name : x\n").is_empty());
    }
}
