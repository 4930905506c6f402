//! The trace printer (`--print text|json`): one line per exported span.
//!
//! In: completed traces. Out: lines on a writer (stdout), from a worker thread behind a
//! bounded queue (a full queue drops and counts, the pipeline never waits for stdout).
//!
//! Text (the DESIGN.md format):
//!
//! ```text
//! 2026-11-22 10:00:00.123456789 (5.04ms[4.80ms]) HTTPClient 200 GET /api/items [10.244.1.9 as frontend.demo:37450]->[10.96.0.20 as backend.demo:80] size:0B svc=[demo/frontend] traceparent=[00-<trace id>-<span id>[<parent id>]-01]
//! ```
//!
//! - the span's start (UTC, nanoseconds);
//! - `(duration[remote])`: the duration observed at this span's observation point (request's
//!   first segment to response's first segment), and in brackets the same request's
//!   duration observed at the other end: the callee's for a `HTTPClient` span (so the
//!   difference is network and queueing), the caller's for an `HTTP` (server) span; `-`
//!   when the other half was not found;
//! - `HTTPClient` (CLIENT span) or `HTTP` (SERVER span), status, method, path;
//! - `[client]->[server]` as `ip as workload.namespace:port` (the IP again when unnamed);
//!   for a CLIENT span the server is as addressed (a Service before DNAT);
//! - `size`: the request body size;
//! - `svc`: `namespace/workload` of the span's owner (caller for CLIENT, callee for SERVER;
//!   `-/ip` when unnamed);
//! - `traceparent`: trace id, span id, parent span id in brackets (zeros for a root).
//!
//! JSON: one object per line with the keys `time` (the text timestamp), `start_unix_nanos`,
//! `end_unix_nanos`, `duration_nanos`, `remote_duration_nanos` (null when unjoined),
//! `kind` (`CLIENT`|`SERVER`), `status`, `method`, `path`, `name` (`METHOD route`),
//! `client` and `server` (objects: `ip`, `port`, `kind`, `name`, `workload`, `namespace`,
//! `pod`), `request_bytes`, `response_bytes`, `service` (`namespace/workload`), `trace_id`,
//! `span_id`, `parent_span_id` (`""` for a root), `link` (`join`|`traceparent`|`thread`|
//! `timing`|`ambiguous`|`""`), `joined`, `error`, `node`, `late`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use weft_proto::v1::Side;

use super::{LogOnce, owner};
use crate::metrics::{Counter, Registry};
use crate::model::{CompletedTrace, LinkKind, SpanId, SpanRecord, TraceSink};
use crate::resolve::Identity;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrintFormat {
    Text,
    Json,
}

/// Traces the printer's queue holds before it drops.
const QUEUE: usize = 4096;

/// A [`TraceSink`] that prints every span.
pub struct Printer {
    tx: SyncSender<Arc<CompletedTrace>>,
    dropped: Counter,
    log: LogOnce,
}

