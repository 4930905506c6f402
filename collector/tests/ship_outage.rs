//! Acceptance (issue 4, test 2): the stitcher is unreachable for 30 s while the collector
//! produces 1,000 events/s into a small queue bound.
//!
//! Expected: the queue depth never exceeds the bound (memory bounded); exactly the events
//! beyond the bound are dropped and counted (`queue_full`), and they are the oldest ones;
//! when the stitcher returns the shipper reconnects by itself and delivers the newest
//! `bound` events of the outage, then new events flow again.

mod ship_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ship_support::*;
use weft_collector::ship::{ShipConfig, Shipper};

const RATE: u64 = 1_000;
const BOUND: usize = 5_000;
const BEFORE: u64 = 2_000; // 2 s healthy
const OUTAGE: u64 = 30_000; // 30 s unreachable
const AFTER: u64 = 2_000; // 2 s healthy again

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_of_30s_drops_exactly_what_exceeds_the_bound_and_recovers() {
    let port = free_port();
    let first = Stitcher::start(port);
    let mut cfg = ShipConfig::new(Some(first.url()), "node-b");
    cfg.queue_max_events = BOUND;
    cfg.batch_max_events = 1_000;
    cfg.batch_max_delay = Duration::from_millis(200);
    cfg.backoff_max = Duration::from_secs(1);
    let shipper = Arc::new(Shipper::spawn(cfg));
    let sender = shipper.sender();
    let instance = shipper.instance_id().unwrap().to_string();

    // Healthy phase; then wait until nothing is queued, so the outage starts from empty.
    produce(&sender, 1..=BEFORE, RATE, |_| {}).await;
    assert!(
        wait_until(Duration::from_secs(10), || shipper.stats().acked_events
            == BEFORE
            && shipper.stats().queue_depth == 0)
        .await,
        "healthy phase not delivered: {:?}",
        shipper.stats()
    );
    let first_ids = parse_lines(&first.kill());

    // Outage: nothing listens on the port. Sample the depth all along.
    let max_seen = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (shipper, max_seen) = (shipper.clone(), max_seen.clone());
        tokio::spawn(async move {
            loop {
                let d = shipper.stats().queue_depth;
                max_seen.fetch_max(d, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    produce(&sender, BEFORE + 1..=BEFORE + OUTAGE, RATE, |_| {
        max_seen.fetch_max(shipper.stats().queue_depth, Ordering::Relaxed);
    })
    .await;
    let during = shipper.stats();
    assert!(!during.connected, "stitcher was down: {during:?}");
    assert_eq!(
        during.acked_events, BEFORE,
        "nothing can be acked while down"
    );
    assert_eq!(during.queue_depth, BOUND, "{during:?}");
    assert_eq!(
        during.dropped.get("queue_full").copied(),
        Some(OUTAGE - BOUND as u64),
        "drops must be exactly the events beyond the bound: {during:?}"
    );
    assert!(during.reconnects > 3, "it kept trying: {during:?}");

    // The stitcher returns; the shipper finds it by itself and delivers the queue. (Events
    // pushed before it has drained would still meet a full queue and push out older ones,
    // so the test lets it drain first to keep the drop count exact.)
    let second = Stitcher::start(port);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = shipper.stats();
            s.acked_events == BEFORE + BOUND as u64 && s.queue_depth == 0
        })
        .await,
        "queued events not delivered after the stitcher returned: {:?}",
        shipper.stats()
    );
    produce(
        &sender,
        BEFORE + OUTAGE + 1..=BEFORE + OUTAGE + AFTER,
        RATE,
        |_| {},
    )
    .await;
    let total_acked = BEFORE + BOUND as u64 + AFTER;
    assert!(
        wait_until(Duration::from_secs(20), || shipper.stats().acked_events
            == total_acked)
        .await,
        "not resumed: {:?}",
        shipper.stats()
    );
    sampler.abort();
    let end = shipper.stats();
    let second_ids = parse_lines(&second.kill());

    assert!(max_seen.load(Ordering::Relaxed) <= BOUND);
    assert!(end.queue_max_depth <= BOUND, "{end:?}");
    assert_eq!(end.dropped.len(), 1, "only queue_full drops: {end:?}");
    assert_eq!(end.dropped["queue_full"], OUTAGE - BOUND as u64);

    // Who got through: the healthy phase, the newest BOUND events of the outage (drop
    // oldest), and everything after.
    assert!(first_ids.iter().all(|(i, _)| *i == instance));
    assert_eq!(set(first_ids.iter().map(|x| x.1)), set(1..=BEFORE));
    let expected_second = set((BEFORE + OUTAGE - BOUND as u64 + 1..=BEFORE + OUTAGE)
        .chain(BEFORE + OUTAGE + 1..=BEFORE + OUTAGE + AFTER));
    let got_second = set(second_ids.iter().map(|x| x.1));
    assert_eq!(got_second.len(), second_ids.len(), "duplicates in life 2");
    assert_eq!(got_second, expected_second);
    eprintln!("outage stats: {during:?}\nend stats: {end:?}");
}
