//! The service map: who calls whom, how often, how many fail, how fast.
//!
//! In: the spans of a stored trace that the map has not seen yet.
//! Out: [`ServiceMap`] edges (client → server) over a look-back window, with nodes.
//!
//! One request is one edge sample, counted once:
//! - A CLIENT span gives `client identity → server`, where the server is the pod
//!   workload of the SERVER half joined to it (its child with link `join`) when that
//!   half is in the trace, and otherwise what the client addressed (a Service name, or
//!   an external IP). So a joined call through a Service shows the workload that
//!   served it, and an unjoined one shows the Service. Latency is the client's view.
//! - A SERVER span whose CLIENT half is not in the trace (a caller outside the cluster,
//!   or a node without a collector) gives `caller → server identity`, with the
//!   server's latency. A SERVER span under its CLIENT half adds nothing (the client
//!   span already counted the request).
//!
//! Bounds: samples go into per-minute buckets (by span start); each bucket holds at most
//! `max_edges` distinct edges, each with a request count, an error count and a
//! [`Histogram`] of latencies; buckets older than the retention are dropped. A query
//! merges the buckets that overlap the window, so the window is effectively rounded up
//! to whole minutes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use weft_proto::v1::Side;

use super::histogram::Histogram;
use super::traces::StoredTrace;
use crate::model::{FastMap, FastSet, LinkKind, SpanId, SpanRecord};
use crate::resolve::{Identity, PeerKind, PeerMeta};

const MINUTE_NANOS: u64 = 60_000_000_000;

/// What a service-map node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKind {
    /// A pod's workload (Deployment, StatefulSet, ... or the pod itself).
    Workload,
    /// A Service that was addressed but whose serving pod is unknown.
    Service,
    /// A node address (host-network pods, kubelet).
    Node,
    /// An address that resolves to nothing in the cluster.
    External,
}

impl NodeKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeKind::Workload => "workload",
            NodeKind::Service => "service",
            NodeKind::Node => "node",
            NodeKind::External => "external",
        }
    }
}

/// A vertex of the map. Ids: `workload.namespace` for workloads, `svc:name.namespace`
/// for Services, the node name for nodes, the IP for external peers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MapNode {
    pub id: String,
    pub kind: NodeKind,
    pub namespace: String,
    pub name: String,
}

impl MapNode {
    pub fn of(identity: &Identity) -> Self {
        let kind = match (&identity.meta, identity.kind) {
            (None, _) | (_, PeerKind::External) => NodeKind::External,
            (Some(_), PeerKind::Pod) => NodeKind::Workload,
            (Some(_), PeerKind::Service) => NodeKind::Service,
            (Some(_), PeerKind::Node) => NodeKind::Node,
        };
        match identity.meta.as_deref() {
            Some(m) if kind != NodeKind::External => MapNode {
                // A Service and the Deployment behind it often share a name: keep
                // their nodes apart.
                id: match kind {
                    NodeKind::Service => format!("svc:{}", identity.name()),
                    _ => identity.name(),
                },
                kind,
                namespace: m.namespace.clone(),
                name: m.workload.clone(),
            },
            _ => {
                let ip = identity.addr.ip().to_string();
                MapNode {
                    id: ip.clone(),
                    kind: NodeKind::External,
                    namespace: String::new(),
                    name: ip,
                }
            }
        }
    }
}

/// One request for the map: references into a stored trace's spans.
#[derive(Debug, Clone, Copy)]
pub struct EdgeSample<'a> {
    pub client: &'a Identity,
    pub server: &'a Identity,
    pub start_unix_nanos: u64,
    pub latency_nanos: u64,
    pub error: bool,
}

/// The edge samples that the new spans of a trace contribute: `new[i]` tells whether
/// `trace.spans()`'s i-th span is new (the others were counted before).
pub fn samples<'a>(trace: &'a StoredTrace, new: &[bool]) -> Vec<EdgeSample<'a>> {
    if !new.iter().any(|&n| n) {
        return Vec::new();
    }
    let lookup = Lookup::new(trace);
    let mut out = Vec::new();
    for (span, _) in trace.spans().zip(new).filter(|(_, n)| **n) {
        let (client, server) = match span.side {
            Side::Client => {
                let server = lookup
                    .joined_server(span.span_id)
                    .map_or(&span.server, |s| &s.server);
                (&span.client, server)
            }
            Side::Server => {
                let under_its_client =
                    span.link == LinkKind::Join && span.parent.is_some_and(|p| lookup.is_client(p));
                if under_its_client {
                    continue;
                }
                (&span.client, &span.server)
            }
            Side::Unspecified => continue,
        };
        out.push(EdgeSample {
            client,
            server,
            start_unix_nanos: span.start_unix_nanos,
            latency_nanos: span.end_unix_nanos.saturating_sub(span.start_unix_nanos),
            error: span.error,
        });
    }
    out
}

