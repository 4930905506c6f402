//! Overhead: a saturating keep-alive HTTP load (h2load over HTTP/1.1) against a
//! `weft-demo-app serve` pod on one harness node, in alternating rounds without and with
//! `weft-collector` attached (same binaries, same topology; the order alternates per round
//! so drift does not favour one side).
//!
//! Saturating: one h2load thread per CPU (16 connections each) keeps every CPU busy, so the
//! rate is what the machine can serve. With a single h2load thread the CPUs stay 10–20 %
//! idle and the rate is that of the one client thread, on whose CPU the classifiers of the
//! packets it sends also run: that measures the slowdown of one thread's critical path,
//! not of the server (`--overhead-threads 1` still runs it). The machine's busy fraction
//! during the runs without the collector is reported, so a run shows which it measured.
//!
//! In: the release binaries and h2load. Out: figures per client [`Placement`]: throughput
//! ratio (median of the rounds' rates with / without), p50 and p99 latency ratios,
//! collector CPU in millicores per 10k requests/s, collector peak RSS, ring-buffer drops,
//! the packets/s it saw and the exchanges it reported per request.
//!
//! Two placements of h2load, each with its own figures (labelled) and verdicts:
//! - [`Placement::Pod`]: in a client pod on the same node. The collector sees both halves
//!   of every request (the client pod's veth and the server pod's veth), the most a node
//!   agent carries per request.
//! - [`Placement::Node`]: in the node's own network namespace, which reaches the pod over
//!   the `cni0` bridge. The collector traces only the pods' host-side veths, so it sees the
//!   server half only: the overhead a traced server shows to an untraced client.
//!
//! The exchanges-per-request figure confirms the placement (≈ 2 for pod, ≈ 1 for node).
//!
//! Which runs ship: in the ratio rounds (and the `--bpf-stats` run) the collector runs
//! local-only (no `--stitcher`): each Exchange is built and discarded, so protobuf encoding
//! and the gRPC stream are not in those figures. A stitcher there would have to run on the
//! same 2 CPUs as the load and the server (in production it runs on another node) and
//! would lower the "with" rate for a reason that is not the collector's. Instead each
//! placement gets one extra run, outside the ratio, in which the collector ships to a real
//! `weft-stitcher` in the cluster's control namespace ([`crate::harness_stitcher`], no
//! printing, no OTLP export): its CPU per 10k req/s is the collector's production cost;
//! the stitcher's CPU, that run's rate and whether everything was delivered (the
//! collector's `ship` counters and queue gauge, read once the shipper has flushed) go in
//! its note.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, Proc};

use crate::Settings;
use crate::child::{self, Child};
use crate::harness_stitcher;
use crate::procfs::{MachineCpu, Sample};
use crate::prom;
use crate::report::{self, Figure, Report, Target};
use crate::ship::{self, Flush, STUCK_TICKS, ShipCounters};
use crate::stats;

const BENCH: &str = "overhead";
const SERVER_PORT: u16 = 8080;
/// Inside the node's own network namespace: a fixed port cannot collide.
pub const COLLECTOR_METRICS: &str = "127.0.0.1:9401";

/// Where h2load runs relative to the traced server pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In a traced client pod on the server's node: both halves traced.
    Pod,
    /// In the node's network namespace (not a pod, so untraced): the server half only.
    Node,
}

impl Placement {
    /// Appended to every figure name, so the table says which placement a row is.
    pub fn label(self) -> &'static str {
        match self {
            Placement::Pod => "client pod → server pod, both halves traced",
            Placement::Node => "node → server pod, server half traced",
        }
    }

    /// Short tag for progress lines and h2load log files.
    fn tag(self) -> &'static str {
        match self {
            Placement::Pod => "pod",
            Placement::Node => "node",
        }
    }

    /// Exchanges the collector should report per request: one per traced half.
    pub fn expected_exchanges(self) -> f64 {
        match self {
            Placement::Pod => 2.0,
            Placement::Node => 1.0,
        }
    }
}

/// `--overhead-client`: which placements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientChoice {
    Pod,
    Node,
    Both,
}

impl ClientChoice {
    pub fn placements(self) -> Vec<Placement> {
        match self {
            ClientChoice::Pod => vec![Placement::Pod],
            ClientChoice::Node => vec![Placement::Node],
            ClientChoice::Both => vec![Placement::Pod, Placement::Node],
        }
    }
}

pub struct OverheadArgs {
    pub rounds: u32,
    pub round: Duration,
    /// h2load threads.
    pub threads: u32,
    /// h2load connections, over all threads.
    pub connections: u32,
    pub placements: Vec<Placement>,
    /// A third run per round: the collector with `--hooks-only`.
    pub hooks: bool,
}

/// One load run as h2load reported it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadResult {
    pub rps: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The machine's busy fraction during the run (all CPUs).
    pub cpu_busy: Option<f64>,
}

