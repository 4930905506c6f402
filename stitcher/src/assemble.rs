//! assemble: linked calls → traces.
//!
//! In: [`LinkedCall`]s (a call's halves, and the parent of its CLIENT span).
//! Out: [`CompletedTrace`]s, each exported once, after `idle_nanos` without new spans.
//!
//! A trace is a connected set of spans. Each call contributes up to two spans: the CLIENT
//! span (parent: the server span it was linked to) and the SERVER span (parent: its CLIENT
//! span when both halves were joined). Calls become connected when one names a span of
//! another as parent, in whichever order they arrive: every span id, and every parent id
//! not yet seen, points to the pending group that holds or awaits it; groups merge (small
//! into large) when a call connects them.
//!
//! IDs: a trace id propagated by the application (`traceparent`) is honoured (the
//! earliest span's, if a group saw several); otherwise a random W3C trace id. Span ids
//! are the halves' own (the application's for a CLIENT span that carried `traceparent`,
//! random otherwise); a span id seen twice is replaced by a random one and counted
//! (`assemble.duplicate_span_id`). A parent is always a span of the same trace and never
//! the span itself: a parent that never arrived is removed (the span becomes a root) and
//! counted in `assemble.parent_missing`, so no exported trace has a dangling parent.
//!
//! Late spans: the ids of an exported trace are remembered for `late_grace_nanos`. A call
//! that connects to one of them joins that trace id and is exported, after its own idle
//! window, as a `late` CompletedTrace with the same trace id, instead of a duplicate trace.
//!
//! Bounds: `max_pending_spans` (the oldest groups are completed early, counted in
//! `assemble.evicted`) and `max_remembered_spans` (the oldest exported ids are forgotten
//! early, counted in `assemble.late_index_evicted`).

use std::collections::VecDeque;

use weft_proto::v1::Side;

use crate::link::LinkedCall;
use crate::metrics::{Counter, Registry};
use crate::model::{
    CompletedTrace, FastMap, FastSet, Half, LinkKind, SpanId, SpanRecord, TraceId, span_name,
};

#[derive(Debug, Clone, Copy)]
pub struct AssembleConfig {
    /// A trace is complete after this long without new spans (`--trace-idle`).
    pub idle_nanos: u64,
    /// How long an exported trace still accepts late spans under its id.
    pub late_grace_nanos: u64,
    pub max_pending_spans: usize,
    pub max_remembered_spans: usize,
}

impl Default for AssembleConfig {
    fn default() -> Self {
        AssembleConfig {
            idle_nanos: 2_000_000_000,
            late_grace_nanos: 10_000_000_000,
            max_pending_spans: 1 << 21,
            max_remembered_spans: 1 << 21,
        }
    }
}

type GroupId = u64;

/// A trace being assembled.
struct Group {
    calls: Vec<LinkedCall>,
    /// Every id that points to this group (its spans and the parents it waits for).
    ids: Vec<SpanId>,
    spans: usize,
    last_update: u64,
    /// Set when the group connects to an already exported trace.
    late_of: Option<TraceId>,
}

struct Counters {
    traces: Counter,
    late_traces: Counter,
    spans: Counter,
    evicted: Counter,
    parent_missing: Counter,
    duplicate_span_id: Counter,
    late_index_evicted: Counter,
    pending_spans: Counter,
}

/// The assemble stage.
pub struct Assembler {
    cfg: AssembleConfig,
    groups: FastMap<GroupId, Group>,
    next_group: GroupId,
    by_span: FastMap<SpanId, GroupId>,
    /// (deadline, group): one entry per update; stale entries are skipped.
    idle: VecDeque<(u64, GroupId)>,
    /// Spans of exported traces, for late arrivals: span → (trace, forget at).
    exported: FastMap<SpanId, TraceId>,
    exported_order: VecDeque<(u64, SpanId)>,
    pending_spans: usize,
    counters: Counters,
}