/// Finds a CLIENT span's joined SERVER half and whether a span id is a CLIENT span:
/// by scanning a small trace (most are a few spans: no allocation, no hashing), through
/// hash maps in a large one.
enum Lookup<'a> {
    Scan(&'a StoredTrace),
    Maps {
        /// CLIENT span id → the SERVER half joined under it.
        joined_server: FastMap<SpanId, &'a SpanRecord>,
        clients: FastSet<SpanId>,
    },
}

impl<'a> Lookup<'a> {
    /// Largest trace that is scanned.
    const SCAN_MAX: usize = 16;

    fn new(trace: &'a StoredTrace) -> Self {
        if trace.span_count() <= Self::SCAN_MAX {
            return Lookup::Scan(trace);
        }
        Lookup::Maps {
            joined_server: trace
                .spans()
                .filter(|s| is_joined_server(s))
                .filter_map(|s| Some((s.parent?, s)))
                .collect(),
            clients: trace
                .spans()
                .filter(|s| s.side == Side::Client)
                .map(|s| s.span_id)
                .collect(),
        }
    }

    fn joined_server(&self, client: SpanId) -> Option<&'a SpanRecord> {
        match self {
            Lookup::Scan(t) => t
                .spans()
                .find(|s| is_joined_server(s) && s.parent == Some(client)),
            Lookup::Maps { joined_server, .. } => joined_server.get(&client).copied(),
        }
    }

    fn is_client(&self, id: SpanId) -> bool {
        match self {
            Lookup::Scan(t) => t.spans().any(|s| s.side == Side::Client && s.span_id == id),
            Lookup::Maps { clients, .. } => clients.contains(&id),
        }
    }
}

fn is_joined_server(s: &SpanRecord) -> bool {
    s.side == Side::Server && s.link == LinkKind::Join
}

/// An edge by its nodes' numbers in the [`NodeInterner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct EdgeKey {
    client: u32,
    server: u32,
}

/// What a map node is looked up by: the resolved meta it names (its address) and the
/// node kind, or the IP of an external peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum IdentityKey {
    Named { meta: usize, kind: NodeKind },
    External(IpAddr),
}

impl IdentityKey {
    fn of(identity: &Identity) -> Self {
        match (&identity.meta, identity.kind) {
            (None, _) | (_, PeerKind::External) => IdentityKey::External(identity.addr.ip()),
            (Some(m), kind) => IdentityKey::Named {
                meta: Arc::as_ptr(m) as usize,
                kind: match kind {
                    PeerKind::Service => NodeKind::Service,
                    PeerKind::Node => NodeKind::Node,
                    _ => NodeKind::Workload,
                },
            },
        }
    }
}

/// Map nodes by number, so that an edge key is two integers and recording a request
/// neither builds nor hashes strings: an identity is found by [`IdentityKey`] (its
/// meta's address, held alive by the entry, or its IP) and only a new one builds its
/// [`MapNode`] (which identities with equal names share).
///
/// Bounds: numbers are handed out as nodes appear; [`MinuteBuckets`] compacts the
/// interner to the nodes its buckets still use once it has grown to twice that (see
/// [`MinuteBuckets::compact`]), and the identity lookup is emptied when it outgrows the
/// nodes (pods that come and go leave metas behind).
#[derive(Debug, Default)]
pub struct NodeInterner {
    by_identity: FastMap<IdentityKey, (u32, Option<Arc<PeerMeta>>)>,
    by_node: HashMap<Arc<MapNode>, u32>,
    nodes: Vec<Arc<MapNode>>,
}

impl NodeInterner {
    /// The number of `identity`'s node; the same for every identity whose node is equal.
    pub fn intern(&mut self, identity: &Identity) -> u32 {
        let key = IdentityKey::of(identity);
        if let Some((id, _)) = self.by_identity.get(&key) {
            return *id;
        }
        let id = self.intern_node(MapNode::of(identity));
        self.by_identity.insert(key, (id, identity.meta.clone()));
        id
    }

