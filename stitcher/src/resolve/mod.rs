//! resolve: addresses → names.
//!
//! In: an IP address and port as observed, and the time of the observation.
//! Out: an [`Identity`]: the Pod (and its workload), the Service, the Node, or
//! an external address that stays an IP.
//!
//! Sources: a static inventory file (`--inventory`) or the Kubernetes API (watches).
//! Lookups never wait on the API: they read in-memory state.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

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
