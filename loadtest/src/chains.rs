//! Synthetic but joinable exchanges: request chains `frontend → backend → store`.
//!
//! In: a chain index `k`. Out: the four halves of chain `k`, each on the node whose
//! collector observed it:
//!
//! ```text
//! 1 CLIENT frontend → backend Service (ClusterIP, before DNAT)   on the frontend's node
//! 2 SERVER frontend → backend pod                                on the backend's node
//! 3 CLIENT backend  → store Service                              on the backend's node
//! 4 SERVER backend  → store pod                                  on the store's node
//! ```
//!
//! Halves 1/2 and 3/4 share their TCP seqs (the join key) and client address; 3/4 lie
//! inside 2 in time (what timing-containment linking looks for). Everything is a pure
//! function of `k`, so fake collectors that each emit only their own node's halves still
//! produce matching pairs across streams.
//!
//! For speed each collector builds a pool of batches once ([`Pool::new`]) and then shifts
//! it to the next chains in place ([`Pool::advance`]): ids, seqs and times move on, no
//! allocation per exchange.

use weft_proto::v1;

/// Spacing of chain starts (ns): the synthetic workload's "request rate" in event time.
const CHAIN_SPACING_NS: u64 = 100_000;

#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub nodes: u32,
    pub traceparent: bool,
    /// Chains repeat their shape (nodes, addresses, paths) with this period; seqs, times
    /// and ids keep moving on. A [`Pool`] covers exactly one period.
    pub period: u64,
    /// Event time of chain 0 (Unix ns).
    pub base_unix_nanos: u64,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64: cheap, deterministic, well spread.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn ep(ip: [u8; 4], port: u32) -> Option<v1::Endpoint> {
    Some(v1::Endpoint {
        ip: ip.to_vec(),
        port,
    })
}

fn pod_ip(node: u32, host: u8) -> [u8; 4] {
    [10, 244, (node % 250 + 1) as u8, host]
}

/// The four halves of chain `k`, with the node index that observes each.
pub fn chain(t: &Topology, k: u64) -> [(u32, v1::Exchange); 4] {
    let shape = k % t.period.max(1);
    let h = mix(shape);
    let n = t.nodes.max(1);
    let (nf, nb, ns) = (
        (h % u64::from(n)) as u32,
        ((h >> 16) % u64::from(n)) as u32,
        ((h >> 32) % u64::from(n)) as u32,
    );
    let (fe, be, st) = (pod_ip(nf, 10), pod_ip(nb, 20), pod_ip(ns, 30));
    let fe_port = 32768 + (shape % 28000) as u32;
    let be_port = 32768 + ((shape + 9999) % 28000) as u32;
    let t0 = t.base_unix_nanos + k * CHAIN_SPACING_NS;
    let (s1, s2) = (mix(k ^ 0xabcd), mix(k ^ 0x1234));
    let (q1, r1, q2, r2) = (s1 as u32, (s1 >> 32) as u32, s2 as u32, (s2 >> 32) as u32);
    let traceparent = if t.traceparent {
        format!(
            "00-{:016x}{:016x}-{:016x}-01",
            mix(k ^ 1),
            mix(k ^ 2),
            mix(k ^ 3)
        )
    } else {
        String::new()
    };
    let base = |side: v1::Side, start: u64, end: u64| v1::Exchange {
        side: side as i32,
        start_unix_nanos: start,
        end_unix_nanos: end,
        method: "GET".into(),
        status: 200,
        request_bytes: 0,
        response_bytes: 512 + (h % 4096),
        interface: format!("veth{:x}", h % 4096),
        ifindex: 10 + (h % 50) as u32,
        ..Default::default()
    };
    let path_items = format!("/api/items/{}", shape % 1000);
    let path_store = format!("/kv/item-{}", shape % 1000);
    let mut x1 = base(v1::Side::Client, t0, t0 + 5_000_000);
    x1.client = ep(fe, fe_port);
    x1.server = ep([10, 96, 0, 20], 80);
    x1.path = path_items.clone();
    x1.host = "backend.demo".into();
    x1.traceparent = traceparent.clone();
    let mut x2 = base(v1::Side::Server, t0 + 100_000, t0 + 4_900_000);
    x2.client = ep(fe, fe_port);
    x2.server = ep(be, 8080);
    x2.path = path_items;
    x2.host = "backend.demo".into();
    x2.traceparent = traceparent;
    let mut x3 = base(v1::Side::Client, t0 + 1_000_000, t0 + 3_000_000);
    x3.client = ep(be, be_port);
    x3.server = ep([10, 96, 0, 30], 80);
    x3.path = path_store.clone();
    x3.host = "store.demo".into();
    let mut x4 = base(v1::Side::Server, t0 + 1_100_000, t0 + 2_900_000);
    x4.client = ep(be, be_port);
    x4.server = ep(st, 9000);
    x4.path = path_store;
    x4.host = "store.demo".into();
    for (x, (q, r)) in [
        (&mut x1, (q1, r1)),
        (&mut x2, (q1, r1)),
        (&mut x3, (q2, r2)),
        (&mut x4, (q2, r2)),
    ] {
        x.request_seq = q;
        x.response_seq = r;
        x.connection_id = k;
    }
    [(nf, x1), (nb, x2), (nb, x3), (ns, x4)]
}

