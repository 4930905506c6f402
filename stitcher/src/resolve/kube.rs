//! Kubernetes source: watches the API and keeps a [`Directory`] current.
//!
//! In: list and watch streams of Pods, Services, Nodes, EndpointSlices, ReplicaSets and
//! Jobs (all namespaces), through `kube::runtime::watcher`. Out: changes to the
//! directory's [`ClusterState`](super::state::ClusterState); lookups read the directory
//! and never wait on the API.
//!
//! Recovery is kube's watcher: a closed watch resumes from the last resourceVersion it
//! saw (bookmarks keep that fresh), an expired one (410 Gone) relists, a failed request
//! retries with backoff. Events missed during an outage arrive on the resumed watch; a
//! relist replaces what was known, and whatever the relist no longer contains is taken as
//! deleted at the time of the relist ([`ClusterState::resync`]).
//!
//! Deployments, StatefulSets, DaemonSets and CronJobs are not watched: a pod's owner
//! reference names a StatefulSet or DaemonSet directly, and the ReplicaSet's (Job's) owner
//! reference names its Deployment (CronJob).

use std::collections::HashSet;
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::directory::{CacheConfig, Directory, ResolveCounters, now_nanos};
use super::state::{
    ClusterState, Nanos, NodeRecord, ObjectKind, OwnerRecord, OwnerRef, PodRecord, ServiceRecord,
    SliceRecord, owner_key,
};
use super::{Identity, Resolve};
use crate::metrics::Registry;

/// Settings of the Kubernetes source.
#[derive(Debug, Clone, Copy)]
pub struct KubeOptions {
    /// How long deleted objects stay resolvable.
    pub deleted_grace: Duration,
    pub cache: CacheConfig,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            deleted_grace: Duration::from_secs(60),
            cache: CacheConfig::default(),
        }
    }
}

/// A resolver kept current by watches on the Kubernetes API.
pub struct KubeResolver {
    dir: Arc<Directory>,
    sync: Arc<SyncState>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeResolver {
    /// Starts the watches (in the background: this returns at once) with default options.
    pub async fn start(client: Client, registry: &Registry) -> anyhow::Result<Self> {
        Self::start_with(client, registry, KubeOptions::default()).await
    }

    /// Starts the watches with `opts`. Must run inside a tokio runtime.
    pub async fn start_with(
        client: Client,
        registry: &Registry,
        opts: KubeOptions,
    ) -> anyhow::Result<Self> {
        let dir = Arc::new(Directory::new(opts.deleted_grace, opts.cache, registry));
        let sync = Arc::new(SyncState::default());
        let tasks = vec![
            spawn_watch::<Pod>(&client, &dir, &sync),
            spawn_watch::<Service>(&client, &dir, &sync),
            spawn_watch::<Node>(&client, &dir, &sync),
            spawn_watch::<EndpointSlice>(&client, &dir, &sync),
            spawn_watch::<ReplicaSet>(&client, &dir, &sync),
            spawn_watch::<Job>(&client, &dir, &sync),
            tokio::spawn(prune_loop(dir.clone(), opts.deleted_grace)),
        ];
        Ok(KubeResolver { dir, sync, tasks })
    }

    /// The directory the watches fill.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.dir
    }

    /// Whether every kind has been listed once.
    pub fn is_synced(&self) -> bool {
        self.sync.all()
    }

