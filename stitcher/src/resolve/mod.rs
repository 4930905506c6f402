//! resolve: addresses → names.
//!
//! In: an IP address and port as observed, and the time of the observation.
//! Out: an [`Identity`]: the Pod (and its workload), the Service, the Node, or
//! an external address that stays an IP.
//!
//! Sources: a static inventory file (`--inventory`, [`inventory`]) or the Kubernetes API
//! (watches, [`kube`]). Both fill one time-aware model of cluster state ([`state`]) that
//! the hot path reads through a cache ([`directory`]). Lookups never wait on the API:
//! they read in-memory state.
//!
//! # Entry points (for `main`)
//!
//! - Flatten [`ResolveArgs`] into the command line (`--inventory`, `--kubernetes
//!   [auto|on|off]` (bare `--kubernetes` = on), `--deleted-grace 60s`,
//!   `--resolve-cache-size`, `--resolve-cache-ttl`; env `WEFT_*`), or fill its public
//!   fields from flags of your own; then `resolve::build(&args, &registry).await?` gives
//!   an `Arc<dyn Resolve>`. Call it inside the tokio runtime: the Kubernetes source
//!   spawns its watch tasks there. `--inventory` wins over `--kubernetes auto`;
//!   `--inventory` with `--kubernetes on` is an error.
//! - Or directly: [`StaticInventory::from_file`]`(path, cache, &registry)` and
//!   [`KubeResolver::start`]`(client, &registry).await` ([`KubeResolver::wait_synced`]
//!   waits for the first full list).
//!
//! # What an address resolves to
//!
//! A Service ClusterIP → the Service (never a pod). A pod IP → the pod that held it at the
//! observation's time, named by its workload (Pod → ReplicaSet → Deployment, Pod → Job →
//! CronJob, StatefulSet, DaemonSet; the pod itself without an owner). A pod holds its
//! IP from `status.startTime` (else `creationTimestamp`) until it is deleted (the earlier
//! of the DELETED event and `deletionTimestamp`) or completes (Succeeded/Failed: the last
//! container's `finishedAt`; the object stays but the IP is free for reuse); when two
//! holders overlap, the one that started last wins. Ended pods stay resolvable for
//! `--deleted-grace` past their end. A node address → the host-network pod that declares
//! the port as a containerPort, else the Node. An address listed only in an EndpointSlice
//! (a selector-less Service's backend) → that Service. Anything else stays an IP
//! ([`Identity::external`]).
//!
//! # RBAC (the Helm chart mirrors this list; nothing else is read)
//!
//! | apiGroup            | resource         | verbs       |
//! |---------------------|------------------|-------------|
//! | `""` (core)         | `pods`           | list, watch |
//! | `""` (core)         | `services`       | list, watch |
//! | `""` (core)         | `nodes`          | list, watch |
//! | `discovery.k8s.io`  | `endpointslices` | list, watch |
//! | `apps`              | `replicasets`    | list, watch |
//! | `batch`             | `jobs`           | list, watch |
//!
//! `get` is never used (watchers list, then watch). Deployments, StatefulSets, DaemonSets
//! and CronJobs are named from owner references and are not read.
//!
//! # Counters
//!
//! `resolve.lookups`, `resolve.cache.hits`, `resolve.cache.misses`, `resolve.unresolved`,
//! `resolve.watch.errors` (watch restarts), `resolve.watch.relists`,
//! `resolve.watch.events`, `resolve.watch.deleted_while_disconnected`,
//! `resolve.objects_skipped`, `resolve.objects.<kind>` (gauges).

pub mod directory;
pub mod inventory;
pub mod kube;
pub mod state;

pub use directory::{CacheConfig, Directory};
pub use inventory::{Inventory, StaticInventory};
pub use kube::{KubeOptions, KubeResolver};

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::info;

use crate::metrics::Registry;

/// What kind of thing an address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKind {
    Pod,
    Service,
    Node,
    External,
}