/// What the collector did during one "with" round.
#[derive(Debug, Clone, Default)]
struct CollectorRound {
    cores: f64,
    hwm_kib: u64,
    ring_drops: f64,
    packets: f64,
    exchanges: f64,
    seconds: f64,
    /// Classifier run time (s) and runs over the load, ingress then egress; zero unless
    /// the collector ran with `--bpf-stats`.
    classifier_seconds: [f64; 2],
    classifier_runs: [f64; 2],
    /// Only when the collector shipped to a stitcher.
    shipping: Option<ShipRound>,
}

/// What shipping did during one run: the stitcher's side and the collector's ship counters.
/// The shipper may still be sending when the load stops, so CPU is counted from the start
/// of the load until the flush ended.
#[derive(Debug, Clone, Default)]
struct ShipRound {
    /// The collector's CPU seconds from the end of the load until the flush ended.
    collector_cpu_after_load: f64,
    /// The stitcher's CPU seconds from the start of the load until the flush ended.
    stitcher_cpu_seconds: f64,
    /// Exchanges the stitcher ingested from the start of the load to the end of the flush.
    stitcher_exchanges: f64,
    /// Events sent by the end of the load (as of the collector's last tick before it).
    sent_at_load_end: f64,
    /// The collector's totals once the shipper had flushed (or the wait ended).
    counters: ShipCounters,
    /// How the wait for the flush ended.
    flush: Flush,
    /// How long after the load the flush ended (or the wait gave up).
    flush_wait: Duration,
}

impl ShipRound {
    /// The collector's CPU for this run in cores: everything it spent from the start of
    /// the load until it had shipped the load's events, over the load's `load_seconds`.
    fn collector_cores(&self, cores_during_load: f64, load_seconds: f64) -> f64 {
        if load_seconds <= 0.0 {
            return cores_during_load;
        }
        cores_during_load + self.collector_cpu_after_load / load_seconds
    }
}

/// The collector's CPU (in cores) per 10k requests/s, in millicores; `None` without load.
pub fn millicores_per_10k_rps(cores: f64, rps: f64) -> Option<f64> {
    (rps > 0.0).then(|| cores * 1000.0 / (rps / 10_000.0))
}

/// The collector's kernel programs whose cost lands on the packets' path.
const CLASSIFIERS: [&str; 2] = ["weft_tc_ingress", "weft_tc_egress"];

/// Every run of one placement; `with[i]`, `without[i]` and `collector[i]` are round `i`.
#[derive(Debug, Default)]
struct Runs {
    without: Vec<LoadResult>,
    with: Vec<LoadResult>,
    collector: Vec<CollectorRound>,
    /// Round `i`'s run with the collector's classifiers attached but returning at once
    /// (`--overhead-hooks`; empty without).
    hooks: Vec<LoadResult>,
    /// One extra run with `--bpf-stats` (not in the ratio: the kernel's timing costs two
    /// clock reads per run): the classifiers' own time per run and per request.
    timed: Option<(LoadResult, CollectorRound)>,
    /// One extra run shipping to a stitcher (not in the ratio: the stitcher would take the
    /// load's CPUs): the collector's cost with encoding and the gRPC stream.
    shipped: Option<(LoadResult, CollectorRound)>,
}

/// Where the load comes from and goes to.
struct Setup<'a> {
    cluster: &'a Cluster,
    node_ns: String,
    h2load: std::path::PathBuf,
    collector_bin: std::path::PathBuf,
    url: String,
    work: std::path::PathBuf,
}

impl Setup<'_> {
    fn client_ns(&self, placement: Placement) -> String {
        match placement {
            Placement::Pod => self.cluster.pod("client").netns().to_owned(),
            Placement::Node => self.node_ns.clone(),
        }
    }
}

