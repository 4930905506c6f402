//! Building and tearing down a cluster of network namespaces.
//!
//! In: a [`ClusterSpec`]. Out: a [`Cluster`] (namespaces, links, routes, nft Service rules,
//! all named after the run prefix) that removes all of it on drop.

use crate::proc::Proc;
use crate::run::{self, RunDir};
use crate::spec::{ClusterSpec, ServiceSpec};
use crate::sys;
use anyhow::{Context, Result};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The underlay's control address; nodes get `10.10.0.<i+1>`.
const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 254);
/// ClusterIPs are `10.96.0.<10+k>`.
const SERVICE_CIDR: &str = "10.96.0.0/16";
const UNDERLAY_BRIDGE: &str = "underlay0";
const NODE_BRIDGE: &str = "cni0";
/// The cluster is IPv4 only: without IPv6 no router solicitations, MLD reports or DAD probes
/// cross the pod veths, so captures there hold only what the test sent. `all` covers links
/// that exist already, `default` those created later.
const IPV6_OFF: [(&str, &str); 2] = [
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
];
/// How long processes still running at teardown get between SIGTERM and SIGKILL.
const TEARDOWN_GRACE: Duration = Duration::from_millis(500);

/// A node: a namespace with an underlay link (`eth0`) and a pod bridge (`cni0`).
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    netns: String,
    underlay_ip: Ipv4Addr,
    index: u8,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The namespace name, for `ip netns exec` or [`Cluster::spawn`].
    pub fn netns(&self) -> &str {
        &self.netns
    }
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }
    /// The pod CIDR, e.g. `10.244.1.0/24`.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }
    /// The pods' default gateway: the address of the node's bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, 1)
    }
    /// The bridge the pod veths are enslaved to.
    pub fn bridge(&self) -> &str {
        NODE_BRIDGE
    }
}

/// A pod: a namespace whose `eth0` is a veth to its node.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    namespace: String,
    workload: String,
    node: String,
    netns: String,
    ip: Ipv4Addr,
    host_veth: String,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The Kubernetes namespace (not the network namespace; that is [`Pod::netns`]).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn workload(&self) -> &str {
        &self.workload
    }
    /// The name of the node the pod runs on.
    pub fn node(&self) -> &str {
        &self.node
    }
    pub fn netns(&self) -> &str {
        &self.netns
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    /// The host-side veth, in the node's namespace (`veth<prefix>-<n>`, ≤ 15 bytes).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }
}

/// A ClusterIP Service.
#[derive(Debug, Clone)]
pub struct Service {
    spec: ServiceSpec,
    cluster_ip: Ipv4Addr,
    backends: Vec<Ipv4Addr>,
}

impl Service {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    pub fn namespace(&self) -> &str {
        &self.spec.namespace
    }
    pub fn cluster_ip(&self) -> Ipv4Addr {
        self.cluster_ip
    }
    pub fn port(&self) -> u16 {
        self.spec.port
    }
    pub fn target_port(&self) -> u16 {
        self.spec.target_port
    }
    /// IPs of the pods the Service balances over.
    pub fn backends(&self) -> &[Ipv4Addr] {
        &self.backends
    }
}

/// A running test cluster. Dropping it kills every process in its namespaces and deletes them.
#[derive(Debug)]
pub struct Cluster {
    run: RunDir,
    control_netns: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    services: Vec<Service>,
    spawned: AtomicUsize,
}

