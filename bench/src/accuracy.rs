//! Accuracy and freshness on the harness chain: a `loader` pod (node n4) calls the
//! `client` pod (n1), which calls `frontend` → `backend` → `store` through their Services; each
//! pod is on its own node (every hop crosses nodes), a collector runs on every node and
//! ships to one `weft-stitcher` (static inventory, `--print json`) in the control namespace.
//!
//! Runs concurrency 1, 8 and 32, without and with `traceparent` propagation
//! (`weft-demo-app serve --propagate`), and scores the printed spans against the demo apps'
//! request logs ([`crate::score`]). The same spans give freshness: from the end of a
//! trace's last span to the moment its last line was read, net of `--trace-idle`.

use std::collections::HashSet;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, Proc, ServiceSpec};

use crate::Settings;
use crate::child;
use crate::harness_stitcher;
use crate::overhead::wait_running;
use crate::report::{Figure, Report, Target};
use crate::score::{self, Hop, Span};
use crate::stats;

const PORT: u16 = 8080;
const COLLECTOR_METRICS: &str = "127.0.0.1:9401";
/// (pod, node, service) of the chain, in call order.
const CHAIN: [(&str, &str); 4] = [
    ("client", "n1"),
    ("frontend", "n2"),
    ("backend", "n3"),
    ("store", "n4"),
];

/// The pod the load comes from, on another node than `client`, so that the chain's first
/// request is seen (and joined) at both ends like every other.
const LOADER: (&str, &str) = ("loader", "n4");

pub struct AccuracyArgs {
    pub requests: u64,
    pub concurrency: Vec<u32>,
    pub trace_idle: Duration,
}

type Lines = Arc<Mutex<Vec<(u64, String)>>>;

pub fn run(settings: &Settings, args: &AccuracyArgs, report: &mut Report) -> Result<()> {
    let demo_app = child::sibling_binary("weft-demo-app")?;
    let collector_bin = child::sibling_binary("weft-collector")?;
    let work = settings.work_dir.join("accuracy");
    std::fs::create_dir_all(&work)?;

    let cluster = Cluster::up(&ClusterSpec {
        nodes: CHAIN
            .iter()
            .map(|(pod, node)| NodeSpec {
                name: (*node).into(),
                pods: std::iter::once(*pod)
                    .chain((*node == LOADER.1).then_some(LOADER.0))
                    .map(|name| PodSpec {
                        name: name.into(),
                        namespace: "bench".into(),
                        workload: name.into(),
                    })
                    .collect(),
            })
            .collect(),
        services: CHAIN[1..]
            .iter()
            .map(|(pod, _)| ServiceSpec {
                name: (*pod).into(),
                namespace: "bench".into(),
                port: 80,
                target_port: PORT,
                workload: (*pod).into(),
            })
            .collect(),
    })?;
    // The stitcher, its stdout read line by line and timestamped as it arrives.
    let mut stitcher = harness_stitcher::start(
        &cluster,
        &work,
        harness_stitcher::Options {
            print: "json",
            trace_idle: Some(args.trace_idle),
            stdout: Stdio::piped(),
        },
    )?;
    let lines: Lines = Arc::default();
    let stdout = stitcher.take_stdout().context("stitcher stdout")?;
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let now = unix_nanos();
                lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((now, line));
            }
        })
    };

    let stitcher_url = harness_stitcher::url(&cluster);
    let mut collectors = Vec::new();
    for (_, node) in CHAIN {
        let proc = cluster.spawn(
            cluster.node(node).netns(),
            Command::new(&collector_bin)
                .args(["--node-name", node, "--stitcher", &stitcher_url])
                .args(["--metrics-listen", COLLECTOR_METRICS, "--log", "info"]),
        )?;
        wait_running(&proc)?;
        collectors.push(proc);
    }

    // Phases run one after the other; spans are attributed to phases by their unique paths
    // (not by arrival time), so a late export still counts for its own phase.
    let mut phases = Vec::new();
    for propagate in [false, true] {
        let mode = if propagate { "p" } else { "t" };
        let servers = start_chain(&cluster, &demo_app, mode, propagate)?;
        for &c in &args.concurrency {
            drive(&cluster, &demo_app, mode, c, args.requests, propagate)?;
            wait_quiet(
                &lines,
                args.trace_idle + Duration::from_secs(2),
                Duration::from_secs(30),
            );
            stitcher.ensure_running()?;
        }
        let logs: Vec<Vec<score::Served>> = servers
            .iter()
            .map(|p| weft_harness::app_log::served(&p.stdout_text()))
            .collect();
        phases.push((propagate, mode, logs));
        drop(servers);
    }
    wait_quiet(
        &lines,
        args.trace_idle + Duration::from_secs(4),
        Duration::from_secs(30),
    );
    let all_spans = spans_since(&lines, 0);
    let ingested = stitcher_ingested(&cluster).unwrap_or(0.0);
    for (propagate, mode, logs) in &phases {
        for &c in &args.concurrency {
            let sc = score_phase(&all_spans, logs, mode, c);
            add_figures(
                report,
                &sc,
                *propagate,
                c,
                args.requests,
                all_spans.len(),
                ingested,
            );
        }
    }

    let freshness = score::freshness(&all_spans, args.trace_idle.as_nanos() as u64);
    let fresh = &freshness.net_ms;
    let note = format!(
        "{} traces ({} with late spans, counted to their late export), --trace-idle {:?}; \
         last span end → its printer line read",
        fresh.len(),
        freshness.with_late_spans,
        args.trace_idle
    );
    let p = |q| stats::percentile(fresh, q);
    let mut f50 = Figure::new("freshness", "p50 net of idle", p(0.5), "ms").note(note);
    let mut f99 =
        Figure::new("freshness", "p99 net of idle", p(0.99), "ms").target(Target::at_most(250.0));
    if fresh.is_empty() {
        let why = "the stitcher printed no spans";
        f50 = f50.note(why);
        f99 = f99.note(why);
    }
    report.add(f50);
    report.add(f99);

    drop(collectors);
    stitcher.stop(Duration::from_secs(3));
    let _ = reader.join();
    Ok(())
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The path template of the call made by chain member `i` (to member `i + 1`).
fn call_template(i: usize, mode: &str) -> String {
    let hop = ["f", "b", "s"][i];
    format!("/{hop}{mode}/{{n}}")
}

