//! The connection table: requests that wait for their response, per TCP connection
//! and observation point, within fixed bounds.
//!
//! Keyed by the connection's two endpoints (order-free, so a `ConnEvent` that knows
//! only local/remote finds it), then by who is the client and the interface the
//! segments were seen on (the same connection seen on two pods' veths of one node
//! is two flows). When the connection bound is reached, a connection not used since
//! the eviction hand last passed it goes first (second-chance, or CLOCK, an
//! approximation of least recently used that costs one flag write per use instead of
//! reordering a list on every packet).
//!
//! One hash lookup per packet: every segment of a saturating load goes through here.

use std::cmp::Ordering;
use std::collections::hash_map::Entry as Slot;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use weft_ebpf_common::{FAMILY_IPV4, FAMILY_IPV6};
use weft_proto::v1::{Exchange, Side};

/// Hash of the table: fast (the keys are a few fixed-size addresses), seeded per process
/// so that crafted addresses cannot aim at one bucket.
type FastState = foldhash::fast::RandomState;

/// A TCP endpoint as the kernel reports it: family, 16 address bytes (an IPv4 address
/// in the first 4, the rest zero) and port. Fixed-size and flat, so comparing and
/// hashing it is a few word operations (a `SocketAddr` goes through its enum field by
/// field), which matters on a path every packet takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr {
    ip: [u8; 16],
    port: u16,
    family: u8,
}

impl Addr {
    /// The endpoint of a kernel event; `None` for an unknown address family.
    pub fn from_kernel(family: u8, ip: &[u8; 16], port: u16) -> Option<Addr> {
        let ip = match family {
            FAMILY_IPV4 => {
                let mut v4 = [0u8; 16];
                v4[..4].copy_from_slice(&ip[..4]);
                v4
            }
            FAMILY_IPV6 => *ip,
            _ => return None,
        };
        Some(Addr { ip, port, family })
    }

    /// The address bytes: 4 for IPv4, 16 for IPv6.
    pub fn ip_bytes(&self) -> &[u8] {
        if self.family == FAMILY_IPV4 {
            &self.ip[..4]
        } else {
            &self.ip
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address as a number, for ordering: big-endian, so it orders as the bytes do.
    fn ip_value(&self) -> u128 {
        u128::from_be_bytes(self.ip)
    }
}

/// Orders as `SocketAddr` does (IPv4 before IPv6, then address, then port), so that
/// [`SockPair`]'s canonical order, and with it [`SockPair::connection_id`], is the one
/// the collector has always used.
impl Ord for Addr {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.family != FAMILY_IPV4, self.ip_value(), self.port).cmp(&(
            other.family != FAMILY_IPV4,
            other.ip_value(),
            other.port,
        ))
    }
}

impl PartialOrd for Addr {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Addr {
        match a.ip() {
            IpAddr::V4(v4) => {
                let mut ip = [0u8; 16];
                ip[..4].copy_from_slice(&v4.octets());
                Addr {
                    ip,
                    port: a.port(),
                    family: FAMILY_IPV4,
                }
            }
            IpAddr::V6(v6) => Addr {
                ip: v6.octets(),
                port: a.port(),
                family: FAMILY_IPV6,
            },
        }
    }
}

impl From<Addr> for SocketAddr {
    fn from(a: Addr) -> SocketAddr {
        let ip = if a.family == FAMILY_IPV4 {
            IpAddr::V4(Ipv4Addr::new(a.ip[0], a.ip[1], a.ip[2], a.ip[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(a.ip))
        };
        SocketAddr::new(ip, a.port)
    }
}

/// A connection's endpoints in a canonical order (lower first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockPair {
    lo: Addr,
    hi: Addr,
}

/// Three words into the hasher: both addresses whole, then ports and families together.
impl Hash for SockPair {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from_ne_bytes(self.lo.ip));
        state.write_u128(u128::from_ne_bytes(self.hi.ip));
        state.write_u64(
            u64::from(self.lo.port)
                | u64::from(self.hi.port) << 16
                | u64::from(self.lo.family) << 32
                | u64::from(self.hi.family) << 40,
        );
    }
}

