//! Traffic: the client pod asks the frontend for items at a modest, steady rate.
//!
//! In: the client pod, the frontend Service, a rate. Out: rounds of `weft-demo-app load`
//! (one per second, `rate` requests each) until told to stop, and their [`Tally`].

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Requests sent and how they ended, summed over rounds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub rounds: u64,
    pub requests: u64,
    pub ok: u64,
    pub http_5xx: u64,
    pub transport_errors: u64,
    pub failed_rounds: u64,
}

/// What a traffic loop sends where.
#[derive(Debug, Clone)]
pub struct TrafficConfig {
    pub demo_app: PathBuf,
    pub netns: String,
    pub url: String,
    pub rate: u32,
    pub concurrency: u32,
}

pub struct Traffic {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    pub fn start(cfg: TrafficConfig) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let thread = {
            let (stop, tally) = (stop.clone(), tally.clone());
            std::thread::Builder::new()
                .name("weft-demo-traffic".into())
                .spawn(move || rounds(&cfg, &stop, &tally))
                .ok()
        };
        Traffic {
            stop,
            tally,
            thread,
        }
    }

    pub fn tally(&self) -> Tally {
        *self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the current round finish (bounded by its timeout), then stops.
    pub fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.tally()
    }
}

const ROUND: Duration = Duration::from_secs(1);
/// Bound of one round (`load --timeout-s`).
const ROUND_TIMEOUT_S: &str = "10";

fn rounds(cfg: &TrafficConfig, stop: &AtomicBool, tally: &Mutex<Tally>) {
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let result = round(cfg);
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        t.rounds += 1;
        t.requests += u64::from(cfg.rate);
        match result {
            Ok(summary) => {
                let get = |k: &str| summary.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                t.ok += get("ok");
                t.http_5xx += get("http_5xx");
                t.transport_errors += get("transport_errors");
            }
            Err(e) => {
                t.failed_rounds += 1;
                if !warned {
                    eprintln!("weft-demo: warning: a traffic round failed: {e:#}");
                    warned = true;
                }
            }
        }
        drop(t);
        // Sleep out the rest of the second in small steps, to stop promptly.
        while started.elapsed() < ROUND && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One `load` run in the client pod; its JSON summary.
fn round(cfg: &TrafficConfig) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("ip")
        .args(["netns", "exec", &cfg.netns])
        // Its own session: a terminal's Ctrl-C stops weft-demo, which ends the round.
        .arg("setsid")
        .arg(&cfg.demo_app)
        .args(["load", "--url", &cfg.url])
        .args(["--requests", &cfg.rate.to_string()])
        .args(["--concurrency", &cfg.concurrency.to_string()])
        .args(["--timeout-s", ROUND_TIMEOUT_S, "--allow-http-errors"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    match summary {
        Some(s) => Ok(s),
        None => anyhow::bail!(
            "load printed no summary ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}
