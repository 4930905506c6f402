//! The connection table: requests that wait for their response, per TCP connection
//! and observation point, within fixed bounds.
//!
//! Keyed by the connection's two endpoints (order-free, so a `ConnEvent` that knows
//! only local/remote finds it), then by who is the client and the interface the
//! segments were seen on (the same connection seen on two pods' veths of one node
//! is two flows). Least recently used connections are evicted first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;

use weft_proto::v1::Side;

use super::http::RequestHead;

/// A connection's endpoints in a canonical order (lower first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockPair {
    lo: SocketAddr,
    hi: SocketAddr,
}

impl SockPair {
    pub fn new(a: SocketAddr, b: SocketAddr) -> Self {
        if a <= b {
            SockPair { lo: a, hi: b }
        } else {
            SockPair { lo: b, hi: a }
        }
    }

    /// A stable 64-bit FNV-1a hash of the endpoints: the same for both directions,
    /// for every interface the connection is seen on, and for its `Connection`
    /// events, so all of them can be correlated. Never 0.
    pub fn connection_id(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for ep in [self.lo, self.hi] {
            match ep {
                SocketAddr::V4(a) => {
                    feed(&[4]);
                    feed(&a.ip().octets());
                }
                SocketAddr::V6(a) => {
                    feed(&[6]);
                    feed(&a.ip().octets());
                }
            }
            feed(&ep.port().to_be_bytes());
        }
        h.max(1)
    }
}

/// A request waiting for its response.
#[derive(Clone, Debug)]
pub struct Pending {
    /// TCP seq of the request's first byte.
    pub seq: u32,
    /// The request segment's ack (what the client had received of the server's
    /// stream when it sent the request); `None` without the ACK flag.
    pub ack: Option<u32>,
    pub start_unix_nanos: u64,
    pub side: Side,
    pub request: RequestHead,
    pub request_bytes: u64,
    /// An interim (1xx) response was seen for it.
    pub interim_seen: bool,
}

/// One connection as seen on one interface, oriented client → server.
#[derive(Debug)]
pub struct Flow {
    pub client: SocketAddr,
    pub ifindex: u32,
    pub pending: VecDeque<Pending>,
    /// Highest request and response seq seen: a segment at or below them is a
    /// retransmission (messages on one connection have increasing seqs).
    pub last_request_seq: Option<u32>,
    pub last_response_seq: Option<u32>,
}

impl Flow {
    fn new(client: SocketAddr, ifindex: u32) -> Self {
        Flow {
            client,
            ifindex,
            pending: VecDeque::new(),
            last_request_seq: None,
            last_response_seq: None,
        }
    }
}

/// More flows than this on one connection (interfaces × orientations) evict the
/// oldest: a connection crosses at most two traced veths on one node.
const MAX_FLOWS_PER_CONNECTION: usize = 4;

#[derive(Debug)]
pub struct Entry {
    stamp: u64,
    pub last_seen: u64,
    /// When a close event was seen: responses may still be in flight (events come
    /// from different rings and CPUs), so the entry lives on for a grace period.
    pub closed_at: Option<u64>,
    pub flows: Vec<Flow>,
}

impl Entry {
    pub fn pending_count(&self) -> usize {
        self.flows.iter().map(|f| f.pending.len()).sum()
    }
}

/// What an insertion pushed out, for the caller to count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub connections: u64,
    pub requests: u64,
}

#[derive(Debug, Default)]
pub struct Table {
    entries: HashMap<SockPair, Entry>,
    /// Use order: stamp → connection; the first is the least recently used.
    lru: BTreeMap<u64, SockPair>,
    next_stamp: u64,
}

impl Table {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn pending_total(&self) -> usize {
        self.entries.values().map(Entry::pending_count).sum()
    }

    pub fn get_mut(&mut self, pair: &SockPair) -> Option<&mut Entry> {
        self.entries.get_mut(pair)
    }

    /// Marks a connection as just used.
    pub fn touch(&mut self, pair: &SockPair, now: u64) {
        if let Some(e) = self.entries.get_mut(pair) {
            self.lru.remove(&e.stamp);
            self.next_stamp += 1;
            e.stamp = self.next_stamp;
            e.last_seen = e.last_seen.max(now);
            self.lru.insert(e.stamp, *pair);
        }
    }