    /// Waits until every kind has been listed once, at most `timeout`. Lookups work
    /// before that (they just know less).
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.sync.notify.notified();
                if self.sync.all() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl Drop for KubeResolver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Resolve for KubeResolver {
    fn resolve(&self, addr: std::net::SocketAddr, at_unix_nanos: u64) -> Identity {
        self.dir.resolve(addr, at_unix_nanos)
    }
}

#[derive(Default)]
struct SyncState {
    listed: AtomicU8,
    notify: Notify,
}

impl SyncState {
    fn mark(&self, kind: ObjectKind) {
        self.listed.fetch_or(bit(kind), Ordering::AcqRel);
        self.notify.notify_waiters();
    }
    fn all(&self) -> bool {
        let all = ObjectKind::ALL.iter().fold(0, |acc, k| acc | bit(*k));
        self.listed.load(Ordering::Acquire) & all == all
    }
}

fn bit(kind: ObjectKind) -> u8 {
    1 << ObjectKind::ALL.iter().position(|k| *k == kind).unwrap_or(7)
}

/// Reports objects the resolver cannot use: counted always, logged once per kind.
struct Skips {
    kind: ObjectKind,
    logged: AtomicBool,
    counters: ResolveCounters,
}

impl Skips {
    fn skip(&self, what: &str, reason: &str) {
        self.counters.objects_skipped.inc();
        if !self.logged.swap(true, Ordering::Relaxed) {
            warn!(
                kind = self.kind.as_str(),
                object = what,
                reason,
                "resolver skips an object or address (logged once per kind; counted in resolve.objects_skipped)"
            );
        } else {
            debug!(
                kind = self.kind.as_str(),
                object = what,
                reason,
                "resolver skips"
            );
        }
    }
}

/// A watched kind: how its objects change the state.
trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: ObjectKind;
    /// The key [`ClusterState::resync`] knows the object by.
    fn state_key(&self) -> Option<String>;
    /// Applies the object; false when nothing visible changed.
    fn apply(&self, st: &mut ClusterState, now: Nanos, skips: &Skips) -> bool;
    fn delete(&self, st: &mut ClusterState, now: Nanos) -> bool;
}

fn spawn_watch<K: Watched>(
    client: &Client,
    dir: &Arc<Directory>,
    sync: &Arc<SyncState>,
) -> JoinHandle<()> {
    let api: Api<K> = Api::all(client.clone());
    tokio::spawn(watch_kind(api, dir.clone(), sync.clone()))
}

async fn watch_kind<K: Watched>(api: Api<K>, dir: Arc<Directory>, sync: Arc<SyncState>) {
    let counters = dir.counters.clone();
    let skips = Skips {
        kind: K::KIND,
        logged: AtomicBool::new(false),
        counters: counters.clone(),
    };
    let kind = K::KIND.as_str();
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut lists = 0u64;
    let mut listing: Option<HashSet<String>> = None;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(err) => {
                counters.watch_errors.inc();
                if !failing {
                    warn!(kind, error = %err, "watch failed; reconnecting with backoff (counted in resolve.watch.errors)");
                    failing = true;
                } else {
                    debug!(kind, error = %err, "watch still failing");
                }
                continue;
            }
        };
        if failing && !matches!(event, Event::Init) {
            info!(kind, "watch recovered");
            failing = false;
        }
        let now = now_nanos();
        match event {
            Event::Init => {
                lists += 1;
                if lists > 1 {
                    counters.watch_relists.inc();
                    info!(kind, "relisting (watch expired or could not resume)");
                }
                listing = Some(HashSet::new());
            }
            Event::InitApply(obj) => {
                if let (Some(live), Some(key)) = (listing.as_mut(), obj.state_key()) {
                    live.insert(key);
                }
                dir.update_if(|st| obj.apply(st, now, &skips));
            }
            Event::InitDone => {
                let live = listing.take().unwrap_or_default();
                let mut gone = 0;
                dir.update_if(|st| {
                    gone = st.resync(K::KIND, &live, now);
                    gone > 0
                });
                if gone > 0 {
                    counters.deleted_while_disconnected.add(gone as u64);
                    info!(
                        kind,
                        gone, "relist found objects deleted while the watch was down"
                    );
                }
                debug!(kind, objects = live.len(), "listed");
                sync.mark(K::KIND);
                dir.publish_counts();
            }
            Event::Apply(obj) => {
                counters.watch_events.inc();
                dir.update_if(|st| obj.apply(st, now, &skips));
            }
            Event::Delete(obj) => {
                counters.watch_events.inc();
                dir.update_if(|st| obj.delete(st, now));
            }
        }
    }
    // kube's watcher never ends; if it did, names would silently go stale.
    warn!(
        kind,
        "watch stream ended; names of this kind are no longer updated"
    );
}