/// The four demo servers of one mode, in chain order.
fn start_chain(
    cluster: &Cluster,
    demo_app: &std::path::Path,
    mode: &str,
    propagate: bool,
) -> Result<Vec<Proc>> {
    let mut procs = Vec::new();
    for (i, (pod, _)) in CHAIN.iter().enumerate() {
        let mut cmd = Command::new(demo_app);
        cmd.args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{PORT}"),
            "--name",
            pod,
        ]);
        if let Some((next, _)) = CHAIN.get(i + 1) {
            let svc = cluster.service(next);
            cmd.arg("--call").arg(format!(
                "http://{}:{}{}",
                svc.cluster_ip(),
                svc.port(),
                call_template(i, mode)
            ));
            if propagate {
                cmd.arg("--propagate");
            }
        }
        let p = cluster.spawn(cluster.pod(pod).netns(), &mut cmd)?;
        procs.push(p);
    }
    // Listening?
    let deadline = Instant::now() + Duration::from_secs(10);
    for (pod, _) in CHAIN {
        let addr = SocketAddr::from((cluster.pod(pod).ip(), PORT));
        while !cluster.try_run_in(cluster.node("n1").netns(), move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })? {
            if Instant::now() > deadline {
                bail!("demo server {pod} does not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(procs)
}

/// `requests` GETs of `/e<mode><c>/<k>` (k = 1, 2, ...: a path per request) from the loader pod
/// to the client pod at concurrency `c`, each with a new `traceparent` if `traceparent`.
fn drive(
    cluster: &Cluster,
    demo_app: &std::path::Path,
    mode: &str,
    c: u32,
    requests: u64,
    traceparent: bool,
) -> Result<()> {
    let url = format!(
        "http://{}:{PORT}/e{mode}{c}/{{n}}",
        cluster.pod("client").ip()
    );
    let mut cmd = Command::new(demo_app);
    cmd.args(["load", "--url", &url])
        .args(["--requests", &requests.to_string()])
        .args(["--concurrency", &c.to_string()])
        .args(["--timeout-s", "120"]);
    if traceparent {
        // The loader is the traced caller: without its traceparent the client pod starts a
        // new trace, and its own calls could not be linked by propagation.
        cmd.arg("--traceparent");
    }
    let proc = cluster.spawn(cluster.pod(LOADER.0).netns(), &mut cmd)?;
    let status = proc
        .wait_timeout(Duration::from_secs(130))?
        .context("weft-demo-app load did not finish")?;
    if !status.success() {
        bail!(
            "weft-demo-app load failed ({status}): {}",
            proc.stdout_text()
        );
    }
    Ok(())
}

/// Waits until no new line arrived for `quiet` (traces close after the idle window).
fn wait_quiet(lines: &Lines, quiet: Duration, limit: Duration) {
    let start = Instant::now();
    let mut count = usize::MAX;
    let mut since = Instant::now();
    while start.elapsed() < limit {
        let n = lines.lock().unwrap_or_else(|e| e.into_inner()).len();
        if n != count {
            count = n;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spans_since(lines: &Lines, first: usize) -> Vec<Span> {
    let lines = lines.lock().unwrap_or_else(|e| e.into_inner());
    lines[first.min(lines.len())..]
        .iter()
        .filter_map(|(t, l)| Span::parse(l, *t))
        .collect()
}

/// Scores one (mode, concurrency) phase: the calls descending from `/e<mode><c>/<k>`.
fn score_phase(spans: &[Span], logs: &[Vec<score::Served>], mode: &str, c: u32) -> score::Score {
    // The phase's call paths, following the logs down the chain.
    let mut in_phase: HashSet<String> = HashSet::new();
    let root = format!("/e{mode}{c}/");
    let mut parents: HashSet<String> = HashSet::new();
    for (i, log) in logs.iter().enumerate().take(3) {
        let template = call_template(i, mode);
        let mut next = HashSet::new();
        for req in log.iter().filter(|r| {
            if i == 0 {
                r.path.starts_with(&root)
            } else {
                parents.contains(&r.path)
            }
        }) {
            let call = template.replace("{n}", &req.n.to_string());
            in_phase.insert(call.clone());
            next.insert(call);
        }
        parents = next;
    }
    let templates: Vec<String> = (0..3).map(|i| call_template(i, mode)).collect();
    let hops: Vec<Hop<'_>> = (0..3)
        .map(|i| Hop {
            caller: &logs[i],
            call_template: &templates[i],
            callee: &logs[i + 1],
        })
        .collect();
    score::score(spans, &hops, &|p| in_phase.contains(p))
}

/// Exchanges the stitcher ingested so far (for saying why nothing was printed).
fn stitcher_ingested(cluster: &Cluster) -> Result<f64> {
    let text = harness_stitcher::scrape(cluster)?;
    Ok(crate::prom::sum(&text, "weft_stitcher_ingest_exchanges", &[]).unwrap_or(0.0))
}

fn add_figures(
    report: &mut Report,
    sc: &score::Score,
    propagate: bool,
    c: u32,
    requests: u64,
    spans: usize,
    ingested: f64,
) {
    let bench = format!(
        "accuracy c={c} {}",
        if propagate { "traceparent" } else { "no-tp" }
    );
    let b = bench.as_str();
    if spans == 0 {
        // Nothing to score: say why instead of reporting 0%.
        report.add(
            Figure::new(b, "join recall", None, "%")
                .target(Target::at_least(100.0))
                .note(format!(
                    "weft-stitcher --print json printed no spans although it ingested {ingested} \
             exchanges so far ({} calls expected)",
                    sc.expected
                )),
        );
        return;
    }
    report.add(
        Figure::new(b, "join recall", sc.recall_pct(), "%")
            .target(Target::at_least(100.0))
            .note(format!(
                "{}/{} calls joined; {requests} requests × 3 hops",
                sc.joined_right, sc.expected
            )),
    );
    report.add(
        Figure::new(b, "join precision", sc.precision_pct(), "%")
            .target(Target::at_least(100.0))
            .note(format!("{}/{} joins right", sc.joins_right, sc.joins)),
    );
    let kinds = {
        let mut k: Vec<_> = sc.by_kind.iter().collect();
        k.sort();
        k.iter()
            .map(|(kind, (n, right))| format!("{kind} {right}/{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut links = Figure::new(b, "parent links right", sc.links_right_pct(), "%").note(format!(
        "client, frontend and backend calls; right/total by kind: {kinds}"
    ));
    if propagate {
        links = links.target(Target::at_least(100.0));
    }
    report.add(links);
    if !propagate {
        report.add(
            Figure::new(b, "timing links right", sc.kind_right_pct("timing"), "%")
                .target(Target::at_least(99.0)),
        );
    }
    report.add(Figure::new(
        b,
        "marked ambiguous",
        sc.kind_share_pct("ambiguous")
            .or(Some(0.0).filter(|_| sc.links > 0)),
        "%",
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use score::Served;

    #[test]
    fn phases_follow_the_logs_down_the_chain() {
        let served = |n, p: &str| Served {
            n,
            path: p.into(),
            ..Served::default()
        };
        let logs = vec![
            vec![served(1, "/et1/1"), served(2, "/et8/1")],
            vec![served(1, "/ft/1"), served(2, "/ft/2")],
            vec![served(1, "/bt/2"), served(2, "/bt/1")],
            vec![served(1, "/st/1"), served(2, "/st/2")],
        ];
        let span = |id: &str, parent: &str, client, path: &str, link: &str| Span {
            trace_id: "t".into(),
            span_id: id.into(),
            parent: parent.into(),
            client,
            path: path.into(),
            link: link.into(),
            end_unix_nanos: 0,
            read_unix_nanos: 0,
            late: false,
        };
        // Phase c=8: client request n=2 → /ft/2 → frontend n=2 → /bt/2 → backend n=1 → /st/1.
        let spans = vec![
            span("f", "", false, "/ft/2", "join"),
            span("fc", "f", true, "/bt/2", "timing"),
            span("bs", "fc", false, "/bt/2", "join"),
            span("bc", "bs", true, "/st/1", "timing"),
            span("ss", "bc", false, "/st/1", "join"),
        ];
        let sc = score_phase(&spans, &logs, "t", 8);
        // 3 calls expected (/ft/2, /bt/2, /st/1); /ft/2's join has no CLIENT parent.
        assert_eq!(sc.expected, 3);
        assert_eq!(sc.joined_right, 2);
        assert_eq!((sc.links, sc.links_right), (2, 2));
        let other = score_phase(&spans, &logs, "t", 1);
        assert_eq!(other.expected, 3);
        assert_eq!(other.joined_right, 0);
    }
}
