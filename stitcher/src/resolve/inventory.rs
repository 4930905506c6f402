//! Static inventory: names from a YAML file, for machines outside Kubernetes and demos.
//!
//! In: the inventory file (format in DESIGN.md). Out: a [`Directory`] filled with those
//! pods, Services and Nodes, valid at all times.
//!
//! ```yaml
//! pods:
//!   - {name: frontend-0, namespace: demo, workload: frontend, node: node-a, ip: 10.244.1.9}
//! services:
//!   - {name: backend, namespace: demo, cluster_ip: 10.96.0.20, ports: [{port: 80, target_port: 8080}]}
//! nodes:
//!   - {name: node-a, ip: 10.10.0.1}
//! ```
//!
//! Optional pod fields: `workload_kind` (default `Deployment` when `workload` is given,
//! else the pod names itself with kind `Pod`), `host_network` and `ports` (declared
//! container ports; a host-network pod resolves by these on its node's address).
//! Unknown fields, duplicate addresses and malformed values are errors naming the field
//! (and line and column for syntax and type errors).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::directory::{CacheConfig, Directory};
use super::state::{NodeRecord, OwnerRef, PodRecord, ServiceRecord};
use crate::metrics::Registry;

/// The inventory file, as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    #[serde(default)]
    pub pods: Vec<InventoryPod>,
    #[serde(default)]
    pub services: Vec<InventoryService>,
    #[serde(default)]
    pub nodes: Vec<InventoryNode>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryPod {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub workload_kind: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    pub ip: IpAddr,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryService {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: IpAddr,
    #[serde(default)]
    pub ports: Vec<InventoryServicePort>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryServicePort {
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryNode {
    pub name: String,
    pub ip: IpAddr,
}

impl Inventory {
    /// Parses and checks an inventory. Errors name the field (`pods[2].ip: …`).
    pub fn parse(yaml: &str) -> anyhow::Result<Self> {
        let inv: Inventory = serde_yaml::from_str(yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
        inv.check()?;
        Ok(inv)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading inventory {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("inventory {}", path.display()))
    }

    /// Semantic checks: names present, every address held by one thing only.
    fn check(&self) -> anyhow::Result<()> {
        let mut owners: HashMap<(IpAddr, Option<u16>), String> = HashMap::new();
        let mut claim = |ip: IpAddr, port: Option<u16>, what: String| -> anyhow::Result<()> {
            if let Some(first) = owners.get(&(ip, port)) {
                bail!("{what}: address {ip} is already used by {first}");
            }
            owners.insert((ip, port), what);
            Ok(())
        };
        for (i, p) in self.pods.iter().enumerate() {
            non_empty(&p.name, || format!("pods[{i}].name"))?;
            non_empty(&p.namespace, || format!("pods[{i}].namespace"))?;
            let what = format!("pods[{i}] ({}/{})", p.namespace, p.name);
            if p.host_network {
                if p.ports.is_empty() {
                    bail!(
                        "{what}.ports: a host_network pod needs its ports to be told from its node"
                    );
                }
                for port in &p.ports {
                    claim(p.ip, Some(*port), format!("{what}.ports"))?;
                }
            } else {
                claim(p.ip, None, format!("{what}.ip"))?;
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            non_empty(&s.name, || format!("services[{i}].name"))?;
            non_empty(&s.namespace, || format!("services[{i}].namespace"))?;
            claim(
                s.cluster_ip,
                None,
                format!("services[{i}] ({}/{}).cluster_ip", s.namespace, s.name),
            )?;
        }
        for (i, n) in self.nodes.iter().enumerate() {
            non_empty(&n.name, || format!("nodes[{i}].name"))?;
            claim(n.ip, None, format!("nodes[{i}] ({}).ip", n.name))?;
        }
        Ok(())
    }

    /// Fills a directory with the inventory, valid from the beginning of time.
    pub fn into_directory(self, cache: CacheConfig, registry: &Registry) -> Directory {
        let dir = Directory::new(Duration::ZERO, cache, registry);
        dir.update(|st| {
            for n in self.nodes {
                st.apply_node(NodeRecord {
                    name: n.name,
                    ips: vec![n.ip],
                    from: 0,
                });
            }
            for s in self.services {
                st.apply_service(ServiceRecord {
                    key: format!("{}/{}", s.namespace, s.name),
                    namespace: s.namespace,
                    name: s.name,
                    cluster_ips: vec![s.cluster_ip],
                    ports: s.ports.iter().map(|p| p.port).collect(),
                    from: 0,
                });
            }
            for p in self.pods {
                let owner = p.workload.map(|name| OwnerRef {
                    kind: p.workload_kind.unwrap_or_else(|| "Deployment".into()),
                    name,
                });
                st.apply_pod(PodRecord {
                    key: format!("{}/{}", p.namespace, p.name),
                    uid: None,
                    namespace: p.namespace,
                    name: p.name,
                    node: p.node,
                    ips: vec![p.ip],
                    host_network: p.host_network,
                    ports: p.ports,
                    owner,
                    from: 0,
                    until: None,
                });
            }
        });
        dir.publish_counts();
        dir
    }
}

fn non_empty(value: &str, field: impl FnOnce() -> String) -> anyhow::Result<()> {
    if value.trim().is_empty() {
        bail!("{}: must not be empty", field());
    }
    Ok(())
}

/// The static inventory source.
pub struct StaticInventory;

impl StaticInventory {
    /// Reads `path` and returns a resolver over it.
    pub fn from_file(
        path: &Path,
        cache: CacheConfig,
        registry: &Registry,
    ) -> anyhow::Result<Arc<Directory>> {
        Ok(Arc::new(
            Inventory::from_file(path)?.into_directory(cache, registry),
        ))
    }

    /// As [`StaticInventory::from_file`], from YAML text.
    pub fn from_yaml(
        yaml: &str,
        cache: CacheConfig,
        registry: &Registry,
    ) -> anyhow::Result<Arc<Directory>> {
        Ok(Arc::new(
            Inventory::parse(yaml)?.into_directory(cache, registry),
        ))
    }
}