impl Cluster {
    /// Builds the cluster under a fresh run prefix, after removing leftovers of dead runs.
    pub fn up(spec: &ClusterSpec) -> Result<Cluster> {
        spec.validate()?;
        run::cleanup_stale();
        let run = RunDir::claim()?;
        // A prefix can only be claimed once its old run directory is gone, but namespaces of
        // a run whose directory was removed by hand could still carry it.
        run::destroy_run_netns(&run.prefix, Duration::ZERO);
        let prefix = run.prefix.clone();
        // From here on, an error drops `cluster`, which removes whatever was built.
        let mut cluster = Cluster {
            control_netns: format!("{prefix}-ctl"),
            run,
            nodes: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            spawned: AtomicUsize::new(0),
        };
        cluster.plan(spec);
        cluster.build_control()?;
        for node in &cluster.nodes {
            cluster.build_node(node)?;
        }
        for pod in &cluster.pods {
            cluster.build_pod(pod)?;
        }
        cluster.install_services()?;
        eprintln!(
            "weft-harness: cluster {prefix} up ({} nodes, {} pods, {} services), logs in {}",
            cluster.nodes.len(),
            cluster.pods.len(),
            cluster.services.len(),
            cluster.run.logs().display()
        );
        Ok(cluster)
    }

    /// Assigns names and addresses (no system changes).
    fn plan(&mut self, spec: &ClusterSpec) {
        let prefix = &self.run.prefix;
        for (i, node_spec) in spec.nodes.iter().enumerate() {
            let index = (i + 1) as u8;
            let node = Node {
                name: node_spec.name.clone(),
                netns: format!("{prefix}-node-{}", node_spec.name),
                underlay_ip: Ipv4Addr::new(10, 10, 0, index),
                index,
            };
            for (j, pod_spec) in node_spec.pods.iter().enumerate() {
                self.pods.push(Pod {
                    name: pod_spec.name.clone(),
                    namespace: pod_spec.namespace.clone(),
                    workload: pod_spec.workload.clone(),
                    node: node.name.clone(),
                    netns: format!("{prefix}-pod-{}", pod_spec.name),
                    ip: Ipv4Addr::new(10, 244, index, (j + 2) as u8),
                    host_veth: format!("veth{prefix}-{j}"),
                });
            }
            self.nodes.push(node);
        }
        for (k, svc) in spec.services.iter().enumerate() {
            let backends = self
                .pods
                .iter()
                .filter(|p| p.namespace == svc.namespace && p.workload == svc.workload)
                .map(|p| p.ip)
                .collect();
            self.services.push(Service {
                spec: svc.clone(),
                cluster_ip: Ipv4Addr::new(10, 96, 0, (10 + k) as u8),
                backends,
            });
        }
    }

