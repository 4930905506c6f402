//! Stored traces: merged spans, a precomputed summary, and the table that bounds them.
//!
//! In: a [`CompletedTrace`] (possibly `late`, to merge into a stored one).
//! Out: [`StoredTrace`]s, ordered by start time, found by id or by [`TraceFilter`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use weft_proto::v1::Side;

use crate::model::{CompletedTrace, SpanId, SpanRecord, TraceId};
use crate::resolve::{Identity, PeerMeta};

/// What ListTraces shows of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSummary {
    pub root_name: String,
    /// Name (`workload.namespace` or IP) of the service that emitted the root span: the
    /// caller for a CLIENT root, the callee for a SERVER root.
    pub root_service: String,
    pub start_unix_nanos: u64,
    pub duration_nanos: u64,
    pub span_count: u32,
    /// Names of the services that emitted the trace's spans (as `root_service`), sorted.
    pub services: Vec<String>,
    pub error: bool,
}

/// A trace as kept by the store: immutable once built; a late merge builds a new one.
#[derive(Debug)]
pub struct StoredTrace {
    pub trace_id: TraceId,
    /// Sorted by start time.
    pub spans: Vec<SpanRecord>,
    pub summary: TraceSummary,
    /// Distinct names known for the spans' clients and servers (for filtering).
    peers: Vec<Arc<PeerMeta>>,
    /// Approximate memory held by this trace.
    pub bytes: usize,
}

/// A trace built from a stored one (if any) and an incoming one.
pub struct Merged {
    pub trace: StoredTrace,
    /// Spans not seen before (they feed the service map).
    pub new_spans: HashSet<SpanId>,
}

impl StoredTrace {
    /// Merges `incoming` into `existing`: spans are unique by span id and an incoming
    /// span replaces a stored one with the same id. `None` when there are no spans.
    pub fn merge(existing: Option<&StoredTrace>, incoming: &CompletedTrace) -> Option<Merged> {
        let mut spans: Vec<SpanRecord> = existing.map(|e| e.spans.clone()).unwrap_or_default();
        let mut index: HashMap<SpanId, usize> = spans
            .iter()
            .enumerate()
            .map(|(i, s)| (s.span_id, i))
            .collect();
        let mut new_spans = HashSet::new();
        for span in &incoming.spans {
            match index.get(&span.span_id) {
                Some(&i) => spans[i] = span.clone(),
                None => {
                    index.insert(span.span_id, spans.len());
                    new_spans.insert(span.span_id);
                    spans.push(span.clone());
                }
            }
        }
        if spans.is_empty() {
            return None;
        }
        spans.sort_by_key(|s| (s.start_unix_nanos, s.end_unix_nanos));
        let summary = summarize(&spans);
        let peers = peers(&spans);
        let bytes = approx_bytes(&spans, &summary, &peers);
        Some(Merged {
            trace: StoredTrace {
                trace_id: incoming.trace_id,
                spans,
                summary,
                peers,
                bytes,
            },
            new_spans,
        })
    }

    /// Whether any client or server of any span is the given workload and namespace
    /// (each `None` matches anything). `service` matches the workload name or
    /// `workload.namespace`.
    fn has_peer(&self, service: Option<&str>, namespace: Option<&str>) -> bool {
        self.peers.iter().any(|m| {
            let service_ok = service.is_none_or(|s| {
                m.workload == s
                    || s.strip_prefix(m.workload.as_str())
                        .and_then(|rest| rest.strip_prefix('.'))
                        .is_some_and(|ns| ns == m.namespace)
            });
            service_ok && namespace.is_none_or(|n| m.namespace == n)
        })
    }
}

/// The service that emitted a span: the caller for CLIENT, the callee for SERVER.
fn emitter(span: &SpanRecord) -> &Identity {
    match span.side {
        Side::Client => &span.client,
        _ => &span.server,
    }
}

/// Summary of spans sorted by start (not empty).
fn summarize(spans: &[SpanRecord]) -> TraceSummary {
    let ids: HashSet<SpanId> = spans.iter().map(|s| s.span_id).collect();
    let start = spans.iter().map(|s| s.start_unix_nanos).min().unwrap_or(0);
    let end = spans
        .iter()
        .map(|s| s.end_unix_nanos)
        .max()
        .unwrap_or(start);
    // The earliest span without a parent in the trace (there is one unless the trace
    // only holds late spans whose parents were evicted; then the earliest span).
    let root = spans
        .iter()
        .find(|s| s.parent.is_none_or(|p| !ids.contains(&p)))
        .or(spans.first());
    let services: BTreeSet<String> = spans.iter().map(|s| emitter(s).name()).collect();
    TraceSummary {
        root_name: root.map(|r| r.name.clone()).unwrap_or_default(),
        root_service: root.map(|r| emitter(r).name()).unwrap_or_default(),
        start_unix_nanos: start,
        duration_nanos: end.saturating_sub(start),
        span_count: u32::try_from(spans.len()).unwrap_or(u32::MAX),
        services: services.into_iter().collect(),
        error: spans.iter().any(|s| s.error),
    }
}

