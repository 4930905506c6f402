//! link: each outgoing call → the server span it was made for.
//!
//! In: [`Call`]s from the join stage, plus every SERVER half as soon as it arrives
//! ([`Linker::observe_server`], so candidates do not wait for their own join).
//! Out: [`LinkedCall`]s: the call and, for its CLIENT span, the chosen parent and how
//! it was chosen ([`LinkKind`]).
//!
//! A pod's outgoing CLIENT call is a child of the SERVER span the pod was serving. The
//! caller pod is the client half's source address (seen leaving the pod, before any NAT);
//! the server spans of that pod are the SERVER halves whose destination is that address
//! (seen entering the pod, after DNAT). Both halves are observed by the same collector (the
//! pod's node), so their clocks agree. Rules, strongest first:
//!
//! 1. **traceparent** (exact): the call carries `00-T-C-..`; a server span of the same pod
//!    received trace id `T`. Several such spans (a trace visiting the pod twice): the one
//!    that contains the call in time, latest start first.
//! 2. **thread** (exact where a thread serves one request at a time): the seam for thread
//!    attribution. Exchanges carry the `pid`/`tid` that read the request (SERVER) and wrote
//!    the call (CLIENT); 0 means unknown, so today this rule never fires. When the collector
//!    fills them, the one containing server span of the same thread is the parent.
//! 3. **timing** (inferred): server spans of the same pod with
//!    `server.start <= call.start && call.end <= server.end`. Exactly one → `timing`.
//!    **Several → `ambiguous`**, and the stated rule picks the candidate that started last
//!    before the call (the innermost, most recently accepted request). The link is kept so
//!    the call is not orphaned, but marked so nobody mistakes it for evidence. None → the
//!    call is a root.
//!
//! When to decide: a server span ends after the calls it contains, so its SERVER half
//! usually arrives *after* its children, from the same collector (the pod's node), which
//! reports exchanges as they complete. A call therefore waits until that node's progress
//! (the latest exchange end it reported, [`Linker::note_progress`]) has passed the call's
//! end by `progress_slack_nanos`: by then the server spans that contain the call and end
//! soon after it have been reported. It waits at least `wait_nanos` and at most
//! `max_wait_nanos` (stitcher clock, from its CLIENT half's arrival at the stitcher, not
//! from the call's arrival here: the wait runs while the join waits for the other half
//! and while the trace's idle window runs, instead of adding to them; a quiet node makes
//! no progress). Calls wait in one queue per node of their CLIENT half, because progress
//! is per node: a quiet node's calls never hold up a busy node's.
//! Waiting on the collector's progress rather than on the clock alone keeps a slow or
//! starved collector from turning a half-seen candidate set into a confident `timing` link.
//! Candidates are kept in a per-pod index for `retention_nanos`. A parent that ends later
//! than the slack after its call may be missed when another candidate was seen: that is the
//! residual error of `timing`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use crate::join::Call;
use crate::metrics::{Counter, Registry};
use crate::model::{FastMap, Half, LinkKind, SpanId, TraceId};

/// A call with the parent of its CLIENT span decided.
#[derive(Debug, Clone)]
pub struct LinkedCall {
    pub call: Call,
    /// The SERVER span that made this call, and how it was found. `None`: a root (also
    /// always `None` for a call seen only on the server side).
    pub parent: Option<SpanLink>,
}

/// An edge from a CLIENT span to the SERVER span it was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanLink {
    pub parent: SpanId,
    pub kind: LinkKind,
}

#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Least time a call waits for the server span that contains it.
    pub wait_nanos: u64,
    /// Most time a call waits (when its node reports no progress).
    pub max_wait_nanos: u64,
    /// How far past the call's end its node must have reported before deciding.
    pub progress_slack_nanos: u64,
    /// How long a server span stays a candidate after it arrived.
    pub retention_nanos: u64,
    /// Most calls waiting; beyond it the oldest is decided early.
    pub max_pending: usize,
    /// Most candidate server spans indexed; beyond it the oldest are forgotten.
    pub max_candidates: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            wait_nanos: 200_000_000,
            max_wait_nanos: 1_500_000_000,
            progress_slack_nanos: 250_000_000,
            retention_nanos: 5_000_000_000,
            max_pending: 1 << 20,
            max_candidates: 1 << 20,
        }
    }
}