    fn intern_node(&mut self, node: MapNode) -> u32 {
        if let Some(&id) = self.by_node.get(&node) {
            return id;
        }
        let id = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        let node = Arc::new(node);
        self.nodes.push(node.clone());
        self.by_node.insert(node, id);
        id
    }

    /// The node with this number.
    pub fn node(&self, id: u32) -> &Arc<MapNode> {
        &self.nodes[id as usize]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Identities cached in the lookup.
    pub fn identities(&self) -> usize {
        self.by_identity.len()
    }

    /// Keeps only the nodes for which `live` holds, renumbered in order; returns the
    /// new number of each old one (`u32::MAX` for the dropped).
    fn retain(&mut self, live: &[bool]) -> Vec<u32> {
        let mut renumber = vec![u32::MAX; self.nodes.len()];
        let old = std::mem::take(&mut self.nodes);
        self.by_node.clear();
        for (i, node) in old.into_iter().enumerate() {
            if live.get(i).copied().unwrap_or(false) {
                renumber[i] = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
                self.by_node.insert(node.clone(), renumber[i]);
                self.nodes.push(node);
            }
        }
        self.by_identity.retain(|_, (id, _)| {
            *id = renumber[*id as usize];
            *id != u32::MAX
        });
        renumber
    }
}

#[derive(Debug, Clone, Default)]
struct EdgeStats {
    requests: u64,
    errors: u64,
    latency: Histogram,
}

impl EdgeStats {
    fn merge(&mut self, other: &EdgeStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
    }
}

/// One edge of a [`ServiceMap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub client: String,
    pub server: String,
    pub requests: u64,
    pub errors: u64,
    pub p50_nanos: u64,
    pub p90_nanos: u64,
    pub p99_nanos: u64,
}

/// The map over a window: nodes sorted by id, edges by (client, server).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceMap {
    pub nodes: Vec<MapNode>,
    pub edges: Vec<Edge>,
}

#[cfg(test)]
impl ServiceMap {
    /// (client, server, requests) per edge: what the tests compare.
    pub(crate) fn edge_counts(&self) -> Vec<(&str, &str, u64)> {
        self.edges
            .iter()
            .map(|e| (e.client.as_str(), e.server.as_str(), e.requests))
            .collect()
    }
}

/// What happened to the samples given to [`MinuteBuckets::record`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Older than the retention: not recorded.
    pub expired: u64,
    /// Their minute already held `max_edges` other edges: not recorded.
    pub edges_full: u64,
}

/// Fewest interned nodes before the interner is compacted.
const MIN_COMPACT_NODES: usize = 4096;

/// Per-minute edge statistics, bounded by retention and edges per minute.
#[derive(Debug)]
pub struct MinuteBuckets {
    minutes: BTreeMap<u64, FastMap<EdgeKey, EdgeStats>>,
    nodes: NodeInterner,
    /// Compact the interner once it holds this many nodes.
    compact_at: usize,
    retention_minutes: u64,
    max_edges: usize,
}

impl MinuteBuckets {
    pub fn new(retention_minutes: u64, max_edges: usize) -> Self {
        MinuteBuckets {
            minutes: BTreeMap::new(),
            nodes: NodeInterner::default(),
            compact_at: MIN_COMPACT_NODES,
            retention_minutes: retention_minutes.max(1),
            max_edges: max_edges.max(1),
        }
    }

    /// Oldest minute still kept at `now`.
    fn first_kept(&self, now_unix_nanos: u64) -> u64 {
        (now_unix_nanos / MINUTE_NANOS).saturating_sub(self.retention_minutes)
    }