    /// The control namespace: the underlay bridge, and routes to every pod CIDR.
    fn build_control(&self) -> Result<()> {
        let ns = &self.control_netns;
        sys::run("ip", &["netns", "add", ns])?;
        let mut cmds = vec![
            "link set lo up".to_string(),
            format!("link add {UNDERLAY_BRIDGE} type bridge"),
            format!("addr add {CONTROL_IP}/24 dev {UNDERLAY_BRIDGE}"),
            format!("link set {UNDERLAY_BRIDGE} up"),
        ];
        for (i, node) in self.nodes.iter().enumerate() {
            cmds.push(format!(
                "link add und{i} type veth peer name eth0 netns {}",
                node.netns
            ));
            cmds.push(format!("link set und{i} master {UNDERLAY_BRIDGE}"));
            cmds.push(format!("link set und{i} up"));
        }
        // Node namespaces must exist before the veths can be moved into them.
        for node in &self.nodes {
            sys::run("ip", &["netns", "add", &node.netns])?;
        }
        ip_batch(ns, &cmds)?;
        sys::sysctls_in(ns, &IPV6_OFF)?;
        let mut routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("route add {} via {}", n.pod_cidr(), n.underlay_ip))
            .collect();
        // Local processes look a route up before the output hook DNATs a ClusterIP.
        routes.push(format!("route add {SERVICE_CIDR} dev {UNDERLAY_BRIDGE}"));
        ip_batch(ns, &routes)
    }

    /// A node namespace: forwarding, underlay address, pod bridge, routes to other nodes' pods.
    fn build_node(&self, node: &Node) -> Result<()> {
        let ns = &node.netns;
        sys::sysctls_in(
            ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                // Pod-to-pod traffic on one node leaves and enters through cni0: routed on
                // purpose (so Service DNAT is undone), not something to redirect.
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.default.send_redirects", "0"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                IPV6_OFF[0],
                IPV6_OFF[1],
            ],
        )?;
        let mut cmds = vec![
            "link set lo up".to_string(),
            format!("addr add {}/24 dev eth0", node.underlay_ip),
            "link set eth0 up".to_string(),
            // A fixed MAC: otherwise the bridge takes its lowest port's MAC and changes it as
            // pods come, invalidating the pods' ARP entry for their gateway.
            format!(
                "link add {NODE_BRIDGE} address 02:00:0a:f4:{:02x}:01 type bridge",
                node.index
            ),
            format!("addr add {}/24 dev {NODE_BRIDGE}", node.gateway()),
            format!("link set {NODE_BRIDGE} up"),
        ];
        cmds.push(format!("route add {SERVICE_CIDR} dev eth0"));
        for other in self.nodes.iter().filter(|o| o.name != node.name) {
            cmds.push(format!(
                "route add {} via {}",
                other.pod_cidr(),
                other.underlay_ip
            ));
        }
        ip_batch(ns, &cmds)
    }

    /// A pod namespace: a veth to its node's bridge, a /32 address, default route via the node.
    fn build_pod(&self, pod: &Pod) -> Result<()> {
        let node = self.node(&pod.node);
        sys::run("ip", &["netns", "add", &pod.netns])?;
        sys::sysctls_in(&pod.netns, &IPV6_OFF)?;
        ip_batch(
            &node.netns,
            &[
                format!(
                    "link add {} type veth peer name eth0 netns {}",
                    pod.host_veth, pod.netns
                ),
                format!("link set {} master {NODE_BRIDGE}", pod.host_veth),
                format!("link set {} up", pod.host_veth),
            ],
        )?;
        ip_batch(
            &pod.netns,
            &[
                "link set lo up".to_string(),
                format!("addr add {}/32 dev eth0", pod.ip),
                "link set eth0 up".to_string(),
                format!("route add default via {} dev eth0 onlink", node.gateway()),
            ],
        )
    }

    /// Service DNAT in every node namespace and in the control namespace.
    fn install_services(&self) -> Result<()> {
        let rules = nft_services(&self.nft_table(), &self.services);
        for ns in self
            .nodes
            .iter()
            .map(|n| n.netns.as_str())
            .chain([self.control_netns.as_str()])
        {
            sys::run_with_stdin("ip", &["netns", "exec", ns, "nft", "-f", "-"], Some(&rules))
                .with_context(|| format!("installing Service rules in {ns}"))?;
        }
        Ok(())
    }

    /// The nft table (family `ip`) holding the Service rules in each node namespace.
    pub fn nft_table(&self) -> String {
        format!("weft_{}", self.run.prefix)
    }

    /// The unique run prefix that starts every namespace name (e.g. `wft3a7f`).
    pub fn prefix(&self) -> &str {
        &self.run.prefix
    }

    /// The run directory (`/run/weft-harness/<prefix>`), holding `logs/`.
    pub fn run_dir(&self) -> &Path {
        &self.run.path
    }

    pub fn node(&self, name: &str) -> &Node {
        self.try_node(name)
            .unwrap_or_else(|| panic!("the cluster has no node named {name:?}"))
    }
    pub fn try_node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.try_pod(name)
            .unwrap_or_else(|| panic!("the cluster has no pod named {name:?}"))
    }
    pub fn try_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn service(&self, name: &str) -> &Service {
        self.try_service(name)
            .unwrap_or_else(|| panic!("the cluster has no service named {name:?}"))
    }
    pub fn try_service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.spec.name == name)
    }
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The namespace for central components (the stitcher): on the underlay, reachable from
    /// every node and, through the nodes' routes, from every pod.
    pub fn control_netns(&self) -> &str {
        &self.control_netns
    }
    pub fn control_ip(&self) -> Ipv4Addr {
        CONTROL_IP
    }

    /// Every namespace of the run: control, nodes, pods.
    pub fn all_netns(&self) -> Vec<&str> {
        std::iter::once(self.control_netns.as_str())
            .chain(self.nodes.iter().map(|n| n.netns.as_str()))
            .chain(self.pods.iter().map(|p| p.netns.as_str()))
            .collect()
    }

    /// The static inventory (DESIGN.md format) naming this cluster's pods, services and nodes.
    pub fn inventory_yaml(&self) -> String {
        crate::inventory::render(&self.nodes, &self.pods, &self.services)
    }

    /// Starts `cmd` inside `netns` (`ip netns exec`); stdout and stderr go to log files in the
    /// run directory. The returned [`Proc`] kills the process on drop; dropping the cluster
    /// kills it too.
    pub fn spawn(&self, netns: &str, cmd: &mut Command) -> Result<Proc> {
        let seq = self.spawned.fetch_add(1, Ordering::Relaxed);
        let program = Path::new(cmd.get_program())
            .file_name()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let place = netns
            .strip_prefix(&format!("{}-", self.run.prefix))
            .unwrap_or(netns);
        let label = format!("{seq:03}-{place}-{program}");
        Proc::spawn(netns, cmd, &self.run.logs(), &label)
    }

    /// Runs `f` on a thread that has entered `netns`, e.g. for an in-process HTTP client.
    /// Panics if the namespace cannot be entered (see [`Cluster::try_run_in`]).
    pub fn run_in<R: Send, F: FnOnce() -> R + Send>(&self, netns: &str, f: F) -> R {
        self.try_run_in(netns, f)
            .unwrap_or_else(|e| panic!("cannot run in netns {netns}: {e:#}"))
    }

    /// Like [`Cluster::run_in`], returning an error if the namespace cannot be entered.
    pub fn try_run_in<R: Send, F: FnOnce() -> R + Send>(&self, netns: &str, f: F) -> Result<R> {
        sys::run_in_netns(netns, f)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        run::destroy_run_netns(&self.run.prefix, TEARDOWN_GRACE);
        let keep = std::thread::panicking() || std::env::var_os("WEFT_HARNESS_KEEP_LOGS").is_some();
        if keep {
            // Without the owner file the directory is a finished run's logs: stale clean-up
            // leaves it alone.
            let _ = std::fs::remove_file(self.run.path.join("owner"));
            eprintln!(
                "weft-harness: cluster {} removed; logs kept in {}",
                self.run.prefix,
                self.run.logs().display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.run.path);
        }
    }
}