/// A server span as a candidate parent.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    end: u64,
    pid: u32,
    tid: u32,
}

/// The server spans of one pod, by duration class (log2 of the duration), each by start
/// time. A containment search looks back, in each class, only as far as that class's
/// longest span: one long span (a slow request, a long poll) no longer makes every search
/// of the pod scan all its recent short spans (measured: seconds of stitch thread per
/// tick under sustained load, when a pod had served one long request).
#[derive(Default)]
struct PodSpans {
    classes: Vec<DurationClass>,
}

struct DurationClass {
    class: u8,
    /// Longest duration in this class seen: how far back its search looks.
    max_duration: u64,
    /// Sorted by (start, span). Server halves arrive in about end order, and within a
    /// class durations differ by less than 2x, so they arrive in about start order too:
    /// an insert lands near the back and an expiry near the front (a sorted deque
    /// instead of a B-tree: no node allocation per span, half the instructions).
    by_start: VecDeque<((u64, SpanId), Candidate)>,
}

fn duration_class(duration: u64) -> u8 {
    (u64::BITS - duration.leading_zeros()) as u8
}

impl PodSpans {
    fn insert(&mut self, start: u64, id: SpanId, c: Candidate) -> u8 {
        let duration = c.end.saturating_sub(start);
        let class = duration_class(duration);
        let i = match self.classes.iter().position(|k| k.class == class) {
            Some(i) => i,
            None => {
                self.classes.push(DurationClass {
                    class,
                    max_duration: 0,
                    by_start: VecDeque::new(),
                });
                self.classes.len() - 1
            }
        };
        let k = &mut self.classes[i];
        k.max_duration = k.max_duration.max(duration);
        let key = (start, id);
        let at = if k.by_start.back().is_none_or(|(last, _)| *last <= key) {
            k.by_start.len()
        } else {
            k.by_start.partition_point(|(x, _)| *x < key)
        };
        k.by_start.insert(at, (key, c));
        class
    }

    fn remove(&mut self, class: u8, start: u64, id: SpanId) {
        if let Some(i) = self.classes.iter().position(|k| k.class == class) {
            let v = &mut self.classes[i].by_start;
            let key = (start, id);
            let at = if v.front().is_some_and(|(first, _)| *first == key) {
                0
            } else {
                v.partition_point(|(x, _)| *x < key)
            };
            if v.get(at).is_some_and(|(x, _)| *x == key) {
                v.remove(at);
            }
            if v.is_empty() {
                self.classes.swap_remove(i);
            }
        }
    }

    /// Candidates that started at or before `start` and may still contain it, each
    /// class latest start first.
    fn around(&self, start: u64) -> impl Iterator<Item = &((u64, SpanId), Candidate)> {
        self.classes.iter().flat_map(move |k| {
            let earliest = start.saturating_sub(k.max_duration);
            let from = k.by_start.partition_point(|((s, _), _)| *s < earliest);
            let to = k.by_start.partition_point(|((s, _), _)| *s <= start);
            k.by_start.range(from..to.max(from)).rev()
        })
    }
}

/// What the rules need to know of a call's candidates: per rule, how many and the one
/// that started last.
#[derive(Default)]
struct Found {
    /// Same trace id (a containing one preferred).
    by_trace: Option<SpanId>,
    by_thread: (usize, Option<SpanId>),
    by_time: (usize, Option<SpanId>),
}

struct Counters {
    traceparent: Counter,
    thread: Counter,
    timing: Counter,
    ambiguous: Counter,
    root: Counter,
    evicted_pending: Counter,
    evicted_candidates: Counter,
}

/// (expires, pod, start, span, trace, duration class).
type CandidateEntry = (u64, IpAddr, u64, SpanId, Option<TraceId>, u8);

/// The link stage.
pub struct Linker {
    cfg: LinkConfig,
    pods: FastMap<IpAddr, PodSpans>,
    /// Exact index for rule 1: (pod address, trace id) → server spans.
    by_trace: FastMap<(IpAddr, TraceId), Vec<SpanId>>,
    /// Candidate expiry order: (expires, pod, start, span, trace, duration class).
    candidates: VecDeque<CandidateEntry>,
    /// Calls waiting for a decision, by node of their CLIENT half, in the order they came.
    waiting: FastMap<Arc<str>, VecDeque<Call>>,
    waiting_len: usize,
    /// Per collector node, the latest exchange end it reported.
    progress: FastMap<Arc<str>, u64>,
    counters: Counters,
}

