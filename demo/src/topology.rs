//! The demo cluster: three nodes, a three-tier app where every hop crosses nodes.
//!
//! In: nothing. Out: the [`ClusterSpec`] the harness builds, and the names the rest of the
//! run refers to.
//!
//! ```text
//!  node-c: client-0 ──→ node-a: frontend-0 ──→ node-b: backend-0 ──→ node-c: store-0
//!          (load)        Service frontend       Service backend        Service store
//! ```

use weft_harness::{ClusterSpec, NodeSpec, PodSpec, ServiceSpec};

/// The Kubernetes namespace of every pod and Service.
pub const NAMESPACE: &str = "demo";
/// Port every Service listens on, and the port the app serves on.
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;
/// The port the stitcher serves gRPC on, in the control namespace.
pub const STITCHER_PORT: u16 = 9400;

pub const CLIENT_POD: &str = "client-0";
pub const FRONTEND_POD: &str = "frontend-0";
pub const BACKEND_POD: &str = "backend-0";
pub const STORE_POD: &str = "store-0";

/// Pods: (node, pod, workload).
const PODS: [(&str, &str, &str); 4] = [
    ("node-a", FRONTEND_POD, "frontend"),
    ("node-b", BACKEND_POD, "backend"),
    ("node-c", STORE_POD, "store"),
    ("node-c", CLIENT_POD, "client"),
];

/// Services, each selecting the workload of the same name.
pub const SERVICES: [&str; 3] = ["frontend", "backend", "store"];

pub fn spec() -> ClusterSpec {
    let nodes = ["node-a", "node-b", "node-c"]
        .into_iter()
        .map(|node| NodeSpec {
            name: node.to_string(),
            pods: PODS
                .iter()
                .filter(|(n, _, _)| *n == node)
                .map(|(_, pod, workload)| PodSpec {
                    name: pod.to_string(),
                    namespace: NAMESPACE.to_string(),
                    workload: workload.to_string(),
                })
                .collect(),
        })
        .collect();
    let services = SERVICES
        .into_iter()
        .map(|name| ServiceSpec {
            name: name.to_string(),
            namespace: NAMESPACE.to_string(),
            port: SERVICE_PORT,
            target_port: APP_PORT,
            workload: name.to_string(),
        })
        .collect();
    ClusterSpec { nodes, services }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every hop of client → frontend → backend → store crosses nodes.
    #[test]
    fn every_hop_crosses_nodes() {
        let spec = spec();
        let node_of = |pod: &str| {
            spec.nodes
                .iter()
                .find(|n| n.pods.iter().any(|p| p.name == pod))
                .map(|n| n.name.clone())
                .unwrap()
        };
        let chain = [CLIENT_POD, FRONTEND_POD, BACKEND_POD, STORE_POD];
        for hop in chain.windows(2) {
            assert_ne!(node_of(hop[0]), node_of(hop[1]), "{hop:?}");
        }
        assert_eq!(spec.nodes.len(), 3);
        assert_eq!(spec.services.len(), 3);
    }
}
