//! Metrics: what every stage counted, served as Prometheus text on `/metrics`, and `/healthz`.
//!
//! In: counts pushed by `attach` (backend, state per interface), `capture` (events read, kernel
//! counters) and `parse` (exchanges, connections, failures). Out: HTTP on `--metrics-listen`.
//! Other stages (for example `ship`) register their own metrics with `Metrics::register`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, sync::atomic::AtomicU64};

use crate::capture::ReadStats;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Metric, Registry},
};
use tokio::net::TcpListener;
use tracing::{info, warn};
use weft_ebpf_common::{COUNTER_COUNT, Counter as KernelCounter};

type Labels = Vec<(String, String)>;

/// Attach state of a traced interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfaceState {
    Attached,
    /// The Cilium rules forbid attaching (netlink mode).
    Refused,
    Failed,
}

impl IfaceState {
    pub fn as_str(self) -> &'static str {
        match self {
            IfaceState::Attached => "attached",
            IfaceState::Refused => "refused",
            IfaceState::Failed => "failed",
        }
    }
}

pub struct Metrics {
    registry: Mutex<Registry>,
    backend: Family<Labels, Gauge>,
    /// 1, or 0 with `--hooks-only`.
    capture_enabled: Gauge,
    interfaces: Family<Labels, Gauge>,
    iface_states: Mutex<std::collections::HashMap<String, IfaceState>>,
    events_read: Family<Labels, Counter>,
    ring_malformed: Counter,
    ring_repeats: Counter,
    ring_unresolved_repeats: Counter,
    ring_marked: Counter,
    ring_twins: Counter,
    kernel: Family<Labels, Counter>,
    ring_drops: Family<Labels, Counter>,
    parse_failures: Counter,
    exchanges: Counter,
    connections: Counter,
    stages: Family<Labels, Counter>,
    ship_queue: Gauge,
    read_interval: Gauge<f64, AtomicU64>,
    reads: Family<Labels, Counter>,
    program_run_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    program_runs: Family<Labels, Counter>,
    /// When the capture loop last finished its periodic work (Unix seconds; 0 = not yet).
    last_tick: std::sync::atomic::AtomicU64,
}