impl SockPair {
    pub fn new(a: Addr, b: Addr) -> Self {
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
            feed(&[if ep.family == FAMILY_IPV4 { 4 } else { 6 }]);
            feed(ep.ip_bytes());
            feed(&ep.port.to_be_bytes());
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
    /// The request's fields (method, path, kept headers), copied out of the captured
    /// bytes, which are gone when the response comes; the response completes the rest
    /// (see `spare::Spares::with_request`).
    pub request: Box<Exchange>,
    pub request_bytes: u64,
    /// An interim (1xx) response was seen for it.
    pub interim_seen: bool,
}

/// One connection as seen on one interface, oriented client → server.
#[derive(Debug)]
pub struct Flow {
    pub client: Addr,
    pub ifindex: u32,
    pub pending: VecDeque<Pending>,
    /// Highest request and response seq seen: a segment at or below them is a
    /// retransmission (messages on one connection have increasing seqs).
    pub last_request_seq: Option<u32>,
    pub last_response_seq: Option<u32>,
}

impl Flow {
    fn new(client: Addr, ifindex: u32) -> Self {
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
    /// Distinguishes this entry from an earlier one of the same endpoints in the
    /// eviction queue.
    generation: u64,
    /// Used since the eviction hand last passed it (second chance).
    referenced: bool,
    pub last_seen: u64,
    /// When a close event was seen: responses may still be in flight (events come
    /// from different rings and CPUs), so the entry lives on for a grace period.
    pub closed_at: Option<u64>,
    /// [`SockPair::connection_id`], computed once per connection.
    pub connection_id: u64,
    pub flows: Vec<Flow>,
}

impl Entry {
    pub fn pending_count(&self) -> usize {
        self.flows.iter().map(|f| f.pending.len()).sum()
    }

    /// The flow seen from `client` on `ifindex`, if there is one.
    pub fn flow_of(&mut self, client: Addr, ifindex: u32) -> Option<&mut Flow> {
        let i = self.flow_index(client, ifindex)?;
        Some(&mut self.flows[i])
    }

    fn flow_index(&self, client: Addr, ifindex: u32) -> Option<usize> {
        self.flows
            .iter()
            .position(|f| f.client == client && f.ifindex == ifindex)
    }

    /// The flow seen from `client` on `ifindex`, created if missing (evicting the
    /// oldest beyond `MAX_FLOWS_PER_CONNECTION`, counted in `evicted`).
    pub fn flow(&mut self, client: Addr, ifindex: u32, evicted: &mut Evicted) -> &mut Flow {
        let idx = match self.flow_index(client, ifindex) {
            Some(i) => i,
            None => {
                if self.flows.len() >= MAX_FLOWS_PER_CONNECTION {
                    let old = self.flows.remove(0);
                    evicted.connections += 1;
                    evicted.requests += old.pending.len() as u64;
                }
                self.flows.push(Flow::new(client, ifindex));
                self.flows.len() - 1
            }
        };
        &mut self.flows[idx]
    }
}

/// What an insertion pushed out, for the caller to count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub connections: u64,
    pub requests: u64,
    /// Requests still pending on a closed connection whose endpoints came back (a new
    /// connection on the same 4-tuple): they will never be answered.
    pub unanswered: u64,
}

#[derive(Debug, Default)]
pub struct Table {
    entries: HashMap<SockPair, Entry, FastState>,
    /// Connections in insertion order with their generation: the eviction hand's
    /// round. Entries removed otherwise leave stale items, skipped and compacted.
    order: VecDeque<(SockPair, u64)>,
    next_generation: u64,
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

    /// The connection, marked as just used.
    pub fn get_touched(&mut self, pair: &SockPair, now: u64) -> Option<&mut Entry> {
        let e = self.entries.get_mut(pair)?;
        e.referenced = true;
        e.last_seen = e.last_seen.max(now);
        Some(e)
    }

    /// Marks a connection as just used.
    pub fn touch(&mut self, pair: &SockPair, now: u64) {
        self.get_touched(pair, now);
    }

