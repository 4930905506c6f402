//! The one model of cluster state that both sources fill and lookups read.
//!
//! In: records ([`PodRecord`], [`ServiceRecord`], [`NodeRecord`], [`OwnerRecord`],
//! [`SliceRecord`]) applied and deleted by a source, with the time each change took effect.
//! Out: [`Found`]: what an `ip:port` was at a given time, and the time range over which
//! that answer holds (so the cache can keep it without being wrong at a boundary).
//!
//! Time matters because addresses are reused: a pod IP freed by a deleted or completed pod
//! is handed to a new pod. Every pod, Service and Node is held as a *tenure*: the address
//! belonged to it from `from` until `until` (open while it lives). A lookup at time `t`
//! picks, among tenures that cover `t`, the one that began last: when two overlap (the
//! old holder's end is only known late), the newer holder is the one that can have the
//! address. Ended tenures stay resolvable for `grace` after their end (late or skewed
//! events) and are dropped `grace` after the deletion was seen.
//!
//! This module does no I/O and takes no locks; `directory` wraps it for concurrent use.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{PeerKind, PeerMeta};

/// Unix time in nanoseconds (the unit of every timestamp in the pipeline).
pub type Nanos = u64;

/// A controlling owner as named by `metadata.ownerReferences`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
}

/// A pod as the resolver needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRecord {
    /// Unique key: the pod UID from Kubernetes, `namespace/name` from an inventory.
    pub key: String,
    pub uid: Option<String>,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Host-network pods share the node's address: they match only on a declared port.
    pub host_network: bool,
    /// Declared TCP container ports.
    pub ports: Vec<u16>,
    /// The controlling owner (ReplicaSet, StatefulSet, DaemonSet, Job, …) or, from an
    /// inventory, the workload itself.
    pub owner: Option<OwnerRef>,
    /// Earliest time the pod can hold its addresses.
    pub from: Nanos,
    /// When the pod stopped holding them while its object still exists (completed Job pods).
    pub until: Option<Nanos>,
}

/// A Service with its ClusterIPs (headless Services have none).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub from: Nanos,
}

/// A Node with its addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// The node name (node names are unique and stable across re-registration).
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub from: Nanos,
}

/// A ReplicaSet or Job: an intermediate owner between a pod and the workload to name.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerRecord {
    pub namespace: String,
    /// "ReplicaSet" or "Job".
    pub kind: String,
    pub name: String,
    /// Its own controlling owner (a Deployment, a CronJob), if any.
    pub owner: Option<OwnerRef>,
}

/// An EndpointSlice: which addresses back which Service.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceRecord {
    pub key: String,
    pub namespace: String,
    pub service: String,
    pub ips: Vec<IpAddr>,
}

/// The kinds of object a source reports, for resynchronisation after a relist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Pod,
    Service,
    Node,
    ReplicaSet,
    Job,
    EndpointSlice,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 6] = [
        ObjectKind::Pod,
        ObjectKind::Service,
        ObjectKind::Node,
        ObjectKind::ReplicaSet,
        ObjectKind::Job,
        ObjectKind::EndpointSlice,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            ObjectKind::Pod => "pods",
            ObjectKind::Service => "services",
            ObjectKind::Node => "nodes",
            ObjectKind::ReplicaSet => "replicasets",
            ObjectKind::Job => "jobs",
            ObjectKind::EndpointSlice => "endpointslices",
        }
    }
}

/// The answer to a lookup, and the time range `[valid_from, valid_until)` over which the
/// same query gives the same answer in the current state.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub kind: PeerKind,
    pub meta: Option<Arc<PeerMeta>>,
    /// Whether the port took part in the answer (host-network addresses).
    pub port_sensitive: bool,
    pub valid_from: Nanos,
    pub valid_until: Nanos,
}

/// Something that holds addresses for a time.
trait Tenant {
    fn key(&self) -> &str;
    fn ips(&self) -> &[IpAddr];
    fn from(&self) -> Nanos;
    fn until(&self) -> Option<Nanos> {
        None
    }
}

