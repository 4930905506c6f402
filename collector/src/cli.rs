//! Command-line flags (DESIGN.md "Interfaces that users and tests rely on"); every flag also
//! reads `WEFT_<FLAG>`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::capture::pace::parse_max_interval;
pub use crate::print::PrintMode;
use crate::ship::ShipArgs;

/// Pod-side veth names of common CNIs: plain veth pairs and the bridge plugin (`veth*`),
/// Cilium (`lxc*`), Calico (`cali*`), the CNI reference plugins (`cni*`), AWS VPC CNI (`eni*`),
/// GKE (`gke*`). The test harness names host veths `veth<run prefix>-<n>`.
pub const DEFAULT_INTERFACES: &str = "veth*,lxc*,cali*,cni*,eni*,gke*";

#[derive(Debug, Clone, Parser)]
#[command(name = "weft-collector", version, about = "Weft per-node collector")]
pub struct Cli {
    /// Identity of this node (default: the host name).
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: Option<String>,

    /// Comma-separated globs of interface names to trace (veth and netkit devices only).
    #[arg(long, env = "WEFT_INTERFACES", default_value = DEFAULT_INTERFACES, value_delimiter = ',')]
    pub interfaces: Vec<String>,

    /// How classifiers are attached: `auto` (TCX where the kernel supports it), `tcx`, `netlink`.
    #[arg(long, env = "WEFT_TC_BACKEND", value_enum, default_value_t = TcBackendArg::Auto)]
    pub tc_backend: TcBackendArg,

    /// Print exchanges locally: `off`, `text` or `json` (one object per line). Written by
    /// the collector's one thread after each read of the rings (every 5 ms under traffic):
    /// a stdout that blocks (a pipe nobody reads) stalls capture, shipping and /healthz
    /// with it. A debugging aid.
    #[arg(long, env = "WEFT_PRINT", value_enum, default_value_t = PrintMode::Off)]
    pub print: PrintMode,

    /// Shipping to the stitcher (`--stitcher` absent: local only).
    #[command(flatten)]
    pub ship: ShipArgs,

    /// Address of the Prometheus `/metrics` and `/healthz` endpoint.
    #[arg(long, env = "WEFT_METRICS_LISTEN", default_value = "0.0.0.0:9401")]
    pub metrics_listen: SocketAddr,

    /// Have the kernel time every run of the programs (BPF_ENABLE_STATS) and export the
    /// totals as `weft_collector_program_run_seconds` / `weft_collector_program_runs`: what
    /// tracing costs inside the network stack, which the process's own CPU time does not
    /// show. Costs two clock reads per run (tens of nanoseconds), so off by default.
    #[arg(long, env = "WEFT_BPF_STATS", default_value_t = false)]
    pub bpf_stats: bool,

    /// Attach the classifiers as usual but have them return at once, capturing nothing: a
    /// benchmark's reference for what the attached hooks alone cost (`weft-bench
    /// --overhead-hooks`). Produces no exchanges.
    #[arg(long, env = "WEFT_HOOKS_ONLY", default_value_t = false)]
    pub hooks_only: bool,

    /// Longest wait between reads of the packet rings while no traffic comes (under traffic
    /// they are read every 5 ms). A burst wakes the collector at once whatever this is (a
    /// ring half full rings its doorbell); a lone request or connection event waits up to
    /// this long, and an idle collector wakes about once per interval.
    #[arg(long, env = "WEFT_MAX_READ_INTERVAL", default_value = "100ms", value_parser = parse_max_interval)]
    pub max_read_interval: Duration,

    /// Keep query strings in paths (default: redacted).
    #[arg(long, env = "WEFT_KEEP_QUERY", default_value_t = false)]
    pub keep_query: bool,

    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TcBackendArg {
    Auto,
    Tcx,
    Netlink,
}