impl PeerKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            PeerKind::Pod => "pod",
            PeerKind::Service => "service",
            PeerKind::Node => "node",
            PeerKind::External => "external",
        }
    }
}

/// Names known for an address. Shared (`Arc`) so a lookup copies a pointer, not strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PeerMeta {
    pub namespace: String,
    /// Deployment, StatefulSet, DaemonSet, Job, CronJob name; the pod's own name when
    /// it has no owner; the Service name for a Service; the node name for a Node.
    pub workload: String,
    /// "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod",
    /// "Service", "Node".
    pub workload_kind: String,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub node: Option<String>,
    pub service: Option<String>,
}

/// An address with what is known about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub kind: PeerKind,
    pub addr: SocketAddr,
    pub meta: Option<Arc<PeerMeta>>,
}

impl Identity {
    pub fn external(addr: SocketAddr) -> Self {
        Identity {
            kind: PeerKind::External,
            addr,
            meta: None,
        }
    }

    /// `workload.namespace` when known, else the IP.
    pub fn name(&self) -> String {
        match &self.meta {
            Some(m) if m.namespace.is_empty() => m.workload.clone(),
            Some(m) => format!("{}.{}", m.workload, m.namespace),
            None => self.addr.ip().to_string(),
        }
    }

    pub fn workload(&self) -> Option<&str> {
        self.meta.as_deref().map(|m| m.workload.as_str())
    }

    pub fn namespace(&self) -> Option<&str> {
        self.meta.as_deref().map(|m| m.namespace.as_str())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} as {}:{}",
            self.addr.ip(),
            self.name(),
            self.addr.port()
        )
    }
}

/// The one interface of the resolve stage. Implementations: the static inventory and
/// the Kubernetes watcher.
pub trait Resolve: Send + Sync + 'static {
    /// Resolve `ip:port` as it was at `at_unix_nanos`. Never blocks on I/O.
    fn resolve(&self, addr: SocketAddr, at_unix_nanos: u64) -> Identity;
}

/// Resolves nothing: every address stays an IP.
pub struct Unresolved;

impl Resolve for Unresolved {
    fn resolve(&self, addr: SocketAddr, _at_unix_nanos: u64) -> Identity {
        Identity::external(addr)
    }
}

/// Turns a wire endpoint (4 or 16 address bytes) into a socket address; `None` for
/// malformed input.
pub fn endpoint_addr(ep: Option<&weft_proto::v1::Endpoint>) -> Option<SocketAddr> {
    let ep = ep?;
    let port = u16::try_from(ep.port).ok()?;
    let ip = match ep.ip.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(ep.ip.as_slice()).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(ep.ip.as_slice()).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether to watch the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KubernetesMode {
    /// When running in a cluster (`KUBERNETES_SERVICE_HOST` set) and no inventory is given.
    Auto,
    /// Always (in-cluster config, else kubeconfig).
    On,
    /// Never.
    Off,
}

/// Resolver flags, for `main` to `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResolveArgs {
    /// Static inventory file (YAML: pods, services, nodes) for names outside Kubernetes.
    #[arg(long, env = "WEFT_INVENTORY", value_name = "PATH")]
    pub inventory: Option<PathBuf>,
    /// Watch the Kubernetes API for names: auto (in a cluster), on, off.
    #[arg(
        long,
        env = "WEFT_KUBERNETES",
        value_enum,
        default_value = "auto",
        num_args = 0..=1,
        default_missing_value = "on"
    )]
    pub kubernetes: KubernetesMode,
    /// How long deleted pods, Services and Nodes stay resolvable.
    #[arg(long, env = "WEFT_DELETED_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub deleted_grace: Duration,
    /// Most cached lookups.
    #[arg(long, env = "WEFT_RESOLVE_CACHE_SIZE", default_value_t = 100_000)]
    pub resolve_cache_size: u64,
    /// How long a cached lookup lives.
    #[arg(long, env = "WEFT_RESOLVE_CACHE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub resolve_cache_ttl: Duration,
}

