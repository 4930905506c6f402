//! Stitch throughput: `weft-loadgen` → a release `weft-stitcher` on loopback, full path
//! (ingest → resolve → join → link → assemble → export to a local OTLP/gRPC sink), 3-hop
//! chains. The sink is `weft-otlp sink` by default (a real gRPC server that walks each
//! request's protobuf framing and counts spans: ~0.3 µs per span) or rotel with its
//! blackhole exporter (`--stitch-sink rotel`: a real collector, but ~2-3 µs of CPU per
//! span, which on 2 cores takes the CPU the stitcher is measured on).
//!
//! In: the binaries next to `weft-bench`. Out: figures: exchanges/s ingested and taken by
//! the stitch path, CPU of the stitcher and of the load generator, bytes per pending
//! exchange (RSS growth and the stitcher's own estimate), spans exported per second.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Settings;
use crate::child::{self, Child};
use crate::procfs::Sample;
use crate::prom;
use crate::report::{Figure, Report, Target};
use crate::stats;

const BENCH: &str = "stitch";

pub struct StitchArgs {
    pub duration: Duration,
    pub streams: u32,
    pub trace_idle: Duration,
    pub sink: Sink,
}

/// The local OTLP/gRPC receiver the stitcher exports to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    /// `weft-otlp sink` (loadtest crate): receives, walks the framing, counts spans.
    WeftOtlp,
    /// rotel with its blackhole exporter (from PyPI).
    Rotel,
}

/// What the stitcher's metrics said at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    ingested: f64,
    pipeline: Option<f64>,
    exported: Option<f64>,
    export_dropped: Option<f64>,
    pending_halves: Option<f64>,
    pending_calls: Option<f64>,
    /// Spans in open traces (waiting for the idle window).
    pending_spans: Option<f64>,
    pending_bytes: Option<f64>,
    /// Exchanges pending when `pending_bytes` was taken (the gauge is refreshed once a
    /// second, the pending gauges every tick).
    pending_bytes_exchanges: Option<f64>,
    /// Halves and calls a pending bound pushed on before their window (join.evicted,
    /// link.evicted): joined or linked worse than they could have been.
    evicted: f64,
    /// Traces completed before their idle window by the bound (assemble.evicted).
    traces_cut: f64,
    /// Traces the Query store's writer could not keep up with (store.dropped).
    store_dropped: f64,
}

impl Counters {
    /// Exchanges held in pending state: halves to join, calls to link, spans of open traces.
    fn pending(&self) -> f64 {
        self.pending_halves.unwrap_or(0.0)
            + self.pending_calls.unwrap_or(0.0)
            + self.pending_spans.unwrap_or(0.0)
    }
}

fn counters(text: &str) -> Counters {
    let m = |n: &str| prom::sum(text, &format!("weft_stitcher_{n}"), &[]);
    let dropped = [
        "export_otlp_dropped",
        "export_otlp_dropped_queue_full",
        "export_otlp_rejected",
    ]
    .iter()
    .filter_map(|n| m(n))
    .reduce(|a, b| a + b);
    Counters {
        ingested: m("ingest_exchanges").unwrap_or(0.0),
        pipeline: m("pipeline_exchanges"),
        exported: m("export_otlp_spans"),
        export_dropped: dropped,
        pending_halves: m("pipeline_pending_halves"),
        pending_calls: m("pipeline_pending_calls"),
        pending_spans: m("assemble_pending_spans"),
        pending_bytes: m("pipeline_pending_bytes"),
        pending_bytes_exchanges: m("pipeline_pending_bytes_exchanges"),
        evicted: m("join_evicted").unwrap_or(0.0) + m("link_evicted").unwrap_or(0.0),
        traces_cut: m("assemble_evicted").unwrap_or(0.0),
        store_dropped: m("store_dropped").unwrap_or(0.0),
    }
}