impl Tenant for PodRecord {
    fn key(&self) -> &str {
        &self.key
    }
    fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
    fn from(&self) -> Nanos {
        self.from
    }
    fn until(&self) -> Option<Nanos> {
        self.until
    }
}

impl Tenant for ServiceRecord {
    fn key(&self) -> &str {
        &self.key
    }
    fn ips(&self) -> &[IpAddr] {
        &self.cluster_ips
    }
    fn from(&self) -> Nanos {
        self.from
    }
}

impl Tenant for NodeRecord {
    fn key(&self) -> &str {
        &self.name
    }
    fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
    fn from(&self) -> Nanos {
        self.from
    }
}

struct Entry<R> {
    rec: R,
    meta: Arc<PeerMeta>,
    /// For a host-network pod: the node it runs on, for ports that are not its own.
    node_meta: Option<Arc<PeerMeta>>,
    /// When the object's deletion was seen (wall clock); drives pruning.
    deleted_seen: Option<Nanos>,
    /// When the tenure ended: the earlier of the record's own end and its deletion.
    end: Option<Nanos>,
}

impl<R: Tenant> Entry<R> {
    /// The last instant (exclusive) at which a lookup may still return this entry.
    fn resolvable_until(&self, grace: Nanos) -> Nanos {
        self.end.map_or(Nanos::MAX, |e| e.saturating_add(grace))
    }

    fn covers(&self, t: Nanos, grace: Nanos) -> bool {
        self.rec.from() <= t && t < self.resolvable_until(grace)
    }
}

/// Records of one kind, indexed by key and by address.
struct Table<R> {
    entries: HashMap<String, Entry<R>>,
    by_ip: HashMap<IpAddr, Vec<String>>,
    /// Addresses whose answers changed since the last [`ClusterState::drain_touched`].
    touched: Vec<IpAddr>,
}

impl<R> Default for Table<R> {
    fn default() -> Self {
        Table {
            entries: HashMap::new(),
            by_ip: HashMap::new(),
            touched: Vec::new(),
        }
    }
}

impl<R: Tenant + PartialEq> Table<R> {
    /// Inserts or replaces `rec`; false when nothing a lookup can see changed (status
    /// churn), so cached answers stay valid.
    fn upsert(&mut self, rec: R, meta: Arc<PeerMeta>, node_meta: Option<Arc<PeerMeta>>) -> bool {
        let key = rec.key().to_string();
        if let Some(old) = self.entries.get(&key)
            && old.deleted_seen.is_none()
            && old.rec == rec
            && old.meta == meta
            && old.node_meta == node_meta
        {
            return false;
        }
        if let Some(old) = self.entries.get(&key) {
            self.touched.extend_from_slice(old.rec.ips());
            let stale: Vec<IpAddr> = old
                .rec
                .ips()
                .iter()
                .filter(|ip| !rec.ips().contains(ip))
                .copied()
                .collect();
            for ip in stale {
                self.unindex(ip, &key);
            }
        }
        self.touched.extend_from_slice(rec.ips());
        for ip in rec.ips() {
            let keys = self.by_ip.entry(*ip).or_default();
            if !keys.contains(&key) {
                keys.push(key.clone());
            }
        }
        // An end once seen stays (a completed pod re-applied later must not move it on);
        // an object applied again after a deletion (a relist still had it) is alive.
        let end = match (
            self.entries.get(&key).and_then(|e| e.rec.until()),
            rec.until(),
        ) {
            (Some(old), Some(new)) => Some(old.min(new)),
            (_, new) => new,
        };
        self.entries.insert(
            key,
            Entry {
                rec,
                meta,
                node_meta,
                deleted_seen: None,
                end,
            },
        );
        true
    }