impl Assembler {
    pub fn new(cfg: AssembleConfig, metrics: &Registry) -> Self {
        let c = |name: &str, help| metrics.counter(name, help);
        Assembler {
            cfg,
            groups: FastMap::default(),
            next_group: 0,
            by_span: FastMap::default(),
            idle: VecDeque::new(),
            exported: FastMap::default(),
            exported_order: VecDeque::new(),
            pending_spans: 0,
            counters: Counters {
                traces: c("assemble.traces", "traces completed"),
                late_traces: c(
                    "assemble.late_traces",
                    "late spans exported under an already exported trace id",
                ),
                spans: c("assemble.spans", "spans in completed traces"),
                evicted: c(
                    "assemble.evicted",
                    "traces completed before their idle window because the pending bound was reached",
                ),
                parent_missing: c(
                    "assemble.parent_missing",
                    "spans exported as roots because their parent never arrived",
                ),
                duplicate_span_id: c(
                    "assemble.duplicate_span_id",
                    "span ids seen twice, replaced by random ids",
                ),
                late_index_evicted: c(
                    "assemble.late_index_evicted",
                    "exported span ids forgotten before the late grace because of the bound",
                ),
                pending_spans: c(
                    "assemble.pending_spans",
                    "spans waiting in open traces (gauge)",
                ),
            },
        }
    }

    /// Spans in traces not yet complete.
    pub fn pending_spans(&self) -> usize {
        self.pending_spans
    }

    /// Exported span ids remembered for late arrivals.
    pub fn remembered_spans(&self) -> usize {
        self.exported.len()
    }

    pub fn push(&mut self, mut lc: LinkedCall, now: u64, out: &mut Vec<CompletedTrace>) {
        self.forget_exported(now);
        self.dedup_client_id(&mut lc);
        let server_id = lc.call.server.as_ref().map(|h| h.span_id);
        let client_id = lc.call.client.as_ref().map(|h| h.span_id);
        let parent_id = lc.parent.map(|l| l.parent);
        let ids: Vec<SpanId> = [client_id, server_id, parent_id]
            .into_iter()
            .flatten()
            .collect();

        let mut late_of = None;
        let mut found: Vec<GroupId> = Vec::new();
        for id in &ids {
            if let Some(g) = self.by_span.get(id) {
                if !found.contains(g) {
                    found.push(*g);
                }
            } else if let Some(t) = self.exported.get(id) {
                late_of.get_or_insert(*t);
            }
        }
        let gid = self.merge(found, now);
        let spans = lc.call.halves();
        let group = self.groups.get_mut(&gid).expect("merged group exists");
        if group.late_of.is_none() {
            group.late_of = late_of;
        }
        for id in ids {
            if self.by_span.insert(id, gid).is_none() {
                group.ids.push(id);
            }
        }
        group.calls.push(lc);
        group.spans += spans;
        group.last_update = now;
        self.pending_spans += spans;
        self.idle
            .push_back((now.saturating_add(self.cfg.idle_nanos), gid));

        while self.pending_spans > self.cfg.max_pending_spans {
            let Some((_, oldest)) = self.idle.pop_front() else {
                break;
            };
            if self.groups.contains_key(&oldest) && oldest != gid {
                self.counters.evicted.inc();
                out.push(self.complete(oldest, now));
            }
        }
        self.counters.pending_spans.set(self.pending_spans as u64);
    }

    /// Completes every trace idle for `idle_nanos`; forgets expired exported ids.
    pub fn tick(&mut self, now: u64, out: &mut Vec<CompletedTrace>) {
        while let Some(&(deadline, gid)) = self.idle.front() {
            if deadline > now {
                break;
            }
            self.idle.pop_front();
            let idle = self
                .groups
                .get(&gid)
                .is_some_and(|g| g.last_update.saturating_add(self.cfg.idle_nanos) <= now);
            if idle {
                out.push(self.complete(gid, now));
            }
        }
        self.forget_exported(now);
        self.counters.pending_spans.set(self.pending_spans as u64);
    }