pub fn run(settings: &Settings, args: &StitchArgs, report: &mut Report) -> Result<()> {
    let stitcher_bin = child::sibling_binary("weft-stitcher")?;
    let loadgen_bin = child::sibling_binary("weft-loadgen")?;
    let work = settings.work_dir.join("stitch");
    std::fs::create_dir_all(&work)?;

    let otlp_port = child::free_port()?;
    let (mut sink, sink_name) = match args.sink {
        Sink::WeftOtlp => {
            let bin = child::sibling_binary("weft-otlp")?;
            let mut cmd = Command::new(bin);
            cmd.args(["sink", "--listen", &format!("127.0.0.1:{otlp_port}")])
                .args(["--report-every", "3600s"]);
            let child = Child::spawn(
                "weft-otlp sink",
                &mut cmd,
                Stdio::null(),
                Some(&work.join("sink.stderr")),
            )?;
            (Some(child), "weft-otlp sink (OTLP/gRPC, counts spans)")
        }
        Sink::Rotel => rotel_sink(&work, otlp_port)?,
    };

    let port = child::free_port()?;
    let mport = child::free_port()?;
    let metrics_addr = format!("127.0.0.1:{mport}").parse()?;
    let mut cmd = Command::new(&stitcher_bin);
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{mport}")])
        .args(["--kubernetes", "off"])
        .args([
            "--trace-idle",
            &humantime::format_duration(args.trace_idle).to_string(),
        ])
        .env("WEFT_LOG", "warn");
    if sink.is_some() {
        cmd.args(["--otlp-endpoint", &format!("http://127.0.0.1:{otlp_port}")]);
    }
    let mut stitcher = Child::spawn(
        "weft-stitcher",
        &mut cmd,
        Stdio::null(),
        Some(&work.join("stitcher.stderr")),
    )?;
    child::wait_healthy(&mut stitcher, metrics_addr, Duration::from_secs(20))?;
    if let Some(s) = sink.as_mut() {
        std::thread::sleep(Duration::from_millis(300));
        s.ensure_running()
            .with_context(|| format!("the OTLP sink ({sink_name})"))?;
    }

    let scrape =
        || -> Result<Counters> { Ok(counters(&child::http_get(metrics_addr, "/metrics")?)) };
    let before = scrape()?;
    let base = Sample::read(stitcher.pid())?;
    let sink_base = sink.as_ref().and_then(|s| Sample::read(s.pid()).ok());

    let mut cmd = Command::new(&loadgen_bin);
    cmd.args(["--target", &format!("http://127.0.0.1:{port}")])
        .args(["--rate", "0", "--json"])
        .args(["-c", &args.streams.to_string()])
        .args(["-z", &humantime::format_duration(args.duration).to_string()]);
    let load_out = work.join("loadgen.json");
    let mut loadgen = Child::spawn(
        "weft-loadgen",
        &mut cmd,
        Stdio::from(std::fs::File::create(&load_out)?),
        Some(&work.join("loadgen.stderr")),
    )?;

    // Sample both processes while the load runs: CPU over the window, the peak of pending
    // state and the RSS at that peak.
    let mut load_first: Option<Sample> = None;
    let mut load_last: Option<Sample> = None;
    let mut peak_pending = 0.0f64;
    // The stitcher's own estimate at that peak (as the RSS): its bytes gauge over the
    // exchanges pending when it was taken (older stitchers: the pending gauges of the
    // same scrape). Not the largest ratio of any sample: the bytes gauge is refreshed
    // once a second and counts table capacity, so while pending state drains (the
    // load's end) that ratio divides a stale or peak-sized figure by a small count.
    let mut estimate_per_pending: Option<f64> = None;
    let mut rss_at_peak = base.rss_kib;
    let deadline = Instant::now() + args.duration + Duration::from_secs(30);
    let mut stitch_end;
    loop {
        if let Ok(s) = Sample::read(loadgen.pid()) {
            load_first.get_or_insert(s);
            load_last = Some(s);
        }
        stitch_end = Sample::read(stitcher.pid())?;
        if let Ok(c) = scrape() {
            let pending = c.pending();
            if pending > peak_pending {
                peak_pending = pending;
                rss_at_peak = stitch_end.rss_kib;
                let at = c.pending_bytes_exchanges.filter(|n| *n > 0.0);
                if let Some(b) = c.pending_bytes.filter(|b| *b > 0.0) {
                    estimate_per_pending = Some(b / at.unwrap_or(pending));
                }
            }
        }
        if loadgen.wait_timeout(Duration::from_millis(200)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("weft-loadgen did not end in time");
        }
    }
    let status = loadgen.wait_timeout(Duration::from_secs(1))?;
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&load_out)?)
        .with_context(|| format!("weft-loadgen output ({status}): {}", loadgen.stderr_tail()))?;
    let after_load = scrape()?;
    // Traces complete after the idle window: wait for the export to catch up (until its
    // counters stop moving, bounded).
    std::thread::sleep(args.trace_idle);
    let mut settled = scrape()?;
    let export_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let now = scrape()?;
        let moved = now.exported != settled.exported
            || now.export_dropped != settled.export_dropped
            || now.pending() > 0.0;
        settled = now;
        if !moved || Instant::now() > export_deadline {
            break;
        }
    }
    let end_sample = Sample::read(stitcher.pid())?;
    let sink_cores = match (sink_base, sink.as_ref().map(|s| Sample::read(s.pid()))) {
        (Some(a), Some(Ok(b))) => Some(b.cores_since(&a) * 1000.0),
        _ => None,
    };
    stitcher.ensure_running()?;

    let secs = summary["total_seconds"].as_f64().unwrap_or(0.0);
    let acked = summary["exchanges"].as_f64().unwrap_or(0.0);
    let errors = summary["errors"].as_object().map(|m| m.len()).unwrap_or(0);
    let ingested = after_load.ingested - before.ingested;
    let per_sec = |x: f64| (secs > 0.0).then(|| x / secs);
    let cmd_note = format!(
        "weft-loadgen --rate 0 -c {} -z {:?}, 3-hop chains, sink {}",
        args.streams,
        args.duration,
        if sink.is_some() {
            sink_name
        } else {
            "none (rotel not found)"
        }
    );
    let wired = after_load.pipeline.is_some();
    let mut fig = Figure::new(BENCH, "exchanges/s ingested", per_sec(ingested), "/s")
        .target(Target::at_least(300_000.0))
        .note(cmd_note);
    if !wired {
        fig = fig.note(
            "weft-stitcher has no stitch path wired (no weft_stitcher_pipeline_* metrics: \
             stitcher/src/main.rs feeds a stand-in consumer): ingest + dedup only",
        );
    }
    if errors > 0 {
        fig = fig.note(format!("loadgen stream errors: {}", summary["errors"]));
    }
    report.add(fig);
    report.add(Figure::new(
        BENCH,
        "exchanges acked by loadgen",
        Some(acked),
        "",
    ));
    if wired {
        let taken = after_load.pipeline.unwrap_or(0.0) - before.pipeline.unwrap_or(0.0);
        report.add(
            Figure::new(
                BENCH,
                "exchanges/s through stitch path",
                per_sec(taken),
                "/s",
            )
            .target(Target::at_least(300_000.0)),
        );
    }
    report.add(Figure::new(
        BENCH,
        "stitcher CPU",
        Some(stitch_end.cores_since(&base) * 1000.0),
        "millicores",
    ));
    let load_cores = match (load_first, load_last) {
        (Some(a), Some(b)) => Some(b.cores_since(&a) * 1000.0),
        _ => None,
    };
    report.add(Figure::new(BENCH, "loadgen CPU", load_cores, "millicores"));
    report.add(
        Figure::new(BENCH, "OTLP sink CPU", sink_cores, "millicores")
            .note(format!("{sink_name}, until the export settled")),
    );
    report.add(Figure::new(
        BENCH,
        "stitcher peak RSS",
        Some(end_sample.hwm_kib as f64 / 1024.0),
        "MiB",
    ));
    let pending_fig = |name: &str, value: Option<f64>, why: &str| {
        let mut f = Figure::new(BENCH, name, value, "B")
            .target(Target::at_most(512.0))
            .note(format!(
                "peak pending {} exchanges (halves + calls + spans of open traces)",
                stats_int(peak_pending)
            ));
        if value.is_none() {
            f = f.note(why);
        }
        f
    };
    report.add(pending_fig(
        "bytes/pending exchange (RSS growth)",
        (peak_pending > 0.0)
            .then(|| (rss_at_peak.saturating_sub(base.rss_kib) * 1024) as f64 / peak_pending),
        "no pending-state gauges (weft_stitcher_pipeline_pending_*, assemble_pending_spans)",
    ));
    report.add(pending_fig(
        "bytes/pending exchange (stitcher estimate)",
        estimate_per_pending,
        "weft_stitcher_pipeline_pending_bytes stayed 0 while exchanges were pending",
    ));
    let exported = match (settled.exported, before.exported) {
        (Some(a), b) => Some(a - b.unwrap_or(0.0)),
        _ => None,
    };
    // A rate bought by pushing exchanges through the bounds early is not the full path's
    // rate: show what the bounds did during the run.
    let evicted = settled.evicted - before.evicted;
    report.add(
        Figure::new(
            BENCH,
            "halves/calls evicted by pending bounds",
            stats::share_pct(evicted as u64, ingested as u64),
            "%",
        )
        .target(Target::at_most(0.0))
        .note(format!(
            "join.evicted + link.evicted = {} of {} ingested exchanges (default --max-pending-memory)",
            stats_int(evicted),
            stats_int(ingested)
        )),
    );
    report.add(Figure::new(
        BENCH,
        "traces completed early by the bound",
        Some(settled.traces_cut - before.traces_cut),
        "",
    ));
    report.add(Figure::new(
        BENCH,
        "traces dropped by the Query store",
        Some(settled.store_dropped - before.store_dropped),
        "",
    ));
    let mut f = Figure::new(BENCH, "spans exported/s", exported.and_then(per_sec), "/s");
    if exported.is_none() {
        f = f.note("no weft_stitcher_export_otlp_spans metric: OTLP export not wired");
    } else {
        let share = stats::share_pct(exported.unwrap_or(0.0) as u64, ingested as u64);
        f = f.note(format!(
            "{} of ingested exchanges exported as spans; export drops {} (queue full, \
             failed, rejected)",
            share.map(|s| format!("{s:.1}%")).unwrap_or("-".into()),
            settled.export_dropped.unwrap_or(0.0) - before.export_dropped.unwrap_or(0.0)
        ));
    }
    report.add(f);
    drop(loadgen);
    stitcher.stop(Duration::from_secs(3));
    if let Some(mut s) = sink.take() {
        s.stop(Duration::from_secs(2));
    }
    Ok(())
}

