//! Service names of identities, shared instead of formatted per span.
//!
//! In: an [`Identity`] (a span's client or server). Out: its name as
//! [`Identity::name`] gives it (`workload.namespace`, the workload alone without a
//! namespace, or the IP of an unnamed peer), as an `Arc<str>` that every trace naming
//! the same service shares.
//!
//! Why: a trace summary names the service of every span; formatting that name each
//! time was a fifth of the store's CPU. Names are cached by the resolver's `PeerMeta`
//! (by address, while the cache holds that `Arc`, so the address cannot be reused) or by
//! IP.
//!
//! Bounds: at most `capacity` entries; a full cache is emptied and refills (pods come
//! and go, so old entries are not worth tracking one by one).

use std::net::IpAddr;
use std::sync::Arc;

use crate::model::FastMap;
use crate::resolve::{Identity, PeerMeta};

/// Names by resolved meta (its address) and by IP.
#[derive(Debug)]
pub struct NameCache {
    by_meta: FastMap<usize, (Arc<PeerMeta>, Arc<str>)>,
    by_ip: FastMap<IpAddr, Arc<str>>,
    capacity: usize,
}

impl NameCache {
    /// Entries kept by the store's cache (names of distinct pods and unnamed IPs).
    pub const DEFAULT_CAPACITY: usize = 8192;

    pub fn new(capacity: usize) -> Self {
        NameCache {
            by_meta: FastMap::default(),
            by_ip: FastMap::default(),
            capacity: capacity.max(1),
        }
    }

    /// The name of `identity`, equal to `identity.name()`.
    pub fn name(&mut self, identity: &Identity) -> Arc<str> {
        if self.len() >= self.capacity {
            self.by_meta.clear();
            self.by_ip.clear();
        }
        match &identity.meta {
            Some(meta) => {
                let key = Arc::as_ptr(meta) as usize;
                self.by_meta
                    .entry(key)
                    .or_insert_with(|| (meta.clone(), Arc::from(identity.name())))
                    .1
                    .clone()
            }
            None => self
                .by_ip
                .entry(identity.addr.ip())
                .or_insert_with(|| Arc::from(identity.name()))
                .clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_meta.len() + self.by_ip.len()
    }
}

impl Default for NameCache {
    fn default() -> Self {
        NameCache::new(NameCache::DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::PeerKind;

    fn named(ns: &str, workload: &str, addr: &str) -> Identity {
        Identity {
            kind: PeerKind::Pod,
            addr: addr.parse().unwrap(),
            meta: Some(Arc::new(PeerMeta {
                namespace: ns.into(),
                workload: workload.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn names_match_identity_name_and_are_shared() {
        let mut cache = NameCache::new(16);
        let a = named("demo", "frontend", "10.0.0.1:80");
        let no_ns = named("", "kubelet", "10.0.0.2:80");
        let ip = Identity::external("192.0.2.7:443".parse().unwrap());
        for id in [&a, &no_ns, &ip] {
            assert_eq!(&*cache.name(id), id.name());
        }
        assert_eq!(&*cache.name(&a), "frontend.demo");
        assert_eq!(&*cache.name(&no_ns), "kubelet");
        assert_eq!(&*cache.name(&ip), "192.0.2.7");
        // The same meta (another port of it) and the same unnamed IP share one name.
        let mut a2 = a.clone();
        a2.addr = "10.0.0.1:81".parse().unwrap();
        assert!(Arc::ptr_eq(&cache.name(&a), &cache.name(&a2)));
        let ip2 = Identity::external("192.0.2.7:80".parse().unwrap());
        assert!(Arc::ptr_eq(&cache.name(&ip), &cache.name(&ip2)));
        assert_eq!(cache.len(), 3);
        // Equal content in another meta: the same name (a separate entry).
        let b = named("demo", "frontend", "10.0.0.9:80");
        assert_eq!(&*cache.name(&b), "frontend.demo");
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn a_full_cache_starts_over_and_still_names_correctly() {
        let mut cache = NameCache::new(4);
        let ids: Vec<Identity> = (0..10)
            .map(|i| named("ns", &format!("w{i}"), &format!("10.0.1.{i}:80")))
            .collect();
        for round in 0..2 {
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(&*cache.name(id), format!("w{i}.ns"), "round {round}");
                assert!(cache.len() <= 4, "bounded: {}", cache.len());
            }
        }
    }
}