/// One fake collector's batches for chains `[cycle·K, (cycle+1)·K)`.
pub struct Pool {
    pub batches: Vec<Vec<v1::Exchange>>,
    chains_per_cycle: u64,
    exchanges_per_cycle: u64,
    cycle: u64,
}

impl Pool {
    /// The halves that `node` observes among chains `0..t.period`, in batches of `batch`.
    pub fn new(t: &Topology, node: u32, batch: usize) -> Pool {
        let chains = t.period.max(1);
        let mut mine = Vec::new();
        for k in 0..chains {
            for (n, x) in chain(t, k) {
                if n == node {
                    mine.push(x);
                }
            }
        }
        for (i, x) in mine.iter_mut().enumerate() {
            x.id = i as u64 + 1;
        }
        let exchanges_per_cycle = mine.len() as u64;
        let batches = mine.chunks(batch.max(1)).map(<[_]>::to_vec).collect();
        Pool {
            batches,
            chains_per_cycle: chains,
            exchanges_per_cycle,
            cycle: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exchanges_per_cycle == 0
    }

    /// Moves every exchange to the same place in the next cycle's chains.
    pub fn advance(&mut self) {
        self.cycle += 1;
        let dk = self.chains_per_cycle;
        let dt = dk * CHAIN_SPACING_NS;
        for x in self.batches.iter_mut().flatten() {
            let k = x.connection_id;
            let k2 = k + dk;
            // The seqs are a function of k; recompute them for k + dk. Same for both halves.
            let shifted = chain_seqs(k2, x.request_seq, k);
            x.request_seq = shifted.0;
            x.response_seq = shifted.1;
            x.connection_id = k2;
            x.id += self.exchanges_per_cycle;
            x.start_unix_nanos += dt;
            x.end_unix_nanos += dt;
        }
    }
}

/// The (request, response) seqs of the pair of chain `k2` that corresponds to the pair of
/// chain `k` whose request seq is `req`: the first pair (halves 1/2) or the second (3/4).
fn chain_seqs(k2: u64, req: u32, k: u64) -> (u32, u32) {
    let first = mix(k ^ 0xabcd) as u32 == req;
    if first {
        let s = mix(k2 ^ 0xabcd);
        (s as u32, (s >> 32) as u32)
    } else {
        let s = mix(k2 ^ 0x1234);
        (s as u32, (s >> 32) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_of_a_chain_join_and_nest_in_time() {
        let t = Topology {
            nodes: 3,
            traceparent: true,
            period: 100,
            base_unix_nanos: 1_000_000_000,
        };
        let [(_, c1), (_, s2), (_, c3), (_, s4)] = chain(&t, 42);
        assert_eq!(
            (c1.request_seq, c1.response_seq),
            (s2.request_seq, s2.response_seq)
        );
        assert_eq!(
            (c3.request_seq, c3.response_seq),
            (s4.request_seq, s4.response_seq)
        );
        assert_eq!(c1.client, s2.client);
        assert!(s2.start_unix_nanos < c3.start_unix_nanos && c3.end_unix_nanos < s2.end_unix_nanos);
        assert!(!c1.traceparent.is_empty());
    }

    #[test]
    fn advanced_pools_still_match_fresh_chains() {
        let t = Topology {
            nodes: 2,
            traceparent: false,
            period: 50,
            base_unix_nanos: 1,
        };
        let mut p = Pool::new(&t, 0, 10);
        p.advance();
        p.advance();
        for x in p.batches.iter().flatten() {
            let fresh = chain(&t, x.connection_id);
            assert!(
                fresh.iter().any(|(n, f)| *n == 0
                    && f.request_seq == x.request_seq
                    && f.response_seq == x.response_seq
                    && f.start_unix_nanos == x.start_unix_nanos),
                "{x:?}"
            );
        }
    }
}
