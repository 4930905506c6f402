//! `weft-bench`: Weft's benchmarks in one command, with bounded run time. Prints a table
//! (each figure with its target and whether it is met) and writes a JSON report.
//!
//! ```text
//! cargo xtask bench                 # the default set (about 8 minutes)
//! cargo xtask bench -- --quick      # shorter rounds (about 2 minutes)
//! target/release/weft-bench --only stitch,overhead
//! ```
//!
//! Benchmarks ([`Bench`]): `stitch` (weft-loadgen → weft-stitcher), `overhead` (HTTP load
//! against a harness pod with and without the collector, from a client pod and from the
//! node; `--overhead-client`), `accuracy` (the harness chain, joins and links checked
//! against what the demo apps logged; also gives `freshness`),
//! `query` (Query API calls/s while weft-loadgen ingests 100,000 exchanges/s), `idle`
//! (the collector's wake-ups and CPU with nothing to trace, and under connection churn).
//! Benchmarks are not tests: nothing here fails on a missed target; the exit code is
//! non-zero only when a benchmark could not run.

mod accuracy;
mod child;
mod harness_stitcher;
mod idle;
mod overhead;
mod procfs;
mod prom;
mod query;
mod report;
mod score;
mod ship;
mod signals;
mod stats;
mod stitch;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};

use report::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bench {
    Stitch,
    Overhead,
    Accuracy,
    Query,
    Idle,
}

#[derive(Debug, Parser)]
#[command(
    name = "weft-bench",
    version,
    about = "Weft's benchmarks: table + JSON report"
)]
struct Cli {
    /// Short rounds (about 2 minutes in all).
    #[arg(long)]
    quick: bool,
    /// Run only these benchmarks (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Bench>,
    /// Directory of weft-stitcher, weft-collector, weft-loadgen and weft-demo-app
    /// (default: the directory of weft-bench itself).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/report.json")]
    out: PathBuf,
    /// Stitch benchmark: how long weft-loadgen drives the stitcher.
    #[arg(long, value_parser = humantime::parse_duration)]
    stitch_duration: Option<Duration>,
    /// Overhead benchmark: rounds (each one run without and one with the collector, per
    /// client placement). Default 31, the median interval at ≥ 90 % is then [11th, 21st]
    /// (92.9 %); 11 rounds give [3rd, 9th], 5 only [lowest, highest]. About 7 minutes for
    /// both placements.
    #[arg(long)]
    overhead_rounds: Option<u32>,
    /// Overhead benchmark: length of each run (default 3 s). Short runs, many rounds: a
    /// shared VM's speed moves in phases of seconds to tens of seconds (back-to-back 1 s
    /// runs without the collector: 58–59k req/s for 6 s, then 68–72k), and a run pair
    /// that straddles a change moves its ratio by up to the change. With 11 rounds of
    /// 10 s the ratio's 93 % interval was 0.03–0.25 wide (median 0.10; 6 runs, 12
    /// intervals); with 31 rounds of 3 s, in less time, 0.017–0.054 (3 runs, 6 intervals).
    #[arg(long, value_parser = humantime::parse_duration)]
    overhead_round: Option<Duration>,
    /// Overhead benchmark: where h2load runs: in a traced client pod (both halves of each
    /// request traced), in the node's network namespace (server half only), or both.
    #[arg(long, value_enum, default_value = "both")]
    overhead_client: overhead::ClientChoice,
    /// Overhead benchmark: h2load threads (default: one per CPU, which saturates the
    /// machine; 1 measures the slowdown of a single client thread instead).
    #[arg(long)]
    overhead_threads: Option<u32>,
    /// Overhead benchmark: h2load connections over all threads, keep-alive (default: 16 per
    /// thread).
    #[arg(long)]
    overhead_connections: Option<u32>,
    /// Overhead benchmark: a third run per round, the collector with `--hooks-only` (its
    /// classifiers attached but returning at once), which splits the throughput loss into
    /// what the attached hooks cost and what Weft's capture adds. Half as long again.
    #[arg(long)]
    overhead_hooks: bool,
    /// Accuracy benchmark: requests per (concurrency, propagation) phase.
    #[arg(long)]
    accuracy_requests: Option<u64>,
    /// Stitch benchmark: fake collectors (streams).
    #[arg(long, default_value_t = 4)]
    stitch_streams: u32,
    /// Stitch benchmark: the local OTLP/gRPC receiver the stitcher exports to.
    #[arg(long, value_enum, default_value = "weft-otlp")]
    stitch_sink: stitch::Sink,
    /// Instead of benchmarks, run the collector's profile training (`cargo xtask pgo`): an
    /// instrumented weft-collector in `--bin-dir` through varied traffic, stopped so that
    /// it writes its profile. Not a benchmark: it reports only what it ran.
    #[arg(long, conflicts_with_all = ["only", "quick"])]
    train_collector: bool,
}