/// Forgets deleted objects after their grace period and refreshes the gauges.
async fn prune_loop(dir: Arc<Directory>, grace: Duration) {
    let period = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = now_nanos();
        dir.update_if(|st| st.prune(now) > 0);
        dir.publish_counts();
    }
}

// ---- object → record ----

fn time_nanos(t: &Time) -> Nanos {
    u64::try_from(t.0.as_nanosecond()).unwrap_or(0)
}

fn name_of(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The controlling owner, else the first owner.
fn owner_of(meta: &ObjectMeta) -> Option<OwnerRef> {
    let refs = meta.owner_references.as_ref()?;
    refs.iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| refs.first())
        .map(|r| OwnerRef {
            kind: r.kind.clone(),
            name: r.name.clone(),
        })
}

fn parse_ips<'a>(
    addrs: impl Iterator<Item = &'a str>,
    what: &ObjectMeta,
    skips: &Skips,
) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for a in addrs {
        match a.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => skips.skip(&name_of(what), &format!("unparsable address {a:?}")),
        }
    }
    ips
}

fn pod_record(pod: &Pod, now: Nanos, skips: &Skips) -> Option<PodRecord> {
    let meta = &pod.metadata;
    let Some(uid) = meta.uid.clone() else {
        skips.skip(&name_of(meta), "no metadata.uid");
        return None;
    };
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    let listed: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .collect(),
    };
    let ips = parse_ips(listed.into_iter().filter(|s| !s.is_empty()), meta, skips);
    let containers = spec.into_iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    });
    let mut ports: Vec<u16> = containers
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let started = status.and_then(|s| s.start_time.as_ref());
    let from = started
        .or(meta.creation_timestamp.as_ref())
        .map_or(0, time_nanos);
    let terminal = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    // A completed pod keeps its object (and status.podIP) but its address is free for reuse.
    let until = terminal.then(|| {
        status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
            .map(time_nanos)
            .max()
            .unwrap_or(now)
    });
    Some(PodRecord {
        key: uid.clone(),
        uid: Some(uid),
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ports,
        owner: owner_of(meta),
        from,
        until,
    })
}

impl Watched for Pod {
    const KIND: ObjectKind = ObjectKind::Pod;
    fn state_key(&self) -> Option<String> {
        self.metadata.uid.clone()
    }
    fn apply(&self, st: &mut ClusterState, now: Nanos, skips: &Skips) -> bool {
        pod_record(self, now, skips).is_some_and(|rec| st.apply_pod(rec))
    }
    fn delete(&self, st: &mut ClusterState, now: Nanos) -> bool {
        let Some(uid) = self.metadata.uid.as_deref() else {
            return false;
        };
        // deletionTimestamp is when the kubelet must have stopped it (graceful deadline).
        let at = self
            .metadata
            .deletion_timestamp
            .as_ref()
            .map_or(now, |t| time_nanos(t).min(now));
        st.delete_pod(uid, at, now)
    }
}

impl Watched for Service {
    const KIND: ObjectKind = ObjectKind::Service;
    fn state_key(&self) -> Option<String> {
        self.metadata.uid.clone()
    }
    fn apply(&self, st: &mut ClusterState, _now: Nanos, skips: &Skips) -> bool {
        let meta = &self.metadata;
        let Some(uid) = meta.uid.clone() else {
            skips.skip(&name_of(meta), "no metadata.uid");
            return false;
        };
        let spec = self.spec.as_ref();
        let listed: Vec<&str> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => spec
                .and_then(|s| s.cluster_ip.as_deref())
                .into_iter()
                .collect(),
        };
        // Headless Services say "None": they have no address of their own.
        let listed = listed.into_iter().filter(|s| !s.is_empty() && *s != "None");
        st.apply_service(ServiceRecord {
            key: uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            cluster_ips: parse_ips(listed, meta, skips),
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect(),
            from: meta.creation_timestamp.as_ref().map_or(0, time_nanos),
        })
    }
    fn delete(&self, st: &mut ClusterState, now: Nanos) -> bool {
        self.metadata
            .uid
            .as_deref()
            .is_some_and(|uid| st.delete_service(uid, now))
    }
}

