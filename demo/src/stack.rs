//! Starting Weft and the demo app on the cluster, and stopping them in order.
//!
//! In: a running [`Cluster`], the [`Tools`], the run's options. Out: a [`Stack`] of ready
//! processes (each started with `setsid`, so a terminal's Ctrl-C reaches only `weft-demo`,
//! which then stops them in order instead of all at once):
//!
//! - the app: `store`, `backend` (calls store, a 500 every 17th request), `frontend`
//!   (calls backend), thread-per-connection servers in their pods;
//! - the OTLP receiver (rotel) and the stitcher in the control namespace;
//! - a collector per node, in the node namespace, tracing that node's pod veths.

use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_harness::{Cluster, Proc};

use crate::query::Query;
use crate::receiver;
use crate::tools::Tools;
use crate::topology::{self, APP_PORT, BACKEND_POD, FRONTEND_POD, STITCHER_PORT, STORE_POD};

/// Every `--error-every` of the backend: a 500 now and then.
pub const BACKEND_ERROR_EVERY: u32 = 17;
/// How long a process gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What [`Stack::start`] needs besides the cluster and tools.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub otlp: bool,
    pub trace_idle: Duration,
}

/// A named process of the stack.
pub struct Part {
    pub name: String,
    pub proc: Proc,
}

/// Everything running on the cluster, in start order.
pub struct Stack {
    pub apps: Vec<Part>,
    pub receiver: Option<Part>,
    pub stitcher: Part,
    pub collectors: Vec<Part>,
    pub stitcher_addr: SocketAddr,
    pub inventory: PathBuf,
}

impl Stack {
    pub fn start(cluster: &Cluster, tools: &Tools, cfg: &StackConfig) -> Result<Stack> {
        let apps = start_apps(cluster, tools)?;
        let receiver = match (&tools.rotel, cfg.otlp) {
            (Some(agent), true) => Some(start_receiver(cluster, agent)?),
            _ => None,
        };
        let inventory = cluster.run_dir().join("inventory.yaml");
        std::fs::write(&inventory, cluster.inventory_yaml())
            .with_context(|| format!("writing {}", inventory.display()))?;
        let stitcher_addr = SocketAddr::new(cluster.control_ip().into(), STITCHER_PORT);
        let stitcher = start_stitcher(
            cluster,
            tools,
            &inventory,
            stitcher_addr,
            receiver.is_some(),
            cfg,
        )?;
        let collectors = start_collectors(cluster, tools, stitcher_addr)?;
        let stack = Stack {
            apps,
            receiver,
            stitcher,
            collectors,
            stitcher_addr,
            inventory,
        };
        stack.wait_collectors_connected(cluster);
        Ok(stack)
    }

    /// Every process of the stack with its PID.
    pub fn pids(&self) -> Vec<(String, i32)> {
        self.parts()
            .map(|p| (p.name.clone(), p.proc.pid()))
            .collect()
    }

    /// Each part's log files, as `<label>` of `<label>.stdout` / `<label>.stderr`.
    pub fn log_labels(&self) -> Vec<(String, String)> {
        self.parts()
            .map(|p| {
                let label = p
                    .proc
                    .log_path()
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (p.name.clone(), label)
            })
            .collect()
    }

    fn parts(&self) -> impl Iterator<Item = &Part> {
        self.apps
            .iter()
            .chain(self.receiver.iter())
            .chain(std::iter::once(&self.stitcher))
            .chain(self.collectors.iter())
    }

