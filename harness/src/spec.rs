//! What a test asks for: nodes with their pods, and Services selecting pods by workload.

/// A whole test cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSpec {
    pub nodes: Vec<NodeSpec>,
    pub services: Vec<ServiceSpec>,
}

/// One node: a network namespace with a bridge and a pod CIDR.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub pods: Vec<PodSpec>,
}

/// One pod: a network namespace attached to its node's bridge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSpec {
    /// Unique across the cluster (pods are looked up by name alone).
    pub name: String,
    pub namespace: String,
    /// The workload (Deployment, StatefulSet…) the pod belongs to; Services select on it.
    pub workload: String,
}

/// A ClusterIP Service: `cluster_ip:port` DNATed to `pod_ip:target_port` of every pod of
/// `workload` in `namespace`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Unique across the cluster (services are looked up by name alone).
    pub name: String,
    pub namespace: String,
    pub port: u16,
    pub target_port: u16,
    pub workload: String,
}

impl ClusterSpec {
    /// Rejects specs the harness cannot build: duplicate or unusable names, too many items.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        use anyhow::{bail, ensure};
        use std::collections::HashSet;
        ensure!(!self.nodes.is_empty(), "a cluster needs at least one node");
        ensure!(self.nodes.len() <= 200, "at most 200 nodes");
        ensure!(self.services.len() <= 240, "at most 240 services");
        let mut nodes = HashSet::new();
        let mut pods = HashSet::new();
        for node in &self.nodes {
            check_name("node", &node.name)?;
            if !nodes.insert(&node.name) {
                bail!("duplicate node name {:?}", node.name);
            }
            ensure!(
                node.pods.len() <= 250,
                "node {:?}: at most 250 pods",
                node.name
            );
            for pod in &node.pods {
                check_name("pod", &pod.name)?;
                check_name("namespace", &pod.namespace)?;
                check_name("workload", &pod.workload)?;
                if !pods.insert(&pod.name) {
                    bail!("duplicate pod name {:?}", pod.name);
                }
            }
        }
        let mut services = HashSet::new();
        for svc in &self.services {
            check_name("service", &svc.name)?;
            check_name("namespace", &svc.namespace)?;
            if !services.insert(&svc.name) {
                bail!("duplicate service name {:?}", svc.name);
            }
        }
        Ok(())
    }
}

/// Names end up in namespace names and YAML: keep them DNS-label-like.
fn check_name(kind: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    anyhow::ensure!(ok, "{kind} name {name:?} must be 1-63 chars of [a-z0-9.-]");
    Ok(())
}