impl Default for ResolveArgs {
    /// The flags' defaults (Kubernetes `auto`, no inventory).
    fn default() -> Self {
        ResolveArgs {
            inventory: None,
            kubernetes: KubernetesMode::Auto,
            deleted_grace: Duration::from_secs(60),
            resolve_cache_size: CacheConfig::default().capacity,
            resolve_cache_ttl: CacheConfig::default().ttl,
        }
    }
}

impl ResolveArgs {
    /// No source of names: every address stays an IP.
    pub fn default_off() -> Self {
        ResolveArgs {
            kubernetes: KubernetesMode::Off,
            ..Self::default()
        }
    }

    pub fn cache(&self) -> CacheConfig {
        CacheConfig {
            capacity: self.resolve_cache_size,
            ttl: self.resolve_cache_ttl,
            ..CacheConfig::default()
        }
    }
}

/// Builds the resolver the flags ask for: the inventory, the Kubernetes watches, or none
/// (every address stays an IP). Must run inside the tokio runtime.
pub async fn build(args: &ResolveArgs, registry: &Registry) -> anyhow::Result<Arc<dyn Resolve>> {
    if let Some(path) = &args.inventory {
        if args.kubernetes == KubernetesMode::On {
            anyhow::bail!(
                "--inventory and --kubernetes on exclude each other: choose one source of names"
            );
        }
        let dir = StaticInventory::from_file(path, args.cache(), registry)?;
        info!(path = %path.display(), "names from the static inventory");
        return Ok(dir);
    }
    let watch = match args.kubernetes {
        KubernetesMode::On => true,
        KubernetesMode::Off => false,
        KubernetesMode::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
    };
    if !watch {
        info!("no source of names (no --inventory, not watching Kubernetes): addresses stay IPs");
        return Ok(Arc::new(Unresolved));
    }
    let client = ::kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
    let opts = KubeOptions {
        deleted_grace: args.deleted_grace,
        cache: args.cache(),
    };
    let resolver = KubeResolver::start_with(client, registry, opts).await?;
    info!("names from the Kubernetes API (watching)");
    Ok(Arc::new(resolver))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        resolve: ResolveArgs,
    }

    #[test]
    fn flags_parse_with_defaults_and_bare_kubernetes_means_on() {
        let cli = Cli::try_parse_from(["x"]).expect("defaults");
        assert_eq!(cli.resolve.kubernetes, KubernetesMode::Auto);
        assert_eq!(cli.resolve.deleted_grace, Duration::from_secs(60));
        let cli = Cli::try_parse_from(["x", "--kubernetes", "--deleted-grace", "5s"]).expect("on");
        assert_eq!(cli.resolve.kubernetes, KubernetesMode::On);
        assert_eq!(cli.resolve.deleted_grace, Duration::from_secs(5));
        let cli = Cli::try_parse_from(["x", "--kubernetes", "off"]).expect("off");
        assert_eq!(cli.resolve.kubernetes, KubernetesMode::Off);
        assert!(Cli::try_parse_from(["x", "--deleted-grace", "soon"]).is_err());
    }

    #[tokio::test]
    async fn build_picks_the_inventory_or_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, "nodes:\n  - {name: n1, ip: 10.1.1.1}\n").expect("write");
        let args = ResolveArgs {
            inventory: Some(path),
            kubernetes: KubernetesMode::Off,
            ..ResolveArgs::default()
        };
        let r = build(&args, &Registry::new()).await.expect("inventory");
        let a: SocketAddr = "10.1.1.1:22".parse().expect("addr");
        assert_eq!(r.resolve(a, 1).kind, PeerKind::Node);

        let on = ResolveArgs {
            kubernetes: KubernetesMode::On,
            ..args.clone()
        };
        assert!(build(&on, &Registry::new()).await.is_err());

        let off = ResolveArgs::default_off();
        let r = build(&off, &Registry::new()).await.expect("none");
        assert_eq!(r.resolve(a, 1).kind, PeerKind::External);
    }
}