    fn unindex(&mut self, ip: IpAddr, key: &str) {
        if let Some(keys) = self.by_ip.get_mut(&ip) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// Ends the tenure of `key` at `at` (never later than it already ended).
    fn mark_deleted(&mut self, key: &str, at: Nanos, seen: Nanos) -> bool {
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        if e.deleted_seen.is_some() {
            return false;
        }
        e.deleted_seen = Some(seen);
        e.end = Some(e.end.map_or(at, |end| end.min(at)));
        self.touched.extend_from_slice(e.rec.ips());
        true
    }

    /// After a relist: everything alive that the list did not contain was deleted meanwhile.
    fn resync(&mut self, live: &HashSet<String>, now: Nanos) -> usize {
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(k, e)| e.deleted_seen.is_none() && !live.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.mark_deleted(k, now, now);
        }
        gone.len()
    }

    /// Removes what was deleted more than `grace` ago; returns the removed records.
    fn prune(&mut self, now: Nanos, grace: Nanos) -> Vec<R> {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.deleted_seen
                    .is_some_and(|s| s.saturating_add(grace) <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut removed = Vec::with_capacity(expired.len());
        for k in &expired {
            if let Some(e) = self.entries.remove(k) {
                for ip in e.rec.ips() {
                    self.unindex(*ip, k);
                }
                self.touched.extend_from_slice(e.rec.ips());
                removed.push(e.rec);
            }
        }
        removed
    }

    fn at_ip(&self, ip: &IpAddr) -> impl Iterator<Item = &Entry<R>> {
        self.by_ip
            .get(ip)
            .into_iter()
            .flatten()
            .filter_map(|k| self.entries.get(k))
    }

    /// Narrows `[lo, hi)` around `t` by the boundaries of every tenure at `ip`.
    fn narrow(&self, ip: &IpAddr, t: Nanos, grace: Nanos, lo: &mut Nanos, hi: &mut Nanos) {
        for e in self.at_ip(ip) {
            for b in [e.rec.from(), e.resolvable_until(grace)] {
                if b <= t {
                    *lo = (*lo).max(b);
                } else {
                    *hi = (*hi).min(b);
                }
            }
        }
    }

    fn alive(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.deleted_seen.is_none())
            .count()
    }
}

/// Picks the tenure that began last among those that cover `t` and satisfy `ok`.
fn newest<'a, R: Tenant + 'a>(
    entries: impl Iterator<Item = &'a Entry<R>>,
    t: Nanos,
    grace: Nanos,
    mut ok: impl FnMut(&Entry<R>) -> bool,
) -> Option<&'a Entry<R>> {
    entries
        .filter(|e| e.covers(t, grace) && ok(e))
        .max_by_key(|e| e.rec.from())
}

/// Cluster state: pods, Services, Nodes by address over time, and the owners that name
/// workloads.
pub struct ClusterState {
    grace: Nanos,
    pods: Table<PodRecord>,
    services: Table<ServiceRecord>,
    nodes: Table<NodeRecord>,
    /// (namespace, kind, name) of ReplicaSets and Jobs → their own owner.
    owners: HashMap<(String, String, String), Option<OwnerRef>>,
    /// (namespace, owner kind, owner name) → keys of the pods it owns, so an owner that
    /// arrives renames its pods without a scan (there are many old ReplicaSets).
    owned: HashMap<(String, String, String), Vec<String>>,
    slices: HashMap<String, SliceEntry>,
    /// Address → keys of the EndpointSlices that list it.
    endpoints: HashMap<IpAddr, Vec<String>>,
    /// Endpoint addresses whose answers changed since the last drain.
    touched: Vec<IpAddr>,
}

struct SliceEntry {
    rec: SliceRecord,
    meta: Arc<PeerMeta>,
}

impl ClusterState {
    /// `grace`: how long ended tenures stay resolvable (and deleted objects are kept).
    pub fn new(grace: Nanos) -> Self {
        ClusterState {
            grace,
            pods: Table::default(),
            services: Table::default(),
            nodes: Table::default(),
            owners: HashMap::new(),
            owned: HashMap::new(),
            slices: HashMap::new(),
            endpoints: HashMap::new(),
            touched: Vec::new(),
        }
    }

