//! The end of a run: what was traced, what the receiver got, who calls whom.
//!
//! In: the trace lines seen, the receiver's spans, the Query answers, the traffic tally and
//! the clean-up check. Out: a short text summary on stdout and, with `--json-out`, the same
//! as one JSON object.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;

use serde_json::{Value, json};
use weft_proto::v1::ServiceMapResponse;

use crate::live::{Seen, SpanLine};
use crate::receiver::ReceivedSpan;
use crate::traffic::Tally;

/// Spans in one request's trace: client → frontend → backend → store, each call a CLIENT
/// and a SERVER span.
pub const SPANS_PER_TRACE: usize = 6;

/// Everything the summary reports.
#[derive(Debug, Default)]
pub struct Report {
    pub prefix: String,
    pub control_netns: String,
    pub netns: Vec<String>,
    pub pids: Vec<(String, i32)>,
    pub stitcher: String,
    pub grpcurl: Vec<String>,
    pub traffic: Tally,
    pub seen: Seen,
    /// `None` when no receiver ran.
    pub received: Option<Vec<ReceivedSpan>>,
    pub service_map: Option<ServiceMapResponse>,
    pub stored_traces: Option<usize>,
    pub problems: Vec<String>,
    pub leftovers: Vec<String>,
}

/// A trace of exactly [`SPANS_PER_TRACE`] spans, one root, every other span's parent in it.
pub fn is_whole(spans: &[SpanLine]) -> bool {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    spans.len() == SPANS_PER_TRACE
        && ids.len() == SPANS_PER_TRACE
        && spans.iter().filter(|s| s.is_root()).count() == 1
        && spans
            .iter()
            .all(|s| s.is_root() || ids.contains(s.parent_id.as_str()))
}

impl Report {
    fn whole_traces(&self) -> Vec<&String> {
        self.seen
            .traces
            .iter()
            .filter(|(_, spans)| is_whole(spans))
            .map(|(id, _)| id)
            .collect()
    }

    /// Received spans by trace id.
    fn received_by_trace(&self) -> HashMap<&str, Vec<&ReceivedSpan>> {
        let mut by: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
        for s in self.received.iter().flatten() {
            by.entry(s.trace_id.as_str()).or_default().push(s);
        }
        by
    }

