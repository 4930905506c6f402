//! Prints how long `Cluster::up` and dropping the cluster take for N nodes × M pods and one
//! Service per node: `cargo run -p weft-harness --example cluster_timing -- [N] [M]` (as root).

use std::time::Instant;
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, ServiceSpec};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let nodes = args.next().transpose()?.unwrap_or(3);
    let pods = args.next().transpose()?.unwrap_or(4);
    let spec = ClusterSpec {
        nodes: (0..nodes)
            .map(|n| NodeSpec {
                name: format!("node-{n}"),
                pods: (0..pods)
                    .map(|p| PodSpec {
                        name: format!("app{n}-{p}"),
                        namespace: "demo".into(),
                        workload: format!("app{}", p % nodes.max(1)),
                    })
                    .collect(),
            })
            .collect(),
        services: (0..nodes)
            .map(|n| ServiceSpec {
                name: format!("app{n}"),
                namespace: "demo".into(),
                port: 80,
                target_port: 8080,
                workload: format!("app{n}"),
            })
            .collect(),
    };
    let start = Instant::now();
    let cluster = Cluster::up(&spec)?;
    let up = start.elapsed();
    let start = Instant::now();
    drop(cluster);
    let down = start.elapsed();
    println!(
        "{{\"nodes\":{nodes},\"pods\":{},\"services\":{nodes},\"up_ms\":{},\"drop_ms\":{}}}",
        nodes * pods,
        up.as_millis(),
        down.as_millis()
    );
    Ok(())
}
