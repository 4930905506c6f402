//! Test clusters made of Linux network namespaces: nodes, pods, an underlay and
//! kube-proxy-style Services, built for real with `ip` and `nft`.
//!
//! In: a [`ClusterSpec`] (nodes, their pods, services). Out: a running [`Cluster`] whose
//! namespaces, interfaces and addresses tests use to start processes ([`Cluster::spawn`]) or
//! run closures ([`Cluster::run_in`]) inside pods and nodes. Dropping the cluster removes
//! everything it made, also while a test panics; [`cleanup_stale`] removes what killed runs left.
//!
//! # Topology
//!
//! ```text
//!  control netns  <prefix>-ctl   bridge `underlay0` 10.10.0.254/24 (stitcher, tests)
//!      │ veth per node (`und<i>` in control, `eth0` in the node)
//!  node netns     <prefix>-node-<name>   eth0 10.10.0.<i+1>/24, bridge `cni0` 10.244.<i+1>.1/24,
//!      │                                 ip_forward=1, nft table `weft_<prefix>` (Service DNAT),
//!      │                                 routes: other nodes' pod CIDRs via their underlay IP
//!      │ veth per pod: host side `veth<prefix>-<j>` (in the node netns, enslaved to cni0),
//!      │               pod side `eth0`
//!  pod netns      <prefix>-pod-<name>    eth0 10.244.<i+1>.<j+2>/32, default via 10.244.<i+1>.1 onlink
//! ```
//!
//! Host-side pod veths match the globs `veth*` and `veth<prefix>*`, and fit the 15-byte limit.
//! Pods carry /32 addresses, so even pod-to-pod traffic on one node is routed by the node
//! (not bridged), which lets the node's conntrack undo Service DNAT on replies without
//! `br_netfilter`. Services are `ClusterIP:port → numgen random mod N → pod:targetPort` DNAT
//! rules (prerouting and output) in every node netns and in the control netns; there is no
//! SNAT, so servers see the client pod's own address. Nothing is created in the root namespace.
//!
//! # Ownership and clean-up
//!
//! Every run has a unique prefix `wft` + 4 hex digits, claimed by creating the run directory
//! `/run/weft-harness/<prefix>/` (which holds `owner` = PID and start time, and `logs/`).
//! Every namespace name starts with `<prefix>-`. A run whose owner process is gone (or whose
//! namespaces have no run directory) is stale: [`cleanup_stale`], also called by
//! [`Cluster::up`], kills the processes still inside its namespaces by PID and deletes them.
//! A process about to exit without unwinding (a benchmark on SIGTERM) calls [`teardown_own`]
//! instead of waiting for the next clean-up.
//!
//! Processes started with [`Cluster::spawn`] write to `logs/<n>-<where>-<program>.stdout` and
//! `.stderr` in the run directory. The cluster removes the directory on drop, except when the
//! test is panicking or `WEFT_HARNESS_KEEP_LOGS` is set: then it keeps the logs (without the
//! owner file) and prints where; stale clean-up removes kept logs after a day.
//!
//! Tests that need another package's binary (`weft-collector`, `weft-demo-app`, ...) take it
//! from the workspace build with [`binaries::path`]; they read the demo app's request log (the
//! ground truth they score the stitcher against) with [`app_log::served`].
//!
//! Timing (`cargo run -p weft-harness --example cluster_timing -- 3 4`): 3 nodes × 4 pods up
//! in about 0.3 s, dropped in about 10 ms.

pub mod app_log;
pub mod binaries;
mod cluster;
mod inventory;
mod proc;
mod run;
mod spec;
mod sys;

pub use cluster::{Cluster, Node, Pod, Service};
pub use proc::{IntoSignal, Proc};
pub use run::{Teardown, cleanup_stale, teardown_own};
pub use spec::{ClusterSpec, NodeSpec, PodSpec, ServiceSpec};