impl Linker {
    pub fn new(cfg: LinkConfig, metrics: &Registry) -> Self {
        let c = |name: &str, help| metrics.counter(name, help);
        Linker {
            cfg,
            pods: FastMap::default(),
            by_trace: FastMap::default(),
            candidates: VecDeque::new(),
            waiting: FastMap::default(),
            waiting_len: 0,
            progress: FastMap::default(),
            counters: Counters {
                traceparent: c(
                    "link.traceparent",
                    "calls linked by a propagated traceparent",
                ),
                thread: c("link.thread", "calls linked by thread attribution"),
                timing: c(
                    "link.timing",
                    "calls linked by the only containing server span",
                ),
                ambiguous: c(
                    "link.ambiguous",
                    "calls with several containing server spans (linked by the stated rule, marked)",
                ),
                root: c(
                    "link.root",
                    "calls without any containing server span (roots)",
                ),
                evicted_pending: c(
                    "link.evicted",
                    "calls decided early because the pending bound was reached",
                ),
                evicted_candidates: c(
                    "link.candidates_evicted",
                    "candidate server spans forgotten early because the index bound was reached",
                ),
            },
        }
    }

    /// Calls waiting for a decision.
    pub fn pending(&self) -> usize {
        self.waiting_len
    }

    /// Server spans kept as candidate parents.
    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }

    /// Halves held by waiting calls (O(n): for figures, not the hot path).
    pub fn pending_halves(&self) -> usize {
        self.waiting.values().flatten().map(Call::halves).sum()
    }

    /// Notes how far a node's collector has reported (every half, as it arrives).
    pub fn note_progress(&mut self, half: &Half) {
        self.note_node_progress(half.node(), half.end_unix_nanos);
    }

    /// Notes that `node`'s collector has reported exchanges ending up to `end` (once
    /// per batch: a batch comes from one node).
    pub fn note_node_progress(&mut self, node: &Arc<str>, end: u64) {
        match self.progress.get_mut(&**node) {
            Some(p) => *p = (*p).max(end),
            None => {
                self.progress.insert(node.clone(), end);
            }
        }
    }

    /// Indexes a SERVER half as a candidate parent for calls made by its pod.
    pub fn observe_server(&mut self, half: &Half, now: u64) {
        let pod = half.server.addr.ip();
        let start = half.start_unix_nanos;
        let trace = half.traceparent().map(|t| t.trace_id);
        let (pid, tid) = half.thread().unwrap_or((0, 0));
        let class = self.pods.entry(pod).or_default().insert(
            start,
            half.span_id,
            Candidate {
                end: half.end_unix_nanos,
                pid,
                tid,
            },
        );
        if let Some(t) = trace {
            self.by_trace
                .entry((pod, t))
                .or_default()
                .push(half.span_id);
        }
        self.candidates.push_back((
            now.saturating_add(self.cfg.retention_nanos),
            pod,
            start,
            half.span_id,
            trace,
            class,
        ));
        while self.candidates.len() > self.cfg.max_candidates {
            self.counters.evicted_candidates.inc();
            self.forget_oldest_candidate();
        }
    }

    /// Takes a call from the join stage. Calls without a CLIENT half have no parent to
    /// find and pass straight through.
    pub fn push(&mut self, call: Call, out: &mut Vec<LinkedCall>) {
        let Some(node) = call.client.as_ref().map(|c| c.node().clone()) else {
            out.push(LinkedCall { call, parent: None });
            return;
        };
        self.waiting.entry(node).or_default().push_back(call);
        self.waiting_len += 1;
        while self.waiting_len > self.cfg.max_pending {
            let Some(call) = self.pop_oldest() else { break };
            self.counters.evicted_pending.inc();
            let parent = self.decide(&call);
            out.push(LinkedCall { call, parent });
        }
    }

    /// The waiting call whose CLIENT half arrived first (nodes are few).
    fn pop_oldest(&mut self) -> Option<Call> {
        let queue = self
            .waiting
            .values_mut()
            .filter(|q| !q.is_empty())
            .min_by_key(|q| q.front().map_or(u64::MAX, wait_from))?;
        self.waiting_len -= 1;
        queue.pop_front()
    }

    /// Decides every call whose wait is over, and forgets expired candidates.
    pub fn tick(&mut self, now: u64, out: &mut Vec<LinkedCall>) {
        let mut waiting = std::mem::take(&mut self.waiting);
        for queue in waiting.values_mut() {
            while queue
                .front()
                .is_some_and(|call| ready(&self.cfg, &self.progress, call, now))
            {
                if let Some(call) = queue.pop_front() {
                    self.waiting_len -= 1;
                    let parent = self.decide(&call);
                    out.push(LinkedCall { call, parent });
                }
            }
        }
        waiting.retain(|_, q| !q.is_empty());
        self.waiting = waiting;
        while self.candidates.front().is_some_and(|c| c.0 <= now) {
            self.forget_oldest_candidate();
        }
    }

    /// Decides everything still waiting (shutdown).
    pub fn flush(&mut self, out: &mut Vec<LinkedCall>) {
        while let Some(call) = self.pop_oldest() {
            let parent = self.decide(&call);
            out.push(LinkedCall { call, parent });
        }
        self.waiting.clear();
    }

    fn forget_oldest_candidate(&mut self) {
        let Some((_, pod, start, id, trace, class)) = self.candidates.pop_front() else {
            return;
        };
        if let Some(spans) = self.pods.get_mut(&pod) {
            spans.remove(class, start, id);
            if spans.classes.is_empty() {
                self.pods.remove(&pod);
            }
        }
        if let Some(t) = trace
            && let Some(ids) = self.by_trace.get_mut(&(pod, t))
        {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                self.by_trace.remove(&(pod, t));
            }
        }
    }

    /// Applies the rules, strongest first, to the call's CLIENT half.
    fn decide(&self, call: &Call) -> Option<SpanLink> {
        let client = call.client.as_ref()?;
        let found = self.candidates_for(client);
        let pick = if let Some(p) = found.by_trace {
            self.counters.traceparent.inc();
            SpanLink {
                parent: p,
                kind: LinkKind::Traceparent,
            }
        } else if let (1, Some(p)) = found.by_thread {
            self.counters.thread.inc();
            SpanLink {
                parent: p,
                kind: LinkKind::Thread,
            }
        } else if let (1, Some(p)) = found.by_time {
            self.counters.timing.inc();
            SpanLink {
                parent: p,
                kind: LinkKind::Timing,
            }
        } else if let (_, Some(latest)) = found.by_time {
            self.counters.ambiguous.inc();
            SpanLink {
                parent: latest,
                kind: LinkKind::Ambiguous,
            }
        } else {
            self.counters.root.inc();
            return None;
        };
        // A span is never its own parent (a pod calling itself through a Service).
        (pick.parent != client.span_id).then_some(pick)
    }

    /// Server spans of the caller's pod that may have made this call.
    fn candidates_for(&self, call: &Half) -> Found {
        let pod = call.client.addr.ip();
        let mut found = Found::default();
        let same_trace = call
            .traceparent()
            .and_then(|tp| self.by_trace.get(&(pod, tp.trace_id)));
        let Some(spans) = self.pods.get(&pod) else {
            return found;
        };
        let (start, end) = (call.start_unix_nanos, call.end_unix_nanos);
        let containing = spans
            .around(start)
            .filter(|(_, c)| c.end >= end)
            .filter(|((_, id), _)| *id != call.span_id);
        let thread = call.thread();
        // Per rule: how many, and the one that started last.
        let note = |slot: &mut (usize, Option<(u64, SpanId)>), at: u64, id: SpanId| {
            slot.0 += 1;
            if slot.1.is_none_or(|latest| (at, id) > latest) {
                slot.1 = Some((at, id));
            }
        };
        let (mut by_time, mut by_thread) = ((0, None), (0, None));
        let mut by_trace: Option<(u64, SpanId)> = None;
        for ((at, id), c) in containing {
            note(&mut by_time, *at, *id);
            if thread.is_some() && thread == Some((c.pid, c.tid)) {
                note(&mut by_thread, *at, *id);
            }
            if same_trace.is_some_and(|ids| ids.contains(id))
                && by_trace.is_none_or(|latest| (*at, *id) > latest)
            {
                by_trace = Some((*at, *id));
            }
        }
        found.by_time = (by_time.0, by_time.1.map(|(_, id)| id));
        found.by_thread = (by_thread.0, by_thread.1.map(|(_, id)| id));
        found.by_trace = by_trace.map(|(_, id)| id);
        if found.by_trace.is_none() {
            // Same trace but not containing (clock or capture oddities): still exact.
            found.by_trace = same_trace.and_then(|ids| ids.last().copied());
        }
        found
    }

    /// Approximate bytes held (for the benchmark's memory figure).
    pub fn pending_bytes(&self) -> usize {
        let cand = self.candidates.len()
            * (std::mem::size_of::<CandidateEntry>()
                + std::mem::size_of::<((u64, SpanId), Candidate)>()
                + 16);
        let waiting: usize = self
            .waiting
            .values()
            .flatten()
            .map(|c| {
                std::mem::size_of::<Call>()
                    + c.halves() * std::mem::size_of::<Half>()
                    + c.client.as_ref().map_or(0, |h| h.heap_bytes())
                    + c.server.as_ref().map_or(0, |h| h.heap_bytes())
            })
            .sum();
        cand + waiting + self.by_trace.len() * 64
    }
}