pub fn run(settings: &Settings, args: &OverheadArgs, report: &mut Report) -> Result<()> {
    if args.placements.is_empty() {
        bail!("no client placement selected");
    }
    let h2load = which("h2load")
        .context("h2load not found (Debian nghttp2-client; `cargo xtask setup` installs it)")?;
    let demo_app = child::sibling_binary("weft-demo-app")?;
    let collector_bin = child::sibling_binary("weft-collector")?;
    // Each placement's shipping run comes after its ratio rounds: without a stitcher
    // (say, a `--bin-dir` holding only a variant collector) fail now, not minutes in.
    child::sibling_binary("weft-stitcher")?;
    let work = settings.work_dir.join("overhead");
    std::fs::create_dir_all(&work)?;

    let pod = |name: &str| PodSpec {
        name: name.into(),
        namespace: "bench".into(),
        workload: name.into(),
    };
    // The client pod exists for every placement: the same topology (and the same veths
    // for the collector to attach to) whichever placement runs.
    let cluster = Cluster::up(&ClusterSpec {
        nodes: vec![NodeSpec {
            name: "a".into(),
            pods: vec![pod("client"), pod("server")],
        }],
        services: vec![],
    })?;
    let server = cluster.pod("server");
    let _server = cluster.spawn(
        server.netns(),
        Command::new(&demo_app).args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{SERVER_PORT}"),
            "--name",
            "server",
        ]),
    )?;
    let setup = Setup {
        cluster: &cluster,
        node_ns: cluster.node("a").netns().to_owned(),
        h2load,
        collector_bin,
        url: format!("http://{}:{SERVER_PORT}/", server.ip()),
        work,
    };
    let server_addr = SocketAddr::from((server.ip(), SERVER_PORT));
    for &placement in &args.placements {
        wait_listening(&cluster, &setup.client_ns(placement), server_addr)?;
    }

    let mut runs: Vec<Runs> = args.placements.iter().map(|_| Runs::default()).collect();
    for round in 0..args.rounds {
        // Placements interleave within a round, so both see the same background load.
        for (&placement, runs) in args.placements.iter().zip(&mut runs) {
            run_round(&setup, placement, round, args, runs)?;
        }
    }
    for (&placement, runs) in args.placements.iter().zip(&mut runs) {
        let client_ns = setup.client_ns(placement);
        let label = format!("{}-timed", placement.tag());
        let load = || h2load_run(&setup, &client_ns, args, &label);
        runs.timed = Some(with_collector(&setup, &["--bpf-stats"], None, load)?);
    }
    // Started only now, so that it takes no CPU in the runs above. Prints nothing (no pipe
    // to fill) and exports nothing: ingest and the stitch path only.
    let mut stitcher = harness_stitcher::start(
        &cluster,
        &setup.work,
        harness_stitcher::Options {
            print: "off",
            trace_idle: None,
            stdout: Stdio::null(),
        },
    )?;
    let ship_to = ShipTo {
        stitcher: &stitcher,
        url: harness_stitcher::url(&cluster),
    };
    for (&placement, runs) in args.placements.iter().zip(&mut runs) {
        let client_ns = setup.client_ns(placement);
        let label = format!("{}-shipping", placement.tag());
        let load = || h2load_run(&setup, &client_ns, args, &label);
        let (load, c) = with_collector(&setup, &[], Some(&ship_to), load)?;
        eprintln!(
            "weft-bench: overhead {label}: {:.0} req/s, {}",
            load.rps,
            c.shipping.as_ref().map_or(String::new(), |s| format!(
                "{}; flush ended {:.1} s after the load",
                s.counters.describe(),
                s.flush_wait.as_secs_f64()
            ))
        );
        runs.shipped = Some((load, c));
    }
    stitcher.stop(Duration::from_secs(3));
    for (&placement, runs) in args.placements.iter().zip(&runs) {
        report_placement(report, placement, runs, args);
    }
    Ok(())
}

/// The runs of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Without,
    With,
    /// The collector with `--hooks-only`.
    Hooks,
}

impl Arm {
    fn tag(self) -> &'static str {
        match self {
            Arm::Without => "without",
            Arm::With => "with",
            Arm::Hooks => "hooks",
        }
    }
}

/// The order of round `round`'s runs: rotated each round (off/on, on/off, ...; with
/// `hooks`, off/on/hooks, on/hooks/off, ...) so that drift favours no run.
fn round_order(round: u32, hooks: bool) -> Vec<Arm> {
    let mut arms = vec![Arm::Without, Arm::With];
    if hooks {
        arms.push(Arm::Hooks);
    }
    let n = arms.len();
    arms.rotate_left(round as usize % n);
    arms
}

/// One round of one placement: a run without and one with the collector (and one with
/// `--hooks-only` if asked), in [`round_order`].
fn run_round(
    setup: &Setup,
    placement: Placement,
    round: u32,
    args: &OverheadArgs,
    runs: &mut Runs,
) -> Result<()> {
    let client_ns = setup.client_ns(placement);
    for arm in round_order(round, args.hooks) {
        let label = format!("{}-r{round}-{}", placement.tag(), arm.tag());
        let load = || h2load_run(setup, &client_ns, args, &label);
        let rps = match arm {
            Arm::Without => {
                runs.without.push(load()?);
                runs.without.last()
            }
            Arm::With => {
                let (load, c) = with_collector(setup, &[], None, load)?;
                runs.collector.push(c);
                runs.with.push(load);
                runs.with.last()
            }
            Arm::Hooks => {
                runs.hooks
                    .push(with_collector(setup, &["--hooks-only"], None, load)?.0);
                runs.hooks.last()
            }
        }
        .map_or(0.0, |l| l.rps);
        eprintln!("weft-bench: overhead {label}: {rps:.0} req/s");
    }
    Ok(())
}

/// True when the collector's exchanges per request match what the placement traces (within
/// a quarter exchange: keep-alive connections add no exchanges, only lost events remove).
pub fn placement_confirmed(placement: Placement, exchanges_per_request: f64) -> bool {
    (exchanges_per_request - placement.expected_exchanges()).abs() <= 0.25
}