    /// Printed whole traces whose spans (ids and parents) the receiver got, all of them.
    fn whole_traces_received(&self) -> usize {
        let by = self.received_by_trace();
        self.whole_traces()
            .into_iter()
            .filter(|id| {
                let Some(got) = by.get(id.as_str()) else {
                    return false;
                };
                let got: BTreeSet<(&str, &str)> = got
                    .iter()
                    .map(|s| (s.span_id.as_str(), s.parent_id.as_str()))
                    .collect();
                self.seen.traces[*id].iter().all(|s| {
                    let parent = if s.is_root() {
                        ""
                    } else {
                        s.parent_id.as_str()
                    };
                    got.contains(&(s.span_id.as_str(), parent))
                })
            })
            .count()
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n── weft-demo summary ({}) ──", self.prefix);
        let t = &self.traffic;
        let _ = writeln!(
            out,
            "traffic:   {} requests from client-0: {} ok, {} answered 5xx, {} failed",
            t.requests,
            t.ok,
            t.http_5xx,
            // Transport errors, timeouts and rounds that could not run.
            t.requests.saturating_sub(t.ok + t.http_5xx)
        );
        let whole = self.whole_traces().len();
        let _ = writeln!(
            out,
            "printed:   {} traces, {} spans; {} whole {}-span traces",
            self.seen.traces.len(),
            self.seen.spans,
            whole,
            SPANS_PER_TRACE
        );
        match &self.received {
            Some(spans) => {
                let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
                let _ = writeln!(
                    out,
                    "OTLP:      rotel received {} spans in {} traces; {} of the {} whole traces arrived whole",
                    spans.len(),
                    traces.len(),
                    self.whole_traces_received(),
                    whole
                );
            }
            None => {
                let _ = writeln!(out, "OTLP:      no receiver (rotel not installed)");
            }
        }
        if let Some(n) = self.stored_traces {
            let _ = writeln!(out, "stitcher:  {n} traces in its store at the end");
        }
        match &self.service_map {
            Some(map) => {
                let _ = writeln!(out, "service map (last 5 minutes):");
                for e in edges(map) {
                    let _ = writeln!(
                        out,
                        "  {:<16} → {:<16} {:>5} requests {:>4} errors   p50 {:>8}  p99 {:>8}",
                        e.client,
                        e.server,
                        e.requests,
                        e.errors,
                        ms(e.p50_nanos),
                        ms(e.p99_nanos)
                    );
                }
            }
            None => {
                let _ = writeln!(out, "service map: unavailable (see the warning above)");
            }
        }
        for p in &self.problems {
            let _ = writeln!(out, "problem:   {p}");
        }
        if self.leftovers.is_empty() {
            let _ = writeln!(
                out,
                "clean-up:  done (namespaces, veths, qdiscs, processes removed)"
            );
        } else {
            for l in &self.leftovers {
                let _ = writeln!(out, "left over: {l}");
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        let received = self.received.as_ref().map(|spans| {
            let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
            json!({
                "spans": spans.len(),
                "traces": traces.len(),
                "whole_traces_received": self.whole_traces_received(),
            })
        });
        let map = self.service_map.as_ref().map(|m| {
            edges(m)
                .into_iter()
                .map(|e| {
                    json!({
                        "client": e.client, "server": e.server, "requests": e.requests,
                        "errors": e.errors, "p50_nanos": e.p50_nanos, "p99_nanos": e.p99_nanos,
                    })
                })
                .collect::<Vec<_>>()
        });
        let t = &self.traffic;
        json!({
            "prefix": self.prefix,
            "control_netns": self.control_netns,
            "netns": self.netns,
            "pids": self.pids.iter().map(|(n, p)| json!({"name": n, "pid": p})).collect::<Vec<_>>(),
            "stitcher": self.stitcher,
            "grpcurl": self.grpcurl,
            "traffic": {
                "rounds": t.rounds, "requests": t.requests, "ok": t.ok,
                "http_5xx": t.http_5xx, "transport_errors": t.transport_errors,
                "failed_rounds": t.failed_rounds,
            },
            "printed": {
                "traces": self.seen.traces.len(),
                "spans": self.seen.spans,
                "whole_traces": self.whole_traces().len(),
            },
            "otlp": received,
            "service_map": map,
            "stored_traces": self.stored_traces,
            "problems": self.problems,
            "leftovers": self.leftovers,
        })
    }
}

/// A service map edge with names instead of node ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub client: String,
    pub server: String,
    pub requests: u64,
    pub errors: u64,
    pub p50_nanos: u64,
    pub p99_nanos: u64,
}

/// The map's edges, named (`frontend.demo`), busiest first.
pub fn edges(map: &ServiceMapResponse) -> Vec<Edge> {
    let names: BTreeMap<&str, String> = map
        .nodes
        .iter()
        .map(|n| {
            let name = if n.namespace.is_empty() {
                n.name.clone()
            } else {
                format!("{}.{}", n.name, n.namespace)
            };
            (n.id.as_str(), name)
        })
        .collect();
    let name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let mut edges: Vec<Edge> = map
        .edges
        .iter()
        .map(|e| Edge {
            client: name(&e.client),
            server: name(&e.server),
            requests: e.requests,
            errors: e.errors,
            p50_nanos: e.latency_p50_nanos,
            p99_nanos: e.latency_p99_nanos,
        })
        .collect();
    edges.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then_with(|| a.client.cmp(&b.client))
    });
    edges
}

fn ms(nanos: u64) -> String {
    format!("{:.2}ms", nanos as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str) -> SpanLine {
        SpanLine {
            start: String::new(),
            client: true,
            status: 200,
            method: "GET".into(),
            path: "/".into(),
            from: String::new(),
            to: String::new(),
            service: String::new(),
            trace_id: "t".into(),
            span_id: id.into(),
            parent_id: parent.into(),
        }
    }

    #[test]
    fn whole_means_six_connected_spans_and_one_root() {
        let root = "0000000000000000";
        let chain: Vec<SpanLine> = (0..6)
            .map(|i| {
                let parent = if i == 0 {
                    root.to_string()
                } else {
                    format!("{i:016x}")
                };
                span(&format!("{:016x}", i + 1), &parent)
            })
            .collect();
        assert!(is_whole(&chain));
        assert!(!is_whole(&chain[..5]));
        let mut orphan = chain.clone();
        orphan[3].parent_id = "ffffffffffffffff".into();
        assert!(!is_whole(&orphan));
        let mut two_roots = chain.clone();
        two_roots[5].parent_id = root.into();
        assert!(!is_whole(&two_roots));
    }
}
