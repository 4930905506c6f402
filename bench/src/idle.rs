//! Idle: what the collector costs when nothing it traces happens, and under connection
//! churn that it sees but does not trace.
//!
//! A node's collector spends most of its life idle, and the tracepoint that reports TCP
//! connections fires for every socket of the host (kubelet, probes, a pod's own loopback).
//! So two phases, one harness node with one pod and no traffic on its veth:
//! - idle: the collector alone, after it has had time to back off its reads;
//! - churn: `weft-demo-app load --no-keepalive` against a `weft-demo-app serve` on the
//!   pod's loopback (4 connection events per request: both ends open and close).
//!
//! In: the release binaries. Out: wake-ups per second and millicores, idle; connection
//! events per second, wake-ups and CPU per 1,000 events, and events lost, under churn.
//! Wake-ups are the voluntary context switches of all the collector's threads, CPU their
//! `schedstat` run time (clock ticks are too coarse for an idle process).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, Proc};

use crate::Settings;
use crate::child::{self, http_get};
use crate::overhead::{COLLECTOR_METRICS, collector_command, wait_running};
use crate::procfs::Threads;
use crate::prom;
use crate::report::{Figure, Report, Target};

const BENCH: &str = "idle";
const SERVER: &str = "127.0.0.1:8080";
/// Opened and closed, at both ends.
const EVENTS_PER_CONNECTION: f64 = 4.0;

pub struct IdleArgs {
    /// How long the idle phase measures.
    pub idle: Duration,
    /// Connections (one request each) in the churn phase.
    pub connections: u64,
}

pub fn run(_settings: &Settings, args: &IdleArgs, report: &mut Report) -> Result<()> {
    let demo_app = child::sibling_binary("weft-demo-app")?;
    let collector_bin = child::sibling_binary("weft-collector")?;
    let cluster = Cluster::up(&ClusterSpec {
        nodes: vec![NodeSpec {
            name: "a".into(),
            pods: vec![PodSpec {
                name: "server".into(),
                namespace: "bench".into(),
                workload: "server".into(),
            }],
        }],
        services: vec![],
    })?;
    let node_ns = cluster.node("a").netns().to_owned();
    let pod_ns = cluster.pod("server").netns().to_owned();
    let _server = cluster.spawn(
        &pod_ns,
        Command::new(&demo_app).args(["serve", "--listen", SERVER, "--name", "server"]),
    )?;
    let collector = cluster.spawn(&node_ns, &mut collector_command(&collector_bin, None))?;
    wait_running(&collector)?;
    let scrape = || -> Result<String> {
        let addr = COLLECTOR_METRICS.parse()?;
        cluster.try_run_in(&node_ns, move || http_get(addr, "/metrics"))?
    };

    // Long enough for the reader to back off to its bound (0.1 s of empty reads, then
    // doubling).
    std::thread::sleep(Duration::from_secs(2));
    let idle = measure(&collector, || {
        std::thread::sleep(args.idle);
        Ok(())
    })?;
    report_idle(report, &idle);

    let before = scrape()?;
    let churn = measure(&collector, || churn(&cluster, &pod_ns, &demo_app, args))?;
    // Past the reader's longest wait (0.1 s by default) and the counters' one-second tick.
    std::thread::sleep(Duration::from_millis(1200));
    let after = scrape()?;
    let delta = |series: &str, labels: &[(&str, &str)]| {
        let v = |t: &str| prom::sum(t, series, labels).unwrap_or(0.0);
        v(&after) - v(&before)
    };
    let events = delta("weft_collector_connections_total", &[]);
    let lost = delta("weft_collector_ring_drops_total", &[("ring", "conns")]);
    let woken = delta(
        "weft_collector_kernel_events_total",
        &[("counter", "conn_wakeup")],
    );
    report_churn(report, args, &churn, events, lost, woken);
    collector.stop(Duration::from_secs(3))?;
    Ok(())
}

/// What the collector's threads did while `phase` ran, and for how long.
struct Window {
    threads: Threads,
    seconds: f64,
}

fn measure(collector: &Proc, phase: impl FnOnce() -> Result<()>) -> Result<Window> {
    let (t0, start) = (Threads::read(collector.pid())?, Instant::now());
    phase()?;
    let (t1, seconds) = (
        Threads::read(collector.pid())?,
        start.elapsed().as_secs_f64(),
    );
    Ok(Window {
        threads: t1.since(&t0),
        seconds,
    })
}

fn churn(
    cluster: &Cluster,
    pod_ns: &str,
    demo_app: &std::path::Path,
    args: &IdleArgs,
) -> Result<()> {
    let load = cluster.spawn(
        pod_ns,
        Command::new(demo_app)
            .args([
                "load",
                "--url",
                &format!("http://{SERVER}/"),
                "--no-keepalive",
            ])
            .args(["--requests", &args.connections.to_string()]),
    )?;
    let limit = Duration::from_secs(120);
    let status = load
        .wait_timeout(limit)?
        .with_context(|| format!("weft-demo-app load still running after {limit:?}"))?;
    if !status.success() {
        bail!(
            "weft-demo-app load failed ({status}): {}",
            load.stderr_text()
        );
    }
    Ok(())
}

fn report_idle(report: &mut Report, w: &Window) {
    let per_sec = w.threads.sleeps as f64 / w.seconds;
    report.add(
        Figure::new(BENCH, "collector wake-ups per second, idle", Some(per_sec), "/s").note(
            format!(
                "{} wake-ups of its threads in {:.1} s with nothing to trace; reading every 5 ms would be 200",
                w.threads.sleeps, w.seconds
            ),
        ),
    );
    report.add(Figure::new(
        BENCH,
        "collector CPU, idle",
        Some(w.threads.cpu_ns as f64 / 1e6 / w.seconds),
        "millicores",
    ));
}

fn report_churn(
    report: &mut Report,
    args: &IdleArgs,
    w: &Window,
    events: f64,
    lost: f64,
    woken: f64,
) {
    let expected = EVENTS_PER_CONNECTION * args.connections as f64;
    let per_1k = |v: f64| (events > 0.0).then(|| v * 1000.0 / events);
    report.add(
        Figure::new(
            BENCH,
            "connection events per second (churn)",
            Some(events / w.seconds),
            "/s",
        )
        .note(format!(
            "{events:.0} read (at least {expected:.0} expected: {} connections on a pod's loopback, 4 events each, plus the host's own) in {:.1} s",
            args.connections, w.seconds
        )),
    );
    report.add(
        Figure::new(
            BENCH,
            "collector wake-ups per 1,000 connection events",
            per_1k(w.threads.sleeps as f64),
            "",
        )
        .note(format!(
            "{} wake-ups; {woken:.0} events found the ring a quarter full and woke it",
            w.threads.sleeps
        )),
    );
    report.add(Figure::new(
        BENCH,
        "collector CPU per 1,000 connection events",
        per_1k(w.threads.cpu_ns as f64 / 1e6),
        "ms",
    ));
    // Counted drops, and any shortfall the counters missed.
    let missing = (expected - events).max(0.0);
    report.add(
        Figure::new(BENCH, "connection events lost", Some(lost + missing), "")
            .target(Target::at_most(0.0))
            .note(format!(
                "{lost:.0} counted (weft_collector_ring_drops_total{{ring=\"conns\"}}), {missing:.0} missing from what was read"
            )),
    );
}