    /// The connection of `pair`, created if missing, marked as just used. Creating a
    /// connection beyond `max_connections` evicts one not used recently; a connection
    /// that was closed is replaced by a new one (its endpoints were reused). What was
    /// pushed out is returned.
    pub fn entry_or_insert(
        &mut self,
        pair: SockPair,
        now: u64,
        max_connections: usize,
    ) -> (&mut Entry, Evicted) {
        let mut evicted = Evicted::default();
        if self.entries.len() >= max_connections.max(1) && !self.entries.contains_key(&pair) {
            while self.entries.len() >= max_connections.max(1) {
                match self.evict_one() {
                    Some(e) => {
                        evicted.connections += 1;
                        evicted.requests += e.pending_count() as u64;
                    }
                    None => break,
                }
            }
        }
        self.compact_order();
        let entry = match self.entries.entry(pair) {
            Slot::Occupied(o) => {
                let e = o.into_mut();
                if e.closed_at.is_some() {
                    // A request after a close: the 4-tuple was reused by a new connection.
                    evicted.unanswered += e.pending_count() as u64;
                    self.next_generation += 1;
                    self.order.push_back((pair, self.next_generation));
                    *e = Entry::new(pair, self.next_generation, now);
                } else {
                    e.referenced = true;
                    e.last_seen = e.last_seen.max(now);
                }
                e
            }
            Slot::Vacant(v) => {
                self.next_generation += 1;
                self.order.push_back((pair, self.next_generation));
                v.insert(Entry::new(pair, self.next_generation, now))
            }
        };
        (entry, evicted)
    }

    /// The flow of `pair` seen from `client` on `ifindex` ([`Table::entry_or_insert`],
    /// then [`Entry::flow`]), and its connection's id.
    #[cfg(test)]
    pub fn flow_or_insert(
        &mut self,
        pair: SockPair,
        client: Addr,
        ifindex: u32,
        now: u64,
        max_connections: usize,
    ) -> (&mut Flow, u64, Evicted) {
        let (entry, mut evicted) = self.entry_or_insert(pair, now, max_connections);
        let id = entry.connection_id;
        (entry.flow(client, ifindex, &mut evicted), id, evicted)
    }

    /// Second chance: the hand skips (and clears) connections used since it last
    /// passed them, and evicts the first one that was not.
    fn evict_one(&mut self) -> Option<Entry> {
        // Each live entry is passed at most twice (once to clear its flag).
        let mut budget = 2 * self.order.len();
        while budget > 0 {
            budget -= 1;
            let (pair, generation) = self.order.pop_front()?;
            let Some(e) = self.entries.get_mut(&pair) else {
                continue;
            };
            if e.generation != generation {
                continue;
            }
            if e.referenced {
                e.referenced = false;
                self.order.push_back((pair, generation));
                continue;
            }
            return self.entries.remove(&pair);
        }
        None
    }

    /// Drops the queue's stale items once they outnumber the live ones (amortised:
    /// each compaction follows at least as many insertions as it visits).
    fn compact_order(&mut self) {
        if self.order.len() <= 2 * self.entries.len() + 64 {
            return;
        }
        let entries = &self.entries;
        self.order
            .retain(|(pair, g)| entries.get(pair).is_some_and(|e| e.generation == *g));
    }

    pub fn remove(&mut self, pair: &SockPair) -> Option<Entry> {
        self.entries.remove(pair)
    }

