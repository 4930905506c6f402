//! A `weft-stitcher` in a harness cluster's control namespace, where the nodes' collectors
//! reach it (`--stitcher http://<control ip>:9400`): static inventory (the cluster's pods,
//! services and nodes), `--kubernetes off`.
//!
//! In: the cluster, a work directory (inventory file, stderr log), the print format and where
//! its stdout goes. Out: a healthy stitcher as a [`Child`], killed by its PID when dropped (so
//! a failing benchmark leaves nothing running); its URL for the collectors; its `/metrics`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use weft_harness::Cluster;

use crate::child::{self, Child};

const PORT: u16 = 9400;
/// Inside the control namespace: a fixed port cannot collide.
const METRICS: &str = "127.0.0.1:9402";

/// How the stitcher prints and how long a trace stays open.
pub struct Options {
    /// `--print`: `off`, or a format whose lines the caller reads from `stdout`.
    pub print: &'static str,
    /// `--trace-idle`; the stitcher's default when `None`.
    pub trace_idle: Option<Duration>,
    /// Where stdout goes: a pipe only if the caller reads it (a full pipe blocks the printer).
    pub stdout: Stdio,
}

/// Starts the stitcher in the control namespace and waits until `/healthz` answers.
pub fn start(cluster: &Cluster, work: &Path, opts: Options) -> Result<Child> {
    let stitcher_bin = child::sibling_binary("weft-stitcher")?;
    let inventory = work.join("inventory.yaml");
    std::fs::write(&inventory, cluster.inventory_yaml())?;
    let mut cmd = Command::new("ip");
    // `ip netns exec` execs the stitcher: the child's PID is the stitcher's.
    cmd.args(["netns", "exec", cluster.control_netns()])
        .arg(&stitcher_bin)
        .args(["--listen", &format!("0.0.0.0:{PORT}")])
        .args(["--metrics-listen", METRICS])
        .args(["--kubernetes", "off", "--print", opts.print])
        .arg("--inventory")
        .arg(&inventory)
        .env("WEFT_LOG", "info");
    if let Some(idle) = opts.trace_idle {
        cmd.args([
            "--trace-idle",
            &humantime::format_duration(idle).to_string(),
        ]);
    }
    let mut stitcher = Child::spawn(
        "weft-stitcher",
        &mut cmd,
        opts.stdout,
        Some(&work.join("stitcher.stderr")),
    )?;
    wait_healthy(cluster, &mut stitcher)?;
    Ok(stitcher)
}

/// The `--stitcher` URL for the collectors of the cluster's nodes.
pub fn url(cluster: &Cluster) -> String {
    format!("http://{}:{PORT}", cluster.control_ip())
}

/// The stitcher's `/metrics` text.
pub fn scrape(cluster: &Cluster) -> Result<String> {
    let addr: SocketAddr = METRICS.parse()?;
    cluster.try_run_in(cluster.control_netns(), move || {
        child::http_get(addr, "/metrics")
    })?
}

fn wait_healthy(cluster: &Cluster, stitcher: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = METRICS.parse()?;
    loop {
        stitcher.ensure_running()?;
        let ok = cluster.try_run_in(cluster.control_netns(), move || {
            child::http_get(addr, "/healthz").is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "weft-stitcher not healthy after 20 s: {}",
                stitcher.stderr_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
