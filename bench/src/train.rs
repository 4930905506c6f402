//! Training run for the collector's profile-guided build (`cargo xtask pgo`): runs an
//! instrumented `weft-collector` (built with `-Cprofile-generate`) through traffic that
//! covers what a node carries, then stops it with SIGTERM so that it writes its profile.
//!
//! The traffic is deliberately not the overhead benchmark's (h2load `GET /` without headers
//! against one server), so that the benchmark does not measure a build tuned to itself:
//! - a two-tier chain (`front` calls `back` for every request, with `traceparent`) driven
//!   by `weft-demo-app load` over a new connection per request, with query strings and an
//!   error every 7th request: connection events, short connections, 5xx;
//! - keep-alive h2load from a pod to `back` over several paths, with `traceparent`,
//!   `tracestate` and `x-request-id`: the collector's hot path at full rate;
//! - POSTs with 2 KiB bodies from the node's namespace (server half only, cut heads);
//! - garbage and truncated requests (parse errors);
//! - the keep-alive load again with the collector shipping to a stitcher (encoding and the
//!   gRPC stream).
//!
//! In: the instrumented collector and the other binaries (`--bin-dir`), h2load.
//! Out: the profile files the collector writes where it was built to; figures on stderr.
//! Fails when the collector produced no exchanges in a phase, or did not exit cleanly.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, Proc};

use crate::Settings;
use crate::child;
use crate::harness_stitcher;
use crate::overhead::{COLLECTOR_METRICS, collector_command, wait_listening, wait_running, which};
use crate::prom;

const PORT: u16 = 8080;

pub fn run(settings: &Settings) -> Result<()> {
    let h2load = which("h2load")
        .context("h2load not found (Debian nghttp2-client; `cargo xtask setup` installs it)")?;
    let app = child::sibling_binary("weft-demo-app")?;
    let collector = child::sibling_binary("weft-collector")?;
    let work = settings.work_dir.join("train");
    std::fs::create_dir_all(&work)?;
    let pod = |name: &str| PodSpec {
        name: name.into(),
        namespace: "train".into(),
        workload: name.into(),
    };
    let cluster = Cluster::up(&ClusterSpec {
        nodes: vec![NodeSpec {
            name: "a".into(),
            pods: vec![pod("client"), pod("front"), pod("back")],
        }],
        services: vec![],
    })?;
    let (front, back) = (cluster.pod("front"), cluster.pod("back"));
    let listen = format!("0.0.0.0:{PORT}");
    let _back = cluster.spawn(
        back.netns(),
        Command::new(&app).args(["serve", "--listen", &listen, "--name", "back"]),
    )?;
    let _front = cluster.spawn(
        front.netns(),
        Command::new(&app)
            .args(["serve", "--listen", &listen, "--name", "front"])
            .args([
                "--propagate",
                "--error-every",
                "7",
                "--call",
                &format!("http://{}:{PORT}/item/{{n}}?tier=back", back.ip()),
            ]),
    )?;
    let client_ns = cluster.pod("client").netns().to_owned();
    let node_ns = cluster.node("a").netns().to_owned();
    for ip in [front.ip(), back.ip()] {
        wait_listening(&cluster, &client_ns, SocketAddr::from((ip, PORT)))?;
    }
    let back_url = |path: &str| format!("http://{}:{PORT}{path}", back.ip());
    let body = work.join("body.json");
    std::fs::write(&body, format!("{{\"data\":\"{}\"}}", "x".repeat(2040)))?;
    let load = Load {
        cluster: &cluster,
        h2load: &h2load,
        headers: [
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate: vendor=abc",
            "x-request-id: 7d3c9a5e-train",
        ],
        keep_alive_urls: ["/", "/orders?id=42&user=7", "/a/b/c/d", "/search?q=weft"].map(back_url),
    };

    let mut local = Collector::start(&cluster, &node_ns, &collector, None)?;
    let chain = cluster.spawn(
        &client_ns,
        Command::new(&app).args([
            "load",
            "--url",
            &format!("http://{}:{PORT}/order/{{n}}?user=7", front.ip()),
            "--requests",
            "3000",
            "--concurrency",
            "8",
            "--no-keepalive",
            "--traceparent",
            "--allow-http-errors",
            "--timeout-s",
            "60",
        ]),
    )?;
    finish(&chain, "weft-demo-app load", Duration::from_secs(90))?;
    local.phase_done("chain of new connections")?;
    load.keep_alive(&client_ns, Duration::from_secs(4))?;
    local.phase_done("keep-alive from a pod")?;
    load.post(&node_ns, &body, &back_url("/upload?batch=1"))?;
    local.phase_done("POST bodies from the node")?;
    send_garbage(&cluster, &client_ns, SocketAddr::from((back.ip(), PORT)))?;
    local.stop()?;

    let mut stitcher = harness_stitcher::start(
        &cluster,
        &work,
        harness_stitcher::Options {
            print: "off",
            trace_idle: None,
            stdout: Stdio::null(),
        },
    )?;
    let url = harness_stitcher::url(&cluster);
    let mut shipping = Collector::start(&cluster, &node_ns, &collector, Some(&url))?;
    load.keep_alive(&client_ns, Duration::from_secs(3))?;
    shipping.phase_done("keep-alive, shipping to a stitcher")?;
    // Let the shipper send what it holds before the stop (its flush on SIGTERM is bounded).
    std::thread::sleep(Duration::from_secs(2));
    shipping.stop()?;
    stitcher.stop(Duration::from_secs(3));
    Ok(())
}

