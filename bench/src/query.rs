//! Query API under ingest (issue 6): `weft-loadgen --rate 100000` drives a release
//! `weft-stitcher` on loopback while gRPC clients loop over ListTraces, GetTrace (of a
//! listed trace), ServiceMap and Stats.
//!
//! In: the binaries next to `weft-bench`. Out: Query calls per second (OK status only),
//! latency p50/p99, errors, and the ingest rate reached meanwhile.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_proto::v1::{self, query_client::QueryClient};

use crate::Settings;
use crate::child::{self, Child};
use crate::prom;
use crate::report::{Figure, Report};
use crate::stats;

const BENCH: &str = "query";

pub struct QueryArgs {
    pub duration: Duration,
    pub ingest_rate: u64,
    pub clients: usize,
}

#[derive(Default)]
struct Tally {
    ok: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    latencies_ms: Vec<f64>,
}

pub fn run(settings: &Settings, args: &QueryArgs, report: &mut Report) -> Result<()> {
    let stitcher_bin = child::sibling_binary("weft-stitcher")?;
    let loadgen_bin = child::sibling_binary("weft-loadgen")?;
    let work = settings.work_dir.join("query");
    std::fs::create_dir_all(&work)?;
    let port = child::free_port()?;
    let mport = child::free_port()?;
    let metrics_addr = format!("127.0.0.1:{mport}").parse()?;
    let mut stitcher = Child::spawn(
        "weft-stitcher",
        Command::new(&stitcher_bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{mport}")])
            .args(["--kubernetes", "off"])
            .env("WEFT_LOG", "warn"),
        Stdio::null(),
        Some(&work.join("stitcher.stderr")),
    )?;
    child::wait_healthy(&mut stitcher, metrics_addr, Duration::from_secs(20))?;
    let ingested = || -> f64 {
        child::http_get(metrics_addr, "/metrics")
            .ok()
            .and_then(|t| prom::sum(&t, "weft_stitcher_ingest_exchanges", &[]))
            .unwrap_or(0.0)
    };

    let load_secs = args.duration + Duration::from_secs(3);
    let mut loadgen = Child::spawn(
        "weft-loadgen",
        Command::new(&loadgen_bin)
            .args(["--target", &format!("http://127.0.0.1:{port}")])
            .args(["--rate", &args.ingest_rate.to_string(), "-c", "4", "--json"])
            .args(["-z", &humantime::format_duration(load_secs).to_string()]),
        Stdio::null(),
        Some(&work.join("loadgen.stderr")),
    )?;
    // Let ingest reach its rate and traces complete (idle window) before querying.
    std::thread::sleep(Duration::from_secs(3));
    loadgen.ensure_running()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let i0 = ingested();
    let started = Instant::now();
    let tally = rt.block_on(query_load(port, args.clients, args.duration))?;
    let secs = started.elapsed().as_secs_f64();
    let i1 = ingested();
    let _ = loadgen.wait_timeout(Duration::from_secs(10));
    stitcher.stop(Duration::from_secs(3));

    let ok: u64 = tally.ok.values().sum();
    let errors: u64 = tally.errors.values().sum();
    let mix = tally
        .ok
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut f = Figure::new(
        BENCH,
        "Query calls/s during ingest",
        Some(ok as f64 / secs),
        "/s",
    )
    .note(format!(
        "{} gRPC clients, mix: {mix}; weft-loadgen --rate {}",
        args.clients, args.ingest_rate
    ));
    if ok == 0 {
        f.value = None;
        f = f.note(format!("no call succeeded; errors: {:?}", tally.errors));
        if tally.errors.keys().any(|k| k.contains("Unimplemented")) {
            f = f.note("weft-stitcher does not serve weft.v1.Query on --listen");
        }
    } else if errors > 0 {
        f = f.note(format!("errors: {:?}", tally.errors));
    }
    report.add(f);
    report.add(Figure::new(
        BENCH,
        "Query latency p50",
        stats::percentile(&tally.latencies_ms, 0.5),
        "ms",
    ));
    report.add(Figure::new(
        BENCH,
        "Query latency p99",
        stats::percentile(&tally.latencies_ms, 0.99),
        "ms",
    ));
    report.add(Figure::new(
        BENCH,
        "ingest exchanges/s meanwhile",
        (ok > 0 && secs >= 1.0).then(|| (i1 - i0) / secs),
        "/s",
    ));
    Ok(())
}

async fn query_load(port: u16, clients: usize, duration: Duration) -> Result<Tally> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await
        .context("connecting to the stitcher's gRPC port")?;
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let mut client = QueryClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut trace_id = String::new();
            let mut step = 0usize;
            while Instant::now() < deadline {
                let start = Instant::now();
                let (name, result) = match step % 4 {
                    0 => {
                        let r = client
                            .list_traces(v1::ListTracesRequest {
                                limit: 20,
                                ..Default::default()
                            })
                            .await;
                        if let Ok(resp) = &r
                            && let Some(tr) = resp.get_ref().traces.first()
                        {
                            trace_id = tr.trace_id.clone();
                        }
                        ("ListTraces", r.map(|_| ()))
                    }
                    1 if !trace_id.is_empty() => (
                        "GetTrace",
                        client
                            .get_trace(v1::GetTraceRequest {
                                trace_id: trace_id.clone(),
                            })
                            .await
                            .map(|_| ()),
                    ),
                    2 => (
                        "ServiceMap",
                        client
                            .service_map(v1::ServiceMapRequest::default())
                            .await
                            .map(|_| ()),
                    ),
                    _ => (
                        "Stats",
                        client.stats(v1::StatsRequest::default()).await.map(|_| ()),
                    ),
                };
                step += 1;
                match result {
                    Ok(()) => {
                        *t.ok.entry(name).or_default() += 1;
                        t.latencies_ms.push(start.elapsed().as_secs_f64() * 1000.0);
                    }
                    Err(status) => {
                        *t.errors
                            .entry(format!("{name}: {:?}", status.code()))
                            .or_default() += 1;
                        if status.code() == tonic::Code::Unimplemented {
                            // The service is not served: more calls would say the same.
                            break;
                        }
                    }
                }
            }
            t
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await?;
        for (k, v) in t.ok {
            *all.ok.entry(k).or_default() += v;
        }
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
        all.latencies_ms.extend(t.latencies_ms);
    }
    if all.ok.is_empty() && all.errors.is_empty() {
        bail!("no Query call was made");
    }
    Ok(all)
}