/// Raises a monotonically increasing counter to `total` (the sources keep running totals).
fn raise_to(c: &Counter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

fn labels(k: &str, v: &str) -> Labels {
    vec![(k.to_owned(), v.to_owned())]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("weft_collector")),
            backend: Family::default(),
            capture_enabled: Gauge::default(),
            interfaces: Family::default(),
            iface_states: Mutex::default(),
            events_read: Family::default(),
            ring_malformed: Counter::default(),
            ring_repeats: Counter::default(),
            ring_unresolved_repeats: Counter::default(),
            ring_marked: Counter::default(),
            ring_twins: Counter::default(),
            kernel: Family::default(),
            ring_drops: Family::default(),
            parse_failures: Counter::default(),
            exchanges: Counter::default(),
            connections: Counter::default(),
            stages: Family::default(),
            ship_queue: Gauge::default(),
            read_interval: Gauge::default(),
            reads: Family::default(),
            program_run_seconds: Family::default(),
            program_runs: Family::default(),
            last_tick: Default::default(),
        };
        m.capture_enabled.set(1);
        {
            let mut r = m.registry.lock();
            r.register(
                "capture_enabled",
                "1 when the classifiers capture; 0 with --hooks-only (attached, capturing nothing: a benchmark's reference)",
                m.capture_enabled.clone(),
            );
            r.register(
                "tc_backend",
                "How classifiers are attached (label backend = tcx | netlink)",
                m.backend.clone(),
            );
            r.register(
                "interface_state",
                "Attach state per traced interface (1 = in this state)",
                m.interfaces.clone(),
            );
            r.register(
                "ship_queue_events",
                "Events held for the stitcher now: sent and not yet acknowledged, waiting to be sent, not yet batched (bounded by --queue-max-events)",
                m.ship_queue.clone(),
            );
            r.register(
                "read_interval_seconds",
                "Time between reads of the packet rings now: 0.005 while packet records come; after 0.1 s without any, doubling up to --max-read-interval (default 0.1), while a ring half full wakes the collector at once",
                m.read_interval.clone(),
            );
            r.register(
                "reads",
                "Reads of the kernel's rings, by cause: timer (the read schedule) or kernel (a ring half full rang its doorbell, or the connection ring buffer was a quarter full)",
                m.reads.clone(),
            );
            r.register(
                "events_read",
                "Events read from the kernel ring buffers",
                m.events_read.clone(),
            );
            r.register(
                "ring_malformed",
                "Ring entries of an unexpected size or announcing more payload than a slot holds (dropped)",
                m.ring_malformed.clone(),
            );
            r.register(
                "ring_repeats",
                "Packet records that repeat the record before them (the same segment on a second veth of the node) and were read with its payload",
                m.ring_repeats.clone(),
            );
            r.register(
                "ring_unresolved_repeats",
                "Packet records that repeat a record the reader did not have (read before it started, or malformed); dropped",
                m.ring_unresolved_repeats.clone(),
            );
            r.register(
                "ring_marked",
                "Second sightings of a segment on the node read from a mark on its first record, not from a record of their own (included in ring_repeats)",
                m.ring_marked.clone(),
            );
            r.register(
                "ring_twins",
                "Sightings the kernel wrote both as a mark and as a record (it marked a record the reader may have passed): handed on once, the other skipped",
                m.ring_twins.clone(),
            );
            r.register(
                "kernel_events",
                "Per-CPU kernel counters summed (packets seen, emitted, and every bail-out)",
                m.kernel.clone(),
            );
            r.register(
                "ring_drops",
                "Events lost because a ring was full (packets: a CPU's packet ring; conns: the connection ring buffer)",
                m.ring_drops.clone(),
            );
            r.register(
                "parse_failures",
                "HTTP heads that could not be parsed or paired",
                m.parse_failures.clone(),
            );
            r.register(
                "exchanges",
                "Exchanges (request + response) produced",
                m.exchanges.clone(),
            );
            r.register(
                "connections",
                "Connection events produced",
                m.connections.clone(),
            );
            r.register(
                "stage_events",
                "Counters of the parse and ship stages by kind (drops, retransmissions, ...)",
                m.stages.clone(),
            );
            r.register(
                "program_run_seconds",
                "Time the kernel programs ran, by program (only with --bpf-stats)",
                m.program_run_seconds.clone(),
            );
            r.register(
                "program_runs",
                "Runs of the kernel programs, by program (only with --bpf-stats)",
                m.program_runs.clone(),
            );
        }
        m
    }

    /// Lets another stage add its metrics (names get the `weft_collector_` prefix).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry.lock().register(name, help, metric);
    }

    pub fn set_backend(&self, backend: &str) {
        self.backend.clear();
        self.backend
            .get_or_create(&labels("backend", backend))
            .set(1);
    }

    pub fn set_capture(&self, enabled: bool) {
        self.capture_enabled.set(i64::from(enabled));
    }

    pub fn set_iface(&self, name: &str, state: IfaceState) {
        let mut states = self.iface_states.lock();
        if let Some(old) = states.insert(name.to_owned(), state) {
            self.interfaces.remove(&iface_labels(name, old));
        }
        self.interfaces
            .get_or_create(&iface_labels(name, state))
            .set(1);
    }

    pub fn remove_iface(&self, name: &str) {
        if let Some(old) = self.iface_states.lock().remove(name) {
            self.interfaces.remove(&iface_labels(name, old));
        }
    }

    pub fn iface_states(&self) -> Vec<(String, IfaceState)> {
        let mut v: Vec<_> = self
            .iface_states
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn record_read(&self, read: &ReadStats) {
        raise_to(
            &self.events_read.get_or_create(&labels("ring", "packets")),
            read.packets,
        );
        raise_to(
            &self.events_read.get_or_create(&labels("ring", "conns")),
            read.conns,
        );
        raise_to(&self.ring_malformed, read.malformed);
        raise_to(&self.ring_repeats, read.repeats);
        raise_to(&self.ring_unresolved_repeats, read.unresolved_repeats);
        raise_to(&self.ring_marked, read.marked);
        raise_to(&self.ring_twins, read.twins);
    }

    pub fn record_kernel(&self, counters: &[u64; COUNTER_COUNT as usize]) {
        for c in KernelCounter::ALL {
            raise_to(
                &self.kernel.get_or_create(&labels("counter", c.name())),
                counters[c as usize],
            );
        }
        raise_to(
            &self.ring_drops.get_or_create(&labels("ring", "packets")),
            counters[KernelCounter::RingFull as usize],
        );
        raise_to(
            &self.ring_drops.get_or_create(&labels("ring", "conns")),
            counters[KernelCounter::ConnRingFull as usize],
        );
    }

    pub fn record_parse(&self, exchanges: u64, connections: u64, failures: u64) {
        raise_to(&self.exchanges, exchanges);
        raise_to(&self.connections, connections);
        raise_to(&self.parse_failures, failures);
    }

    /// Running totals of a stage, by kind.
    pub fn record_stage(&self, stage: &str, counters: &[(&str, u64)]) {
        for (kind, total) in counters {
            let labels = vec![
                ("stage".to_owned(), stage.to_owned()),
                ("kind".to_owned(), (*kind).to_owned()),
            ];
            raise_to(&self.stages.get_or_create(&labels), *total);
        }
    }

    /// A read of the rings by its cause (`timer` or `kernel`), and the time to the next
    /// timed read (see `capture::pace`).
    pub fn record_pace(&self, cause: &str, interval: std::time::Duration) {
        self.reads.get_or_create(&labels("cause", cause)).inc();
        self.record_read_interval(interval);
    }

    /// The time between reads of the packet rings now (see `capture::pace`).
    pub fn record_read_interval(&self, interval: std::time::Duration) {
        self.read_interval.set(interval.as_secs_f64());
    }

    /// The shipper's queue depth now (a gauge, unlike the stage totals).
    pub fn record_ship_queue(&self, events: usize) {
        self.ship_queue
            .set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// Running totals of the kernel programs' run time and runs (from BPF run-time stats).
    pub fn record_programs(&self, stats: &[(&str, std::time::Duration, u64)]) {
        for (program, time, runs) in stats {
            let labels = labels("program", program);
            let seconds = self.program_run_seconds.get_or_create(&labels);
            let delta = time.as_secs_f64() - seconds.get();
            if delta > 0.0 {
                seconds.inc_by(delta);
            }
            raise_to(&self.program_runs.get_or_create(&labels), *runs);
        }
    }

    /// The capture loop is alive (called from its periodic tick).
    pub fn heartbeat(&self) {
        self.last_tick
            .store(unix_secs(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Healthy: the capture loop ticked within the last `HEALTHY_WITHIN_SECS` seconds.
    pub fn healthy(&self) -> bool {
        let last = self.last_tick.load(std::sync::atomic::Ordering::Relaxed);
        last != 0 && unix_secs().saturating_sub(last) <= HEALTHY_WITHIN_SECS
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry.lock()) {
            warn!("encoding metrics failed: {e}");
        }
        out
    }

    /// Serves `/metrics` and `/healthz` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!("metrics accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(metrics.respond(&req)) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    info!(%peer, "metrics connection ended: {e}");
                }
            });
        }
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, ctype, body) = match req.uri().path() {
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.encode(),
            ),
            "/healthz" if self.healthy() => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            "/healthz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "capture loop stalled or not started\n".to_owned(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_owned(),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    }
}