    /// Visits every connection; those for which `keep` returns false are removed.
    pub fn retain(&mut self, keep: impl FnMut(&mut Entry) -> bool) {
        let mut keep = keep;
        self.entries.retain(|_, e| keep(e));
        self.compact_order();
    }
}

impl Entry {
    fn new(pair: SockPair, generation: u64, now: u64) -> Self {
        Entry {
            generation,
            referenced: false,
            last_seen: now,
            closed_at: None,
            connection_id: pair.connection_id(),
            flows: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> Addr {
        s.parse::<SocketAddr>().expect("test address").into()
    }

    #[test]
    fn addr_orders_and_converts_as_socket_addr_does() {
        let addrs: Vec<SocketAddr> = [
            "10.0.0.1:80",
            "10.0.0.1:81",
            "10.0.0.2:1",
            "9.255.255.255:65535",
            "255.0.0.0:0",
            "[::1]:80",
            "[::ffff:10.0.0.1]:80",
            "[fe80::1]:1",
            "[2001:db8::1]:443",
        ]
        .iter()
        .map(|s| s.parse().expect("test address"))
        .collect();
        for a in &addrs {
            assert_eq!(SocketAddr::from(Addr::from(*a)), *a);
            for b in &addrs {
                assert_eq!(Addr::from(*a).cmp(&Addr::from(*b)), a.cmp(b), "{a} {b}");
                assert_eq!(Addr::from(*a) == Addr::from(*b), a == b, "{a} {b}");
            }
        }
        let k = Addr::from_kernel(
            FAMILY_IPV4,
            &[10, 0, 0, 1, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0],
            80,
        );
        assert_eq!(
            k,
            Some(sa("10.0.0.1:80")),
            "bytes past an IPv4 address are ignored"
        );
        assert_eq!(k.map(|a| a.ip_bytes().len()), Some(4));
        assert_eq!(Addr::from_kernel(9, &[0; 16], 80), None);
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
        let (_, _, ev) = t.flow_or_insert(p3, c, 1, 2, 2);
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
            let (_, _, ev) = t.flow_or_insert(p, c, ifindex, 0, 10);
            total.connections += ev.connections;
        }
        assert_eq!(total.connections, 3);
        assert_eq!(
            t.get_mut(&p).map(|e| e.flows.len()),
            Some(MAX_FLOWS_PER_CONNECTION)
        );
    }

    #[test]
    fn a_connection_used_since_the_hand_passed_gets_a_second_chance() {
        let mut t = Table::default();
        let c = sa("10.0.0.1:1000");
        let pairs: Vec<_> = (0..4)
            .map(|i| SockPair::new(c, sa(&format!("10.0.0.9:{}", 80 + i))))
            .collect();
        for p in &pairs[..3] {
            t.flow_or_insert(*p, c, 1, 0, 3);
        }
        // The oldest is in use: the next oldest goes instead.
        t.touch(&pairs[0], 1);
        let (_, _, ev) = t.flow_or_insert(pairs[3], c, 1, 2, 3);
        assert_eq!(ev.connections, 1);
        assert!(t.get_mut(&pairs[0]).is_some());
        assert!(t.get_mut(&pairs[1]).is_none());
        // Everything in use: the hand clears every flag, then evicts the first it
        // meets again (the hand's order is now 2, 0, 3).
        for p in [pairs[0], pairs[2], pairs[3]] {
            t.touch(&p, 3);
        }
        let (_, _, ev) = t.flow_or_insert(pairs[1], c, 1, 4, 3);
        assert_eq!(ev.connections, 1);
        assert_eq!(t.len(), 3);
        assert!(t.get_mut(&pairs[2]).is_none());
        assert!(t.get_mut(&pairs[0]).is_some());
    }

    #[test]
    fn removed_connections_leave_no_trace_in_the_eviction_order() {
        let mut t = Table::default();
        let c = sa("10.0.0.1:1000");
        for round in 0..50u16 {
            for i in 0..100u16 {
                let p = SockPair::new(c, sa(&format!("10.0.{round}.{}:80", i % 250)));
                t.flow_or_insert(p, c, 1, 0, 1000);
                t.remove(&p);
            }
        }
        assert!(t.is_empty());
        assert!(t.order.len() <= 64 + 1, "{}", t.order.len());
        // A removed and re-created connection is not evicted for its old queue item.
        let p = SockPair::new(c, sa("10.0.0.9:80"));
        let q = SockPair::new(c, sa("10.0.0.9:81"));
        t.flow_or_insert(p, c, 1, 0, 2);
        t.remove(&p);
        t.flow_or_insert(q, c, 1, 0, 2);
        t.flow_or_insert(p, c, 1, 0, 2);
        let r = SockPair::new(c, sa("10.0.0.9:82"));
        t.flow_or_insert(r, c, 1, 0, 2);
        assert!(
            t.get_mut(&q).is_none(),
            "the oldest live connection goes first"
        );
        assert!(t.get_mut(&p).is_some());
    }

    #[test]
    fn a_closed_connection_whose_endpoints_return_is_replaced() {
        let mut t = Table::default();
        let c = sa("10.0.0.1:1000");
        let p = SockPair::new(c, sa("10.0.0.9:80"));
        let (flow, id, _) = t.flow_or_insert(p, c, 1, 0, 10);
        flow.last_request_seq = Some(7);
        assert_eq!(id, p.connection_id());
        t.get_mut(&p).expect("present").closed_at = Some(1);
        let (flow, _, ev) = t.flow_or_insert(p, c, 1, 2, 10);
        assert_eq!(flow.last_request_seq, None, "a fresh flow");
        assert_eq!(ev, Evicted::default());
        assert_eq!(t.get_mut(&p).map(|e| e.closed_at), Some(None));
    }
}