    // ---- pods ----

    pub fn apply_pod(&mut self, rec: PodRecord) -> bool {
        let meta = Arc::new(self.pod_meta(&rec));
        let node_meta = rec
            .host_network
            .then(|| rec.node.as_deref().map(|n| Arc::new(node_meta(n))))
            .flatten();
        if let Some(old) = self.pods.entries.get(&rec.key)
            && old.rec.owner != rec.owner
        {
            let old = old.rec.clone();
            self.unindex_owned(&old);
        }
        if let Some(o) = &rec.owner {
            let keys = self
                .owned
                .entry((rec.namespace.clone(), o.kind.clone(), o.name.clone()))
                .or_default();
            if !keys.contains(&rec.key) {
                keys.push(rec.key.clone());
            }
        }
        self.pods.upsert(rec, meta, node_meta)
    }

    fn unindex_owned(&mut self, p: &PodRecord) {
        let Some(o) = &p.owner else { return };
        let key = (p.namespace.clone(), o.kind.clone(), o.name.clone());
        if let Some(keys) = self.owned.get_mut(&key) {
            keys.retain(|k| *k != p.key);
            if keys.is_empty() {
                self.owned.remove(&key);
            }
        }
    }

    /// The pod `key` was deleted; it held its addresses until `at` at the latest.
    pub fn delete_pod(&mut self, key: &str, at: Nanos, seen: Nanos) -> bool {
        self.pods.mark_deleted(key, at, seen)
    }

    fn pod_meta(&self, p: &PodRecord) -> PeerMeta {
        let (workload_kind, workload) = self.workload_of(&p.namespace, p.owner.as_ref(), &p.name);
        PeerMeta {
            namespace: p.namespace.clone(),
            workload,
            workload_kind,
            pod: Some(p.name.clone()),
            pod_uid: p.uid.clone(),
            node: p.node.clone(),
            service: self.service_backed_by(&p.namespace, &p.ips),
        }
    }

    /// Follows Pod → ReplicaSet → Deployment and Pod → Job → CronJob; other owners
    /// (StatefulSet, DaemonSet, …) name the workload directly.
    fn workload_of(&self, ns: &str, owner: Option<&OwnerRef>, pod: &str) -> (String, String) {
        let Some(owner) = owner else {
            return ("Pod".into(), pod.into());
        };
        if owner.kind == "ReplicaSet" || owner.kind == "Job" {
            let key = (ns.to_string(), owner.kind.clone(), owner.name.clone());
            if let Some(Some(top)) = self.owners.get(&key) {
                return (top.kind.clone(), top.name.clone());
            }
        }
        (owner.kind.clone(), owner.name.clone())
    }

    fn service_backed_by(&self, ns: &str, ips: &[IpAddr]) -> Option<String> {
        ips.iter()
            .filter_map(|ip| self.endpoints.get(ip))
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .find(|s| s.rec.namespace == ns)
            .map(|s| s.rec.service.clone())
    }

    /// Recomputes the names of the pods at `ips` (after an EndpointSlice changed).
    fn refresh_pods_at(&mut self, ips: impl IntoIterator<Item = IpAddr>) {
        let mut keys: Vec<String> = ips
            .into_iter()
            .filter_map(|ip| self.pods.by_ip.get(&ip))
            .flatten()
            .cloned()
            .collect();
        keys.sort_unstable();
        keys.dedup();
        self.refresh_pod_keys(keys);
    }

    /// Recomputes the names of the pods `keys` (after their owner or an EndpointSlice
    /// that lists them changed).
    fn refresh_pod_keys(&mut self, keys: Vec<String>) {
        for k in keys {
            let meta = match self.pods.entries.get(&k) {
                Some(e) => Arc::new(self.pod_meta(&e.rec)),
                None => continue,
            };
            if let Some(e) = self.pods.entries.get_mut(&k)
                && *e.meta != *meta
            {
                e.meta = meta;
                self.pods.touched.extend_from_slice(&e.rec.ips);
            }
        }
    }

