//! Synthetic collectors for in-process tests and the benchmark: what two or more nodes'
//! collectors would report for chains of HTTP calls through Service DNAT.
//!
//! In: a [`ChainSpec`] (hops, callers, concurrency, propagation, SNAT) and a start time.
//! Out: per-node [`ObservedBatch`]es in the order collectors would send them (each node's
//! exchanges by response time), the inventory YAML that names the pods, and the ground
//! truth (`url.path` carries the request number: `/hop<i>/<request>`).
//!
//! Layout: hop `i` calls Service `svc<i>` (ClusterIP `10.96.0.<10+i>:80`) whose single pod
//! `svc<i>-0` (`10.244.<1 + (i+1)%2>.<10+i>:8080`) runs on the other node than its caller,
//! so every hop crosses nodes. Callers are pods `caller-<k>` on node-a. Request and
//! response sequence numbers are random, as TCP makes them.

use std::sync::Arc;

use rand::Rng;
use weft_proto::v1;

use crate::model::{ObservedBatch, SpanId, TraceId};

#[derive(Debug, Clone)]
pub struct ChainSpec {
    /// Services in the chain (3: frontend → backend → store).
    pub hops: usize,
    /// Requests generated.
    pub requests: usize,
    /// Requests in flight at once (1: strictly sequential).
    pub concurrency: usize,
    /// Caller pods sending the requests (round robin).
    pub callers: usize,
    /// Duration of the innermost server span.
    pub leaf_nanos: u64,
    /// Time each server spends before and after its downstream call.
    pub work_nanos: u64,
    /// One-way network time between nodes.
    pub net_nanos: u64,
    /// The load sends a `traceparent` and every service propagates it.
    pub propagate: bool,
    /// Callers' addresses are masqueraded to node-a's address on the way.
    pub snat: bool,
    /// Exchanges per batch a collector sends.
    pub batch: usize,
}

impl Default for ChainSpec {
    fn default() -> Self {
        ChainSpec {
            hops: 3,
            requests: 100,
            concurrency: 1,
            callers: 1,
            leaf_nanos: 1_000_000,
            work_nanos: 200_000,
            net_nanos: 50_000,
            propagate: false,
            snat: false,
            batch: 64,
        }
    }
}

pub const NODES: [&str; 2] = ["node-a", "node-b"];

fn node_of_hop(i: usize) -> usize {
    (i + 1) % 2
}

pub fn service_ip(i: usize) -> [u8; 4] {
    [10, 96, 0, 10 + i as u8]
}

pub fn pod_ip(i: usize) -> [u8; 4] {
    [10, 244, 1 + node_of_hop(i) as u8, 10 + i as u8]
}

pub fn caller_ip(k: usize) -> [u8; 4] {
    [10, 244, 1, 100 + (k % 100) as u8]
}

/// Names for the synthetic cluster, in the static inventory format.
pub fn inventory_yaml(spec: &ChainSpec) -> String {
    let ip = |b: [u8; 4]| format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3]);
    let mut y = String::from("pods:\n");
    for k in 0..spec.callers.min(100) {
        y += &format!(
            "  - {{name: caller-{k}, namespace: demo, workload: caller, node: node-a, ip: {}}}\n",
            ip(caller_ip(k))
        );
    }
    for i in 0..spec.hops {
        y += &format!(
            "  - {{name: svc{i}-0, namespace: demo, workload: svc{i}, node: {}, ip: {}}}\n",
            NODES[node_of_hop(i)],
            ip(pod_ip(i))
        );
    }
    y += "services:\n";
    for i in 0..spec.hops {
        y += &format!(
            "  - {{name: svc{i}, namespace: demo, cluster_ip: {}, ports: [{{port: 80, target_port: 8080}}]}}\n",
            ip(service_ip(i))
        );
    }
    y += "nodes:\n  - {name: node-a, ip: 10.10.0.1}\n  - {name: node-b, ip: 10.10.0.2}\n";
    y
}

fn ep(ip: [u8; 4], port: u32) -> Option<v1::Endpoint> {
    Some(v1::Endpoint {
        ip: ip.to_vec(),
        port,
    })
}

/// One node's stream of exchanges.
struct NodeStream {
    exchanges: Vec<v1::Exchange>,
}