    /// The first part that exited, with the end of its stderr.
    pub fn exited(&self) -> Option<String> {
        self.parts().find_map(|p| match p.proc.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}): {}",
                p.name,
                tail(&p.proc.stderr_text(), 12)
            )),
            _ => None,
        })
    }

    /// Stops collectors first (nothing new arrives), then the stitcher (it flushes its
    /// export), the receiver and the app. Returns one line per part that did not exit
    /// cleanly (a SIGTERM'd process exits 0 or by the signal; anything else is reported).
    pub fn stop(self) -> Vec<String> {
        let Stack {
            apps,
            receiver,
            stitcher,
            collectors,
            ..
        } = self;
        let mut problems = Vec::new();
        let order = collectors
            .into_iter()
            .chain(std::iter::once(stitcher))
            .chain(receiver)
            .chain(apps);
        for part in order {
            match part.proc.stop(STOP_GRACE) {
                Ok(status) if status.success() || status.code().is_none() => {}
                Ok(status) => problems.push(format!("{} stopped with {status}", part.name)),
                Err(e) => problems.push(format!("{}: {e:#}", part.name)),
            }
        }
        problems
    }

    /// Waits until the stitcher lists every node's collector as connected; says so when
    /// that does not happen (the run goes on: traces show what does arrive).
    fn wait_collectors_connected(&self, cluster: &Cluster) {
        let query = Query::new(cluster, self.stitcher_addr);
        let want = self.collectors.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        while Instant::now() < deadline {
            match query.list_collectors() {
                Ok(list) => {
                    let connected = list.collectors.iter().filter(|c| c.connected).count();
                    if connected >= want {
                        return;
                    }
                    last = format!("{connected} of {want} collectors connected");
                }
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("weft-demo: warning: collectors not all connected to the stitcher yet: {last}");
    }
}

/// `setsid PROGRAM`: the process gets its own session, out of the terminal's reach.
fn own_session(program: &Path) -> Command {
    let mut cmd = Command::new("setsid");
    cmd.arg(program);
    cmd
}

fn start_apps(cluster: &Cluster, tools: &Tools) -> Result<Vec<Part>> {
    let url = |service: &str, path: &str| {
        let svc = cluster.service(service);
        format!("http://{}:{}{path}", svc.cluster_ip(), svc.port())
    };
    let listen = format!("0.0.0.0:{APP_PORT}");
    let store = vec!["serve", "--name", "store", "--listen", &listen];
    let store_url = url("store", "/store/{n}");
    let error_every = BACKEND_ERROR_EVERY.to_string();
    let backend = vec![
        "serve",
        "--name",
        "backend",
        "--listen",
        &listen,
        "--call",
        &store_url,
        "--error-every",
        &error_every,
    ];
    let backend_url = url("backend", "/api/items/{n}");
    let frontend = vec![
        "serve",
        "--name",
        "frontend",
        "--listen",
        &listen,
        "--call",
        &backend_url,
    ];
    let mut parts = Vec::new();
    for (pod, args) in [
        (STORE_POD, store),
        (BACKEND_POD, backend),
        (FRONTEND_POD, frontend),
    ] {
        let pod = cluster.pod(pod);
        let mut cmd = own_session(&tools.demo_app);
        cmd.args(&args);
        let proc = cluster
            .spawn(pod.netns(), &mut cmd)
            .with_context(|| format!("starting the app in {}", pod.name()))?;
        let part = Part {
            name: format!("app {}", pod.name()),
            proc,
        };
        wait_ready(&part, || part.proc.stdout_text().contains("\"listening\""))?;
        parts.push(part);
    }
    Ok(parts)
}

fn start_receiver(cluster: &Cluster, agent: &Path) -> Result<Part> {
    let mut cmd = own_session(agent);
    let inner = receiver::command(agent, cluster.run_dir());
    cmd.args(inner.get_args());
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let proc = cluster
        .spawn(cluster.control_netns(), &mut cmd)
        .context("starting the OTLP receiver (rotel)")?;
    let part = Part {
        name: "otlp receiver (rotel)".into(),
        proc,
    };
    let addr: SocketAddr = receiver::OTLP_GRPC.parse()?;
    wait_ready(&part, || listening(cluster, cluster.control_netns(), addr))?;
    Ok(part)
}

fn start_stitcher(
    cluster: &Cluster,
    tools: &Tools,
    inventory: &Path,
    addr: SocketAddr,
    otlp: bool,
    cfg: &StackConfig,
) -> Result<Part> {
    let mut cmd = own_session(&tools.stitcher);
    cmd.arg("--listen")
        .arg(addr.to_string())
        .args(["--metrics-listen", "127.0.0.1:9402"])
        .arg("--inventory")
        .arg(inventory)
        .args(["--kubernetes", "off", "--print", "text"])
        .arg("--trace-idle")
        .arg(humantime::format_duration(cfg.trace_idle).to_string())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    if otlp {
        cmd.arg("--otlp-endpoint")
            .arg(format!("http://{}", receiver::OTLP_GRPC));
    }
    let proc = cluster
        .spawn(cluster.control_netns(), &mut cmd)
        .context("starting weft-stitcher")?;
    let part = Part {
        name: "weft-stitcher".into(),
        proc,
    };
    wait_ready(&part, || listening(cluster, cluster.control_netns(), addr))?;
    Ok(part)
}

fn start_collectors(cluster: &Cluster, tools: &Tools, stitcher: SocketAddr) -> Result<Vec<Part>> {
    let interfaces = format!("veth{}-*", cluster.prefix());
    let mut parts = Vec::new();
    for node in cluster.nodes() {
        let mut cmd = own_session(&tools.collector);
        cmd.args(["--node-name", node.name()])
            .arg("--stitcher")
            .arg(format!("http://{stitcher}"))
            .args(["--interfaces", &interfaces])
            .args(["--metrics-listen", "127.0.0.1:9401"]);
        let proc = cluster
            .spawn(node.netns(), &mut cmd)
            .with_context(|| format!("starting weft-collector on {}", node.name()))?;
        parts.push(Part {
            name: format!("weft-collector {}", node.name()),
            proc,
        });
    }
    // Started together (attaching takes a moment each); ready once each says it runs.
    for part in &parts {
        wait_ready(part, || part.proc.stderr_text().contains(" running"))?;
    }
    Ok(parts)
}

/// Waits until `ready` holds, failing early (with its stderr) if the process exits.
fn wait_ready(part: &Part, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = part.proc.try_wait()? {
            bail!(
                "{} exited during start-up ({status}):\n{}",
                part.name,
                tail(&part.proc.stderr_text(), 20)
            );
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not ready after {:?}; its log ends with:\n{}",
                part.name,
                READY_TIMEOUT,
                tail(&part.proc.stderr_text(), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether something accepts TCP connections on `addr` inside `netns`.
fn listening(cluster: &Cluster, netns: &str, addr: SocketAddr) -> bool {
    cluster
        .try_run_in(netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .unwrap_or(false)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The address of a ClusterIP Service as clients use it.
pub fn service_addr(cluster: &Cluster, name: &str) -> SocketAddrV4 {
    let svc = cluster.service(name);
    SocketAddrV4::new(svc.cluster_ip(), svc.port())
}

/// The topology names, for messages.
pub fn describe(cluster: &Cluster) -> String {
    let mut out = String::new();
    for node in cluster.nodes() {
        let pods: Vec<String> = cluster
            .pods()
            .iter()
            .filter(|p| p.node() == node.name())
            .map(|p| format!("{} {}", p.name(), p.ip()))
            .collect();
        out.push_str(&format!(
            "  {} ({}): {}\n",
            node.name(),
            node.underlay_ip(),
            pods.join(", ")
        ));
    }
    for name in topology::SERVICES {
        let svc = cluster.service(name);
        out.push_str(&format!(
            "  Service {}.{} {}:{} → :{} ({})\n",
            svc.name(),
            svc.namespace(),
            svc.cluster_ip(),
            svc.port(),
            svc.target_port(),
            svc.backends()
                .iter()
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}
