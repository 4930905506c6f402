//! join: the client half and the server half of one request → one [`Call`].
//!
//! In: [`Half`]s in arrival order (from every node's collector), with the stitcher's
//! monotonic clock. Out: [`Call`]s: both halves of a request (joined), or one half whose
//! partner did not arrive within the join window.
//!
//! A request's CLIENT half (seen leaving the caller's pod, on the caller's node; its
//! server address may be a Service ClusterIP before DNAT) and its SERVER half (seen
//! entering the callee's pod, on the callee's node) share the TCP sequence numbers of the
//! request's and the response's first bytes: NAT rewrites addresses and ports, never
//! sequence numbers. So halves meet on a [`JoinKey`] `(request_seq, response_seq)`, and a
//! candidate pair is then confirmed ([`confirms`]):
//!
//! - by client address: when the server half's caller is a pod, no SNAT happened on the
//!   way and it must be the very address the client half saw leaving the caller (a
//!   sequence-number collision between two unrelated connections fails here);
//! - by time proximity: the server half's request must start after the client half's (and
//!   its response leave before the client sees it), allowing `max_skew` of clock skew
//!   between nodes.
//!
//! A half that finds no partner within `window` (a caller outside the cluster, a server
//! outside it, or a node without a collector) is emitted alone, never dropped, and counted
//! by the side that is missing: `join.unmatched.client` when no client side was seen (a
//! SERVER half alone: the caller is outside the cluster or unobserved),
//! `join.unmatched.server` when no server side was seen (a CLIENT half alone). The bound on
//! pending halves emits the oldest early (also unmatched, and counted in `join.evicted`).

use std::collections::VecDeque;
use std::collections::hash_map::Entry;

use weft_proto::v1::Side;

use crate::metrics::{Counter, Registry};
use crate::model::{FastMap, Half, SpanId};
use crate::resolve::PeerKind;

/// Where two halves of one request meet: the TCP sequence numbers of the request's and
/// of the response's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JoinKey {
    pub request_seq: u32,
    pub response_seq: u32,
}

impl JoinKey {
    pub fn of(half: &Half) -> JoinKey {
        JoinKey {
            request_seq: half.request_seq,
            response_seq: half.response_seq,
        }
    }
}

/// One request as the join stage could assemble it: at least one half is present.
#[derive(Debug, Clone)]
pub struct Call {
    /// Boxed: a call moves through several queues, a pointer moves cheaply.
    pub client: Option<Box<Half>>,
    pub server: Option<Box<Half>>,
}

impl Call {
    pub fn joined(&self) -> bool {
        self.client.is_some() && self.server.is_some()
    }

    /// Either half (the client's when both are present).
    pub fn any_half(&self) -> &Half {
        match (&self.client, &self.server) {
            (Some(c), _) => c,
            (None, Some(s)) => s,
            (None, None) => unreachable!("a Call always holds at least one half"),
        }
    }

    /// When the call's last half reached the stitch path: what the trace's idle window
    /// counts from.
    pub fn arrived(&self) -> u64 {
        let at = |h: &Option<Box<Half>>| h.as_ref().map_or(0, |h| h.arrived);
        at(&self.client).max(at(&self.server))
    }

