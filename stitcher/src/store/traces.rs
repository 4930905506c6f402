//! Stored traces: merged spans, a precomputed summary, and the table that bounds them.
//!
//! In: a [`CompletedTrace`] (possibly `late`, to merge into a stored one), shared with
//! the other sinks (`Arc`).
//! Out: [`StoredTrace`]s, ordered by start time, found by id or by [`TraceFilter`].
//!
//! Why shared parts: a stored trace keeps the `Arc<CompletedTrace>`s it was built from
//! and an order over their spans instead of copies of the spans (three strings each), so
//! storing a trace allocates two small vectors, whatever its size. A late merge adds a
//! part; spans it replaces stay held (and counted) until the trace is evicted.

use std::collections::BTreeMap;
use std::sync::Arc;

use weft_proto::v1::Side;

use super::names::NameCache;
use crate::model::{CompletedTrace, FastMap, FastSet, SpanId, SpanRecord, TraceId};
use crate::resolve::{Identity, PeerMeta};

/// What ListTraces shows of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSummary {
    pub root_name: String,
    /// Name (`workload.namespace` or IP) of the service that emitted the root span: the
    /// caller for a CLIENT root, the callee for a SERVER root.
    pub root_service: Arc<str>,
    pub start_unix_nanos: u64,
    pub duration_nanos: u64,
    pub span_count: u32,
    /// Names of the services that emitted the trace's spans (as `root_service`), sorted.
    pub services: Vec<Arc<str>>,
    pub error: bool,
}

/// Where a span of a stored trace is: its part and its index in that part's spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    part: u32,
    index: u32,
}

/// A trace as kept by the store: immutable once built; a late merge builds a new one.
#[derive(Debug)]
pub struct StoredTrace {
    pub trace_id: TraceId,
    /// The completed traces (the first, then late ones) whose spans make this trace.
    parts: Vec<Arc<CompletedTrace>>,
    /// The trace's spans, unique by span id, sorted by start time.
    order: Vec<Slot>,
    pub summary: TraceSummary,
    /// Distinct names known for the spans' clients and servers (for filtering).
    peers: Vec<Arc<PeerMeta>>,
    /// Approximate memory held by this trace.
    pub bytes: usize,
}

/// A trace built from a stored one (if any) and an incoming one.
pub struct Merged {
    pub trace: StoredTrace,
    /// Per span of `trace` (in its order): not seen before (it feeds the service map).
    pub new: Vec<bool>,
}

impl StoredTrace {
    /// The spans, sorted by start time.
    pub fn spans(&self) -> impl ExactSizeIterator<Item = &SpanRecord> + Clone {
        self.order.iter().map(|&s| self.span(s))
    }

    /// Number of spans (after merges: distinct span ids).
    pub fn span_count(&self) -> usize {
        self.order.len()
    }

    fn span(&self, slot: Slot) -> &SpanRecord {
        &self.parts[slot.part as usize].spans[slot.index as usize]
    }