    /// The flow of `pair` seen from `client` on `ifindex`, created if missing.
    /// Creating a connection beyond `max_connections` evicts the least recently
    /// used one; what was evicted is returned.
    pub fn flow_or_insert(
        &mut self,
        pair: SockPair,
        client: SocketAddr,
        ifindex: u32,
        now: u64,
        max_connections: usize,
    ) -> (&mut Flow, Evicted) {
        let mut evicted = Evicted::default();
        if !self.entries.contains_key(&pair) {
            while self.entries.len() >= max_connections.max(1) {
                match self.evict_lru() {
                    Some(e) => {
                        evicted.connections += 1;
                        evicted.requests += e.pending_count() as u64;
                    }
                    None => break,
                }
            }
            self.next_stamp += 1;
            self.lru.insert(self.next_stamp, pair);
            self.entries.insert(
                pair,
                Entry {
                    stamp: self.next_stamp,
                    last_seen: now,
                    closed_at: None,
                    flows: Vec::new(),
                },
            );
        } else {
            self.touch(&pair, now);
        }
        let entry = self
            .entries
            .get_mut(&pair)
            .expect("entry inserted or present above");
        let idx = match entry
            .flows
            .iter()
            .position(|f| f.client == client && f.ifindex == ifindex)
        {
            Some(i) => i,
            None => {
                if entry.flows.len() >= MAX_FLOWS_PER_CONNECTION {
                    let old = entry.flows.remove(0);
                    evicted.connections += 1;
                    evicted.requests += old.pending.len() as u64;
                }
                entry.flows.push(Flow::new(client, ifindex));
                entry.flows.len() - 1
            }
        };
        (&mut entry.flows[idx], evicted)
    }

    fn evict_lru(&mut self) -> Option<Entry> {
        let (_, pair) = self.lru.pop_first()?;
        self.entries.remove(&pair)
    }

    pub fn remove(&mut self, pair: &SockPair) -> Option<Entry> {
        let e = self.entries.remove(pair)?;
        self.lru.remove(&e.stamp);
        Some(e)
    }

    /// Visits every connection; those for which `keep` returns false are removed.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut Entry) -> bool) {
        let lru = &mut self.lru;
        self.entries.retain(|_, e| {
            let k = keep(e);
            if !k {
                lru.remove(&e.stamp);
            }
            k
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn pair_is_order_free_and_id_is_stable() {
        let a = sa("10.0.0.1:40000");
        let b = sa("10.0.0.2:80");
        assert_eq!(SockPair::new(a, b), SockPair::new(b, a));
        let id = SockPair::new(a, b).connection_id();
        assert_eq!(id, SockPair::new(b, a).connection_id());
        assert_ne!(id, SockPair::new(a, sa("10.0.0.2:81")).connection_id());
        assert_ne!(id, 0);
        // The hash is FNV-1a over fixed bytes: stable across runs and builds.
        assert_eq!(id, SockPair::new(a, b).connection_id());
    }

    #[test]
    fn lru_connection_is_evicted_first_and_counted() {
        let mut t = Table::default();
        let c = sa("10.0.0.1:1000");
        let p1 = SockPair::new(c, sa("10.0.0.9:80"));
        let p2 = SockPair::new(c, sa("10.0.0.9:81"));
        let p3 = SockPair::new(c, sa("10.0.0.9:82"));
        t.flow_or_insert(p1, c, 1, 0, 2);
        t.flow_or_insert(p2, c, 1, 0, 2);
        t.touch(&p1, 1); // p2 is now the least recently used
        let (_, ev) = t.flow_or_insert(p3, c, 1, 2, 2);
        assert_eq!(ev.connections, 1);
        assert_eq!(t.len(), 2);
        assert!(t.get_mut(&p2).is_none());
        assert!(t.get_mut(&p1).is_some());
        assert!(t.get_mut(&p3).is_some());
    }

    #[test]
    fn flows_per_connection_are_bounded() {
        let mut t = Table::default();
        let c = sa("10.0.0.1:1000");
        let p = SockPair::new(c, sa("10.0.0.9:80"));
        let mut total = Evicted::default();
        for ifindex in 0..(MAX_FLOWS_PER_CONNECTION as u32 + 3) {
            let (_, ev) = t.flow_or_insert(p, c, ifindex, 0, 10);
            total.connections += ev.connections;
        }
        assert_eq!(total.connections, 3);
        assert_eq!(
            t.get_mut(&p).map(|e| e.flows.len()),
            Some(MAX_FLOWS_PER_CONNECTION)
        );
    }
}