/// rotel with the blackhole exporter (a real OTLP/gRPC receiver), when installed.
fn rotel_sink(work: &std::path::Path, otlp_port: u16) -> Result<(Option<Child>, &'static str)> {
    let Some(rotel) = child::rotel_agent() else {
        return Ok((None, "none (rotel not found)"));
    };
    let http_port = child::free_port()?;
    let mut cmd = Command::new(rotel);
    cmd.args(["start", "--exporter", "blackhole"])
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{otlp_port}")])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
        .args(["--pid-file", &work.join("rotel.pid").to_string_lossy()]);
    let child = Child::spawn(
        "rotel",
        &mut cmd,
        Stdio::null(),
        Some(&work.join("rotel.stderr")),
    )?;
    Ok((Some(child), "rotel blackhole (OTLP/gRPC)"))
}

fn stats_int(x: f64) -> String {
    crate::report::number(x.round())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_read_the_stitcher_metric_names() {
        let text = "# TYPE weft_stitcher_ingest_exchanges gauge\n\
            weft_stitcher_ingest_exchanges 1000\n\
            weft_stitcher_pipeline_exchanges 990\n\
            weft_stitcher_pipeline_pending_halves 10\n\
            weft_stitcher_pipeline_pending_calls 5\n\
            weft_stitcher_pipeline_pending_bytes 4096\n\
            weft_stitcher_assemble_pending_spans 20\n\
            weft_stitcher_export_otlp_spans 900\n\
            weft_stitcher_export_otlp_dropped 3\n";
        let c = counters(text);
        assert_eq!(c.ingested, 1000.0);
        assert_eq!(c.pipeline, Some(990.0));
        assert_eq!(c.pending_halves, Some(10.0));
        assert_eq!(c.pending_calls, Some(5.0));
        assert_eq!(c.pending_bytes, Some(4096.0));
        assert_eq!(c.pending(), 35.0);
        assert_eq!(c.exported, Some(900.0));
        assert_eq!(c.export_dropped, Some(3.0));
        let none = counters("weft_stitcher_ingest_exchanges 5\n");
        assert_eq!(none.pipeline, None);
        assert_eq!(none.exported, None);
    }
}
