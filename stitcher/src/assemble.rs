//! assemble: linked calls → traces.
//!
//! In: [`LinkedCall`]s (a call's halves, and the parent of its CLIENT span).
//! Out: [`CompletedTrace`]s, each exported once, after `idle_nanos` without new spans.
//!
//! The idle window counts from when a trace's latest span *reached the stitcher*
//! ([`Half::arrived`]), not from when its call got here: the link stage holds a call up
//! to its `max_wait` (from the same arrival) and the join stage up to its window, and
//! both run inside the idle window instead of before it. The windows nest (see the
//! pipeline): a call decided within them reaches its trace before the trace is idle.
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
    CompletedTrace, FastMap, Half, LinkKind, SpanId, SpanRecord, TraceId, span_name,
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
    /// Latest arrival at the stitcher of any of its spans: idle from here.
    last_arrival: u64,
    /// Bucket of this group's entry in the deadline calendar (one entry per group).
    queued: u64,
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
    /// When each group may be idle: one entry per group, at or before its deadline.
    idle: Deadlines,
    /// Scratch for `tick`: entries that surfaced before their deadline.
    not_yet: Vec<(u64, GroupId)>,
    /// Spans of exported traces, for late arrivals.
    exported: LateIndex,
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
            idle: Deadlines::default(),
            not_yet: Vec::new(),
            exported: LateIndex::default(),
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
        let ids = [client_id, server_id, parent_id];

        let mut late_of = None;
        // At most three groups (one per id): no allocation per call.
        let mut found: [GroupId; 3] = [0; 3];
        let mut n = 0;
        for id in ids.iter().flatten() {
            if let Some(g) = self.by_span.get(id) {
                if !found[..n].contains(g) {
                    found[n] = *g;
                    n += 1;
                }
            } else if let Some(t) = self.exported.get(id) {
                late_of.get_or_insert(t);
            }
        }
        let gid = self.merge(&mut found[..n]);
        let spans = lc.call.halves();
        let arrived = lc.call.arrived();
        let group = self.groups.get_mut(&gid).expect("merged group exists");
        if group.late_of.is_none() {
            group.late_of = late_of;
        }
        for id in ids.into_iter().flatten() {
            if self.by_span.insert(id, gid).is_none() {
                group.ids.push(id);
            }
        }
        group.calls.push(lc);
        group.spans += spans;
        group.last_arrival = group.last_arrival.max(arrived);
        if group.queued == UNQUEUED {
            group.queued = self
                .idle
                .push(group.last_arrival.saturating_add(self.cfg.idle_nanos), gid);
        }
        self.pending_spans += spans;

        let mut kept_own = false;
        while self.pending_spans > self.cfg.max_pending_spans {
            let Some((bucket, oldest)) = self.idle.pop_front() else {
                break;
            };
            if oldest == gid {
                kept_own = true;
                continue;
            }
            if self.groups.get(&oldest).is_some_and(|g| g.queued == bucket) {
                self.counters.evicted.inc();
                out.push(self.complete(oldest, now));
            }
        }
        if kept_own && let Some(g) = self.groups.get_mut(&gid) {
            g.queued = self
                .idle
                .push(g.last_arrival.saturating_add(self.cfg.idle_nanos), gid);
        }
        self.counters.pending_spans.set(self.pending_spans as u64);
    }

    /// Completes every trace idle for `idle_nanos` since its latest span arrived;
    /// forgets expired exported ids.
    pub fn tick(&mut self, now: u64, out: &mut Vec<CompletedTrace>) {
        let mut later = std::mem::take(&mut self.not_yet);
        while let Some((bucket, gid)) = self.idle.pop_due(now) {
            let Some(g) = self.groups.get(&gid) else {
                continue;
            };
            if g.queued != bucket {
                continue;
            }
            let deadline = g.last_arrival.saturating_add(self.cfg.idle_nanos);
            if deadline <= now {
                out.push(self.complete(gid, now));
            } else {
                // Not yet (its bucket has begun, or a span arrived since it was queued).
                later.push((deadline, gid));
            }
        }
        for (deadline, gid) in later.drain(..) {
            if let Some(g) = self.groups.get_mut(&gid) {
                g.queued = self.idle.push(deadline, gid);
            }
        }
        self.not_yet = later;
        self.forget_exported(now);
        self.counters.pending_spans.set(self.pending_spans as u64);
    }

    fn forget_exported(&mut self, now: u64) {
        self.exported.forget_until(now);
    }

    /// Completes everything still open (shutdown).
    pub fn flush(&mut self, now: u64, out: &mut Vec<CompletedTrace>) {
        while let Some((_, gid)) = self.idle.pop_front() {
            if self.groups.contains_key(&gid) {
                out.push(self.complete(gid, now));
            }
        }
        // Every group has an entry; nothing can be left, but never lose a span.
        let rest: Vec<GroupId> = self.groups.keys().copied().collect();
        for gid in rest {
            out.push(self.complete(gid, now));
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
    fn merge(&mut self, found: &mut [GroupId]) -> GroupId {
        if found.is_empty() {
            let gid = self.next_group;
            self.next_group += 1;
            self.groups.insert(
                gid,
                Group {
                    calls: Vec::with_capacity(4),
                    ids: Vec::with_capacity(8),
                    spans: 0,
                    last_arrival: 0,
                    queued: UNQUEUED,
                    late_of: None,
                },
            );
            return gid;
        }
        found.sort_by_key(|g| std::cmp::Reverse(self.groups.get(g).map_or(0, |g| g.ids.len())));
        let into = found[0];
        for from in found.iter().skip(1) {
            let Some(small) = self.groups.remove(from) else {
                continue;
            };
            for id in &small.ids {
                self.by_span.insert(*id, into);
            }
            let big = self.groups.get_mut(&into).expect("target group exists");
            big.ids.extend(small.ids);
            big.calls.extend(small.calls);
            big.spans += small.spans;
            // The big group's entry stays; when it surfaces before the merged deadline
            // it is queued again (`tick`).
            big.last_arrival = big.last_arrival.max(small.last_arrival);
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

        // Sorted ids rather than a hash set: traces are small.
        let mut present: Vec<SpanId> = group
            .calls
            .iter()
            .flat_map(|lc| [&lc.call.client, &lc.call.server])
            .flatten()
            .map(|h| h.span_id)
            .collect();
        present.sort_unstable();
        let mut spans = Vec::with_capacity(group.spans);
        for lc in group.calls {
            let joined = lc.call.joined();
            let client_id = lc.call.client.as_ref().map(|h| h.span_id);
            if let Some(c) = lc.call.client {
                let link = lc.parent.filter(|l| {
                    let ok = l.parent != c.span_id
                        && (present.binary_search(&l.parent).is_ok()
                            || (late && self.exported.get(&l.parent) == Some(trace_id)));
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
        self.exported.remember(trace_id, &group.ids, forget_at);
        let evicted = self.exported.bound(self.cfg.max_remembered_spans);
        self.counters.late_index_evicted.add(evicted as u64);
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
                        .map(|h| h.heap_bytes())
                        .sum::<usize>()
            })
            .sum();
        let index = self.by_span.capacity() * (std::mem::size_of::<(SpanId, GroupId)>() + 1);
        calls + index + self.idle.bytes()
    }

    /// Bytes of the late-arrival index (exported ids kept for the grace period).
    pub fn remembered_bytes(&self) -> usize {
        self.exported.bytes()
    }
}

/// A group not (yet) in the deadline calendar.
const UNQUEUED: u64 = u64::MAX;

/// Groups by the time they may be idle, in buckets of 2^20 ns (about 1 ms). Deadlines
/// come out of order (a call reaches assemble up to the link wait after its spans
/// arrived), so a FIFO cannot hold them in order; a heap would cost log n per group.
/// An entry sits in the bucket its deadline falls in (or the first, when that one has
/// passed); `tick` checks the exact deadline of what surfaces.
#[derive(Default)]
struct Deadlines {
    /// Bucket number of `buckets[0]`.
    base: u64,
    buckets: VecDeque<VecDeque<GroupId>>,
    /// Emptied buckets, for reuse (their capacity).
    spare: Vec<VecDeque<GroupId>>,
    /// The latest bucket `pop_due` has reached: nothing is queued before it.
    horizon: u64,
}

const BUCKET_SHIFT: u32 = 20;
/// Most buckets ahead of the first (about 70 s): a later deadline sits in the last one
/// and is queued again when it surfaces.
const MAX_BUCKETS: u64 = 1 << 16;

impl Deadlines {
    /// Queues `gid` at `deadline`; returns the bucket it went to.
    fn push(&mut self, deadline: u64, gid: GroupId) -> u64 {
        let want = (deadline >> BUCKET_SHIFT).max(self.horizon);
        if self.buckets.is_empty() {
            self.base = want;
        }
        while want < self.base && self.buckets.len() < MAX_BUCKETS as usize {
            let b = self.spare.pop().unwrap_or_default();
            self.buckets.push_front(b);
            self.base -= 1;
        }
        let bucket = want.clamp(self.base, self.base + MAX_BUCKETS - 1);
        let i = usize::try_from(bucket - self.base).unwrap_or(usize::MAX);
        while self.buckets.len() <= i {
            let b = self.spare.pop().unwrap_or_default();
            self.buckets.push_back(b);
        }
        self.buckets[i].push_back(gid);
        bucket
    }

    /// The next entry of the earliest bucket, whatever its time (the pending bound).
    fn pop_front(&mut self) -> Option<(u64, GroupId)> {
        loop {
            let front = self.buckets.front_mut()?;
            if let Some(gid) = front.pop_front() {
                return Some((self.base, gid));
            }
            self.drop_front();
        }
    }

    /// The next entry whose bucket has begun by `now`.
    fn pop_due(&mut self, now: u64) -> Option<(u64, GroupId)> {
        self.horizon = self.horizon.max(now >> BUCKET_SHIFT);
        loop {
            if self.base > now >> BUCKET_SHIFT {
                return None;
            }
            let front = self.buckets.front_mut()?;
            if let Some(gid) = front.pop_front() {
                return Some((self.base, gid));
            }
            self.drop_front();
        }
    }

    fn drop_front(&mut self) {
        if let Some(b) = self.buckets.pop_front() {
            if self.spare.len() < 64 {
                self.spare.push(b);
            }
            self.base += 1;
        }
    }

    fn bytes(&self) -> usize {
        self.buckets
            .iter()
            .chain(&self.spare)
            .map(|b| b.capacity() * std::mem::size_of::<GroupId>())
            .sum::<usize>()
            + self.buckets.capacity() * std::mem::size_of::<VecDeque<GroupId>>()
    }
}

/// The ids of exported traces' spans, kept for `late_grace` so that a late span can join
/// its trace: span id → the trace's number in `traces`, whose entry holds the trace id.
///
/// Compact on purpose (it holds about `late_grace` of the exchange rate, 10 s by
/// default: more than all pending state): an id costs a 12-byte map entry and 8 bytes in
/// `ids`, and a trace one `Remembered` entry, instead of a 24-byte entry (the trace id
/// per span) and a 16-byte deadline per span.
#[derive(Debug, Default)]
struct LateIndex {
    by_span: FastMap<SpanId, u32>,
    /// Oldest first; numbers consecutive (modulo 2^32).
    traces: VecDeque<Remembered>,
    /// Every trace's new ids, in the order of `traces`.
    ids: VecDeque<SpanId>,
    next: u32,
}

#[derive(Debug)]
struct Remembered {
    forget_at: u64,
    trace_id: TraceId,
    number: u32,
    /// How many of `ids` are this trace's.
    ids: u32,
}

impl LateIndex {
    fn get(&self, id: &SpanId) -> Option<TraceId> {
        let number = *self.by_span.get(id)?;
        let first = self.traces.front()?.number;
        let t = self.traces.get(number.wrapping_sub(first) as usize)?;
        (t.number == number).then_some(t.trace_id)
    }

    fn contains_key(&self, id: &SpanId) -> bool {
        self.by_span.contains_key(id)
    }

    fn len(&self) -> usize {
        self.by_span.len()
    }

    /// Remembers `ids` as `trace_id`'s until `forget_at`. An id already remembered now
    /// names this trace (and is forgotten with the trace that added it first).
    fn remember(&mut self, trace_id: TraceId, ids: &[SpanId], forget_at: u64) {
        let number = self.next;
        self.next = self.next.wrapping_add(1);
        let mut new = 0u32;
        for &id in ids {
            if self.by_span.insert(id, number).is_none() {
                self.ids.push_back(id);
                new += 1;
            }
        }
        self.traces.push_back(Remembered {
            forget_at,
            trace_id,
            number,
            ids: new,
        });
    }

    /// Forgets the oldest trace; returns how many ids went with it.
    fn forget_oldest(&mut self) -> usize {
        let Some(t) = self.traces.pop_front() else {
            return 0;
        };
        for _ in 0..t.ids {
            if let Some(id) = self.ids.pop_front() {
                self.by_span.remove(&id);
            }
        }
        t.ids as usize
    }

    /// Forgets the traces whose grace ended by `now`.
    fn forget_until(&mut self, now: u64) {
        while self.traces.front().is_some_and(|t| t.forget_at <= now) {
            self.forget_oldest();
        }
    }

    /// Forgets the oldest traces until at most `max` ids are kept; returns the ids
    /// forgotten early.
    fn bound(&mut self, max: usize) -> usize {
        let mut evicted = 0;
        while self.ids.len() > max && !self.traces.is_empty() {
            evicted += self.forget_oldest();
        }
        evicted
    }

    fn bytes(&self) -> usize {
        self.by_span.capacity() * (size_of::<(SpanId, u32)>() + 1)
            + self.ids.capacity() * size_of::<SpanId>()
            + self.traces.capacity() * size_of::<Remembered>()
    }
}

/// The application's trace id, from the earliest span that carried one.
fn propagated_trace_id(calls: &[LinkedCall]) -> Option<TraceId> {
    calls
        .iter()
        .flat_map(|lc| [&lc.call.client, &lc.call.server])
        .flatten()
        .filter_map(|h| h.traceparent().map(|t| (h.start_unix_nanos, t.trace_id)))
        .min_by_key(|(start, _)| *start)
        .map(|(_, t)| t)
}

fn span_record(
    trace_id: TraceId,
    h: Half,
    parent: Option<(SpanId, LinkKind)>,
    joined: bool,
) -> SpanRecord {
    let status = u32::from(h.status);
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
        node: h.source.node.clone(),
        source: (h.source.instance.clone(), h.exchange_id),
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

    #[test]
    fn the_late_index_names_traces_forgets_in_order_and_stays_bounded() {
        let mut idx = LateIndex::default();
        let ids: Vec<SpanId> = (0..10).map(|_| SpanId::random()).collect();
        let (a, b, c) = (TraceId::random(), TraceId::random(), TraceId::random());
        idx.remember(a, &ids[0..3], 100);
        idx.remember(b, &ids[3..6], 200);
        // A shared id (a parent the later trace waited for) now names the later trace.
        idx.remember(c, &[ids[5], ids[6], ids[7]], 300);
        assert_eq!(idx.get(&ids[0]), Some(a));
        assert_eq!(idx.get(&ids[4]), Some(b));
        assert_eq!(idx.get(&ids[5]), Some(c));
        assert_eq!(idx.get(&ids[9]), None);
        assert_eq!(idx.len(), 8);
        idx.forget_until(150);
        assert_eq!(idx.get(&ids[0]), None, "a's grace is over");
        assert_eq!(idx.get(&ids[3]), Some(b));
        assert_eq!(idx.len(), 5);
        // The bound forgets whole traces, oldest first, and counts their ids.
        assert_eq!(idx.bound(3), 3);
        assert_eq!(idx.get(&ids[4]), None);
        assert_eq!(idx.get(&ids[6]), Some(c));
        assert!(idx.len() <= 3);
        assert_eq!(idx.bound(0), 2);
        assert_eq!(idx.len(), 0);
        assert_eq!(idx.bound(0), 0, "empty: nothing to forget, no loop");
        // Numbers keep counting after the index emptied.
        idx.remember(a, &ids[8..10], 400);
        assert_eq!(idx.get(&ids[9]), Some(a));
    }

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

    /// The call's halves reach the stitcher at `at`, and the call reaches assemble then.
    fn arrive(a: &mut Assembler, mut lc: LinkedCall, at: u64, out: &mut Vec<CompletedTrace>) {
        for h in [&mut lc.call.client, &mut lc.call.server]
            .into_iter()
            .flatten()
        {
            h.arrived = at;
        }
        a.push(lc, at, out);
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
        arrive(
            &mut a,
            linked(inner, Some((inner_parent, LinkKind::Timing))),
            0,
            &mut out,
        );
        arrive(&mut a, linked(outer, None), 500, &mut out);
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
    fn the_idle_window_counts_from_arrival_not_from_when_link_let_the_call_go() {
        let reg = Registry::new();
        let mut a = Assembler::new(cfg(), &reg);
        let mut out = Vec::new();
        // Both halves arrived at 0; link held the call until 800.
        let mut lc = linked(joined("10.0.0.1", "10.0.0.2", 1, 100, 900, None), None);
        for h in [&mut lc.call.client, &mut lc.call.server]
            .into_iter()
            .flatten()
        {
            h.arrived = 0;
        }
        a.push(lc, 800, &mut out);
        a.tick(999, &mut out);
        assert!(out.is_empty(), "not before the idle window");
        a.tick(1_000, &mut out);
        assert_eq!(
            out.len(),
            1,
            "idle from arrival (0 + 1000), not from 800 + 1000"
        );
    }

    #[test]
    fn deadlines_out_of_arrival_order_complete_each_on_time() {
        let reg = Registry::new();
        let mut a = Assembler::new(
            AssembleConfig {
                idle_nanos: 10 << 20,
                ..cfg()
            },
            &reg,
        );
        let mut out = Vec::new();
        // Pushed first but arrived last, then pushed last but arrived first.
        arrive(
            &mut a,
            linked(joined("10.0.0.1", "10.0.0.2", 1, 100, 900, None), None),
            5 << 20,
            &mut out,
        );
        let mut early = linked(joined("10.0.0.1", "10.0.0.2", 2, 100, 900, None), None);
        for h in [&mut early.call.client, &mut early.call.server]
            .into_iter()
            .flatten()
        {
            h.arrived = 1 << 20;
        }
        a.push(early, 6 << 20, &mut out);
        a.tick(11 << 20, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].spans[0].source.1, 2, "the earlier arrival first");
        a.tick((15 << 20) - 1, &mut out);
        assert_eq!(out.len(), 1);
        a.tick(15 << 20, &mut out);
        assert_eq!(out.len(), 2);
        // A span joining an open trace moves its deadline.
        let outer = joined("10.0.0.1", "10.0.0.2", 3, 100, 900, None);
        let parent = server_id(&outer);
        arrive(&mut a, linked(outer, None), 20 << 20, &mut out);
        let inner = joined("10.0.0.2", "10.0.0.3", 4, 200, 800, None);
        arrive(
            &mut a,
            linked(inner, Some((parent, LinkKind::Timing))),
            25 << 20,
            &mut out,
        );
        a.tick(30 << 20, &mut out);
        assert_eq!(out.len(), 2, "idle from the later span");
        a.tick(35 << 20, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].spans.len(), 4);
    }

    #[test]
    fn unrelated_calls_are_separate_traces_with_random_w3c_ids() {
        let reg = Registry::new();
        let mut a = Assembler::new(cfg(), &reg);
        let mut out = Vec::new();
        arrive(
            &mut a,
            linked(joined("10.0.0.1", "10.0.0.2", 1, 100, 900, None), None),
            0,
            &mut out,
        );
        arrive(
            &mut a,
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
        arrive(
            &mut a,
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
        arrive(
            &mut a,
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
        arrive(&mut a, linked(outer, None), 0, &mut out);
        a.tick(1_000, &mut out);
        assert_eq!(out.len(), 1);
        let inner = joined("10.0.0.2", "10.0.0.3", 2, 200, 800, None);
        arrive(
            &mut a,
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
        arrive(
            &mut a,
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
            arrive(
                &mut a,
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
        arrive(
            &mut a,
            linked(joined("10.0.0.1", "10.0.0.2", 1, 100, 900, Some(tp)), None),
            0,
            &mut out,
        );
        arrive(
            &mut a,
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