/// The figures of one placement, each name ending in the placement's label.
fn report_placement(report: &mut Report, placement: Placement, runs: &Runs, args: &OverheadArgs) {
    let name = |base: &str| format!("{base} ({})", placement.label());
    let Runs {
        without,
        with,
        collector: collector_rounds,
        hooks,
        timed,
        shipped,
    } = runs;
    if let Some((load, c)) = timed {
        report_classifier_time(report, &name, load, c, args);
    }
    if let Some((load, c)) = shipped {
        report_shipping(report, &name, load, c, args);
    }
    let med = |xs: &[LoadResult], f: fn(&LoadResult) -> Option<f64>| {
        stats::median(&xs.iter().filter_map(f).collect::<Vec<_>>())
    };
    let rps_with = med(with, |l| Some(l.rps));
    let rps_without = med(without, |l| Some(l.rps));
    let failed: u64 = with.iter().chain(without).map(|l| l.failed).sum();
    let cmd = format!(
        "h2load --h1 -t {} -c {} -D {}s from the {}, {} rounds × (without, with{}), \
         weft-demo-app serve in a pod on the same node",
        args.threads,
        args.connections,
        args.round.as_secs(),
        match placement {
            Placement::Pod => "client pod",
            Placement::Node => "node's network namespace",
        },
        args.rounds,
        if hooks.is_empty() { "" } else { ", hooks only" }
    );
    report.add(
        Figure::new(
            BENCH,
            &name("req/s without collector (median)"),
            rps_without,
            "/s",
        )
        .note(cmd),
    );
    report.add(Figure::new(
        BENCH,
        &name("req/s with collector (median)"),
        rps_with,
        "/s",
    ));
    let busy = med(without, |l| l.cpu_busy.map(|b| b * 100.0));
    report.add(
        Figure::new(
            BENCH,
            &name("CPU busy without collector (median)"),
            busy,
            "%",
        )
        .note(
            "all CPUs of the machine during the runs without the collector: near 100 % the \
             load saturates the machine; well below, one client thread limits the rate",
        ),
    );
    // Paired by round (the two runs of a round are adjacent in time, so they share the
    // machine's background load), then the median over rounds.
    let paired = paired_ratios(with, without);
    let mut f = Figure::new(
        BENCH,
        &name("throughput ratio with/without"),
        stats::median(&paired),
        "",
    )
    .target(Target::at_least(0.97))
    .note(ratio_interval(&paired))
    .note(format!(
        "median of per-round ratios {}; rates without {:?}, with {:?}",
        paired
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" "),
        without.iter().map(|l| l.rps.round()).collect::<Vec<_>>(),
        with.iter().map(|l| l.rps.round()).collect::<Vec<_>>()
    ));
    if failed > 0 {
        f = f.note(format!("{failed} requests failed"));
    }
    report.add(f);
    if !hooks.is_empty() {
        report_hooks(report, &name, without, with, hooks);
    }
    report.add(Figure::new(
        BENCH,
        &name("p50 latency ratio with/without"),
        stats::ratio(med(with, |l| l.p50_ms), med(without, |l| l.p50_ms)),
        "",
    ));
    report.add(
        Figure::new(
            BENCH,
            &name("p99 latency ratio with/without"),
            stats::ratio(med(with, |l| l.p99_ms), med(without, |l| l.p99_ms)),
            "",
        )
        .note(format!(
            "p99 without {} ms, with {} ms",
            med(without, |l| l.p99_ms).map_or("-".into(), |v| format!("{v:.2}")),
            med(with, |l| l.p99_ms).map_or("-".into(), |v| format!("{v:.2}")),
        )),
    );

    // Collector cost: CPU per 10k requests/s, peak memory, losses.
    let per_10k: Vec<f64> = collector_rounds
        .iter()
        .zip(with)
        .filter_map(|(c, l)| millicores_per_10k_rps(c.cores, l.rps))
        .collect();
    report.add(
        Figure::new(
            BENCH,
            &name("collector CPU per 10k req/s"),
            stats::median(&per_10k),
            "millicores",
        )
        .target(Target::at_most(100.0))
        .note(format!(
            "collector process at {} millicores (median), {} of each request; \
             the classifiers' in-kernel time is not in /proc/<pid>/stat (it shows in the \
             throughput ratio)",
            stats::median(
                &collector_rounds
                    .iter()
                    .map(|c| c.cores * 1000.0)
                    .collect::<Vec<_>>()
            )
            .map_or("-".into(), |v| format!("{v:.0}")),
            match placement {
                Placement::Pod => "both halves",
                Placement::Node => "the server half",
            }
        )),
    );
    let hwm = collector_rounds.iter().map(|c| c.hwm_kib).max();
    report.add(
        Figure::new(
            BENCH,
            &name("collector peak RSS"),
            hwm.map(|k| k as f64 / 1024.0),
            "MiB",
        )
        .target(Target::at_most(64.0)),
    );
    let drops: f64 = collector_rounds.iter().map(|c| c.ring_drops).sum();
    let pps = collector_rounds
        .iter()
        .filter(|c| c.seconds > 0.0)
        .map(|c| c.packets / c.seconds)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let exchanges_per_req: Vec<f64> = collector_rounds
        .iter()
        .zip(with)
        .filter(|(_, l)| l.succeeded > 0)
        .map(|(c, l)| c.exchanges / (l.succeeded + l.failed) as f64)
        .collect();
    let mut f = Figure::new(BENCH, &name("ring-buffer drops"), Some(drops), "")
        .target(Target::at_most(0.0))
        .note(format!(
            "at up to {} packets/s seen by the collector",
            pps.map_or("-".into(), |p| report::number(p.round()))
        ));
    f = f.note(format!(
        "per round (packets/s, drops): {}",
        collector_rounds
            .iter()
            .filter(|c| c.seconds > 0.0)
            .map(|c| format!("({:.0}, {:.0})", c.packets / c.seconds, c.ring_drops))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    if pps.is_some_and(|p| p < 100_000.0) {
        f = f.note("100k packets/s not reached by this load");
    }
    report.add(f);
    report.add(Figure::new(
        BENCH,
        &name("packets/s seen by the collector (max)"),
        pps,
        "/s",
    ));
    let exchanges = stats::median(&exchanges_per_req);
    let mut f = Figure::new(
        BENCH,
        &name("exchanges per request (collector)"),
        exchanges,
        "",
    )
    .note(format!(
        "{} expected: {}",
        placement.expected_exchanges(),
        match placement {
            Placement::Pod => "the client's and the server's half",
            Placement::Node => "the server's half (the node's own namespace is not traced)",
        }
    ));
    if let Some(x) = exchanges {
        f = f.note(if placement_confirmed(placement, x) {
            "placement confirmed"
        } else {
            "does NOT match the placement"
        });
    }
    report.add(f);
}

/// Paired by round, `a[i].rps / b[i].rps`, where `b[i]` ran.
fn paired_ratios(a: &[LoadResult], b: &[LoadResult]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(_, b)| b.rps > 0.0)
        .map(|(a, b)| a.rps / b.rps)
        .collect()
}

