//! `load`: issues exactly `--requests` GETs with `--concurrency` workers, bounded by
//! `--timeout-s`, and prints a one-line JSON summary; exits non-zero if any request failed.

use crate::http::{self, Conn, Url};
use crate::traceparent::TraceParent;
use anyhow::Result;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    // The help spells the placeholder out: clap prints it as a line break.
    /// URL to GET; `n` in braces in its path becomes the request number (1, 2, ...), as in
    /// `serve --call`, so that every request has a path of its own.
    #[arg(long)]
    url: String,
    /// Number of requests to issue.
    #[arg(long, default_value_t = 100)]
    requests: u64,
    /// Number of concurrent workers (each with its own connection).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Reuse connections (the default).
    #[arg(long, overrides_with = "no_keepalive")]
    keepalive: bool,
    /// A new connection for every request.
    #[arg(long, overrides_with = "keepalive")]
    no_keepalive: bool,
    /// Send a fresh W3C `traceparent` with every request.
    #[arg(long)]
    traceparent: bool,
    /// Give up on requests not finished this long after the start (they count as errors).
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Count HTTP 5xx responses in the summary but do not fail because of them.
    #[arg(long)]
    allow_http_errors: bool,
}

/// What the workers observed.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    http_5xx: u64,
    transport_errors: u64,
    first_error: Option<String>,
}

pub fn run(args: LoadArgs) -> Result<bool> {
    let url = Url::parse(&args.url)?;
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.timeout_s > 0.0, "--timeout-s must be positive");
    let keep_alive = !args.no_keepalive;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.timeout_s);
    let next = AtomicU64::new(0);
    let tally = Mutex::new(Tally::default());
    std::thread::scope(|scope| {
        for _ in 0..args.concurrency.min(args.requests.max(1) as usize) {
            scope.spawn(|| worker(&args, &url, keep_alive, deadline, &next, &tally));
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut tally = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    tally.latencies_us.sort_unstable();
    let responses = tally.latencies_us.len() as u64;
    let ok = responses - tally.http_5xx;
    let errors = args.requests - ok;
    let summary = serde_json::json!({
        "url": args.url,
        "requests": args.requests,
        "ok": ok,
        "errors": errors,
        "http_5xx": tally.http_5xx,
        "transport_errors": tally.transport_errors,
        "elapsed_s": round3(elapsed),
        "rps": round3(responses as f64 / elapsed.max(1e-9)),
        "p50_ms": percentile_ms(&tally.latencies_us, 0.50),
        "p99_ms": percentile_ms(&tally.latencies_us, 0.99),
        "max_ms": percentile_ms(&tally.latencies_us, 1.0),
        "first_error": tally.first_error,
    });
    println!("{summary}");
    let failed = tally.transport_errors > 0 || (tally.http_5xx > 0 && !args.allow_http_errors);
    Ok(!failed)
}

/// Takes request numbers until all are taken; one connection per worker when keep-alive.
fn worker(
    args: &LoadArgs,
    url: &Url,
    keep_alive: bool,
    deadline: Instant,
    next: &AtomicU64,
    tally: &Mutex<Tally>,
) {
    let mut conn: Option<Conn> = None;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed) + 1;
        if n > args.requests {
            break;
        }
        let path = url.path.replace("{n}", &n.to_string());
        let now = Instant::now();
        let outcome = if now >= deadline {
            Err(anyhow::anyhow!("not sent: --timeout-s reached"))
        } else {
            let sent = Instant::now();
            one_request(args, url, &path, keep_alive, deadline - now, &mut conn)
                .map(|status| (status, sent.elapsed()))
        };
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok((status, latency)) => {
                t.latencies_us.push(latency.as_micros() as u64);
                if status >= 500 {
                    t.http_5xx += 1;
                    t.first_error
                        .get_or_insert_with(|| format!("HTTP {status}"));
                }
            }
            Err(e) => {
                t.transport_errors += 1;
                t.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

/// One GET; reuses `conn` when keep-alive, reconnecting once if a reused connection was closed
/// by the server before it answered.
fn one_request(
    args: &LoadArgs,
    url: &Url,
    path: &str,
    keep_alive: bool,
    budget: Duration,
    conn: &mut Option<Conn>,
) -> Result<u16> {
    let timeout = budget.min(Duration::from_secs(10));
    let mut extra = Vec::new();
    if args.traceparent {
        extra.push(("traceparent", TraceParent::new_root().header()));
    }
    for attempt in 0..2 {
        let reused = conn.is_some();
        let mut c = match conn.take() {
            Some(c) => c,
            None => Conn::connect(url.addr, timeout)?,
        };
        let result = http::write_get(&mut c, &url.authority, path, keep_alive, &extra)
            .and_then(|()| c.read_response());
        match result {
            Ok((head, _body)) => {
                if keep_alive && head.keep_alive() {
                    *conn = Some(c);
                }
                return Ok(head.status);
            }
            Err(_) if reused && attempt == 0 => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("the second attempt always returns")
}

fn percentile_ms(sorted_us: &[u64], q: f64) -> Option<f64> {
    let last = sorted_us.len().checked_sub(1)?;
    let idx = ((last as f64) * q).round() as usize;
    Some(round3(sorted_us[idx.min(last)] as f64 / 1000.0))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let us: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&us, 0.5), Some(51.0));
        assert_eq!(percentile_ms(&us, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&us, 1.0), Some(100.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }
}
