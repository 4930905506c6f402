//! Shutdown flushes: what is pending is sealed and delivered before `shutdown` returns;
//! without a stitcher it gives up at the deadline and counts every queued event as
//! dropped (`shutdown`), so nothing disappears uncounted.

mod ship_support;

use std::time::{Duration, Instant};

use ship_support::*;
use weft_collector::ship::{Event, ShipConfig, Shipper};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_pending_events() {
    let stitcher = Stitcher::start(free_port());
    let mut cfg = ShipConfig::new(Some(stitcher.url()), "node-s");
    cfg.batch_max_events = 1000;
    // Longer than the test: only shutdown can seal the last partial batch.
    cfg.batch_max_delay = Duration::from_secs(600);
    cfg.shutdown_timeout = Duration::from_secs(10);
    let shipper = Shipper::spawn(cfg);
    let sender = shipper.sender();
    for id in 1..=2500 {
        sender.try_send(Event::Exchange(Box::new(exchange(id))));
    }
    let stats = shipper.shutdown().await;
    assert_eq!(stats.acked_events, 2500, "{stats:?}");
    assert!(stats.dropped.is_empty(), "{stats:?}");
    let printed = parse_lines(&stitcher.kill());
    assert_eq!(set(printed.iter().map(|p| p.1)), set(1..=2500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_without_stitcher_counts_what_it_gives_up() {
    // A port nothing listens on.
    let mut cfg = ShipConfig::new(Some(format!("http://127.0.0.1:{}", free_port())), "node-s");
    cfg.shutdown_timeout = Duration::from_millis(500);
    let shipper = Shipper::spawn(cfg);
    let sender = shipper.sender();
    for id in 1..=1234 {
        sender.try_send(Event::Exchange(Box::new(exchange(id))));
    }
    let started = Instant::now();
    let stats = shipper.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "deadline not kept"
    );
    assert_eq!(stats.acked_events, 0);
    assert_eq!(
        stats.dropped.get("shutdown").copied(),
        Some(1234),
        "{stats:?}"
    );
    assert_eq!(stats.queue_depth, 0);
}