impl Printer {
    /// Starts the writer thread.
    pub fn spawn(
        format: PrintFormat,
        mut out: Box<dyn Write + Send>,
        metrics: &Registry,
    ) -> Arc<Printer> {
        let (tx, rx) = sync_channel::<Arc<CompletedTrace>>(QUEUE);
        let write_errors = metrics.counter(
            "export.print.write_errors",
            "spans the printer could not write",
        );
        let printed = metrics.counter("export.print.spans", "spans printed");
        let spawned = std::thread::Builder::new()
            .name("weft-printer".into())
            .spawn(move || {
                let log = LogOnce::default();
                for trace in rx {
                    let lines = format_trace(&trace, format);
                    let n = lines.len() as u64;
                    let res = lines
                        .iter()
                        .try_for_each(|l| writeln!(out, "{l}"))
                        .and_then(|_| out.flush());
                    match res {
                        Ok(()) => printed.add(n),
                        Err(e) => {
                            write_errors.add(n);
                            log.warn("trace printer cannot write", &e.to_string());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the trace printer thread");
        }
        Arc::new(Printer {
            tx,
            dropped: metrics.counter(
                "export.print.dropped",
                "spans not printed because the printer's queue was full",
            ),
            log: LogOnce::default(),
        })
    }
}

impl TraceSink for Printer {
    fn on_trace(&self, trace: &Arc<CompletedTrace>) {
        match self.tx.try_send(trace.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(t)) => {
                self.dropped.add(t.spans.len() as u64);
                self.log.warn("trace printer drops spans", "queue full");
            }
            Err(TrySendError::Disconnected(t)) => {
                self.dropped.add(t.spans.len() as u64);
                self.log
                    .warn("trace printer drops spans", "printer stopped");
            }
        }
    }
}

/// One line per span of the trace, in the trace's order.
pub fn format_trace(trace: &CompletedTrace, format: PrintFormat) -> Vec<String> {
    let remote = remote_durations(trace);
    trace
        .spans
        .iter()
        .map(|s| {
            let r = remote.get(&s.span_id).copied();
            match format {
                PrintFormat::Text => text_line(s, r),
                PrintFormat::Json => json_line(s, r, trace.late).to_string(),
            }
        })
        .collect()
}

/// For each span with a joined partner, the partner's duration.
fn remote_durations(trace: &CompletedTrace) -> HashMap<SpanId, u64> {
    let durations: HashMap<SpanId, u64> = trace
        .spans
        .iter()
        .map(|s| (s.span_id, duration(s)))
        .collect();
    let mut remote = HashMap::new();
    for s in &trace.spans {
        if s.link == LinkKind::Join
            && let Some(p) = s.parent
            && let Some(&client) = durations.get(&p)
        {
            remote.insert(s.span_id, client);
            remote.insert(p, duration(s));
        }
    }
    remote
}

fn duration(s: &SpanRecord) -> u64 {
    s.end_unix_nanos.saturating_sub(s.start_unix_nanos)
}

/// `2026-11-22 10:00:00.123456789` (UTC).
pub fn timestamp(unix_nanos: u64) -> String {
    let secs = (unix_nanos / 1_000_000_000) as i64;
    let nanos = (unix_nanos % 1_000_000_000) as u32;
    match DateTime::<Utc>::from_timestamp(secs, nanos) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.9f").to_string(),
        None => unix_nanos.to_string(),
    }
}

/// `5.04ms`: milliseconds with two decimals.
fn millis(nanos: u64) -> String {
    format!("{:.2}ms", nanos as f64 / 1e6)
}

fn service(id: &Identity) -> String {
    match &id.meta {
        Some(m) => format!("{}/{}", m.namespace, m.workload),
        None => format!("-/{}", id.addr.ip()),
    }
}

pub fn text_line(s: &SpanRecord, remote: Option<u64>) -> String {
    let kind = match s.side {
        Side::Client => "HTTPClient",
        _ => "HTTP",
    };
    let parent = s.parent.map_or("0".repeat(16), |p| p.to_hex());
    format!(
        "{} ({}[{}]) {} {} {} {} [{}]->[{}] size:{}B svc=[{}] traceparent=[00-{}-{}[{}]-01]",
        timestamp(s.start_unix_nanos),
        millis(duration(s)),
        remote.map_or("-".to_string(), millis),
        kind,
        s.status,
        s.method,
        s.path,
        s.client,
        s.server,
        s.request_bytes,
        service(owner(s)),
        s.trace_id.to_hex(),
        s.span_id.to_hex(),
        parent,
    )
}

fn peer_json(id: &Identity) -> Value {
    let m = id.meta.as_deref();
    json!({
        "ip": id.addr.ip().to_string(),
        "port": id.addr.port(),
        "kind": id.kind.as_str(),
        "name": id.name(),
        "workload": m.map(|m| m.workload.as_str()),
        "namespace": m.map(|m| m.namespace.as_str()),
        "pod": m.and_then(|m| m.pod.as_deref()),
    })
}

pub fn json_line(s: &SpanRecord, remote: Option<u64>, late: bool) -> Value {
    json!({
        "time": timestamp(s.start_unix_nanos),
        "start_unix_nanos": s.start_unix_nanos,
        "end_unix_nanos": s.end_unix_nanos,
        "duration_nanos": duration(s),
        "remote_duration_nanos": remote,
        "kind": if s.side == Side::Client { "CLIENT" } else { "SERVER" },
        "status": s.status,
        "method": s.method,
        "path": s.path,
        "name": s.name,
        "client": peer_json(&s.client),
        "server": peer_json(&s.server),
        "request_bytes": s.request_bytes,
        "response_bytes": s.response_bytes,
        "service": service(owner(s)),
        "trace_id": s.trace_id.to_hex(),
        "span_id": s.span_id.to_hex(),
        "parent_span_id": s.parent.map(|p| p.to_hex()).unwrap_or_default(),
        "link": s.link.as_str(),
        "joined": s.joined,
        "error": s.error,
        "node": &*s.node,
        "late": late,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::TraceId;
    use crate::resolve::{PeerKind, PeerMeta};

    fn id(kind: PeerKind, addr: &str, workload: &str) -> Identity {
        Identity {
            kind,
            addr: addr.parse().unwrap(),
            meta: Some(Arc::new(PeerMeta {
                namespace: "demo".into(),
                workload: workload.into(),
                workload_kind: "Deployment".into(),
                pod: Some(format!("{workload}-0")),
                node: Some("node-a".into()),
                ..Default::default()
            })),
        }
    }

    /// The DESIGN.md example as a joined client/server pair.
    pub fn example_trace() -> CompletedTrace {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let client_id = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        let server_id = SpanId::from_hex("1111111111111111").unwrap();
        let start = 1_795_341_600_123_456_789; // 2026-11-22 10:00:00.123456789 UTC
        let client = SpanRecord {
            trace_id,
            span_id: client_id,
            parent: None,
            link: LinkKind::Root,
            side: Side::Client,
            name: "GET /api/items".into(),
            start_unix_nanos: start,
            end_unix_nanos: start + 5_040_000,
            method: "GET".into(),
            path: "/api/items".into(),
            status: 200,
            error: false,
            client: id(PeerKind::Pod, "10.244.1.9:37450", "frontend"),
            server: id(PeerKind::Service, "10.96.0.20:80", "backend"),
            joined: true,
            node: Arc::from("node-a"),
            source: (Arc::from("i-a"), 1),
            request_bytes: 0,
            response_bytes: 12,
        };
        let server = SpanRecord {
            span_id: server_id,
            parent: Some(client_id),
            link: LinkKind::Join,
            side: Side::Server,
            start_unix_nanos: start + 120_000,
            end_unix_nanos: start + 120_000 + 4_800_000,
            server: id(PeerKind::Pod, "10.244.2.5:8080", "backend"),
            node: Arc::from("node-b"),
            source: (Arc::from("i-b"), 7),
            ..client.clone()
        };
        CompletedTrace {
            trace_id,
            spans: vec![client, server],
            late: false,
        }
    }

    #[test]
    fn text_lines_follow_the_design_format() {
        let lines = format_trace(&example_trace(), PrintFormat::Text);
        assert_eq!(
            lines[0],
            "2026-11-22 10:00:00.123456789 (5.04ms[4.80ms]) HTTPClient 200 GET /api/items \
             [10.244.1.9 as frontend.demo:37450]->[10.96.0.20 as backend.demo:80] size:0B \
             svc=[demo/frontend] traceparent=[00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7[0000000000000000]-01]"
        );
        assert_eq!(
            lines[1],
            "2026-11-22 10:00:00.123576789 (4.80ms[5.04ms]) HTTP 200 GET /api/items \
             [10.244.1.9 as frontend.demo:37450]->[10.244.2.5 as backend.demo:8080] size:0B \
             svc=[demo/backend] traceparent=[00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111[00f067aa0ba902b7]-01]"
        );
    }

    #[test]
    fn json_lines_carry_the_documented_keys() {
        let lines = format_trace(&example_trace(), PrintFormat::Json);
        let v: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(v["kind"], "SERVER");
        assert_eq!(v["parent_span_id"], "00f067aa0ba902b7");
        assert_eq!(v["link"], "join");
        assert_eq!(v["service"], "demo/backend");
        assert_eq!(v["server"]["workload"], "backend");
        assert_eq!(v["remote_duration_nanos"], 5_040_000);
        assert_eq!(v["duration_nanos"], 4_800_000);
        let root: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(root["parent_span_id"], "");
        assert_eq!(root["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn the_printer_writes_every_span_from_its_thread() {
        #[derive(Clone, Default)]
        struct Shared(Arc<parking_lot::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Shared::default();
        let reg = Registry::new();
        let p = Printer::spawn(PrintFormat::Text, Box::new(buf.clone()), &reg);
        p.on_trace(&Arc::new(example_trace()));
        for _ in 0..200 {
            if reg.snapshot().get("export.print.spans") == Some(&2) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let text = String::from_utf8(buf.0.lock().clone()).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().all(|l| l.contains("traceparent=[00-4bf92f")));
    }
}