    fn forget_exported(&mut self, now: u64) {
        while self.exported_order.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, id)) = self.exported_order.pop_front() {
                self.exported.remove(&id);
            }
        }
    }

    /// Completes everything still open (shutdown).
    pub fn flush(&mut self, now: u64, out: &mut Vec<CompletedTrace>) {
        while let Some((_, gid)) = self.idle.pop_front() {
            if self.groups.contains_key(&gid) {
                out.push(self.complete(gid, now));
            }
        }
        self.counters.pending_spans.set(self.pending_spans as u64);
    }

    /// A CLIENT span id already in use (an application reusing a span id, or a retry
    /// with the same header) gets a fresh random id.
    fn dedup_client_id(&mut self, lc: &mut LinkedCall) {
        if let Some(c) = lc.call.client.as_mut()
            && (self.by_span.contains_key(&c.span_id) || self.exported.contains_key(&c.span_id))
        {
            self.counters.duplicate_span_id.inc();
            c.span_id = SpanId::random();
        }
    }

    /// Merges the groups into the largest one (or makes a new group); returns its id.
    fn merge(&mut self, mut found: Vec<GroupId>, now: u64) -> GroupId {
        if found.is_empty() {
            let gid = self.next_group;
            self.next_group += 1;
            self.groups.insert(
                gid,
                Group {
                    calls: Vec::with_capacity(4),
                    ids: Vec::with_capacity(8),
                    spans: 0,
                    last_update: now,
                    late_of: None,
                },
            );
            return gid;
        }
        found.sort_by_key(|g| std::cmp::Reverse(self.groups.get(g).map_or(0, |g| g.ids.len())));
        let into = found[0];
        for from in found.into_iter().skip(1) {
            let Some(small) = self.groups.remove(&from) else {
                continue;
            };
            for id in &small.ids {
                self.by_span.insert(*id, into);
            }
            let big = self.groups.get_mut(&into).expect("target group exists");
            big.ids.extend(small.ids);
            big.calls.extend(small.calls);
            big.spans += small.spans;
            if big.late_of.is_none() {
                big.late_of = small.late_of;
            }
        }
        into
    }

    fn complete(&mut self, gid: GroupId, now: u64) -> CompletedTrace {
        let group = self.groups.remove(&gid).expect("completed group exists");
        for id in &group.ids {
            self.by_span.remove(id);
        }
        self.pending_spans -= group.spans;
        let late = group.late_of.is_some();
        let trace_id = group
            .late_of
            .or_else(|| propagated_trace_id(&group.calls))
            .unwrap_or_else(TraceId::random);

        let present: FastSet<SpanId> = group
            .calls
            .iter()
            .flat_map(|lc| [&lc.call.client, &lc.call.server])
            .flatten()
            .map(|h| h.span_id)
            .collect();
        let mut spans = Vec::with_capacity(group.spans);
        for lc in group.calls {
            let joined = lc.call.joined();
            let client_id = lc.call.client.as_ref().map(|h| h.span_id);
            if let Some(c) = lc.call.client {
                let link = lc.parent.filter(|l| {
                    let ok = l.parent != c.span_id
                        && (present.contains(&l.parent)
                            || (late && self.exported.get(&l.parent) == Some(&trace_id)));
                    if !ok {
                        self.counters.parent_missing.inc();
                    }
                    ok
                });
                spans.push(span_record(
                    trace_id,
                    *c,
                    link.map(|l| (l.parent, l.kind)),
                    joined,
                ));
            }
            if let Some(s) = lc.call.server {
                let parent = client_id.map(|p| (p, LinkKind::Join));
                spans.push(span_record(trace_id, *s, parent, joined));
            }
        }
        // Remember the trace's ids (also the parents it waited for) for late arrivals.
        let forget_at = now.saturating_add(self.cfg.late_grace_nanos);
        for id in group.ids {
            if self.exported.insert(id, trace_id).is_none() {
                self.exported_order.push_back((forget_at, id));
            }
        }
        while self.exported_order.len() > self.cfg.max_remembered_spans {
            if let Some((_, id)) = self.exported_order.pop_front() {
                self.exported.remove(&id);
                self.counters.late_index_evicted.inc();
            }
        }
        if late {
            self.counters.late_traces.inc();
        } else {
            self.counters.traces.inc();
        }
        self.counters.spans.add(spans.len() as u64);
        CompletedTrace {
            trace_id,
            spans,
            late,
        }
    }

    /// Approximate bytes held by open traces and the late index (benchmark figure).
    pub fn pending_bytes(&self) -> usize {
        let calls: usize = self
            .groups
            .values()
            .map(|g| {
                std::mem::size_of::<Group>()
                    + g.calls.capacity() * std::mem::size_of::<LinkedCall>()
                    + g.spans * std::mem::size_of::<Half>()
                    + g.ids.capacity() * std::mem::size_of::<SpanId>()
                    + g.calls
                        .iter()
                        .flat_map(|lc| [&lc.call.client, &lc.call.server])
                        .flatten()
                        .map(|h| h.path.len())
                        .sum::<usize>()
            })
            .sum();
        let index = self.by_span.capacity() * (std::mem::size_of::<(SpanId, GroupId)>() + 1);
        calls + index + self.idle.capacity() * std::mem::size_of::<(u64, GroupId)>()
    }

    /// Bytes of the late-arrival index (exported ids kept for the grace period).
    pub fn remembered_bytes(&self) -> usize {
        self.exported.capacity() * (std::mem::size_of::<(SpanId, TraceId)>() + 1)
            + self.exported_order.capacity() * std::mem::size_of::<(u64, SpanId)>()
    }
}

