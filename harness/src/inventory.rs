//! The static inventory (DESIGN.md format) for a cluster: what the stitcher's `--inventory`
//! reads to name addresses outside Kubernetes.
//!
//! In: the cluster's nodes, pods and services. Out: YAML text.

use crate::cluster::{Node, Pod, Service};
use std::fmt::Write;

pub(crate) fn render(nodes: &[Node], pods: &[Pod], services: &[Service]) -> String {
    let mut out = String::from(if pods.is_empty() {
        "pods: []\n"
    } else {
        "pods:\n"
    });
    for p in pods {
        let _ = writeln!(
            out,
            "  - {{name: {}, namespace: {}, workload: {}, node: {}, ip: {}}}",
            p.name(),
            p.namespace(),
            p.workload(),
            p.node(),
            p.ip()
        );
    }
    out.push_str(if services.is_empty() {
        "services: []\n"
    } else {
        "services:\n"
    });
    for s in services {
        let _ = writeln!(
            out,
            "  - {{name: {}, namespace: {}, cluster_ip: {}, ports: [{{port: {}, target_port: {}}}]}}",
            s.name(),
            s.namespace(),
            s.cluster_ip(),
            s.port(),
            s.target_port()
        );
    }
    out.push_str("nodes:\n");
    for n in nodes {
        let _ = writeln!(out, "  - {{name: {}, ip: {}}}", n.name(), n.underlay_ip());
    }
    out
}