/// The throughput loss split in two (`--overhead-hooks`): what the attached hooks cost
/// (classifiers on both directions of the traced veths returning at once: what any
/// TC-attached tracer pays here), and what Weft's capture adds beyond them.
fn report_hooks(
    report: &mut Report,
    name: &dyn Fn(&str) -> String,
    without: &[LoadResult],
    with: &[LoadResult],
    hooks: &[LoadResult],
) {
    let split = [
        (
            "throughput ratio hooks only/without",
            paired_ratios(hooks, without),
            "the collector with --hooks-only: its classifiers attached as usual but \
             returning at once, capturing nothing; informational",
        ),
        (
            "throughput ratio with/hooks only",
            paired_ratios(with, hooks),
            "what capture, the rings and the collector add beyond the hooks; informational",
        ),
    ];
    for (figure, ratios, note) in split {
        report.add(
            Figure::new(BENCH, &name(figure), stats::median(&ratios), "")
                .note(ratio_interval(&ratios))
                .note(note),
        );
    }
}

/// How far the rounds leave the true median ratio uncertain: one run's median moves by a
/// few points (a round's rate depends on what else the machine did then), so a median
/// near the target alone does not tell whether it is met.
fn ratio_interval(paired: &[f64]) -> String {
    match stats::median_interval(paired, 0.9) {
        Some(i) => format!(
            "the true median ratio lies in [{:.3}, {:.3}] with {:.0} % confidence \
             (distribution-free, from {} rounds; more rounds narrow it)",
            i.low,
            i.high,
            i.coverage * 100.0,
            paired.len()
        ),
        None => "no rounds".to_owned(),
    }
}

/// The classifiers' own time, from the kernel's per-program statistics of the timed run.
fn report_classifier_time(
    report: &mut Report,
    name: &dyn Fn(&str) -> String,
    load: &LoadResult,
    c: &CollectorRound,
    args: &OverheadArgs,
) {
    let per_run = |i: usize| {
        (c.classifier_runs[i] > 0.0).then(|| c.classifier_seconds[i] * 1e9 / c.classifier_runs[i])
    };
    let (ingress, egress) = (per_run(0), per_run(1));
    let runs: f64 = c.classifier_runs.iter().sum();
    let seconds: f64 = c.classifier_seconds.iter().sum();
    let requests = load.succeeded as f64;
    let mean = (runs > 0.0).then(|| seconds * 1e9 / runs);
    report.add(
        Figure::new(BENCH, &name("classifier time per run"), mean, "ns").note(format!(
            "ingress {} ns, egress {} ns (kernel BPF run-time statistics, one extra {} s run with --bpf-stats, not in the ratio); {:.1} runs per request",
            ingress.map_or("-".into(), |v| format!("{v:.0}")),
            egress.map_or("-".into(), |v| format!("{v:.0}")),
            args.round.as_secs(),
            if requests > 0.0 { runs / requests } else { 0.0 },
        )),
    );
    report.add(
        Figure::new(
            BENCH,
            &name("classifier time per request"),
            (requests > 0.0 && runs > 0.0).then(|| seconds * 1e6 / requests),
            "µs",
        )
        .note("spent in the softirq of whoever sends the packet (h2load and the server), not in the collector process"),
    );
}