/// Runs `ip` commands in one process inside a namespace (`ip -n NS -batch -`).
fn ip_batch(netns: &str, cmds: &[String]) -> Result<()> {
    if cmds.is_empty() {
        return Ok(());
    }
    let input = cmds.join("\n") + "\n";
    sys::run_with_stdin("ip", &["-n", netns, "-batch", "-"], Some(&input))
        .with_context(|| format!("configuring netns {netns}"))
}

/// The nft script for all Services: one DNAT rule per Service, in prerouting (traffic from
/// pods) and output (traffic from processes in the namespace itself).
fn nft_services(table: &str, services: &[Service]) -> String {
    let rules: Vec<String> = services
        .iter()
        .filter_map(|svc| {
            let target = match svc.backends.as_slice() {
                [] => return None,
                [one] => format!("{one}"),
                many => {
                    let entries: Vec<String> = many
                        .iter()
                        .enumerate()
                        .map(|(i, ip)| format!("{i} : {ip}"))
                        .collect();
                    format!(
                        "numgen random mod {} map {{ {} }}",
                        many.len(),
                        entries.join(", ")
                    )
                }
            };
            Some(format!(
                "        ip daddr {} tcp dport {} dnat to {target}:{}\n",
                svc.cluster_ip, svc.spec.port, svc.spec.target_port
            ))
        })
        .collect();
    let rules = rules.concat();
    format!(
        "table ip {table} {{\n\
         \x20   chain prerouting {{\n        type nat hook prerouting priority dstnat; policy accept;\n{rules}    }}\n\
         \x20   chain output {{\n        type nat hook output priority -100; policy accept;\n{rules}    }}\n\
         }}\n"
    )
}