/// When a waiting call's wait started: its CLIENT half's arrival at the stitcher.
fn wait_from(call: &Call) -> u64 {
    call.client.as_ref().map_or(0, |c| c.arrived)
}

/// Whether a waiting call may be decided now: it waited `wait_nanos` and its node has
/// reported past its end by the slack, or it waited `max_wait_nanos`.
fn ready(cfg: &LinkConfig, progress: &FastMap<Arc<str>, u64>, call: &Call, now: u64) -> bool {
    let waited = now.saturating_sub(wait_from(call));
    if waited < cfg.wait_nanos {
        return false;
    }
    if waited >= cfg.max_wait_nanos {
        return true;
    }
    call.client.as_ref().is_none_or(|c| {
        progress
            .get(&**c.node())
            .is_some_and(|p| *p >= c.end_unix_nanos.saturating_add(cfg.progress_slack_nanos))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::tests::{ext, half, pod};
    use crate::model::Source;
    use weft_proto::v1::Side;

    const FRONTEND: &str = "10.244.1.9";

    /// A server span of the frontend pod.
    fn served(start: u64, end: u64, tp: Option<&str>) -> Half {
        half(
            Side::Server,
            ext("10.244.0.3:40000"),
            pod(&format!("{FRONTEND}:8080"), "frontend"),
            (start as u32, 1),
            start,
            end,
            tp,
        )
    }

    /// A call made by the frontend pod.
    fn call(start: u64, end: u64, tp: Option<&str>) -> Call {
        Call {
            client: Some(Box::new(half(
                Side::Client,
                pod(&format!("{FRONTEND}:37450"), "frontend"),
                ext("10.96.0.20:80"),
                (start as u32, 2),
                start,
                end,
                tp,
            ))),
            server: None,
        }
    }

    fn linker(reg: &Registry) -> Linker {
        Linker::new(
            LinkConfig {
                wait_nanos: 100,
                max_wait_nanos: 100,
                progress_slack_nanos: 0,
                retention_nanos: 10_000,
                max_pending: 1_000,
                max_candidates: 1_000,
            },
            reg,
        )
    }

    /// A linker that waits for its node's progress (up to 1,000 ns, slack 50 ns).
    fn progress_linker(reg: &Registry) -> Linker {
        Linker::new(
            LinkConfig {
                wait_nanos: 100,
                max_wait_nanos: 1_000,
                progress_slack_nanos: 50,
                retention_nanos: 10_000,
                max_pending: 1_000,
                max_candidates: 1_000,
            },
            reg,
        )
    }

    /// The call as it reaches the stitcher at `at`.
    fn arriving(mut c: Call, at: u64) -> Call {
        if let Some(h) = c.client.as_mut() {
            h.arrived = at;
        }
        c
    }

    fn decide(l: &mut Linker, c: Call, now: u64) -> Option<SpanLink> {
        let mut out = Vec::new();
        l.push(arriving(c, now), &mut out);
        assert!(out.is_empty(), "a call waits before it is linked");
        l.tick(now + 99, &mut out);
        assert!(out.is_empty());
        l.tick(now + 100, &mut out);
        assert_eq!(out.len(), 1);
        out.pop().unwrap().parent
    }

    #[test]
    fn a_call_waits_for_its_nodes_progress_not_only_the_clock() {
        let reg = Registry::new();
        let mut l = progress_linker(&reg);
        let mut out = Vec::new();
        let c = call(200, 300, None);
        l.note_progress(c.client.as_ref().unwrap());
        l.push(arriving(c, 0), &mut out);
        l.observe_server(&served(100, 900, None), 10);
        // The clock alone is not enough: the node has not reported past 300 + 50 yet.
        l.tick(500, &mut out);
        assert!(out.is_empty());
        // A second candidate the starved collector reports late still counts.
        // (Observed by the same collector as the call: the pod's node.)
        let mut late = served(150, 950, None);
        late.source = Source::new("node-a", "i-1");
        l.note_progress(&late);
        l.observe_server(&late, 600);
        l.tick(600, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].parent.unwrap().kind, LinkKind::Ambiguous);
        // Without progress, the most it waits is max_wait.
        let c = call(2_000, 2_100, None);
        l.push(arriving(c, 1_000), &mut out);
        l.tick(1_999, &mut out);
        assert_eq!(out.len(), 1);
        l.tick(2_000, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn the_wait_counts_from_the_client_halfs_arrival_not_from_the_join() {
        let reg = Registry::new();
        let mut l = progress_linker(&reg);
        let mut out = Vec::new();
        // The client half reached the stitcher at 0; the join held it until 900 (its
        // server half came late). The node reports no progress.
        l.push(arriving(call(200, 300, None), 0), &mut out);
        l.tick(999, &mut out);
        assert!(out.is_empty());
        l.tick(1_000, &mut out);
        assert_eq!(
            out.len(),
            1,
            "decided link_max_wait after arrival, not after the join"
        );
        // With the node's progress past the call, only the least wait counts, also from
        // the arrival: a call joined late is decided at once.
        let c = call(400, 500, None);
        let mut ahead = served(100, 600, None);
        ahead.source = Source::new("node-a", "i-1");
        l.note_progress(&ahead);
        l.push(arriving(c, 1_000), &mut out);
        l.tick(1_100, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_quiet_nodes_call_does_not_hold_up_another_nodes() {
        let reg = Registry::new();
        let mut l = progress_linker(&reg);
        let mut out = Vec::new();
        // First a call from node-a, whose collector reports nothing more.
        l.push(arriving(call(200, 300, None), 0), &mut out);
        // Then one from node-c, whose collector has reported well past it.
        let mut busy = call(200, 300, None);
        if let Some(h) = busy.client.as_mut() {
            h.source = Source::new("node-c", "i-1");
            l.note_progress(h);
            h.end_unix_nanos = 250;
        }
        l.push(arriving(busy, 0), &mut out);
        l.tick(100, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&**out[0].call.client.as_ref().unwrap().node(), "node-c");
        assert_eq!(l.pending(), 1);
        l.tick(1_000, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(l.pending(), 0);
    }

    #[test]
    fn traceparent_wins_over_timing() {
        let reg = Registry::new();
        let mut l = linker(&reg);
        let a = served(
            100,
            900,
            Some("00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-1111111111111111-01"),
        );
        let b = served(
            150,
            950,
            Some("00-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-2222222222222222-01"),
        );
        l.observe_server(&a, 0);
        l.observe_server(&b, 0);
        let c = call(
            200,
            300,
            Some("00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-3333333333333333-01"),
        );
        let link = decide(&mut l, c, 1).unwrap();
        assert_eq!(link.parent, a.span_id);
        assert_eq!(link.kind, LinkKind::Traceparent);
        assert_eq!(reg.snapshot()["link.traceparent"], 1);
    }

    #[test]
    fn the_only_containing_span_is_a_timing_link() {
        let reg = Registry::new();
        let mut l = linker(&reg);
        let a = served(100, 500, None);
        let b = served(600, 950, None);
        // A span of another pod containing the call must not count.
        let other = half(
            Side::Server,
            ext("10.244.0.3:40000"),
            pod("10.244.3.3:8080", "other"),
            (5, 5),
            50,
            999,
            None,
        );
        l.observe_server(&a, 0);
        l.observe_server(&b, 0);
        l.observe_server(&other, 0);
        let link = decide(&mut l, call(650, 700, None), 1).unwrap();
        assert_eq!(link.parent, b.span_id);
        assert_eq!(link.kind, LinkKind::Timing);
    }

    #[test]
    fn the_parent_may_arrive_after_the_call() {
        let reg = Registry::new();
        let mut l = linker(&reg);
        let mut out = Vec::new();
        l.push(arriving(call(200, 300, None), 0), &mut out);
        let a = served(100, 900, None);
        l.observe_server(&a, 50);
        l.tick(100, &mut out);
        assert_eq!(out[0].parent.unwrap().parent, a.span_id);
    }

    #[test]
    fn several_containing_spans_are_marked_ambiguous_and_the_latest_start_is_picked() {
        let reg = Registry::new();
        let mut l = linker(&reg);
        let a = served(100, 900, None);
        let b = served(150, 950, None);
        l.observe_server(&a, 0);
        l.observe_server(&b, 0);
        let link = decide(&mut l, call(200, 300, None), 1).unwrap();
        assert_eq!(link.kind, LinkKind::Ambiguous);
        assert_eq!(link.parent, b.span_id);
        assert_eq!(reg.snapshot()["link.ambiguous"], 1);
    }

    #[test]
    fn spans_of_very_different_durations_are_all_found() {
        let reg = Registry::new();
        let mut l = linker(&reg);
        // A long request (a long poll) and short ones in the same pod.
        let long = served(10, 9_000, None);
        let short = served(150, 950, None);
        let other_short = served(1_000, 1_100, None);
        for s in [&long, &short, &other_short] {
            l.observe_server(s, 0);
        }
        let link = decide(&mut l, call(200, 300, None), 1).unwrap();
        assert_eq!(link.kind, LinkKind::Ambiguous);
        assert_eq!(
            link.parent, short.span_id,
            "the latest start, across classes"
        );
        let link = decide(&mut l, call(5_000, 5_100, None), 1).unwrap();
        assert_eq!(link.kind, LinkKind::Timing);
        assert_eq!(link.parent, long.span_id);
        let link = decide(&mut l, call(1_010, 1_090, None), 1).unwrap();
        assert_eq!(link.kind, LinkKind::Ambiguous);
        assert_eq!(link.parent, other_short.span_id);
        // Expiry removes each from its class.
        let mut out = Vec::new();
        l.tick(10_000, &mut out);
        assert_eq!(l.candidates(), 0);
        assert!(l.pods.is_empty());
    }

    #[test]
    fn a_call_outside_every_server_span_is_a_root() {
        let reg = Registry::new();
        let mut l = linker(&reg);
        l.observe_server(&served(100, 250, None), 0);
        assert_eq!(decide(&mut l, call(200, 300, None), 1), None);
        assert_eq!(reg.snapshot()["link.root"], 1);
    }

    #[test]
    fn thread_attribution_resolves_what_timing_cannot() {
        let reg = Registry::new();
        let mut l = linker(&reg);
        let mut a = served(100, 900, None);
        a.set_thread(7, 70);
        let mut b = served(150, 950, None);
        b.set_thread(7, 71);
        l.observe_server(&a, 0);
        l.observe_server(&b, 0);
        let mut c = call(200, 300, None);
        if let Some(h) = c.client.as_mut() {
            h.set_thread(7, 70);
        }
        let link = decide(&mut l, c, 1).unwrap();
        assert_eq!(link.kind, LinkKind::Thread);
        assert_eq!(link.parent, a.span_id);
    }

    #[test]
    fn candidates_expire_and_server_only_calls_pass_through() {
        let reg = Registry::new();
        let mut l = linker(&reg);
        l.observe_server(&served(100, 900, None), 0);
        let mut out = Vec::new();
        l.tick(10_000, &mut out);
        assert_eq!(decide(&mut l, call(200, 300, None), 10_001), None);
        let s = Call {
            client: None,
            server: Some(Box::new(served(1, 2, None))),
        };
        l.push(s, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].parent.is_none());
    }
}