    /// Adds samples and drops buckets that fell out of the retention. Cheap: two
    /// identity lookups, one edge lookup and a histogram increment per sample.
    pub fn record(&mut self, samples: &[EdgeSample<'_>], now_unix_nanos: u64) -> RecordOutcome {
        let first = self.first_kept(now_unix_nanos);
        let mut expired_minutes = false;
        while let Some(oldest) = self.minutes.first_entry() {
            if *oldest.key() >= first {
                break;
            }
            oldest.remove();
            expired_minutes = true;
        }
        let mut outcome = RecordOutcome::default();
        for s in samples {
            let minute = s.start_unix_nanos / MINUTE_NANOS;
            if minute < first {
                outcome.expired += 1;
                continue;
            }
            let key = EdgeKey {
                client: self.nodes.intern(s.client),
                server: self.nodes.intern(s.server),
            };
            let bucket = self.minutes.entry(minute).or_default();
            if !bucket.contains_key(&key) && bucket.len() >= self.max_edges {
                outcome.edges_full += 1;
                continue;
            }
            let stats = bucket.entry(key).or_default();
            stats.requests += 1;
            stats.errors += u64::from(s.error);
            stats.latency.record(s.latency_nanos);
        }
        let grown = self.nodes.len() >= self.compact_at;
        let freed = expired_minutes && self.nodes.len() >= MIN_COMPACT_NODES;
        if grown || freed || self.nodes.identities() >= 2 * self.compact_at {
            self.compact();
        }
        outcome
    }

    /// Drops the interned nodes that no kept bucket uses (and the cached identities),
    /// renumbering the rest. Runs when the interner has grown to twice the nodes in use
    /// (at least [`MIN_COMPACT_NODES`]), so its cost is spread over as many new nodes, and
    /// when a minute expired while it held that many (at most once a minute).
    pub fn compact(&mut self) {
        let mut live = vec![false; self.nodes.len()];
        for key in self.minutes.values().flat_map(FastMap::keys) {
            live[key.client as usize] = true;
            live[key.server as usize] = true;
        }
        let renumber = self.nodes.retain(&live);
        for bucket in self.minutes.values_mut() {
            *bucket = std::mem::take(bucket)
                .into_iter()
                .map(|(k, v)| {
                    let key = EdgeKey {
                        client: renumber[k.client as usize],
                        server: renumber[k.server as usize],
                    };
                    (key, v)
                })
                .collect();
        }
        // Identities are a cache: rebuilt from the next samples.
        if self.nodes.identities() >= self.compact_at {
            self.nodes.by_identity.clear();
        }
        self.compact_at = (2 * self.nodes.len()).max(MIN_COMPACT_NODES);
    }

    /// Nodes the interner holds (for tests and the bound).
    pub fn interned_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Minutes (keys) that overlap `[now - window, ∞)`.
    pub fn minutes_since(&self, window_nanos: u64, now_unix_nanos: u64) -> Vec<u64> {
        let from = now_unix_nanos.saturating_sub(window_nanos) / MINUTE_NANOS;
        self.minutes.range(from..).map(|(&m, _)| m).collect()
    }

    /// Distinct edges over all kept minutes (for the occupancy gauge).
    pub fn edge_entries(&self) -> usize {
        self.minutes.values().map(FastMap::len).sum()
    }

    /// Adds one minute's statistics into `acc`.
    pub fn merge_minute_into(&self, minute: u64, acc: &mut MapAccumulator) {
        if let Some(bucket) = self.minutes.get(&minute) {
            for (key, stats) in bucket {
                let nodes = (
                    self.nodes.node(key.client).clone(),
                    self.nodes.node(key.server).clone(),
                );
                match acc.edges.get_mut(&nodes) {
                    Some(a) => a.merge(stats),
                    None => {
                        acc.edges.insert(nodes, stats.clone());
                    }
                }
            }
        }
    }
}

/// Edge statistics merged over several minutes, turned into a [`ServiceMap`] at the end.
/// Keyed by the nodes themselves: the interner may renumber between two minutes.
#[derive(Debug, Default)]
pub struct MapAccumulator {
    edges: HashMap<(Arc<MapNode>, Arc<MapNode>), EdgeStats>,
}

impl MapAccumulator {
    pub fn finish(self) -> ServiceMap {
        let mut nodes: BTreeMap<String, MapNode> = BTreeMap::new();
        let mut edges = Vec::with_capacity(self.edges.len());
        for ((client, server), stats) in self.edges {
            edges.push(Edge {
                client: client.id.clone(),
                server: server.id.clone(),
                requests: stats.requests,
                errors: stats.errors,
                p50_nanos: stats.latency.quantile(0.50),
                p90_nanos: stats.latency.quantile(0.90),
                p99_nanos: stats.latency.quantile(0.99),
            });
            for node in [client, server] {
                nodes
                    .entry(node.id.clone())
                    .or_insert_with(|| MapNode::clone(&node));
            }
        }
        edges.sort_by(|a, b| (&a.client, &a.server).cmp(&(&b.client, &b.server)));
        ServiceMap {
            nodes: nodes.into_values().collect(),
            edges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const NOW: u64 = 1_795_000_000 * SEC;

    fn identity(kind: PeerKind, addr: &str, ns: &str, workload: &str) -> Identity {
        Identity {
            kind,
            addr: addr.parse().unwrap(),
            meta: Some(Arc::new(PeerMeta {
                namespace: ns.into(),
                workload: workload.into(),
                ..Default::default()
            })),
        }
    }

    fn external(addr: &str) -> Identity {
        Identity::external(addr.parse().unwrap())
    }

    #[test]
    fn the_interner_numbers_equal_nodes_alike() {
        let mut n = NodeInterner::default();
        let a = identity(PeerKind::Pod, "10.0.0.1:8080", "demo", "cart");
        let mut a_other_port = a.clone();
        a_other_port.addr = "10.0.0.1:9090".parse().unwrap();
        // Another pod of the same workload: another meta, the same node.
        let a_other_pod = identity(PeerKind::Pod, "10.0.0.2:8080", "demo", "cart");
        // The Service of the same name is another node.
        let svc = identity(PeerKind::Service, "10.96.0.1:80", "demo", "cart");
        let ext = external("192.0.2.1:443");
        let ext_other_port = external("192.0.2.1:80");
        let id = n.intern(&a);
        assert_eq!(n.intern(&a_other_port), id);
        assert_eq!(n.intern(&a_other_pod), id);
        let svc_id = n.intern(&svc);
        assert_ne!(svc_id, id);
        let ext_id = n.intern(&ext);
        assert_eq!(n.intern(&ext_other_port), ext_id);
        assert_eq!(n.len(), 3);
        assert_eq!(**n.node(id), MapNode::of(&a));
        assert_eq!(n.node(svc_id).id, "svc:cart.demo");
        assert_eq!(n.node(ext_id).id, "192.0.2.1");
    }

    /// A sample of one request from `client` to `server` at `start`.
    fn sample<'a>(client: &'a Identity, server: &'a Identity, start: u64) -> EdgeSample<'a> {
        EdgeSample {
            client,
            server,
            start_unix_nanos: start,
            latency_nanos: 1_000,
            error: false,
        }
    }

    fn map_at(b: &MinuteBuckets, window: u64, now: u64) -> ServiceMap {
        let mut acc = MapAccumulator::default();
        for m in b.minutes_since(window, now) {
            b.merge_minute_into(m, &mut acc);
        }
        acc.finish()
    }

    #[test]
    fn compaction_drops_expired_nodes_and_keeps_live_edges_right() {
        let mut b = MinuteBuckets::new(2, 100_000);
        let server = identity(PeerKind::Pod, "10.0.0.1:8080", "demo", "api");
        // Many one-off external callers in an old minute...
        let callers: Vec<Identity> = (0..MIN_COMPACT_NODES as u32)
            .map(|i| external(&format!("198.51.{}.{}:1000", i / 250, i % 250)))
            .collect();
        let old: Vec<EdgeSample> = callers.iter().map(|c| sample(c, &server, NOW)).collect();
        assert_eq!(b.record(&old, NOW), RecordOutcome::default());
        // ...and, three minutes later (the old minute expired), a few that stay.
        let later = NOW + 180 * SEC;
        let frontend = identity(PeerKind::Pod, "10.0.0.5:40000", "demo", "web");
        let live = [
            sample(&frontend, &server, later),
            sample(&frontend, &server, later),
            sample(&callers[7], &server, later),
        ];
        assert_eq!(b.record(&live, later), RecordOutcome::default());
        assert!(
            b.interned_nodes() <= 4,
            "expired callers dropped: {} nodes",
            b.interned_nodes()
        );
        let map = map_at(&b, 60 * SEC, later);
        assert_eq!(
            map.edge_counts(),
            vec![("198.51.0.7", "api.demo", 1), ("web.demo", "api.demo", 2)]
        );
        // Renumbered nodes still count into the same edges.
        b.record(&[sample(&frontend, &server, later)], later);
        let map = map_at(&b, 60 * SEC, later);
        assert_eq!(map.edges[1].requests, 3);
        assert_eq!(map.nodes.len(), 3);
    }
}
