//! The collector's data path after capture, in one place: `Captured` events in; `parse` turns
//! them into Exchanges and Connections, which go to `print` (local output) and `ship` (the
//! stitcher); the counters of every stage go to `metrics`.

use std::{collections::HashMap, sync::Arc};

use tracing::warn;
use weft_proto::v1::{CollectorInfo, Exchange};

use crate::{
    capture::{Capture, Captured},
    metrics::Metrics,
    parse::{ParseConfig, ParseStats, Parser},
    print::{PrintMode, Printer},
    ship::{Event, EventSender, ShipStats},
};

pub struct Pipeline {
    parser: Parser,
    printer: Printer,
    sender: EventSender,
    metrics: Arc<Metrics>,
    /// ifindex → name of the traced interfaces (kept by the caller from `attach`); looked
    /// up per event, hence the fast hash.
    ifnames: HashMap<u32, String, foldhash::fast::RandomState>,
    print_failed: bool,
    /// Loss reasons already logged (each is logged once, then only counted).
    logged_losses: std::collections::HashSet<String>,
}

impl Pipeline {
    pub fn new(
        parse: ParseConfig,
        print: PrintMode,
        node_name: &str,
        sender: EventSender,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            parser: Parser::new(parse),
            printer: Printer::new(print, node_name),
            sender,
            metrics,
            ifnames: HashMap::default(),
            print_failed: false,
            logged_losses: Default::default(),
        }
    }

    pub fn set_interfaces(&mut self, ifnames: HashMap<u32, String>) {
        self.ifnames = ifnames.into_iter().collect();
    }

    /// One kernel event through parse, print and ship.
    pub fn on_captured(&mut self, c: Captured<'_>) {
        match c {
            Captured::Packet {
                event,
                wall_unix_nanos,
            } => {
                let name = |ifindex| self.ifnames.get(&ifindex).map_or("", String::as_str);
                let ifnames = [
                    name(event.header.ifindex),
                    event.also.map_or("", |s| name(s.ifindex)),
                ];
                let (printer, print_failed, sender) =
                    (&mut self.printer, &mut self.print_failed, &self.sender);
                let sink = |ex| deliver(printer, print_failed, sender, ex);
                self.parser
                    .on_packet_with(&event, wall_unix_nanos, ifnames, sink);
            }
            Captured::Conn {
                event,
                wall_unix_nanos,
            } => {
                if let Some(conn) = self.parser.on_conn(event, wall_unix_nanos) {
                    self.sender.try_send(Event::Connection(conn));
                }
            }
        }
    }

    /// Hands on the printed lines of the events handled so far (call it after each batch).
    pub fn flush_output(&mut self) {
        if let Err(e) = self.printer.flush() {
            log_print_failure(&mut self.print_failed, &e);
        }
    }

    /// The parse stage's counters so far.
    pub fn parse_stats(&self) -> ParseStats {
        self.parser.stats()
    }

    /// Periodic work: expire what waited too long and publish every stage's counters.
    pub fn tick(&mut self, now_unix_nanos: u64, capture: &Capture, ship: &ShipStats) {
        self.parser.expire(now_unix_nanos);
        self.metrics.record_read(&capture.stats());
        let kernel = capture.kernel_counters();
        self.metrics.record_kernel(&kernel);
        self.log_first_losses(capture, &kernel);
        let p = self.parser.stats();
        self.metrics
            .record_parse(p.exchanges, p.connections, p.parse_errors.total());
        self.metrics.record_stage("parse", &parse_counters(&p));
        self.metrics.record_stage("parse_loss", &p.losses());
        let mut ship_counters = vec![
            ("sent_events", ship.sent_events),
            ("acked_events", ship.acked_events),
            ("retransmitted_batches", ship.retransmitted_batches),
            ("reconnects", ship.reconnects),
        ];
        ship_counters.extend(ship.dropped.iter().map(|(k, v)| (k.as_str(), *v)));
        self.metrics.record_stage("ship", &ship_counters);
        self.metrics.record_ship_queue(ship.queue_depth);
        self.metrics.heartbeat();
    }

    /// Logs each capture loss reason the first time it occurs (parse and ship log their own).
    fn log_first_losses(
        &mut self,
        capture: &Capture,
        kernel: &[u64; weft_ebpf_common::COUNTER_COUNT as usize],
    ) {
        use weft_ebpf_common::Counter;
        let losses = [
            (
                Counter::RingFull,
                "HTTP segments lost: a CPU's packet ring was full (the collector reads too slowly)",
            ),
            (
                Counter::NoRing,
                "HTTP segments lost: no packet ring for the CPU (not set up, or a nested classifier run)",
            ),
            (
                Counter::ConnRingFull,
                "connection events lost: the connection ring buffer was full",
            ),
            (
                Counter::CopyFailed,
                "HTTP segments lost: copying the payload head failed",
            ),
            (
                Counter::BadHeader,
                "packets skipped: truncated or malformed IP/TCP headers",
            ),
            (
                Counter::DoorbellFull,
                "a half-full packet ring could not wake the collector: the doorbell ring buffer was full (its records wait for the next timed read)",
            ),
        ];
        for (counter, why) in losses {
            let n = kernel[counter as usize];
            if n > 0 && self.logged_losses.insert(counter.name().to_owned()) {
                warn!(
                    reason = counter.name(),
                    count = n,
                    "{why}; further ones are counted in /metrics, not logged"
                );
            }
        }
        let read = capture.stats();
        if read.malformed > 0 && self.logged_losses.insert("ring_malformed".to_owned()) {
            warn!(
                count = read.malformed,
                "ring buffer entries of an unexpected size dropped (kernel and user space built from different sources?)"
            );
        }
        if read.unresolved_repeats > 0
            && self
                .logged_losses
                .insert("ring_unresolved_repeat".to_owned())
        {
            warn!(
                count = read.unresolved_repeats,
                "HTTP segments lost: a record repeating the one before it came without that record (read before the collector started, or malformed); further ones are counted in /metrics, not logged"
            );
        }
    }

    /// The drops of every stage so far, by reason (for `CollectorInfo.drops`).
    pub fn drops(&self, capture: &Capture) -> Vec<(String, u64)> {
        use weft_ebpf_common::Counter;
        let k = capture.kernel_counters();
        let mut drops: Vec<(String, u64)> = vec![
            ("ring_full".into(), k[Counter::RingFull as usize]),
            ("no_ring".into(), k[Counter::NoRing as usize]),
            ("conn_ring_full".into(), k[Counter::ConnRingFull as usize]),
            ("copy_failed".into(), k[Counter::CopyFailed as usize]),
            ("ring_malformed".into(), capture.stats().malformed),
            (
                "ring_unresolved_repeat".into(),
                capture.stats().unresolved_repeats,
            ),
        ];
        drops.extend(
            self.parser
                .stats()
                .losses()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v)),
        );
        drops
    }

    pub fn info(&self, backend: &str, interfaces: Vec<String>, capture: &Capture) -> CollectorInfo {
        CollectorInfo {
            tc_backend: backend.to_owned(),
            interfaces,
            drops: self.drops(capture).into_iter().collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// An Exchange to the local printer and to the shipper, which gives it back for reuse.
fn deliver(
    printer: &mut Printer,
    print_failed: &mut bool,
    sender: &EventSender,
    ex: Box<Exchange>,
) -> Option<Box<Exchange>> {
    if let Err(e) = printer.print(&ex) {
        log_print_failure(print_failed, &e);
    }
    sender.try_send(Event::Exchange(ex))
}

/// Logged once: a closed stdout would otherwise flood the log.
fn log_print_failure(print_failed: &mut bool, e: &std::io::Error) {
    if !*print_failed {
        warn!("printing exchanges failed, further failures are not logged: {e}");
        *print_failed = true;
    }
}

fn parse_counters(p: &ParseStats) -> Vec<(&'static str, u64)> {
    vec![
        ("packets", p.packets),
        ("requests", p.requests),
        ("responses", p.responses),
        ("interim_responses", p.interim_responses),
        ("truncated_heads", p.truncated_heads),
        ("heads_beyond_capture", p.heads_beyond_capture),
        ("repeated_segments", p.repeated_segments),
        ("retransmitted_requests", p.retransmitted_requests),
        ("retransmitted_responses", p.retransmitted_responses),
        ("unmatched_responses", p.unmatched_responses),
        ("unanswered_requests", p.unanswered_requests),
        ("evicted_connections", p.evicted_connections),
        ("evicted_requests", p.evicted_requests),
    ]
}