/// The collector's CPU when it ships: from the one run of `placement` that shipped to a
/// stitcher, with the stitcher's side and the delivery counts in the note.
fn report_shipping(
    report: &mut Report,
    name: &dyn Fn(&str) -> String,
    load: &LoadResult,
    c: &CollectorRound,
    args: &OverheadArgs,
) {
    let Some(ship) = &c.shipping else {
        return;
    };
    let cores = ship.collector_cores(c.cores, c.seconds);
    let wait = ship.flush_wait.as_secs_f64();
    let mut f = Figure::new(
        BENCH,
        &name("collector CPU per 10k req/s, shipping to a stitcher"),
        millicores_per_10k_rps(cores, load.rps),
        "millicores",
    )
    .target(Target::at_most(100.0))
    .note(format!(
        "one extra {} s run outside the ratio, the collector with --stitcher to a \
         weft-stitcher in the control namespace (batches zstd-compressed, the default), {:.0} req/s; collector process at {:.0} \
         millicores: its CPU from the start of the load until the shipper had flushed \
         ({wait:.1} s after the load, {:.0} millicores during the load), over the load's {:.1} s",
        args.round.as_secs(),
        load.rps,
        cores * 1000.0,
        c.cores * 1000.0,
        c.seconds,
    ))
    .note(format!(
        "stitcher at {:.0} millicores on the same basis, informational (the same machine \
         here, another node in production); it ingested {} exchanges",
        if c.seconds > 0.0 {
            ship.stitcher_cpu_seconds * 1000.0 / c.seconds
        } else {
            0.0
        },
        report::number(ship.stitcher_exchanges),
    ))
    .note(ship.counters.describe())
    .note(format!(
        "{} events sent after the load ended",
        report::number((ship.counters.sent_events - ship.sent_at_load_end).max(0.0))
    ));
    f = f.note(match (ship.counters.delivered(), ship.flush) {
        (true, _) => "all delivered".to_owned(),
        (false, Flush::Stuck) => format!(
            "NOT all delivered: the queue stopped shrinking for {STUCK_TICKS} ticks ({wait:.1} s after the load)"
        ),
        (false, _) => format!("NOT all delivered when the wait ended ({wait:.1} s after the load)"),
    });
    if load.failed > 0 {
        f = f.note(format!("{} requests failed", load.failed));
    }
    report.add(f);
}

/// Where the collector ships to, in the shipping runs.
struct ShipTo<'a> {
    stitcher: &'a Child,
    url: String,
}

/// Starts the collector in the node (with `extra` flags, and shipping to `ship_to` if
/// given), waits until it runs, runs `load`, measures the collector (and the stitcher) over
/// the load, lets the shipper flush, stops it.
fn with_collector(
    setup: &Setup,
    extra: &[&str],
    ship_to: Option<&ShipTo>,
    load: impl FnOnce() -> Result<LoadResult>,
) -> Result<(LoadResult, CollectorRound)> {
    let (cluster, node_ns) = (setup.cluster, setup.node_ns.as_str());
    let mut cmd = collector_command(&setup.collector_bin, ship_to.map(|to| to.url.as_str()));
    cmd.args(extra);
    let proc = cluster.spawn(node_ns, &mut cmd)?;
    wait_running(&proc)?;
    let scrape = || -> Result<String> {
        let addr: SocketAddr = COLLECTOR_METRICS.parse()?;
        cluster.try_run_in(node_ns, move || child::http_get(addr, "/metrics"))?
    };
    let stitcher_sample = || {
        ship_to
            .map(|to| Sample::read(to.stitcher.pid()))
            .transpose()
    };
    let stitcher_exchanges = || -> Result<f64> {
        let text = harness_stitcher::scrape(cluster)?;
        prom::sum(&text, "weft_stitcher_ingest_exchanges", &[])
            .or_else(|| prom::sum(&text, "weft_stitcher_ingest_exchanges_total", &[]))
            .context("the stitcher's /metrics has no weft_stitcher_ingest_exchanges")
    };
    // With --bpf-stats the program totals are taken on the collector's one-second tick:
    // let one pass before each scrape so that it has them.
    let settle = || {
        if extra.contains(&"--bpf-stats") {
            std::thread::sleep(Duration::from_millis(1100));
        }
    };
    settle();
    let m0 = scrape()?;
    let ingested0 = ship_to.map(|_| stitcher_exchanges()).transpose()?;
    let st0 = stitcher_sample()?;
    let s0 = Sample::read(proc.pid())?;
    let result = load()?;
    let s1 = Sample::read(proc.pid())?;
    settle();
    let m1 = scrape()?;
    let shipping = match (st0, ingested0) {
        (Some(st0), Some(ingested0)) => {
            let at_load_end = ShipCounters::parse(&m1);
            let (counters, flush) = ship::wait_flushed(at_load_end.clone(), &scrape)?;
            let flush_wait = s1.at.elapsed();
            let s2 = Sample::read(proc.pid())?;
            let st2 = stitcher_sample()?.unwrap_or(st0);
            Some(ShipRound {
                collector_cpu_after_load: s2.cpu_seconds_since(&s1),
                stitcher_cpu_seconds: st2.cpu_seconds_since(&st0),
                stitcher_exchanges: stitcher_exchanges()? - ingested0,
                sent_at_load_end: at_load_end.sent_events,
                counters,
                flush,
                flush_wait,
            })
        }
        _ => None,
    };
    proc.stop(Duration::from_secs(3))?;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        let v = |t: &str| {
            prom::sum(t, &format!("{name}_total"), labels)
                .or_else(|| prom::sum(t, name, labels))
                .unwrap_or(0.0)
        };
        v(&m1) - v(&m0)
    };
    Ok((
        result,
        CollectorRound {
            cores: s1.cores_since(&s0),
            hwm_kib: s1.hwm_kib,
            ring_drops: delta("weft_collector_ring_drops", &[]),
            packets: delta("weft_collector_kernel_events", &[("counter", "packets")]),
            exchanges: delta("weft_collector_exchanges", &[]),
            seconds: s1.at.duration_since(s0.at).as_secs_f64(),
            classifier_seconds: CLASSIFIERS
                .map(|p| delta("weft_collector_program_run_seconds", &[("program", p)])),
            classifier_runs: CLASSIFIERS
                .map(|p| delta("weft_collector_program_runs", &[("program", p)])),
            shipping,
        },
    ))
}

