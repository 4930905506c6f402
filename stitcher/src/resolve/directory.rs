//! The hot path: cluster state behind a lock, and a cache in front of it.
//!
//! In: `(ip:port, time)` lookups from the pipeline; state changes from a source.
//! Out: [`Identity`].
//!
//! A lookup first asks the cache (moka, bounded, TTL) under `(ip, port, time bucket)`; the
//! entry carries the generation of its address's shard when it was computed, and every
//! change bumps the shards of the addresses it touched, so a changed answer is never
//! served from the cache while churn elsewhere leaves other entries valid. An answer is cached
//! only when the whole time bucket lies inside the range over which it holds, so a pod
//! that took over an address mid-bucket is never hidden behind its predecessor. Addresses
//! where the port does not matter (everything but host-network addresses) are cached
//! once per bucket for all ports, so client ephemeral ports share one entry.
//!
//! In front of that cache sits a small plain map (a few thousand entries, emptied when
//! full) under an uncontended mutex: the stitch thread looks up two addresses per
//! exchange, nearly always the same few pods and Services in the current time bucket,
//! and moka's bookkeeping per read (read log, frequency sketch, hashing) cost about half
//! of the stitch thread's time. Entries there obey the same generation rule.

use std::hash::BuildHasherDefault;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::sync::Cache;
use parking_lot::{Mutex, RwLock};

use super::state::{ClusterState, Nanos, ObjectKind};
use super::{Identity, PeerKind, PeerMeta, Resolve};
use crate::metrics::{Counter, Registry};
use crate::model::{FastHasher, FastMap};

/// Cache sizing.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Most entries kept.
    pub capacity: u64,
    /// How long an entry lives.
    pub ttl: Duration,
    /// Width of the time buckets lookups are cached by.
    pub bucket: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: 100_000,
            ttl: Duration::from_secs(30),
            bucket: Duration::from_secs(1),
        }
    }
}

/// The resolver's counters (names under `resolve.`).
#[derive(Clone)]
pub struct ResolveCounters {
    pub lookups: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub unresolved: Counter,
    /// The watcher reported an error and will reconnect (disconnects, 410 Gone, API down).
    pub watch_errors: Counter,
    /// Relists after the first list (410 Gone, or a watch that could not resume).
    pub watch_relists: Counter,
    pub watch_events: Counter,
    /// Objects found gone on a relist: deleted while the watch was down.
    pub deleted_while_disconnected: Counter,
    /// Objects or fields that could not be used (no uid, an unparsable IP); logged once.
    pub objects_skipped: Counter,
    objects: Vec<(ObjectKind, Counter)>,
}

impl ResolveCounters {
    pub fn new(registry: &Registry) -> Self {
        let objects = ObjectKind::ALL
            .iter()
            .map(|k| {
                let name = format!("resolve.objects.{}", k.as_str());
                (
                    *k,
                    registry.counter(&name, "live objects of this kind known to the resolver"),
                )
            })
            .collect();
        ResolveCounters {
            lookups: registry.counter("resolve.lookups", "address lookups"),
            cache_hits: registry.counter("resolve.cache.hits", "lookups answered from the cache"),
            cache_misses: registry.counter("resolve.cache.misses", "lookups that read the state"),
            unresolved: registry.counter(
                "resolve.unresolved",
                "lookups that found no pod, service or node (address kept as IP)",
            ),
            watch_errors: registry.counter(
                "resolve.watch.errors",
                "watch failures; the watcher reconnects or relists (watch restarts)",
            ),
            watch_relists: registry.counter(
                "resolve.watch.relists",
                "full relists after the first (410 Gone or unresumable watch)",
            ),
            watch_events: registry.counter("resolve.watch.events", "watch events applied"),
            deleted_while_disconnected: registry.counter(
                "resolve.watch.deleted_while_disconnected",
                "objects found deleted by a relist after a watch outage",
            ),
            objects_skipped: registry.counter(
                "resolve.objects_skipped",
                "objects or addresses the resolver could not use (see log)",
            ),
            objects,
        }
    }
}

#[derive(Clone)]
struct Cached {
    generation: u64,
    port_sensitive: bool,
    kind: PeerKind,
    meta: Option<Arc<PeerMeta>>,
}