    // ---- owners ----

    pub fn apply_owner(&mut self, rec: OwnerRecord) -> bool {
        let key = (rec.namespace.clone(), rec.kind.clone(), rec.name.clone());
        if self.owners.get(&key) == Some(&rec.owner) {
            return false;
        }
        let pods = self.owned.get(&key).cloned().unwrap_or_default();
        self.owners.insert(key, rec.owner);
        self.refresh_pod_keys(pods);
        true
    }

    /// Forgets an owner. Pods keep the names they had (they are deleted with it).
    pub fn delete_owner(&mut self, namespace: &str, kind: &str, name: &str) -> bool {
        self.owners
            .remove(&(namespace.to_string(), kind.to_string(), name.to_string()))
            .is_some()
    }

    // ---- services, nodes, endpoint slices ----

    pub fn apply_service(&mut self, rec: ServiceRecord) -> bool {
        let meta = Arc::new(PeerMeta {
            namespace: rec.namespace.clone(),
            workload: rec.name.clone(),
            workload_kind: "Service".into(),
            service: Some(rec.name.clone()),
            ..PeerMeta::default()
        });
        self.services.upsert(rec, meta, None)
    }

    pub fn delete_service(&mut self, key: &str, at: Nanos) -> bool {
        self.services.mark_deleted(key, at, at)
    }

    pub fn apply_node(&mut self, rec: NodeRecord) -> bool {
        let meta = Arc::new(node_meta(&rec.name));
        self.nodes.upsert(rec, meta, None)
    }

    pub fn delete_node(&mut self, name: &str, at: Nanos) -> bool {
        self.nodes.mark_deleted(name, at, at)
    }

    pub fn apply_slice(&mut self, rec: SliceRecord) -> bool {
        if self.slices.get(&rec.key).is_some_and(|s| s.rec == rec) {
            return false;
        }
        let old_ips = self.remove_slice_entry(&rec.key);
        for ip in &rec.ips {
            let keys = self.endpoints.entry(*ip).or_default();
            if !keys.contains(&rec.key) {
                keys.push(rec.key.clone());
            }
        }
        let meta = Arc::new(PeerMeta {
            namespace: rec.namespace.clone(),
            workload: rec.service.clone(),
            workload_kind: "Service".into(),
            service: Some(rec.service.clone()),
            ..PeerMeta::default()
        });
        let touched: HashSet<IpAddr> = old_ips.into_iter().chain(rec.ips.clone()).collect();
        self.slices
            .insert(rec.key.clone(), SliceEntry { rec, meta });
        self.touched.extend(touched.iter().copied());
        self.refresh_pods_at(touched);
        true
    }

    pub fn delete_slice(&mut self, key: &str) -> bool {
        let had = self.slices.contains_key(key);
        let touched: HashSet<IpAddr> = self.remove_slice_entry(key).into_iter().collect();
        self.touched.extend(touched.iter().copied());
        self.refresh_pods_at(touched);
        had
    }

