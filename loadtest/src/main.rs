//! weft-loadgen: load for the stitcher's `weft.v1.Ingest/Stream`.
//!
//! Several fake collectors (one stream each, one node each) send the halves of synthetic
//! request chains (`frontend → backend → store`, see [`chains`]) at a target rate, and the
//! acks are timed. Prints a ghz-style summary, or JSON with `--json`.

mod chains;
mod stream;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tonic::codec::CompressionEncoding;
use tonic::transport::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Parser)]
#[command(
    name = "weft-loadgen",
    version,
    about = "Load generator for weft.v1.Ingest/Stream"
)]
struct Cli {
    /// Stitcher gRPC URL.
    #[arg(long, env = "WEFT_STITCHER", default_value = "http://127.0.0.1:9400")]
    target: String,
    /// Target exchanges per second over all streams (0: as fast as acks allow).
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Fake collectors: one stream and one node each.
    #[arg(long, short = 'c', default_value_t = 4)]
    concurrency: u32,
    /// Run this long...
    #[arg(long, short = 'z', default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// ...or until this many exchanges were sent (0: no limit).
    #[arg(long, short = 'n', default_value_t = 0)]
    total: u64,
    /// Exchanges per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Unacknowledged batches per stream.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Resend every n-th batch with the same seq (must come back as a duplicate); 0: off.
    #[arg(long, default_value_t = 0)]
    resend_every: u64,
    /// Put W3C traceparent headers on the frontend's calls.
    #[arg(long)]
    traceparent: bool,
    #[arg(long, value_enum, default_value = "none")]
    compression: Compression,
    /// Use one TCP connection per stream (like real collectors) instead of sharing one.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    connection_per_stream: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Summary {
    streams: u32,
    batches: u64,
    exchanges: u64,
    duplicate_acks: u64,
    total_seconds: f64,
    batches_per_second: f64,
    exchanges_per_second: f64,
    latency_ms: BTreeMap<String, f64>,
    errors: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let compression = match cli.compression {
        Compression::None => None,
        Compression::Gzip => Some(CompressionEncoding::Gzip),
        Compression::Zstd => Some(CompressionEncoding::Zstd),
    };
    let endpoint = Endpoint::from_shared(cli.target.clone())
        .context("--target")?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20));
    let shared = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cli.target))?;

    let n = cli.concurrency.max(1);
    // Enough chains per cycle for about 8 batches per collector (4 halves per chain).
    let period = (cli.batch as u64 * 8 * u64::from(n) / 4).max(1);
    let topology = chains::Topology {
        nodes: n,
        traceparent: cli.traceparent,
        period,
        base_unix_nanos: SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64,
    };
    let start = Instant::now();
    let deadline = start + cli.duration;
    let max_exchanges = if cli.total == 0 {
        u64::MAX
    } else {
        cli.total.div_ceil(u64::from(n))
    };
    let mut tasks = Vec::new();
    for node in 0..n {
        let pool = chains::Pool::new(&topology, node, cli.batch);
        let channel = if cli.connection_per_stream {
            endpoint.connect().await?
        } else {
            shared.clone()
        };
        let plan = stream::StreamPlan {
            node: format!("loadgen-node-{node}"),
            rate: cli.rate / f64::from(n),
            max_in_flight: cli.in_flight.max(1),
            resend_every: cli.resend_every,
            compression,
            deadline,
            max_exchanges,
        };
        tasks.push(tokio::spawn(stream::run(channel, pool, plan)));
    }
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let summary = summarize(n, elapsed, reports);
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_text(&summary);
    }
    Ok(())
}

fn summarize(streams: u32, elapsed: f64, reports: Vec<stream::StreamReport>) -> Summary {
    let mut lat: Vec<u64> = Vec::new();
    let mut s = Summary {
        streams,
        batches: 0,
        exchanges: 0,
        duplicate_acks: 0,
        total_seconds: elapsed,
        batches_per_second: 0.0,
        exchanges_per_second: 0.0,
        latency_ms: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    for r in reports {
        s.batches += r.batches_acked;
        s.exchanges += r.exchanges_acked;
        s.duplicate_acks += r.duplicate_acks;
        lat.extend(r.latencies_us);
        for (k, v) in r.errors {
            *s.errors.entry(k).or_default() += v;
        }
    }
    s.batches_per_second = s.batches as f64 / elapsed;
    s.exchanges_per_second = s.exchanges as f64 / elapsed;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (lat.len() - 1) as f64).round() as usize;
        lat[i] as f64 / 1000.0
    };
    for (name, p) in [("p10", 10.0), ("p50", 50.0), ("p90", 90.0), ("p99", 99.0)] {
        s.latency_ms.insert(name.into(), pct(p));
    }
    if !lat.is_empty() {
        s.latency_ms
            .insert("fastest".into(), lat[0] as f64 / 1000.0);
        s.latency_ms
            .insert("slowest".into(), lat[lat.len() - 1] as f64 / 1000.0);
        s.latency_ms.insert(
            "average".into(),
            lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0,
        );
    }
    s
}

fn print_text(s: &Summary) {
    let l = |k: &str| s.latency_ms.get(k).copied().unwrap_or(0.0);
    println!("Summary:");
    println!("  Streams:      {}", s.streams);
    println!(
        "  Count:        {} batches acked ({} exchanges, {} duplicate acks)",
        s.batches, s.exchanges, s.duplicate_acks
    );
    println!("  Total:        {:.2} s", s.total_seconds);
    println!("  Slowest:      {:.2} ms", l("slowest"));
    println!("  Fastest:      {:.2} ms", l("fastest"));
    println!("  Average:      {:.2} ms", l("average"));
    println!("  Batches/sec:  {:.1}", s.batches_per_second);
    println!("  Exchanges/sec: {:.0}", s.exchanges_per_second);
    println!();
    println!("Ack latency distribution:");
    for p in ["p10", "p50", "p90", "p99"] {
        println!("  {} % in {:.2} ms", &p[1..], l(p));
    }
    println!();
    println!("Status code distribution:");
    println!("  [OK]   {} acks", s.batches);
    for (code, n) in &s.errors {
        println!("  [{code}]   {n} stream errors");
    }
}