/// What every benchmark needs to know.
pub struct Settings {
    pub quick: bool,
    /// Logs and scratch files of this run.
    pub work_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = signals::stop_cleanly_on_signal() {
        eprintln!("weft-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    signals::finish(run(&cli))
}

fn run(cli: &Cli) -> ExitCode {
    if let Some(dir) = &cli.bin_dir {
        let _ = child::BIN_DIR.set(std::path::absolute(dir).unwrap_or_else(|_| dir.clone()));
    }
    let benches = if cli.only.is_empty() {
        vec![
            Bench::Stitch,
            Bench::Query,
            Bench::Overhead,
            Bench::Accuracy,
            Bench::Idle,
        ]
    } else {
        cli.only.clone()
    };
    // Absolute: processes started in other namespaces write logs here too.
    let out = std::path::absolute(&cli.out).unwrap_or_else(|_| cli.out.clone());
    let out_dir = out
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let settings = Settings {
        quick: cli.quick,
        work_dir: out_dir.join(format!("work-{}", std::process::id())),
    };
    if cli.train_collector {
        return match train::run(&settings) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&settings.work_dir);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft-bench: train: {e:#}");
                eprintln!("logs: {}", settings.work_dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let mut report = Report {
        started_unix_seconds: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: report::Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        },
        ..Report::default()
    };
    let mut failed = false;
    for bench in benches {
        let name = format!("{bench:?}").to_lowercase();
        eprintln!("weft-bench: running {name}…");
        let result = match bench {
            Bench::Stitch => stitch::run(
                &settings,
                &stitch::StitchArgs {
                    duration: cli.stitch_duration.unwrap_or(if cli.quick {
                        Duration::from_secs(8)
                    } else {
                        Duration::from_secs(20)
                    }),
                    streams: cli.stitch_streams,
                    trace_idle: Duration::from_secs(2),
                    sink: cli.stitch_sink,
                },
                &mut report,
            ),
            Bench::Overhead => {
                let overhead_threads = cli.overhead_threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
                });
                overhead::run(
                    &settings,
                    &overhead::OverheadArgs {
                        rounds: cli
                            .overhead_rounds
                            .unwrap_or(if cli.quick { 2 } else { 31 }),
                        round: cli.overhead_round.unwrap_or(Duration::from_secs(3)),
                        threads: overhead_threads,
                        connections: cli.overhead_connections.unwrap_or(16 * overhead_threads),
                        placements: cli.overhead_client.placements(),
                        hooks: cli.overhead_hooks,
                    },
                    &mut report,
                )
            }
            Bench::Query => query::run(
                &settings,
                &query::QueryArgs {
                    duration: if cli.quick {
                        Duration::from_secs(5)
                    } else {
                        Duration::from_secs(15)
                    },
                    ingest_rate: 100_000,
                    clients: 4,
                },
                &mut report,
            ),
            Bench::Accuracy => accuracy::run(
                &settings,
                &accuracy::AccuracyArgs {
                    requests: cli
                        .accuracy_requests
                        .unwrap_or(if cli.quick { 100 } else { 400 }),
                    concurrency: vec![1, 8, 32],
                    trace_idle: Duration::from_secs(2),
                },
                &mut report,
            ),
            Bench::Idle => idle::run(
                &settings,
                &idle::IdleArgs {
                    idle: Duration::from_secs(if cli.quick { 3 } else { 10 }),
                    connections: if cli.quick { 4_000 } else { 20_000 },
                },
                &mut report,
            ),
        };
        if let Err(e) = result {
            eprintln!("weft-bench: {name}: {e:#}");
            report.skip(&name, format!("{e:#}"));
            failed = true;
        }
    }
    print!("{}", report.table());
    if let Err(e) = report.write_json(&cli.out) {
        eprintln!("weft-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    println!("report: {}", cli.out.display());
    if !failed {
        let _ = std::fs::remove_dir_all(&settings.work_dir);
    } else {
        println!("logs: {}", settings.work_dir.display());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