    fn remove_slice_entry(&mut self, key: &str) -> Vec<IpAddr> {
        let Some(old) = self.slices.remove(key) else {
            return Vec::new();
        };
        for ip in &old.rec.ips {
            if let Some(keys) = self.endpoints.get_mut(ip) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.endpoints.remove(ip);
                }
            }
        }
        old.rec.ips
    }

    // ---- relist and pruning ----

    /// After a relist of `kind`: objects not in `live` (keys as the records carry them;
    /// `namespace/kind/name` for owners) were deleted while the watch was down. Returns
    /// how many were.
    pub fn resync(&mut self, kind: ObjectKind, live: &HashSet<String>, now: Nanos) -> usize {
        match kind {
            ObjectKind::Pod => self.pods.resync(live, now),
            ObjectKind::Service => self.services.resync(live, now),
            ObjectKind::Node => self.nodes.resync(live, now),
            ObjectKind::ReplicaSet | ObjectKind::Job => {
                let kind_name = if kind == ObjectKind::Job {
                    "Job"
                } else {
                    "ReplicaSet"
                };
                let before = self.owners.len();
                self.owners
                    .retain(|k, _| k.1 != kind_name || live.contains(&owner_key(&k.0, &k.1, &k.2)));
                before - self.owners.len()
            }
            ObjectKind::EndpointSlice => {
                let gone: Vec<String> = self
                    .slices
                    .keys()
                    .filter(|k| !live.contains(*k))
                    .cloned()
                    .collect();
                for k in &gone {
                    self.delete_slice(k);
                }
                gone.len()
            }
        }
    }

    /// Drops what was deleted more than `grace` ago. Returns how many objects went.
    pub fn prune(&mut self, now: Nanos) -> usize {
        let pods = self.pods.prune(now, self.grace);
        for p in &pods {
            self.unindex_owned(p);
        }
        pods.len()
            + self.services.prune(now, self.grace).len()
            + self.nodes.prune(now, self.grace).len()
    }

    /// The addresses whose answers may have changed since the last call (the cache drops
    /// what it holds for them).
    pub fn drain_touched(&mut self) -> Vec<IpAddr> {
        let mut all = std::mem::take(&mut self.touched);
        all.append(&mut self.pods.touched);
        all.append(&mut self.services.touched);
        all.append(&mut self.nodes.touched);
        all
    }

    /// Live objects of `kind` (deleted ones in their grace period not counted).
    pub fn count(&self, kind: ObjectKind) -> usize {
        match kind {
            ObjectKind::Pod => self.pods.alive(),
            ObjectKind::Service => self.services.alive(),
            ObjectKind::Node => self.nodes.alive(),
            ObjectKind::ReplicaSet => self.owners.keys().filter(|k| k.1 == "ReplicaSet").count(),
            ObjectKind::Job => self.owners.keys().filter(|k| k.1 == "Job").count(),
            ObjectKind::EndpointSlice => self.slices.len(),
        }
    }

    // ---- lookup ----

    /// What `addr` was at `t`. Order: a Service ClusterIP is never a pod; a pod (a
    /// host-network pod only on one of its ports); the Node; a host-network pod's node;
    /// an address that backs a Service (endpoints outside the pod network); else external.
    pub fn lookup(&self, addr: SocketAddr, t: Nanos) -> Found {
        let ip = addr.ip();
        let port = addr.port();
        let g = self.grace;
        let (mut lo, mut hi) = (0, Nanos::MAX);
        self.services.narrow(&ip, t, g, &mut lo, &mut hi);
        self.pods.narrow(&ip, t, g, &mut lo, &mut hi);
        self.nodes.narrow(&ip, t, g, &mut lo, &mut hi);
        let found = |kind, meta: &Arc<PeerMeta>, port_sensitive| Found {
            kind,
            meta: Some(meta.clone()),
            port_sensitive,
            valid_from: lo,
            valid_until: hi,
        };

        if let Some(s) = newest(self.services.at_ip(&ip), t, g, |_| true) {
            return found(PeerKind::Service, &s.meta, false);
        }
        let mut host_pods = false;
        let pod = newest(self.pods.at_ip(&ip), t, g, |e| {
            if e.rec.host_network {
                host_pods = true;
                e.rec.ports.contains(&port)
            } else {
                true
            }
        });
        if let Some(p) = pod {
            return found(PeerKind::Pod, &p.meta, p.rec.host_network);
        }
        if let Some(n) = newest(self.nodes.at_ip(&ip), t, g, |_| true) {
            return found(PeerKind::Node, &n.meta, host_pods);
        }
        if let Some(node) = newest(self.pods.at_ip(&ip), t, g, |e| e.node_meta.is_some())
            .and_then(|e| e.node_meta.as_ref())
        {
            return found(PeerKind::Node, node, true);
        }
        if let Some(slice) = self
            .endpoints
            .get(&ip)
            .and_then(|keys| keys.first())
            .and_then(|k| self.slices.get(k))
        {
            return found(PeerKind::Service, &slice.meta, false);
        }
        Found {
            kind: PeerKind::External,
            meta: None,
            port_sensitive: false,
            valid_from: lo,
            valid_until: hi,
        }
    }
}