/// h2load with the training's headers and paths.
struct Load<'a> {
    cluster: &'a Cluster,
    h2load: &'a std::path::Path,
    headers: [&'static str; 3],
    keep_alive_urls: [String; 4],
}

impl Load<'_> {
    fn keep_alive(&self, netns: &str, duration: Duration) -> Result<()> {
        let mut cmd = self.h2load_cmd();
        cmd.args(["-t", "2", "-c", "32", "-D", &duration.as_secs().to_string()])
            .args(&self.keep_alive_urls);
        self.run(netns, cmd, duration)
    }

    fn post(&self, netns: &str, body: &std::path::Path, url: &str) -> Result<()> {
        let mut cmd = self.h2load_cmd();
        cmd.args(["-t", "1", "-c", "8", "-D", "3"])
            .args(["-H", "content-type: application/json", "-d"])
            .arg(body)
            .arg(url);
        self.run(netns, cmd, Duration::from_secs(3))
    }

    fn h2load_cmd(&self) -> Command {
        let mut cmd = Command::new(self.h2load);
        cmd.arg("--h1");
        for h in self.headers {
            cmd.args(["-H", h]);
        }
        cmd
    }

    fn run(&self, netns: &str, mut cmd: Command, duration: Duration) -> Result<()> {
        let proc = self.cluster.spawn(netns, &mut cmd)?;
        finish(&proc, "h2load", duration + Duration::from_secs(30))?;
        let out = proc.stdout_text();
        let line = out.lines().find(|l| l.starts_with("requests:"));
        eprintln!(
            "weft-bench: train: h2load {}",
            line.unwrap_or("(no summary)")
        );
        Ok(())
    }
}

/// Waits for a traffic process and fails on its non-zero exit.
fn finish(proc: &Proc, what: &str, limit: Duration) -> Result<()> {
    let status = proc
        .wait_timeout(limit)?
        .with_context(|| format!("{what} still running after {limit:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {}", proc.stderr_text());
    }
    Ok(())
}

/// Bytes that are not HTTP, and request heads cut off, on fresh connections.
fn send_garbage(cluster: &Cluster, netns: &str, to: SocketAddr) -> Result<()> {
    let payloads: [&[u8]; 4] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-that-is-not-http",
        b"GET /truncated HTTP/1.1\r\nHost: back\r\nx-request-",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    ];
    cluster.try_run_in(netns, move || -> Result<()> {
        for _ in 0..25 {
            for p in payloads {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
                s.write_all(p)?;
                // The server answers or closes; either ends the exchange.
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
        }
        Ok(())
    })?
}

/// The instrumented collector on the node, local-only or shipping.
struct Collector<'a> {
    cluster: &'a Cluster,
    node_ns: &'a str,
    proc: Proc,
    /// Exchanges counted at the end of the previous phase.
    exchanges: f64,
}

impl<'a> Collector<'a> {
    fn start(
        cluster: &'a Cluster,
        node_ns: &'a str,
        bin: &std::path::Path,
        stitcher: Option<&str>,
    ) -> Result<Self> {
        let proc = cluster.spawn(node_ns, &mut collector_command(bin, stitcher))?;
        wait_running(&proc)?;
        Ok(Collector {
            cluster,
            node_ns,
            proc,
            exchanges: 0.0,
        })
    }

    /// Checks that the phase produced exchanges (else the profile would not cover it).
    fn phase_done(&mut self, phase: &str) -> Result<()> {
        // The collector publishes its parse counters on its one-second tick.
        std::thread::sleep(Duration::from_millis(1100));
        let addr: SocketAddr = COLLECTOR_METRICS.parse()?;
        let text = self
            .cluster
            .try_run_in(self.node_ns, move || child::http_get(addr, "/metrics"))??;
        let total = prom::sum(&text, "weft_collector_exchanges_total", &[])
            .or_else(|| prom::sum(&text, "weft_collector_exchanges", &[]))
            .context("the collector's /metrics has no weft_collector_exchanges")?;
        let new = total - std::mem::replace(&mut self.exchanges, total);
        eprintln!("weft-bench: train: {phase}: {new:.0} exchanges");
        if new <= 0.0 {
            bail!("the collector produced no exchanges in the phase \"{phase}\"");
        }
        Ok(())
    }

    /// SIGTERM: the instrumented binary writes its profile as it exits.
    fn stop(self) -> Result<()> {
        let status = self.proc.stop(Duration::from_secs(10))?;
        if !status.success() {
            bail!(
                "the collector exited with {status}: {}",
                self.proc.stderr_text()
            );
        }
        Ok(())
    }
}