impl Watched for Node {
    const KIND: ObjectKind = ObjectKind::Node;
    fn state_key(&self) -> Option<String> {
        self.metadata.name.clone()
    }
    fn apply(&self, st: &mut ClusterState, _now: Nanos, skips: &Skips) -> bool {
        let meta = &self.metadata;
        let Some(name) = meta.name.clone() else {
            skips.skip(&name_of(meta), "no metadata.name");
            return false;
        };
        let addrs = self
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .map(|a| a.address.as_str());
        st.apply_node(NodeRecord {
            name,
            ips: parse_ips(addrs, meta, skips),
            from: meta.creation_timestamp.as_ref().map_or(0, time_nanos),
        })
    }
    fn delete(&self, st: &mut ClusterState, now: Nanos) -> bool {
        self.metadata
            .name
            .as_deref()
            .is_some_and(|name| st.delete_node(name, now))
    }
}

fn owner_record(meta: &ObjectMeta, kind: &str) -> OwnerRecord {
    OwnerRecord {
        namespace: meta.namespace.clone().unwrap_or_default(),
        kind: kind.to_string(),
        name: meta.name.clone().unwrap_or_default(),
        owner: owner_of(meta),
    }
}

fn owner_state_key(meta: &ObjectMeta, kind: &str) -> Option<String> {
    Some(owner_key(
        meta.namespace.as_deref().unwrap_or(""),
        kind,
        meta.name.as_deref()?,
    ))
}

impl Watched for ReplicaSet {
    const KIND: ObjectKind = ObjectKind::ReplicaSet;
    fn state_key(&self) -> Option<String> {
        owner_state_key(&self.metadata, "ReplicaSet")
    }
    fn apply(&self, st: &mut ClusterState, _now: Nanos, _skips: &Skips) -> bool {
        st.apply_owner(owner_record(&self.metadata, "ReplicaSet"))
    }
    fn delete(&self, st: &mut ClusterState, _now: Nanos) -> bool {
        let r = owner_record(&self.metadata, "ReplicaSet");
        st.delete_owner(&r.namespace, &r.kind, &r.name)
    }
}

impl Watched for Job {
    const KIND: ObjectKind = ObjectKind::Job;
    fn state_key(&self) -> Option<String> {
        owner_state_key(&self.metadata, "Job")
    }
    fn apply(&self, st: &mut ClusterState, _now: Nanos, _skips: &Skips) -> bool {
        st.apply_owner(owner_record(&self.metadata, "Job"))
    }
    fn delete(&self, st: &mut ClusterState, _now: Nanos) -> bool {
        let r = owner_record(&self.metadata, "Job");
        st.delete_owner(&r.namespace, &r.kind, &r.name)
    }
}

impl Watched for EndpointSlice {
    const KIND: ObjectKind = ObjectKind::EndpointSlice;
    fn state_key(&self) -> Option<String> {
        self.metadata.uid.clone()
    }
    fn apply(&self, st: &mut ClusterState, _now: Nanos, skips: &Skips) -> bool {
        let meta = &self.metadata;
        let Some(uid) = meta.uid.clone() else {
            skips.skip(&name_of(meta), "no metadata.uid");
            return false;
        };
        let service = meta
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"));
        let Some(service) = service.cloned() else {
            skips.skip(&name_of(meta), "no kubernetes.io/service-name label");
            return false;
        };
        // FQDN slices name hosts, not addresses.
        let ips = if self.address_type == "IPv4" || self.address_type == "IPv6" {
            let addrs = self.endpoints.iter().flat_map(|e| e.addresses.iter());
            parse_ips(addrs.map(String::as_str), meta, skips)
        } else {
            Vec::new()
        };
        st.apply_slice(SliceRecord {
            key: uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            service,
            ips,
        })
    }
    fn delete(&self, st: &mut ClusterState, _now: Nanos) -> bool {
        self.metadata
            .uid
            .as_deref()
            .is_some_and(|uid| st.delete_slice(uid))
    }
}