/// Cluster state shared by a source (writer) and the pipeline (readers).
pub struct Directory {
    state: RwLock<ClusterState>,
    /// Generation per address shard (see [`shard`]).
    generations: Box<[AtomicU64]>,
    cache: Cache<(IpAddr, u16, u64), Cached, BuildHasherDefault<FastHasher>>,
    /// The hot few entries, in front of `cache`.
    front: Mutex<FastMap<(IpAddr, u16, u64), Cached>>,
    bucket_nanos: u64,
    pub counters: ResolveCounters,
}

impl Directory {
    pub fn new(grace: Duration, cache: CacheConfig, registry: &Registry) -> Self {
        Directory {
            state: RwLock::new(ClusterState::new(duration_nanos(grace))),
            generations: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            cache: Cache::builder()
                .max_capacity(cache.capacity)
                .time_to_live(cache.ttl)
                .build_with_hasher(BuildHasherDefault::default()),
            front: Mutex::new(FastMap::default()),
            bucket_nanos: duration_nanos(cache.bucket).max(1),
            counters: ResolveCounters::new(registry),
        }
    }

    /// Applies a change to the state; no cached answer from before it is used again.
    pub fn update<R>(&self, change: impl FnOnce(&mut ClusterState) -> R) -> R {
        let mut state = self.state.write();
        let out = change(&mut state);
        state.drain_touched();
        for g in self.generations.iter() {
            g.fetch_add(1, Ordering::Release);
        }
        out
    }

    /// Applies a change; cached answers are dropped for the addresses it touched only.
    /// Returns what `change` returns (whether anything visible changed).
    pub fn update_if(&self, change: impl FnOnce(&mut ClusterState) -> bool) -> bool {
        let mut state = self.state.write();
        let changed = change(&mut state);
        // Bumped while the lock is held, after the change: a reader that saw the old
        // generation can only cache under it, and such entries are never used again.
        for ip in state.drain_touched() {
            self.generations[shard(&ip)].fetch_add(1, Ordering::Release);
        }
        changed
    }

    /// Reads the state (tests, diagnostics).
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.state.read())
    }

    /// Refreshes the `resolve.objects.*` gauges (O(objects): call on sync and periodically,
    /// not per event).
    pub fn publish_counts(&self) {
        let state = self.state.read();
        for (kind, gauge) in &self.counters.objects {
            gauge.set(state.count(*kind) as u64);
        }
    }

    /// A cached answer still valid under `generation`: from the front map, else from
    /// the cache (then kept in front).
    fn cached(
        &self,
        front: &mut FastMap<(IpAddr, u16, u64), Cached>,
        key: (IpAddr, u16, u64),
        generation: u64,
    ) -> Option<Cached> {
        if let Some(c) = front.get(&key).filter(|c| c.generation == generation) {
            return Some(c.clone());
        }
        let c = self
            .cache
            .get(&key)
            .filter(|c| c.generation == generation)?;
        remember(front, key, c.clone());
        Some(c)
    }

    fn insert(
        &self,
        front: &mut FastMap<(IpAddr, u16, u64), Cached>,
        key: (IpAddr, u16, u64),
        c: &Cached,
    ) {
        self.cache.insert(key, c.clone());
        remember(front, key, c.clone());
    }
}

/// Most entries in the front map; it is emptied when full (they are few and hot, and the
/// time bucket in the key retires them anyway).
const FRONT_CAPACITY: usize = 4096;

fn remember(front: &mut FastMap<(IpAddr, u16, u64), Cached>, key: (IpAddr, u16, u64), c: Cached) {
    if front.len() >= FRONT_CAPACITY {
        front.clear();
    }
    front.insert(key, c);
}