/// The collector on harness node `a`: metrics on [`COLLECTOR_METRICS`], no printing,
/// shipping to `stitcher` if given, else local-only (whatever `WEFT_STITCHER` says).
pub fn collector_command(bin: &std::path::Path, stitcher: Option<&str>) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["--node-name", "a", "--metrics-listen", COLLECTOR_METRICS])
        .args(["--print", "off", "--log", "info"]);
    match stitcher {
        Some(url) => cmd.args(["--stitcher", url]),
        None => cmd.env_remove("WEFT_STITCHER"),
    };
    cmd
}

pub fn wait_running(proc: &Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let err = proc.stderr_text();
        if err.contains("running") {
            return Ok(());
        }
        if let Some(status) = proc.try_wait()? {
            // Read again: what it wrote just before exiting (a panic, say) came after `err`.
            bail!(
                "weft-collector exited with {status}: {}",
                tail(&proc.stderr_text())
            );
        }
        if Instant::now() > deadline {
            bail!("weft-collector did not start in 30 s: {}", tail(&err));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(6)..].join("\n")
}

pub fn wait_listening(cluster: &Cluster, netns: &str, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = cluster.try_run_in(netns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the demo server on {addr} does not accept connections");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One h2load run from `client_ns` (a pod's or the node's); latencies from its
/// per-request log.
fn h2load_run(
    setup: &Setup,
    client_ns: &str,
    args: &OverheadArgs,
    label: &str,
) -> Result<LoadResult> {
    let log = setup.work.join(format!("{label}.h2load.log"));
    let cpu_before = MachineCpu::read().ok();
    let proc = setup.cluster.spawn(
        client_ns,
        Command::new(&setup.h2load)
            .args(["--h1", "-t", &args.threads.to_string()])
            .args(["-c", &args.connections.to_string()])
            .args(["-D", &args.round.as_secs().max(1).to_string()])
            // No warm-up phase: h2load would not count its requests, the collector would.
            .arg(format!("--log-file={}", log.display()))
            .arg(&setup.url),
    )?;
    let limit = args.round + Duration::from_secs(30);
    let status = proc
        .wait_timeout(limit)?
        .with_context(|| format!("h2load still running after {limit:?}"))?;
    let out = proc.stdout_text();
    if !status.success() {
        bail!(
            "h2load failed ({status}): {}",
            tail(&(out + &proc.stderr_text()))
        );
    }
    let cpu_busy = cpu_before
        .zip(MachineCpu::read().ok())
        .and_then(|(before, after)| after.busy_since(&before));
    let mut result =
        parse_h2load(&out).with_context(|| format!("unexpected h2load output: {}", tail(&out)))?;
    result.cpu_busy = cpu_busy;
    let latencies = parse_h2load_log(&std::fs::read_to_string(&log).unwrap_or_default());
    result.p50_ms = stats::percentile(&latencies, 0.50);
    result.p99_ms = stats::percentile(&latencies, 0.99);
    let _ = std::fs::remove_file(&log);
    Ok(result)
}

/// `finished in 10.00s, 21437.30 req/s, 2.23MB/s` and
/// `requests: 214373 total, 214373 started, 214373 done, 214370 succeeded, 3 failed, ...`.
pub fn parse_h2load(out: &str) -> Option<LoadResult> {
    let finished = out.lines().find(|l| l.starts_with("finished in"))?;
    let rps = finished
        .split(", ")
        .find_map(|p| p.strip_suffix(" req/s"))?
        .trim()
        .parse()
        .ok()?;
    let requests = out.lines().find(|l| l.starts_with("requests:"))?;
    let field = |name: &str| -> Option<u64> {
        requests
            .trim_start_matches("requests:")
            .split(',')
            .find_map(|p| p.trim().strip_suffix(name)?.trim().parse().ok())
    };
    Some(LoadResult {
        rps,
        succeeded: field("succeeded")?,
        failed: field("failed")?,
        p50_ms: None,
        p99_ms: None,
        cpu_busy: None,
    })
}

/// h2load `--log-file` lines: `start (µs since epoch)\tstatus\tduration (µs)`; durations
/// of 2xx responses in milliseconds.
pub fn parse_h2load_log(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let _start = f.next()?;
            let status: u16 = f.next()?.trim().parse().ok()?;
            let us: f64 = f.next()?.trim().parse().ok()?;
            (200..300).contains(&status).then_some(us / 1000.0)
        })
        .collect()
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "starting benchmark...\n\
        Main benchmark duration is started for 10s.\n\
        finished in 10.00s, 21437.30 req/s, 2.23MB/s\n\
        requests: 214373 total, 214373 started, 214373 done, 214370 succeeded, 3 failed, 3 errored, 0 timeout\n\
        status codes: 214370 2xx, 0 3xx, 0 4xx, 0 5xx\n";

    #[test]
    fn h2load_summary_gives_rate_and_counts() {
        let r = parse_h2load(OUT).unwrap();
        assert_eq!(r.rps, 21437.30);
        assert_eq!(r.succeeded, 214370);
        assert_eq!(r.failed, 3);
        assert_eq!(parse_h2load("garbage\n"), None);
    }

    #[test]
    fn h2load_log_gives_latencies_of_successes() {
        let log = "1700000000000000\t200\t1500\n1700000000000100\t500\t9000\nbad line\n\
                   1700000000000200\t204\t250\n";
        assert_eq!(parse_h2load_log(log), vec![1.5, 0.25]);
    }

    #[test]
    fn shipping_cpu_counts_the_flush_after_the_load() {
        let ship = ShipRound {
            collector_cpu_after_load: 0.5,
            ..ShipRound::default()
        };
        // 0.1 cores over a 10 s load, plus 0.5 CPU seconds of flushing: 0.15 cores.
        assert!((ship.collector_cores(0.1, 10.0) - 0.15).abs() < 1e-12);
        assert_eq!(ship.collector_cores(0.1, 0.0), 0.1);
    }

    #[test]
    fn cpu_per_10k_requests_per_second() {
        // 0.05 cores at 20k req/s: 25 millicores per 10k req/s.
        assert_eq!(millicores_per_10k_rps(0.05, 20_000.0), Some(25.0));
        assert_eq!(millicores_per_10k_rps(0.05, 0.0), None);
    }

    /// Every run once per round, and over as many rounds as there are runs, every run in
    /// every position once: drift within rounds favours none.
    #[test]
    fn round_order_rotates_every_run_through_every_position() {
        assert_eq!(round_order(0, false), [Arm::Without, Arm::With]);
        assert_eq!(round_order(1, false), [Arm::With, Arm::Without]);
        for hooks in [false, true] {
            let n = if hooks { 3 } else { 2 };
            let orders: Vec<Vec<Arm>> = (0..n).map(|r| round_order(r, hooks)).collect();
            for (r, order) in orders.iter().enumerate() {
                assert_eq!(order.len(), n as usize);
                let mut tags: Vec<_> = order.iter().map(|a| a.tag()).collect();
                tags.sort();
                tags.dedup();
                assert_eq!(tags.len(), n as usize, "round {r}: {order:?}");
            }
            for pos in 0..n as usize {
                let mut at: Vec<_> = orders.iter().map(|o| o[pos].tag()).collect();
                at.sort();
                at.dedup();
                assert_eq!(at.len(), n as usize, "position {pos}: {orders:?}");
            }
        }
    }

    #[test]
    fn placements_have_distinct_labels_and_expected_halves() {
        assert_eq!(
            ClientChoice::Both.placements(),
            [Placement::Pod, Placement::Node]
        );
        assert_eq!(ClientChoice::Node.placements(), [Placement::Node]);
        assert_ne!(Placement::Pod.label(), Placement::Node.label());
        assert!(placement_confirmed(Placement::Pod, 1.98));
        assert!(!placement_confirmed(Placement::Pod, 1.0));
        assert!(placement_confirmed(Placement::Node, 1.0));
        assert!(!placement_confirmed(Placement::Node, 2.0));
    }
}