/// The application's trace id, from the earliest span that carried one.
fn propagated_trace_id(calls: &[LinkedCall]) -> Option<TraceId> {
    calls
        .iter()
        .flat_map(|lc| [&lc.call.client, &lc.call.server])
        .flatten()
        .filter_map(|h| h.traceparent.map(|t| (h.start_unix_nanos, t.trace_id)))
        .min_by_key(|(start, _)| *start)
        .map(|(_, t)| t)
}

fn span_record(
    trace_id: TraceId,
    h: Half,
    parent: Option<(SpanId, LinkKind)>,
    joined: bool,
) -> SpanRecord {
    let status = h.status;
    let error = match h.side {
        Side::Client => status >= 400,
        _ => status >= 500,
    };
    SpanRecord {
        trace_id,
        span_id: h.span_id,
        parent: parent.map(|p| p.0),
        link: parent.map_or(LinkKind::Root, |p| p.1),
        side: h.side,
        name: span_name(&h.method, &h.path),
        start_unix_nanos: h.start_unix_nanos,
        end_unix_nanos: h.end_unix_nanos,
        method: h.method.to_string(),
        path: h.path.into_string(),
        status,
        error,
        client: h.client,
        server: h.server,
        joined,
        node: h.node,
        source: (h.instance, h.exchange_id),
        request_bytes: h.request_bytes,
        response_bytes: h.response_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::Call;
    use crate::join::tests::{ext, half, pod};
    use crate::link::SpanLink;
    use std::collections::HashSet;

    fn cfg() -> AssembleConfig {
        AssembleConfig {
            idle_nanos: 1_000,
            late_grace_nanos: 10_000,
            max_pending_spans: 100,
            max_remembered_spans: 100,
        }
    }

    /// A joined call from `caller` to `callee` over [start, end].
    fn joined(
        caller: &str,
        callee: &str,
        seq: u32,
        start: u64,
        end: u64,
        tp: Option<&str>,
    ) -> Call {
        Call {
            client: Some(Box::new(half(
                Side::Client,
                pod(&format!("{caller}:40000"), "a"),
                ext("10.96.0.1:80"),
                (seq, seq),
                start,
                end,
                tp,
            ))),
            server: Some(Box::new(half(
                Side::Server,
                pod(&format!("{caller}:40000"), "a"),
                pod(&format!("{callee}:8080"), "b"),
                (seq, seq),
                start + 1,
                end - 1,
                tp,
            ))),
        }
    }

    fn server_id(c: &Call) -> SpanId {
        c.server.as_ref().unwrap().span_id
    }

    fn linked(call: Call, parent: Option<(SpanId, LinkKind)>) -> LinkedCall {
        LinkedCall {
            call,
            parent: parent.map(|(parent, kind)| SpanLink { parent, kind }),
        }
    }

    fn check_trace(t: &CompletedTrace) {
        let ids: HashSet<SpanId> = t.spans.iter().map(|s| s.span_id).collect();
        assert_eq!(ids.len(), t.spans.len(), "no span twice");
        for s in &t.spans {
            assert_eq!(s.trace_id, t.trace_id);
            assert_ne!(s.parent, Some(s.span_id), "never its own parent");
            if let Some(p) = s.parent {
                assert!(ids.contains(&p), "no dangling parent");
            }
        }
    }

    #[test]
    fn connected_calls_form_one_trace_in_any_order_after_the_idle_window() {
        let reg = Registry::new();
        let mut a = Assembler::new(cfg(), &reg);
        let outer = joined("10.0.0.1", "10.0.0.2", 1, 100, 900, None);
        let inner = joined("10.0.0.2", "10.0.0.3", 2, 200, 800, None);
        let inner_parent = server_id(&outer);
        let mut out = Vec::new();
        // The child first: it waits for its parent.
        a.push(
            linked(inner, Some((inner_parent, LinkKind::Timing))),
            0,
            &mut out,
        );
        a.push(linked(outer, None), 500, &mut out);
        a.tick(1_499, &mut out);
        assert!(out.is_empty(), "not idle yet");
        a.tick(1_500, &mut out);
        assert_eq!(out.len(), 1);
        let t = &out[0];
        assert_eq!(t.spans.len(), 4);
        assert!(!t.late);
        check_trace(t);
        let roots: Vec<_> = t.spans.iter().filter(|s| s.parent.is_none()).collect();
        assert_eq!(roots.len(), 1);
        assert_eq!(roots[0].side, Side::Client);
        let links: Vec<_> = t.spans.iter().map(|s| s.link).collect();
        assert_eq!(links.iter().filter(|l| **l == LinkKind::Join).count(), 2);
        assert_eq!(links.iter().filter(|l| **l == LinkKind::Timing).count(), 1);
        assert_eq!(a.pending_spans(), 0);
        a.tick(100_000, &mut out);
        assert_eq!(out.len(), 1, "exported once");
    }

    #[test]
    fn unrelated_calls_are_separate_traces_with_random_w3c_ids() {
        let reg = Registry::new();
        let mut a = Assembler::new(cfg(), &reg);
        let mut out = Vec::new();
        a.push(
            linked(joined("10.0.0.1", "10.0.0.2", 1, 100, 900, None), None),
            0,
            &mut out,
        );
        a.push(
            linked(joined("10.0.0.1", "10.0.0.2", 2, 100, 900, None), None),
            0,
            &mut out,
        );
        a.tick(1_000, &mut out);
        assert_eq!(out.len(), 2);
        assert_ne!(out[0].trace_id, out[1].trace_id);
        assert_ne!(out[0].trace_id, TraceId::default());
        for t in &out {
            check_trace(t);
        }
    }

    #[test]
    fn propagated_trace_ids_and_span_ids_are_kept() {
        let reg = Registry::new();
        let mut a = Assembler::new(cfg(), &reg);
        let mut out = Vec::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        a.push(
            linked(joined("10.0.0.1", "10.0.0.2", 1, 100, 900, Some(tp)), None),
            0,
            &mut out,
        );
        a.tick(1_000, &mut out);
        let t = &out[0];
        assert_eq!(t.trace_id.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let client = t.spans.iter().find(|s| s.side == Side::Client).unwrap();
        assert_eq!(client.span_id.to_hex(), "00f067aa0ba902b7");
        let server = t.spans.iter().find(|s| s.side == Side::Server).unwrap();
        assert_eq!(server.parent, Some(client.span_id));
    }

    #[test]
    fn a_parent_that_never_arrives_is_removed_and_counted() {
        let reg = Registry::new();
        let mut a = Assembler::new(cfg(), &reg);
        let mut out = Vec::new();
        let call = joined("10.0.0.2", "10.0.0.3", 2, 200, 800, None);
        a.push(
            linked(call, Some((SpanId::random(), LinkKind::Timing))),
            0,
            &mut out,
        );
        a.tick(1_000, &mut out);
        check_trace(&out[0]);
        assert_eq!(reg.snapshot()["assemble.parent_missing"], 1);
        let client = out[0]
            .spans
            .iter()
            .find(|s| s.side == Side::Client)
            .unwrap();
        assert_eq!(client.link, LinkKind::Root);
    }

    #[test]
    fn late_spans_join_the_exported_trace_id_as_a_late_trace() {
        let reg = Registry::new();
        let mut a = Assembler::new(cfg(), &reg);
        let mut out = Vec::new();
        let outer = joined("10.0.0.1", "10.0.0.2", 1, 100, 900, None);
        let parent = server_id(&outer);
        a.push(linked(outer, None), 0, &mut out);
        a.tick(1_000, &mut out);
        assert_eq!(out.len(), 1);
        let inner = joined("10.0.0.2", "10.0.0.3", 2, 200, 800, None);
        a.push(
            linked(inner, Some((parent, LinkKind::Timing))),
            2_000,
            &mut out,
        );
        a.tick(3_000, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[1].late);
        assert_eq!(out[1].trace_id, out[0].trace_id);
        let client = out[1]
            .spans
            .iter()
            .find(|s| s.side == Side::Client)
            .unwrap();
        assert_eq!(
            client.parent,
            Some(parent),
            "late span keeps its exported parent"
        );
        assert_eq!(reg.snapshot()["assemble.late_traces"], 1);
        // After the grace period a connecting call is a new trace of its own.
        let again = joined("10.0.0.2", "10.0.0.3", 3, 300, 700, None);
        a.push(
            linked(again, Some((parent, LinkKind::Timing))),
            20_000,
            &mut out,
        );
        a.tick(21_000, &mut out);
        assert_eq!(out.len(), 3);
        assert!(!out[2].late);
        assert_ne!(out[2].trace_id, out[0].trace_id);
        check_trace(&out[2]);
    }

    #[test]
    fn the_pending_bound_completes_the_oldest_trace_early_and_counts_it() {
        let reg = Registry::new();
        let mut a = Assembler::new(
            AssembleConfig {
                max_pending_spans: 4,
                ..cfg()
            },
            &reg,
        );
        let mut out = Vec::new();
        for seq in 0..3 {
            a.push(
                linked(joined("10.0.0.1", "10.0.0.2", seq, 100, 900, None), None),
                u64::from(seq),
                &mut out,
            );
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].spans[0].source.1, 0, "the oldest went first");
        assert_eq!(reg.snapshot()["assemble.evicted"], 1);
        assert_eq!(a.pending_spans(), 4);
    }

    #[test]
    fn a_reused_client_span_id_is_replaced() {
        let reg = Registry::new();
        let mut a = Assembler::new(cfg(), &reg);
        let mut out = Vec::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        a.push(
            linked(joined("10.0.0.1", "10.0.0.2", 1, 100, 900, Some(tp)), None),
            0,
            &mut out,
        );
        a.push(
            linked(joined("10.0.0.1", "10.0.0.2", 2, 100, 900, Some(tp)), None),
            0,
            &mut out,
        );
        a.tick(1_000, &mut out);
        assert_eq!(reg.snapshot()["assemble.duplicate_span_id"], 1);
        let ids: HashSet<SpanId> = out
            .iter()
            .flat_map(|t| t.spans.iter().map(|s| s.span_id))
            .collect();
        assert_eq!(ids.len(), 4);
    }
}