/// `/healthz` fails when the capture loop (which ticks every second) has not ticked for this long.
const HEALTHY_WITHIN_SECS: u64 = 5;

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn iface_labels(name: &str, state: IfaceState) -> Labels {
    vec![
        ("interface".to_owned(), name.to_owned()),
        ("state".to_owned(), state.as_str().to_owned()),
    ]
}

/// Binds the metrics listener (fails early, before anything is attached, on a busy port).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding --metrics-listen {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_backend_interfaces_and_drops() {
        let m = Metrics::new();
        m.set_backend("tcx");
        m.set_iface("veth1", IfaceState::Attached);
        m.set_iface("lxc2", IfaceState::Failed);
        m.set_iface("lxc2", IfaceState::Refused);
        let mut k = [0u64; COUNTER_COUNT as usize];
        k[KernelCounter::RingFull as usize] = 7;
        m.record_kernel(&k);
        m.record_kernel(&k);
        let text = m.encode();
        assert!(
            text.contains(r#"weft_collector_tc_backend{backend="tcx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"weft_collector_interface_state{interface="veth1",state="attached"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains(r#"state="failed""#), "{text}");
        assert!(
            text.contains("weft_collector_capture_enabled 1\n"),
            "{text}"
        );
        m.set_capture(false);
        assert!(m.encode().contains("weft_collector_capture_enabled 0\n"));
        assert!(
            text.contains(r#"weft_collector_ring_drops_total{ring="packets"} 7"#),
            "{text}"
        );
        m.remove_iface("veth1");
        assert!(!m.encode().contains("veth1"));
    }

    #[test]
    fn ship_queue_is_a_gauge_that_goes_down_too() {
        let m = Metrics::new();
        m.record_ship_queue(1500);
        assert!(
            m.encode()
                .contains("weft_collector_ship_queue_events 1500\n")
        );
        m.record_ship_queue(3);
        assert!(m.encode().contains("weft_collector_ship_queue_events 3\n"));
    }

    #[test]
    fn healthy_only_after_a_recent_heartbeat() {
        let m = Metrics::new();
        assert!(!m.healthy());
        m.heartbeat();
        assert!(m.healthy());
        m.last_tick.store(
            unix_secs() - HEALTHY_WITHIN_SECS - 2,
            std::sync::atomic::Ordering::Relaxed,
        );
        assert!(!m.healthy());
    }
}