/// The key under which [`ClusterState::resync`] expects owners.
pub fn owner_key(namespace: &str, kind: &str, name: &str) -> String {
    format!("{namespace}/{kind}/{name}")
}

fn node_meta(name: &str) -> PeerMeta {
    PeerMeta {
        workload: name.to_string(),
        workload_kind: "Node".into(),
        node: Some(name.to_string()),
        ..PeerMeta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn pod(key: &str, name: &str, ip: &str, from: Nanos) -> PodRecord {
        PodRecord {
            key: key.into(),
            uid: Some(key.into()),
            namespace: "demo".into(),
            name: name.into(),
            node: Some("node-a".into()),
            ips: vec![ip.parse().unwrap()],
            host_network: false,
            ports: vec![],
            owner: None,
            from,
            until: None,
        }
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pod_name(f: &Found) -> Option<&str> {
        f.meta.as_ref().and_then(|m| m.pod.as_deref())
    }

    #[test]
    fn reused_ip_resolves_by_time() {
        let mut st = ClusterState::new(60 * S);
        st.apply_pod(pod("u1", "old", "10.0.0.5", 100 * S));
        st.delete_pod("u1", 200 * S, 200 * S);
        st.apply_pod(pod("u2", "new", "10.0.0.5", 210 * S));
        let a = at("10.0.0.5:80");
        assert_eq!(pod_name(&st.lookup(a, 150 * S)), Some("old"));
        // Within grace after deletion and before the new pod: still the old one.
        assert_eq!(pod_name(&st.lookup(a, 205 * S)), Some("old"));
        assert_eq!(pod_name(&st.lookup(a, 215 * S)), Some("new"));
        assert_eq!(st.lookup(a, 50 * S).kind, PeerKind::External);
        let f = st.lookup(a, 150 * S);
        assert_eq!((f.valid_from, f.valid_until), (100 * S, 210 * S));
        // Pruned after grace: the old pod is gone, the new one stays.
        assert_eq!(st.prune(261 * S), 1);
        assert_eq!(st.lookup(a, 150 * S).kind, PeerKind::External);
        assert_eq!(pod_name(&st.lookup(a, 300 * S)), Some("new"));
    }

    #[test]
    fn owner_chain_names_the_workload_even_when_owners_arrive_late() {
        let mut st = ClusterState::new(S);
        let mut p = pod("u1", "web-5d9-abc", "10.0.0.7", 0);
        p.owner = Some(OwnerRef {
            kind: "ReplicaSet".into(),
            name: "web-5d9".into(),
        });
        st.apply_pod(p);
        let m = st.lookup(at("10.0.0.7:1"), S).meta.unwrap();
        assert_eq!(
            (m.workload_kind.as_str(), m.workload.as_str()),
            ("ReplicaSet", "web-5d9")
        );
        st.apply_owner(OwnerRecord {
            namespace: "demo".into(),
            kind: "ReplicaSet".into(),
            name: "web-5d9".into(),
            owner: Some(OwnerRef {
                kind: "Deployment".into(),
                name: "web".into(),
            }),
        });
        let m = st.lookup(at("10.0.0.7:1"), S).meta.unwrap();
        assert_eq!(
            (m.workload_kind.as_str(), m.workload.as_str()),
            ("Deployment", "web")
        );
        assert_eq!(m.pod.as_deref(), Some("web-5d9-abc"));
    }

    #[test]
    fn host_network_pod_matches_by_port_else_node() {
        let mut st = ClusterState::new(S);
        st.apply_node(NodeRecord {
            name: "node-a".into(),
            ips: vec!["10.10.0.1".parse().unwrap()],
            from: 0,
        });
        let mut p = pod("u1", "agent", "10.10.0.1", 0);
        p.host_network = true;
        p.ports = vec![9100];
        st.apply_pod(p);
        let f = st.lookup(at("10.10.0.1:9100"), S);
        assert_eq!((f.kind, pod_name(&f)), (PeerKind::Pod, Some("agent")));
        assert!(f.port_sensitive);
        let f = st.lookup(at("10.10.0.1:22"), S);
        assert_eq!(f.kind, PeerKind::Node);
        assert_eq!(f.meta.unwrap().workload, "node-a");
    }

    #[test]
    fn cluster_ip_is_a_service_and_endpoints_name_pods_and_outsiders() {
        let mut st = ClusterState::new(S);
        st.apply_pod(pod("u1", "backend-0", "10.0.0.9", 0));
        st.apply_service(ServiceRecord {
            key: "s1".into(),
            namespace: "demo".into(),
            name: "backend".into(),
            cluster_ips: vec!["10.96.0.20".parse().unwrap()],
            ports: vec![80],
            from: 0,
        });
        st.apply_slice(SliceRecord {
            key: "e1".into(),
            namespace: "demo".into(),
            service: "backend".into(),
            ips: vec!["10.0.0.9".parse().unwrap(), "192.168.1.1".parse().unwrap()],
        });
        let f = st.lookup(at("10.96.0.20:80"), S);
        assert_eq!(f.kind, PeerKind::Service);
        assert_eq!(f.meta.unwrap().workload, "backend");
        let f = st.lookup(at("10.0.0.9:8080"), S);
        assert_eq!(f.kind, PeerKind::Pod);
        assert_eq!(f.meta.unwrap().service.as_deref(), Some("backend"));
        assert_eq!(st.lookup(at("192.168.1.1:443"), S).kind, PeerKind::Service);
        st.delete_slice("e1");
        assert_eq!(
            st.lookup(at("10.0.0.9:8080"), S).meta.unwrap().service,
            None
        );
        assert_eq!(st.lookup(at("192.168.1.1:443"), S).kind, PeerKind::External);
    }

    #[test]
    fn resync_ends_what_the_relist_no_longer_has() {
        let mut st = ClusterState::new(10 * S);
        st.apply_pod(pod("u1", "a", "10.0.0.1", 0));
        st.apply_pod(pod("u2", "b", "10.0.0.2", 0));
        let live: HashSet<String> = ["u2".to_string()].into();
        assert_eq!(st.resync(ObjectKind::Pod, &live, 100 * S), 1);
        assert_eq!(st.count(ObjectKind::Pod), 1);
        assert_eq!(pod_name(&st.lookup(at("10.0.0.1:1"), 50 * S)), Some("a"));
        assert_eq!(
            st.lookup(at("10.0.0.1:1"), 111 * S).kind,
            PeerKind::External
        );
    }

    #[test]
    fn unchanged_objects_change_nothing_and_the_owner_index_follows_pruning() {
        let mut st = ClusterState::new(S);
        let mut p = pod("u1", "web-1", "10.0.0.3", 0);
        p.owner = Some(OwnerRef {
            kind: "ReplicaSet".into(),
            name: "web-rs".into(),
        });
        assert!(st.apply_pod(p.clone()));
        assert!(
            !st.apply_pod(p.clone()),
            "the same pod again changes nothing"
        );
        let rs = OwnerRecord {
            namespace: "demo".into(),
            kind: "ReplicaSet".into(),
            name: "web-rs".into(),
            owner: Some(OwnerRef {
                kind: "Deployment".into(),
                name: "web".into(),
            }),
        };
        assert!(st.apply_owner(rs.clone()));
        assert!(!st.apply_owner(rs));
        assert_eq!(st.lookup(at("10.0.0.3:1"), S).meta.unwrap().workload, "web");
        assert!(st.delete_pod("u1", 10 * S, 10 * S));
        assert!(!st.delete_pod("u1", 11 * S, 11 * S), "deleted once");
        assert_eq!(st.prune(20 * S), 1);
        assert!(st.owned.is_empty(), "pruned pods leave the owner index");
    }
}