    /// Merges `incoming` into `existing`: spans are unique by span id and an incoming
    /// span replaces a stored one with the same id (a later one in `incoming` replaces
    /// an earlier one). `None` when there are no spans.
    pub fn merge(
        existing: Option<&StoredTrace>,
        incoming: &Arc<CompletedTrace>,
        names: &mut NameCache,
    ) -> Option<Merged> {
        let mut parts = existing.map(|e| e.parts.clone()).unwrap_or_default();
        parts.push(incoming.clone());
        let newest = u32::try_from(parts.len() - 1).ok()?;
        let span_of = |s: &Slot| &parts[s.part as usize].spans[s.index as usize];
        // Stored spans first, then incoming ones in their order; the stable sort keeps
        // that order among equal ids, so the last of a run is the one that stays.
        let mut slots: Vec<Slot> = existing.map(|e| e.order.clone()).unwrap_or_default();
        slots.extend((0..incoming.spans.len()).map(|i| Slot {
            part: newest,
            index: u32::try_from(i).unwrap_or(u32::MAX),
        }));
        if slots.is_empty() {
            return None;
        }
        slots.sort_by_key(|s| span_of(s).span_id);
        let mut kept: Vec<(Slot, bool)> = Vec::with_capacity(slots.len());
        for run in slots.chunk_by(|a, b| span_of(a).span_id == span_of(b).span_id) {
            let (first, last) = (run[0], run[run.len() - 1]);
            // New unless the run starts with a stored span.
            kept.push((last, first.part == newest));
        }
        kept.sort_by_key(|(s, _)| {
            let span = span_of(s);
            (span.start_unix_nanos, span.end_unix_nanos)
        });
        let mut order = Vec::with_capacity(kept.len());
        let mut new = Vec::with_capacity(kept.len());
        for (slot, is_new) in kept {
            order.push(slot);
            new.push(is_new);
        }
        let mut trace = StoredTrace {
            trace_id: incoming.trace_id,
            parts,
            order,
            summary: TraceSummary {
                root_name: String::new(),
                root_service: Arc::from(""),
                start_unix_nanos: 0,
                duration_nanos: 0,
                span_count: 0,
                services: Vec::new(),
                error: false,
            },
            peers: Vec::new(),
            bytes: 0,
        };
        trace.summary = summarize(&trace, names);
        trace.peers = peers(&trace);
        trace.bytes = approx_bytes(&trace);
        Some(Merged { trace, new })
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

/// Summary of a trace whose spans are sorted by start (not empty).
fn summarize(trace: &StoredTrace, names: &mut NameCache) -> TraceSummary {
    let start = trace.spans().map(|s| s.start_unix_nanos).min().unwrap_or(0);
    let end = trace
        .spans()
        .map(|s| s.end_unix_nanos)
        .max()
        .unwrap_or(start);
    // The earliest span without a parent in the trace (there is one unless the trace
    // only holds late spans whose parents were evicted; then the earliest span). The
    // earliest span is usually the root: the id set is built only when it is not.
    let root = match trace.spans().next() {
        Some(first) if first.parent.is_none() => Some(first),
        _ => {
            let ids: FastSet<SpanId> = trace.spans().map(|s| s.span_id).collect();
            trace
                .spans()
                .find(|s| s.parent.is_none_or(|p| !ids.contains(&p)))
                .or(trace.spans().next())
        }
    };
    let mut services: Vec<Arc<str>> = Vec::new();
    let mut last: Option<&Identity> = None;
    for span in trace.spans() {
        let who = emitter(span);
        // Neighbouring spans often share their emitter: skip the lookup.
        if last.is_some_and(|l| same_name(l, who)) {
            continue;
        }
        last = Some(who);
        let name = names.name(who);
        if !services.contains(&name) {
            services.push(name);
        }
    }
    services.sort_unstable();
    TraceSummary {
        root_name: root.map(|r| r.name.clone()).unwrap_or_default(),
        root_service: root.map_or_else(|| Arc::from(""), |r| names.name(emitter(r))),
        start_unix_nanos: start,
        duration_nanos: end.saturating_sub(start),
        span_count: u32::try_from(trace.span_count()).unwrap_or(u32::MAX),
        services,
        error: trace.spans().any(|s| s.error),
    }
}

/// Whether two identities certainly have the same name (same meta, or both unnamed at
/// the same IP).
fn same_name(a: &Identity, b: &Identity) -> bool {
    match (&a.meta, &b.meta) {
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        (None, None) => a.addr.ip() == b.addr.ip(),
        _ => false,
    }
}

fn peers(trace: &StoredTrace) -> Vec<Arc<PeerMeta>> {
    let mut out: Vec<Arc<PeerMeta>> = Vec::new();
    for meta in trace
        .spans()
        .flat_map(|s| [&s.client.meta, &s.server.meta])
        .flatten()
    {
        if out.iter().any(|m| Arc::ptr_eq(m, meta)) || out.iter().any(|m| m == meta) {
            continue;
        }
        out.push(meta.clone());
    }
    out
}

/// Memory of a trace, approximately: the span records and their strings of every part
/// it holds (replaced spans included), the order, the summary, and the table entries.
/// Resolved names (`PeerMeta`) are shared with the resolver and counted as pointers;
/// service names are shared between traces and counted as pointers too.
fn approx_bytes(trace: &StoredTrace) -> usize {
    const TABLE_ENTRY: usize = 96;
    let spans_bytes: usize = trace
        .parts
        .iter()
        .flat_map(|p| &p.spans)
        .map(|s| size_of::<SpanRecord>() + s.name.len() + s.method.len() + s.path.len())
        .sum();
    let parts_bytes =
        trace.parts.len() * (size_of::<Arc<CompletedTrace>>() + 16 + size_of::<CompletedTrace>());
    let summary = &trace.summary;
    let summary_bytes = summary.root_name.len() + summary.services.len() * size_of::<Arc<str>>();
    size_of::<StoredTrace>()
        + TABLE_ENTRY
        + parts_bytes
        + spans_bytes
        + trace.order.len() * size_of::<Slot>()
        + summary_bytes
        + std::mem::size_of_val(trace.peers.as_slice())
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
    by_id: FastMap<TraceId, OrderKey>,
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
            self.spans -= r.span_count();
        }
        let key = (trace.summary.start_unix_nanos, seq);
        self.bytes += trace.bytes;
        self.spans += trace.span_count();
        self.by_id.insert(trace.trace_id, key);
        self.by_start.insert(key, trace);
        replaced
    }

    /// Removes the trace with the oldest start.
    pub fn pop_oldest(&mut self) -> Option<Arc<StoredTrace>> {
        let (_, t) = self.by_start.pop_first()?;
        self.by_id.remove(&t.trace_id);
        self.bytes -= t.bytes;
        self.spans -= t.span_count();
        Some(t)
    }
}