    /// Number of halves (observed exchanges) in this call.
    pub fn halves(&self) -> usize {
        usize::from(self.client.is_some()) + usize::from(self.server.is_some())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct JoinConfig {
    /// How long a half waits for its partner (stitcher clock, from its arrival).
    pub window_nanos: u64,
    /// Tolerated clock difference between the nodes that saw the two halves.
    pub max_skew_nanos: u64,
    /// Most halves waiting at once; beyond it the oldest is emitted alone.
    pub max_pending: usize,
}

impl Default for JoinConfig {
    fn default() -> Self {
        JoinConfig {
            window_nanos: 1_000_000_000,
            max_skew_nanos: 250_000_000,
            max_pending: 1 << 20,
        }
    }
}

struct Counters {
    matched: Counter,
    unmatched_client: Counter,
    unmatched_server: Counter,
    evicted: Counter,
    rejected: Counter,
    unsided: Counter,
}

/// The join stage: holds halves until their partner arrives or the window closes.
pub struct Joiner {
    cfg: JoinConfig,
    /// Halves waiting, by key. Almost always one per key (no vector to allocate); a
    /// vector for collisions. Boxed on purpose: a half leaves as the same box it came in
    /// (into a `Call`).
    pending: FastMap<JoinKey, Waiting>,
    /// Expiry order: (deadline, key, span id). Deadlines are pushed in clock order, so
    /// the front is always the next to expire; entries of halves already joined are
    /// skipped when they surface.
    order: VecDeque<(u64, JoinKey, SpanId)>,
    len: usize,
    counters: Counters,
}

impl Joiner {
    pub fn new(cfg: JoinConfig, metrics: &Registry) -> Self {
        Joiner {
            cfg,
            pending: FastMap::default(),
            order: VecDeque::new(),
            len: 0,
            counters: Counters {
                matched: metrics.counter("join.matched", "requests whose two halves were joined"),
                unmatched_client: metrics.counter(
                    "join.unmatched.client",
                    "requests whose client side was not seen (server half alone: caller outside the cluster or unobserved)",
                ),
                unmatched_server: metrics.counter(
                    "join.unmatched.server",
                    "requests whose server side was not seen (client half alone: server outside the cluster or unobserved)",
                ),
                evicted: metrics.counter(
                    "join.evicted",
                    "halves emitted unjoined early because the pending bound was reached",
                ),
                rejected: metrics.counter(
                    "join.rejected",
                    "same-key halves not joined: client address or timing disagreed",
                ),
                unsided: metrics.counter(
                    "join.unsided",
                    "halves without a side, emitted alone",
                ),
            },
        }
    }

    /// Halves currently waiting for a partner.
    pub fn pending(&self) -> usize {
        self.len
    }

    /// Takes one half; returns the joined call when its partner was waiting, and any
    /// half the pending bound pushed out.
    pub fn push(&mut self, half: Box<Half>, now: u64, out: &mut Vec<Call>) {
        let side = half.side;
        if side == Side::Unspecified {
            self.counters.unsided.inc();
            out.push(Call {
                client: None,
                server: Some(half),
            });
            return;
        }
        let key = JoinKey::of(&half);
        if let Some(waiting) = self.pending.get_mut(&key) {
            let skew = self.cfg.max_skew_nanos;
            let partner = waiting.as_slice().iter().position(|w| {
                w.side != side
                    && match side {
                        Side::Client => confirms(&half, w, skew),
                        _ => confirms(w, &half, skew),
                    }
            });
            let rejected = partner.is_none() && waiting.as_slice().iter().any(|w| w.side != side);
            if rejected {
                self.counters.rejected.inc();
            }
            if let Some(other) = partner.and_then(|i| self.remove_at(key, i)) {
                self.counters.matched.inc();
                let (mut client, server) = if side == Side::Client {
                    (half, other)
                } else {
                    (other, half)
                };
                share_traceparent(&mut client, &server);
                out.push(Call {
                    client: Some(client),
                    server: Some(server),
                });
                return;
            }
        }
        self.order
            .push_back((now.saturating_add(self.cfg.window_nanos), key, half.span_id));
        match self.pending.entry(key) {
            Entry::Occupied(mut e) => e.get_mut().push(half),
            Entry::Vacant(e) => {
                e.insert(Waiting::One(half));
            }
        }
        self.len += 1;
        while self.len > self.cfg.max_pending {
            match self.order.pop_front() {
                Some((_, key, id)) => {
                    if let Some(h) = self.take(key, id) {
                        self.counters.evicted.inc();
                        out.push(self.alone(h));
                    }
                }
                None => break,
            }
        }
    }

    /// Emits every half whose window has closed, alone.
    pub fn expire(&mut self, now: u64, out: &mut Vec<Call>) {
        while let Some(&(deadline, key, id)) = self.order.front() {
            if deadline > now {
                break;
            }
            self.order.pop_front();
            if let Some(h) = self.take(key, id) {
                out.push(self.alone(h));
            }
        }
    }

    /// Emits everything still waiting (shutdown).
    pub fn flush(&mut self, out: &mut Vec<Call>) {
        self.expire(u64::MAX, out);
    }

    fn take(&mut self, key: JoinKey, id: SpanId) -> Option<Box<Half>> {
        let i = self
            .pending
            .get(&key)?
            .as_slice()
            .iter()
            .position(|h| h.span_id == id)?;
        self.remove_at(key, i)
    }

    /// Removes the `i`th half waiting under `key` (and the key when it was the last).
    fn remove_at(&mut self, key: JoinKey, i: usize) -> Option<Box<Half>> {
        let waiting = self.pending.get_mut(&key)?;
        let h = match waiting {
            Waiting::Many(v) if i < v.len() && v.len() > 1 => {
                let h = v.swap_remove(i);
                if v.len() == 1
                    && let Some(last) = v.pop()
                {
                    *waiting = Waiting::One(last);
                }
                h
            }
            Waiting::Many(_) => return None,
            Waiting::One(_) if i == 0 => match self.pending.remove(&key)? {
                Waiting::One(h) => h,
                Waiting::Many(_) => return None,
            },
            Waiting::One(_) => return None,
        };
        self.len -= 1;
        Some(h)
    }

    fn alone(&self, half: Box<Half>) -> Call {
        if half.side == Side::Client {
            self.counters.unmatched_server.inc();
            Call {
                client: Some(half),
                server: None,
            }
        } else {
            self.counters.unmatched_client.inc();
            Call {
                client: None,
                server: Some(half),
            }
        }
    }

    /// Approximate bytes held by pending halves (for the benchmark's memory figure).
    pub fn pending_bytes(&self) -> usize {
        let per_half = std::mem::size_of::<Half>()
            + std::mem::size_of::<Box<Half>>()
            + std::mem::size_of::<(u64, JoinKey, SpanId)>();
        let heap: usize = self
            .pending
            .values()
            .flat_map(|v| v.as_slice().iter())
            .map(|h| h.heap_bytes())
            .sum();
        self.len * per_half
            + heap
            + self.pending.capacity() * (std::mem::size_of::<(JoinKey, Waiting)>() + 1)
    }
}

/// The halves waiting under one key: one, or (sequence-number collisions) several.
enum Waiting {
    One(Box<Half>),
    #[allow(clippy::vec_box)]
    Many(Vec<Box<Half>>),
}

impl Waiting {
    fn as_slice(&self) -> &[Box<Half>] {
        match self {
            Waiting::One(h) => std::slice::from_ref(h),
            Waiting::Many(v) => v,
        }
    }

    fn push(&mut self, half: Box<Half>) {
        *self = match std::mem::replace(self, Waiting::Many(Vec::new())) {
            Waiting::One(first) => Waiting::Many(vec![first, half]),
            Waiting::Many(mut v) => {
                v.push(half);
                Waiting::Many(v)
            }
        };
    }
}

/// Both halves saw the same request bytes, but each capture may have missed the header
/// (a head cut short at one observation point): a `traceparent` only the server half
/// carries is the client half's too, and names the CLIENT span.
fn share_traceparent(client: &mut Half, server: &Half) {
    if client.traceparent().is_none()
        && let Some(&tp) = server.traceparent()
    {
        client.set_traceparent(Some(tp));
        client.span_id = tp.parent_id;
    }
}

/// Whether a client half and a server half with the same [`JoinKey`] are one request.
pub fn confirms(client: &Half, server: &Half, max_skew_nanos: u64) -> bool {
    // Where the callee saw a pod as caller, no SNAT happened: it must be the very
    // address the caller's node saw leaving the pod.
    if server.client.kind == PeerKind::Pod && server.client.addr != client.client.addr {
        return false;
    }
    // The request reaches the callee after it left the caller, and the response leaves
    // the callee before it reaches the caller (up to clock skew).
    server.start_unix_nanos.saturating_add(max_skew_nanos) >= client.start_unix_nanos
        && server.end_unix_nanos <= client.end_unix_nanos.saturating_add(max_skew_nanos)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Rare, Source, TraceParent};
    use crate::resolve::{Identity, PeerMeta};
    use std::net::SocketAddr;
    use std::sync::Arc;

    pub fn pod(addr: &str, workload: &str) -> Identity {
        Identity {
            kind: PeerKind::Pod,
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

    pub fn ext(addr: &str) -> Identity {
        Identity::external(addr.parse::<SocketAddr>().unwrap())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn half(
        side: Side,
        client: Identity,
        server: Identity,
        seqs: (u32, u32),
        start: u64,
        end: u64,
        traceparent: Option<&str>,
    ) -> Half {
        let tp = traceparent.and_then(TraceParent::parse);
        Half {
            span_id: match (side, tp) {
                (Side::Client, Some(tp)) => tp.parent_id,
                _ => SpanId::random(),
            },
            side,
            source: Source::new(
                if side == Side::Client {
                    "node-a"
                } else {
                    "node-b"
                },
                "i-1",
            ),
            exchange_id: u64::from(seqs.0),
            arrived: 0,
            client,
            server,
            request_seq: seqs.0,
            response_seq: seqs.1,
            start_unix_nanos: start,
            end_unix_nanos: end,
            method: Arc::from("GET"),
            path: "/api/items/42".into(),
            status: 200,
            request_bytes: 0,
            response_bytes: 10,
            rare: Rare::boxed(tp, 0, 0),
        }
    }

    fn joiner(reg: &Registry) -> Joiner {
        Joiner::new(
            JoinConfig {
                window_nanos: 1_000,
                max_skew_nanos: 100,
                max_pending: 100,
            },
            reg,
        )
    }

    #[test]
    fn joins_through_dnat_on_seqs() {
        let reg = Registry::new();
        let mut j = joiner(&reg);
        let mut out = Vec::new();
        // The client saw the ClusterIP, the server the pod: still one request.
        let c = half(
            Side::Client,
            pod("10.244.1.9:37450", "frontend"),
            ext("10.96.0.20:80"),
            (7, 9),
            1_000,
            2_000,
            None,
        );
        let s = half(
            Side::Server,
            pod("10.244.1.9:37450", "frontend"),
            pod("10.244.2.5:8080", "backend"),
            (7, 9),
            1_010,
            1_990,
            None,
        );
        j.push(Box::new(s), 0, &mut out);
        assert!(out.is_empty());
        j.push(Box::new(c), 10, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].joined());
        assert_eq!(out[0].client.as_ref().unwrap().side, Side::Client);
        assert_eq!(j.pending(), 0);
        assert_eq!(reg.snapshot()["join.matched"], 1);
    }

    #[test]
    fn a_traceparent_seen_only_by_the_server_half_names_the_client_span() {
        let reg = Registry::new();
        let mut j = joiner(&reg);
        let mut out = Vec::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = half(
            Side::Client,
            pod("10.244.1.9:37450", "frontend"),
            ext("10.96.0.20:80"),
            (7, 9),
            1_000,
            2_000,
            None,
        );
        let s = half(
            Side::Server,
            pod("10.244.1.9:37450", "frontend"),
            pod("10.244.2.5:8080", "backend"),
            (7, 9),
            1_010,
            1_990,
            Some(tp),
        );
        j.push(Box::new(c), 0, &mut out);
        j.push(Box::new(s), 1, &mut out);
        let client = out[0].client.as_ref().unwrap();
        assert_eq!(client.traceparent().copied(), TraceParent::parse(tp));
        assert_eq!(client.span_id.to_hex(), "00f067aa0ba902b7");
    }

    #[test]
    fn joins_through_snat_on_time_only() {
        let reg = Registry::new();
        let mut j = joiner(&reg);
        let mut out = Vec::new();
        let c = half(
            Side::Client,
            pod("10.244.1.9:37450", "frontend"),
            ext("10.96.0.20:80"),
            (1, 2),
            1_000,
            2_000,
            None,
        );
        // Masqueraded to the node address: not a pod, so time alone confirms.
        let s = half(
            Side::Server,
            ext("10.10.0.1:61000"),
            pod("10.244.2.5:8080", "backend"),
            (1, 2),
            1_010,
            1_990,
            None,
        );
        j.push(Box::new(c), 0, &mut out);
        j.push(Box::new(s), 1, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].joined());
    }

    #[test]
    fn rejects_same_seqs_from_another_pod_or_far_in_time() {
        let reg = Registry::new();
        let mut j = joiner(&reg);
        let mut out = Vec::new();
        let c = half(
            Side::Client,
            pod("10.244.1.9:37450", "frontend"),
            ext("10.96.0.20:80"),
            (1, 2),
            1_000,
            2_000,
            None,
        );
        let other_pod = half(
            Side::Server,
            pod("10.244.1.7:40000", "other"),
            pod("10.244.2.5:8080", "backend"),
            (1, 2),
            1_010,
            1_990,
            None,
        );
        let too_early = half(
            Side::Server,
            pod("10.244.1.9:37450", "frontend"),
            pod("10.244.2.5:8080", "backend"),
            (1, 2),
            500,
            1_990,
            None,
        );
        j.push(Box::new(c), 0, &mut out);
        j.push(Box::new(other_pod), 1, &mut out);
        j.push(Box::new(too_early), 2, &mut out);
        assert!(out.is_empty());
        assert_eq!(reg.snapshot()["join.rejected"], 2);
        j.expire(2_000, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|c| !c.joined()));
    }

    #[test]
    fn unmatched_halves_are_emitted_alone_after_the_window_and_counted_by_missing_side() {
        let reg = Registry::new();
        let mut j = joiner(&reg);
        let mut out = Vec::new();
        let c = half(
            Side::Client,
            pod("10.244.1.9:37450", "frontend"),
            ext("93.184.216.34:80"),
            (1, 2),
            1_000,
            2_000,
            None,
        );
        let s = half(
            Side::Server,
            ext("192.168.7.7:5555"),
            pod("10.244.2.5:8080", "backend"),
            (3, 4),
            1_000,
            2_000,
            None,
        );
        j.push(Box::new(c), 0, &mut out);
        j.push(Box::new(s), 500, &mut out);
        j.expire(999, &mut out);
        assert!(out.is_empty());
        j.expire(1_000, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].client.is_some() && out[0].server.is_none());
        // A client half alone: the server side is what was not seen.
        assert_eq!(reg.snapshot()["join.unmatched.server"], 1);
        assert_eq!(reg.snapshot()["join.unmatched.client"], 0);
        j.expire(1_500, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[1].server.is_some() && out[1].client.is_none());
        let m = reg.snapshot();
        assert_eq!(m["join.unmatched.client"], 1);
        assert_eq!(m["join.unmatched.server"], 1);
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn the_pending_bound_emits_the_oldest_and_counts_it() {
        let reg = Registry::new();
        let mut j = Joiner::new(
            JoinConfig {
                window_nanos: 1_000,
                max_skew_nanos: 100,
                max_pending: 2,
            },
            &reg,
        );
        let mut out = Vec::new();
        for i in 0..3u32 {
            let c = half(
                Side::Client,
                pod("10.244.1.9:37450", "frontend"),
                ext("10.96.0.20:80"),
                (i, i),
                1_000,
                2_000,
                None,
            );
            j.push(Box::new(c), u64::from(i), &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].client.as_ref().unwrap().request_seq, 0);
        assert_eq!(reg.snapshot()["join.evicted"], 1);
        assert_eq!(j.pending(), 2);
    }
}
