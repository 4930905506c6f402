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

use std::collections::{BTreeMap, HashMap, HashSet};

use weft_proto::v1::Side;

use super::histogram::Histogram;
use crate::model::{LinkKind, SpanId, SpanRecord};
use crate::resolve::{Identity, PeerKind};

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

/// One request for the map.
#[derive(Debug, Clone)]
pub struct EdgeSample {
    pub client: MapNode,
    pub server: MapNode,
    pub start_unix_nanos: u64,
    pub latency_nanos: u64,
    pub error: bool,
}

/// The edge samples that the spans `new` (span ids) of a trace contribute, given all of
/// the trace's spans (`all`, which includes them).
pub fn samples(all: &[SpanRecord], new: &HashSet<SpanId>) -> Vec<EdgeSample> {
    // CLIENT span id → the SERVER half joined under it.
    let joined_server: HashMap<SpanId, &SpanRecord> = all
        .iter()
        .filter(|s| s.side == Side::Server && s.link == LinkKind::Join)
        .filter_map(|s| Some((s.parent?, s)))
        .collect();
    let clients: HashSet<SpanId> = all
        .iter()
        .filter(|s| s.side == Side::Client)
        .map(|s| s.span_id)
        .collect();
    let mut out = Vec::new();
    for span in all.iter().filter(|s| new.contains(&s.span_id)) {
        let (client, server) = match span.side {
            Side::Client => {
                let server = joined_server
                    .get(&span.span_id)
                    .map_or(&span.server, |s| &s.server);
                (&span.client, server)
            }
            Side::Server => {
                let under_its_client = span.link == LinkKind::Join
                    && span.parent.is_some_and(|p| clients.contains(&p));
                if under_its_client {
                    continue;
                }
                (&span.client, &span.server)
            }
            Side::Unspecified => continue,
        };
        out.push(EdgeSample {
            client: MapNode::of(client),
            server: MapNode::of(server),
            start_unix_nanos: span.start_unix_nanos,
            latency_nanos: span.end_unix_nanos.saturating_sub(span.start_unix_nanos),
            error: span.error,
        });
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EdgeKey {
    client: MapNode,
    server: MapNode,
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

/// What happened to the samples given to [`MinuteBuckets::record`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Older than the retention: not recorded.
    pub expired: u64,
    /// Their minute already held `max_edges` other edges: not recorded.
    pub edges_full: u64,
}

/// Per-minute edge statistics, bounded by retention and edges per minute.
#[derive(Debug)]
pub struct MinuteBuckets {
    minutes: BTreeMap<u64, HashMap<EdgeKey, EdgeStats>>,
    retention_minutes: u64,
    max_edges: usize,
}

impl MinuteBuckets {
    pub fn new(retention_minutes: u64, max_edges: usize) -> Self {
        MinuteBuckets {
            minutes: BTreeMap::new(),
            retention_minutes: retention_minutes.max(1),
            max_edges: max_edges.max(1),
        }
    }

    /// Oldest minute still kept at `now`.
    fn first_kept(&self, now_unix_nanos: u64) -> u64 {
        (now_unix_nanos / MINUTE_NANOS).saturating_sub(self.retention_minutes)
    }

    /// Adds samples and drops buckets that fell out of the retention. Cheap: one hash
    /// lookup and a histogram increment per sample.
    pub fn record(&mut self, samples: Vec<EdgeSample>, now_unix_nanos: u64) -> RecordOutcome {
        let first = self.first_kept(now_unix_nanos);
        while let Some(oldest) = self.minutes.first_entry() {
            if *oldest.key() >= first {
                break;
            }
            oldest.remove();
        }
        let mut outcome = RecordOutcome::default();
        for s in samples {
            let minute = s.start_unix_nanos / MINUTE_NANOS;
            if minute < first {
                outcome.expired += 1;
                continue;
            }
            let bucket = self.minutes.entry(minute).or_default();
            let key = EdgeKey {
                client: s.client,
                server: s.server,
            };
            if !bucket.contains_key(&key) && bucket.len() >= self.max_edges {
                outcome.edges_full += 1;
                continue;
            }
            let stats = bucket.entry(key).or_default();
            stats.requests += 1;
            stats.errors += u64::from(s.error);
            stats.latency.record(s.latency_nanos);
        }
        outcome
    }

    /// Minutes (keys) that overlap `[now - window, ∞)`.
    pub fn minutes_since(&self, window_nanos: u64, now_unix_nanos: u64) -> Vec<u64> {
        let from = now_unix_nanos.saturating_sub(window_nanos) / MINUTE_NANOS;
        self.minutes.range(from..).map(|(&m, _)| m).collect()
    }

    /// Distinct edges over all kept minutes (for the occupancy gauge).
    pub fn edge_entries(&self) -> usize {
        self.minutes.values().map(HashMap::len).sum()
    }

    /// Adds one minute's statistics into `acc`.
    pub fn merge_minute_into(&self, minute: u64, acc: &mut MapAccumulator) {
        if let Some(bucket) = self.minutes.get(&minute) {
            for (key, stats) in bucket {
                match acc.edges.get_mut(key) {
                    Some(a) => a.merge(stats),
                    None => {
                        acc.edges.insert(key.clone(), stats.clone());
                    }
                }
            }
        }
    }
}

/// Edge statistics merged over several minutes, turned into a [`ServiceMap`] at the end.
#[derive(Debug, Default)]
pub struct MapAccumulator {
    edges: HashMap<EdgeKey, EdgeStats>,
}

impl MapAccumulator {
    pub fn finish(self) -> ServiceMap {
        let mut nodes: BTreeMap<String, MapNode> = BTreeMap::new();
        let mut edges = Vec::with_capacity(self.edges.len());
        for (key, stats) in self.edges {
            edges.push(Edge {
                client: key.client.id.clone(),
                server: key.server.id.clone(),
                requests: stats.requests,
                errors: stats.errors,
                p50_nanos: stats.latency.quantile(0.50),
                p90_nanos: stats.latency.quantile(0.90),
                p99_nanos: stats.latency.quantile(0.99),
            });
            for node in [key.client, key.server] {
                nodes.entry(node.id.clone()).or_insert(node);
            }
        }
        edges.sort_by(|a, b| (&a.client, &a.server).cmp(&(&b.client, &b.server)));
        ServiceMap {
            nodes: nodes.into_values().collect(),
            edges,
        }
    }
}
