//! Capture overhead benchmark (issue 3): saturating keep-alive HTTP/1.1 load from a client pod
//! to a server pod of a harness cluster, alternating runs without and with the collector
//! attached (TCX, `--print off`). Prints requests/s of each run, the with/without ratio, the
//! packets/s the classifiers saw, ring-buffer drops and the collector's peak RSS.
//!
//! Run (as root): `cargo bench -p weft-collector --bench capture`
//! Knobs: `WEFT_BENCH_ROUNDS` (default 3), `WEFT_BENCH_SECS` per run (5),
//! `WEFT_BENCH_CONNS` keep-alive connections (8), `WEFT_BENCH_COLLECTOR_ARGS` extra flags,
//! `WEFT_BENCH_RATE` total requests/s (unset: as fast as possible). About 4 packets cross the
//! veth per request (request, ACK, response, ACK), so `WEFT_BENCH_RATE=25000` is ~100k packets/s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use weft_harness::Cluster;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `conns` keep-alive connections, each sending GETs back to back for `secs` (or paced to
/// `WEFT_BENCH_RATE` requests/s in total when set).
fn load(netns: &str, addr: SocketAddr, conns: u64, secs: u64) -> f64 {
    let per_conn_rate = std::env::var("WEFT_BENCH_RATE")
        .ok()
        .and_then(|r| r.parse::<f64>().ok())
        .map(|r| r / conns as f64);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (netns, done) = (netns.to_owned(), done.clone());
            std::thread::spawn(move || {
                enter_netns(&netns);
                let s = TcpStream::connect(addr).expect("connect");
                s.set_nodelay(true).ok();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let req = b"GET /bench HTTP/1.1\r\nHost: server\r\n\r\n";
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    if let Some(rate) = per_conn_rate {
                        let due = start + Duration::from_secs_f64(sent as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    sent += 1;
                    w.write_all(req).expect("send");
                    read_response(&mut r);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn read_response(r: &mut BufReader<TcpStream>) {
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("response");
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("body");
}

fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) the process used so far.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) : utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

struct WithCollector {
    rps: f64,
    /// Collector CPU over the run, in cores.
    cpu: f64,
    packets_per_s: f64,
    drops: u64,
    rss_kib: u64,
}

fn run_with_collector(cluster: &Cluster, addr: SocketAddr, conns: u64, secs: u64) -> WithCollector {
    let node = cluster.node("a").netns();
    // WEFT_BENCH_COLLECTOR_ARGS: extra flags, e.g. `--interfaces none` to measure the
    // collector without classifiers.
    let extra = std::env::var("WEFT_BENCH_COLLECTOR_ARGS").unwrap_or_default();
    let mut args = vec!["--tc-backend", "tcx", "--print", "off"];
    args.extend(extra.split_whitespace());
    let collector = start_collector(cluster, node, &args);
    let before = scrape(cluster, node);
    let cpu0 = cpu_secs(collector.pid());
    let t0 = Instant::now();
    let rps = load(cluster.pod("client").netns(), addr, conns, secs);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (cpu_secs(collector.pid()) - cpu0) / elapsed;
    std::thread::sleep(Duration::from_millis(1200));
    let after = scrape(cluster, node);
    let packets = r#"weft_collector_kernel_events_total{counter="packets"}"#;
    let drops = r#"weft_collector_ring_drops_total{ring="packets"}"#;
    let result = WithCollector {
        rps,
        cpu,
        packets_per_s: (metric(&after, packets) - metric(&before, packets)) as f64 / elapsed,
        drops: metric(&after, drops),
        rss_kib: peak_rss_kib(collector.pid()),
    };
    collector
        .stop(Duration::from_secs(5))
        .expect("stop collector");
    result
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / nextest discovery: nothing to list.
    }
    let rounds = env_or("WEFT_BENCH_ROUNDS", 3);
    let secs = env_or("WEFT_BENCH_SECS", 5);
    let conns = env_or("WEFT_BENCH_CONNS", 8);
    let cluster = one_node();
    let server = cluster.pod("server");
    let _srv = start_http_server(server.netns());
    let addr = server_addr(server.ip(), SERVER_PORT);
    // Warm up (ARP, caches, first connections).
    load(cluster.pod("client").netns(), addr, conns, 1);

    let (mut without, mut with) = (Vec::new(), Vec::new());
    println!("run  collector  requests/s  packets/s  ring_drops  peak_rss_MiB  collector_cpu");
    for round in 0..rounds {
        // Alternate which goes first so drift (thermal, neighbours) hits both alike.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for attached in order {
            if attached {
                let w = run_with_collector(&cluster, addr, conns, secs);
                println!(
                    "{round:>3}  on         {:>10.0}  {:>9.0}  {:>10}  {:>12.1}  {:>13.2}",
                    w.rps,
                    w.packets_per_s,
                    w.drops,
                    w.rss_kib as f64 / 1024.0,
                    w.cpu
                );
                with.push(w);
            } else {
                let rps = load(cluster.pod("client").netns(), addr, conns, secs);
                println!("{round:>3}  off        {rps:>10.0}");
                without.push(rps);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let with_rps: Vec<f64> = with.iter().map(|w| w.rps).collect();
    let (off, on) = (mean(&without), mean(&with_rps));
    println!(
        "mean requests/s without {off:.0}, with {on:.0}: ratio {:.3} (target >= 0.97)",
        on / off
    );
    println!(
        "max packets/s seen {:.0}, ring drops {}, peak RSS {:.1} MiB (target < 64)",
        with.iter().map(|w| w.packets_per_s).fold(0.0, f64::max),
        with.iter().map(|w| w.drops).max().unwrap_or(0),
        with.iter().map(|w| w.rss_kib).max().unwrap_or(0) as f64 / 1024.0
    );
}