fn peers(spans: &[SpanRecord]) -> Vec<Arc<PeerMeta>> {
    let mut out: Vec<Arc<PeerMeta>> = Vec::new();
    for meta in spans
        .iter()
        .flat_map(|s| [&s.client.meta, &s.server.meta])
        .flatten()
    {
        if !out.iter().any(|m| Arc::ptr_eq(m, meta) || m == meta) {
            out.push(meta.clone());
        }
    }
    out
}

/// Memory of a trace, approximately: the span records and their strings, the summary,
/// and the table entries. Resolved names (`PeerMeta`) are shared with the resolver and
/// counted as pointers.
fn approx_bytes(spans: &[SpanRecord], summary: &TraceSummary, peers: &[Arc<PeerMeta>]) -> usize {
    const TABLE_ENTRY: usize = 96;
    let spans_bytes: usize = spans
        .iter()
        .map(|s| size_of::<SpanRecord>() + s.name.len() + s.method.len() + s.path.len())
        .sum();
    let summary_bytes = summary.root_name.len()
        + summary.root_service.len()
        + summary
            .services
            .iter()
            .map(|s| s.len() + size_of::<String>())
            .sum::<usize>();
    size_of::<StoredTrace>()
        + TABLE_ENTRY
        + spans_bytes
        + summary_bytes
        + std::mem::size_of_val(peers)
}

/// ListTraces filters; an empty field matches everything.
#[derive(Debug, Clone, Default)]
pub struct TraceFilter {
    /// Workload (or `workload.namespace`) of any span's client or server.
    pub service: Option<String>,
    /// Namespace of any span's client or server; with `service`, of the same peer.
    pub namespace: Option<String>,
    pub min_duration_nanos: u64,
    pub error_only: bool,
    /// Inclusive bounds on the trace start; 0 means open.
    pub start_after_unix_nanos: u64,
    pub start_before_unix_nanos: u64,
}

impl TraceFilter {
    pub fn matches(&self, t: &StoredTrace) -> bool {
        let s = &t.summary;
        s.duration_nanos >= self.min_duration_nanos
            && (!self.error_only || s.error)
            && s.start_unix_nanos >= self.start_after_unix_nanos
            && (self.start_before_unix_nanos == 0
                || s.start_unix_nanos <= self.start_before_unix_nanos)
            && (self.service.is_none() && self.namespace.is_none()
                || t.has_peer(self.service.as_deref(), self.namespace.as_deref()))
    }
}

/// Position of a trace in the table: its start time, then arrival order.
pub type OrderKey = (u64, u64);

/// Traces by start time and by id, with their total size.
#[derive(Debug, Default)]
pub struct TraceTable {
    pub by_start: BTreeMap<OrderKey, Arc<StoredTrace>>,
    by_id: HashMap<TraceId, OrderKey>,
    pub bytes: usize,
    pub spans: usize,
    next_seq: u64,
}

impl TraceTable {
    pub fn get(&self, id: &TraceId) -> Option<(OrderKey, &Arc<StoredTrace>)> {
        let key = *self.by_id.get(id)?;
        self.by_start.get(&key).map(|t| (key, t))
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Puts `trace` in, replacing the stored trace with the same id. Returns the one
    /// replaced (to be dropped outside the lock).
    pub fn put(&mut self, trace: Arc<StoredTrace>) -> Option<Arc<StoredTrace>> {
        let old = self.by_id.get(&trace.trace_id).copied();
        let seq = match old {
            Some((_, seq)) => seq,
            None => {
                self.next_seq += 1;
                self.next_seq
            }
        };
        let replaced = old.and_then(|key| self.by_start.remove(&key));
        if let Some(r) = &replaced {
            self.bytes -= r.bytes;
            self.spans -= r.spans.len();
        }
        let key = (trace.summary.start_unix_nanos, seq);
        self.bytes += trace.bytes;
        self.spans += trace.spans.len();
        self.by_id.insert(trace.trace_id, key);
        self.by_start.insert(key, trace);
        replaced
    }

    /// Removes the trace with the oldest start.
    pub fn pop_oldest(&mut self) -> Option<Arc<StoredTrace>> {
        let (_, t) = self.by_start.pop_first()?;
        self.by_id.remove(&t.trace_id);
        self.bytes -= t.bytes;
        self.spans -= t.spans.len();
        Some(t)
    }
}