/// Generates the batches every node would send for `spec`, starting at `t0` (Unix nanos).
/// Returns the batches interleaved across nodes in response-time order.
pub fn generate(spec: &ChainSpec, t0: u64) -> Vec<ObservedBatch> {
    let mut rng = rand::rng();
    let mut nodes: Vec<NodeStream> = NODES
        .iter()
        .map(|_| NodeStream {
            exchanges: Vec::new(),
        })
        .collect();
    // Mean duration of one request as its caller sees it, for the arrival rate.
    let mean_total =
        spec.leaf_nanos + spec.hops as u64 * (2 * spec.work_nanos + 2 * spec.net_nanos);
    let mean_gap = (mean_total / spec.concurrency.max(1) as u64).max(1);
    let mut id = 0u64;
    let mut next_start = t0;
    for r in 0..spec.requests {
        let caller = r % spec.callers.max(1);
        let trace = TraceId::random();
        // Work before and after the downstream call at each hop, and the leaf's time:
        // uniform in [0.25, 1.75] × the spec's means, so concurrent requests overlap
        // irregularly, as real ones do.
        let mut jitter = |mean: u64| mean / 4 + rng.random_range(0..=mean.max(1) * 3 / 2);
        let before: Vec<u64> = (0..spec.hops).map(|_| jitter(spec.work_nanos)).collect();
        let after: Vec<u64> = (0..spec.hops).map(|_| jitter(spec.work_nanos)).collect();
        let leaf = jitter(spec.leaf_nanos);
        // Server span durations, innermost first.
        let mut server_dur = vec![0u64; spec.hops];
        for i in (0..spec.hops).rev() {
            server_dur[i] = if i + 1 == spec.hops {
                leaf
            } else {
                before[i] + 2 * spec.net_nanos + server_dur[i + 1] + after[i]
            };
        }
        let mut start = next_start;
        let request_end = start + 2 * spec.net_nanos + server_dur[0];
        next_start = if spec.concurrency <= 1 {
            // Strictly sequential: the next request leaves after this one's response.
            request_end + spec.net_nanos
        } else {
            // Poisson arrivals with `concurrency` requests in flight on average.
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            start + (-u.ln() * mean_gap as f64) as u64
        };
        // The span id in the header the caller sends (its CLIENT span).
        let mut sender_span = SpanId::random();
        let mut from_ip = caller_ip(caller);
        let mut from_node = 0usize;
        for i in 0..spec.hops {
            let port = 30_000 + ((r * spec.hops + i) % 30_000) as u32;
            let (req_seq, resp_seq): (u32, u32) = (rng.random(), rng.random());
            let tp = if spec.propagate {
                format!("00-{}-{}-01", trace.to_hex(), sender_span.to_hex())
            } else {
                String::new()
            };
            let dur = server_dur[i];
            let path = format!("/hop{i}/{r}");
            let base = v1::Exchange {
                method: "GET".into(),
                path,
                status: 200,
                request_seq: req_seq,
                response_seq: resp_seq,
                response_bytes: 42,
                traceparent: tp,
                ..Default::default()
            };
            id += 1;
            nodes[from_node].exchanges.push(v1::Exchange {
                id,
                side: v1::Side::Client as i32,
                client: ep(from_ip, port),
                server: ep(service_ip(i), 80),
                start_unix_nanos: start,
                end_unix_nanos: start + dur + 2 * spec.net_nanos,
                ..base.clone()
            });
            id += 1;
            let seen_client = if spec.snat {
                [10, 10, 0, 1 + from_node as u8]
            } else {
                from_ip
            };
            let to_node = node_of_hop(i);
            nodes[to_node].exchanges.push(v1::Exchange {
                id,
                side: v1::Side::Server as i32,
                client: ep(seen_client, port),
                server: ep(pod_ip(i), 8080),
                start_unix_nanos: start + spec.net_nanos,
                end_unix_nanos: start + spec.net_nanos + dur,
                ..base
            });
            // The callee calls the next hop after its work.
            start = start + spec.net_nanos + before[i];
            from_ip = pod_ip(i);
            from_node = to_node;
            sender_span = SpanId::random();
        }
    }
    let mut batches = Vec::new();
    let instance: Vec<Arc<str>> = NODES
        .iter()
        .map(|n| Arc::from(format!("{n}-synthetic")))
        .collect();
    let mut seqs = [0u64; 2];
    // Each collector reports when the response is seen: order by end time.
    let mut per_node: Vec<Vec<ObservedBatch>> = Vec::new();
    for (n, stream) in nodes.iter_mut().enumerate() {
        stream.exchanges.sort_by_key(|e| e.end_unix_nanos);
        let mut out = Vec::new();
        for chunk in stream.exchanges.chunks(spec.batch.max(1)) {
            seqs[n] += 1;
            out.push(ObservedBatch {
                node: Arc::from(NODES[n]),
                instance: instance[n].clone(),
                seq: seqs[n],
                exchanges: chunk.to_vec(),
                connections: Vec::new(),
            });
        }
        per_node.push(out);
    }
    // Interleave by the last response time in each batch.
    for b in per_node.into_iter().flatten() {
        batches.push(b);
    }
    batches.sort_by_key(|b| b.exchanges.last().map_or(0, |e| e.end_unix_nanos));
    batches
}