impl Resolve for Directory {
    fn resolve(&self, addr: SocketAddr, at_unix_nanos: u64) -> Identity {
        self.counters.lookups.inc();
        let generation = self.generations[shard(&addr.ip())].load(Ordering::Acquire);
        let bucket = at_unix_nanos / self.bucket_nanos;
        let any_port = (addr.ip(), 0, bucket);
        let mut front = self.front.lock();
        let hit = match self.cached(&mut front, any_port, generation) {
            Some(c) if c.port_sensitive => {
                self.cached(&mut front, (addr.ip(), addr.port(), bucket), generation)
            }
            other => other,
        };
        let answer = match hit {
            Some(c) => {
                self.counters.cache_hits.inc();
                c
            }
            None => {
                self.counters.cache_misses.inc();
                let found = self.state.read().lookup(addr, at_unix_nanos);
                let c = Cached {
                    generation,
                    port_sensitive: found.port_sensitive,
                    kind: found.kind,
                    meta: found.meta,
                };
                let start = bucket.saturating_mul(self.bucket_nanos);
                let end = start.saturating_add(self.bucket_nanos);
                if found.valid_from <= start && end <= found.valid_until {
                    if c.port_sensitive {
                        self.insert(&mut front, (addr.ip(), addr.port(), bucket), &c);
                    }
                    self.insert(&mut front, any_port, &c);
                }
                c
            }
        };
        drop(front);
        if answer.kind == PeerKind::External {
            self.counters.unresolved.inc();
        }
        Identity {
            kind: answer.kind,
            addr,
            meta: answer.meta,
        }
    }
}

/// Number of generation shards: a change invalidates about 1/SHARDS of the cache.
const SHARDS: usize = 256;

fn shard(ip: &IpAddr) -> usize {
    let bits = match ip {
        IpAddr::V4(v4) => u64::from(u32::from(*v4)),
        IpAddr::V6(v6) => {
            let b = u128::from(*v6);
            (b as u64) ^ ((b >> 64) as u64)
        }
    };
    // Fibonacci hashing: the top byte of the product mixes every input bit.
    (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize % SHARDS
}

pub fn duration_nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Wall-clock time in Unix nanoseconds.
pub fn now_nanos() -> Nanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_nanos)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::state::PodRecord;

    const S: u64 = 1_000_000_000;

    fn pod(name: &str, ip: &str, node: &str) -> PodRecord {
        PodRecord {
            key: name.into(),
            uid: None,
            namespace: "demo".into(),
            name: name.into(),
            node: Some(node.into()),
            ips: vec![ip.parse().expect("ip")],
            host_network: false,
            ports: vec![],
            owner: None,
            from: 0,
            until: None,
        }
    }

    fn node_of(dir: &Directory, a: &str) -> Option<String> {
        let addr: SocketAddr = a.parse().expect("addr");
        dir.resolve(addr, 10 * S).meta.and_then(|m| m.node.clone())
    }

    #[test]
    fn a_change_drops_cached_answers_for_its_addresses_only() {
        let (a, b) = ("10.0.0.1", "10.0.0.2");
        assert_ne!(
            shard(&a.parse().expect("ip")),
            shard(&b.parse().expect("ip")),
            "the test needs two shards"
        );
        let reg = Registry::new();
        let dir = Directory::new(Duration::from_secs(60), CacheConfig::default(), &reg);
        dir.update_if(|st| st.apply_pod(pod("a", a, "n1")));
        dir.update_if(|st| st.apply_pod(pod("b", b, "n1")));
        assert_eq!(node_of(&dir, "10.0.0.1:80").as_deref(), Some("n1"));
        assert_eq!(node_of(&dir, "10.0.0.2:80").as_deref(), Some("n1"));
        let hits = || reg.snapshot()["resolve.cache.hits"];
        assert_eq!(hits(), 0);

        // Status churn that changes nothing visible keeps the cache.
        assert!(!dir.update_if(|st| st.apply_pod(pod("a", a, "n1"))));
        assert_eq!(node_of(&dir, "10.0.0.1:80").as_deref(), Some("n1"));
        assert_eq!(hits(), 1);

        // A visible change to a: a is answered afresh, b still from the cache.
        assert!(dir.update_if(|st| st.apply_pod(pod("a", a, "n2"))));
        assert_eq!(node_of(&dir, "10.0.0.1:81").as_deref(), Some("n2"));
        assert_eq!(hits(), 1);
        assert_eq!(node_of(&dir, "10.0.0.2:81").as_deref(), Some("n1"));
        assert_eq!(hits(), 2);

        // Deletion past the grace period, then pruning: a is gone, not cached as a pod.
        assert!(dir.update_if(|st| st.delete_pod("a", 5 * S, 5 * S)));
        let addr: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        assert_eq!(dir.resolve(addr, 70 * S).kind, PeerKind::External);
        assert_eq!(dir.resolve(addr, 4 * S).kind, PeerKind::Pod);
        dir.update_if(|st| st.prune(100 * S) > 0);
        assert_eq!(dir.resolve(addr, 4 * S).kind, PeerKind::External);
    }
}
