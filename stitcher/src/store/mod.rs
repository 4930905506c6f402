//! store: completed traces → bounded memory that the query stage reads.
//!
//! In: `Arc<CompletedTrace>` from assemble (the [`Store`] is a [`TraceSink`]; in the
//! pipeline its [`StoreWriter`] inserts on a thread of its own, off the stitch thread).
//! Out: trace summaries and whole traces ([`StoredTrace`]) and the service map
//! ([`ServiceMap`]) for [`crate::query`].
//!
//! Bounds: at most `--store-max-traces` traces and about `--store-max-bytes` bytes
//! (span records and their strings, summaries, table entries); when either is
//! exceeded the trace with the oldest start is evicted (`store.evicted`,
//! `store.evicted_bytes`). A late trace (same id) merges into the stored one; spans are
//! unique by span id. The service map keeps per-minute edge buckets for
//! `--service-map-retention`, at most `--service-map-max-edges` edges per minute
//! (see [`service_map`] for how a request becomes an edge and the histogram).
//!
//! Queries never block ingest for long: `on_trace` builds the merged trace and its
//! summary before taking the table lock (it shares the incoming trace's spans, see
//! [`traces`], and names services through a cache, see [`names`]), then holds a
//! `parking_lot` mutex only for O(log n) table updates (and evictions), and the map's
//! mutex for a few integer-keyed hash updates per new span (map nodes are interned, see
//! [`service_map::NodeInterner`]). Queries hold the table lock for at most [`SCAN_CHUNK`]
//! entries at a time (cloning `Arc`s, not traces) and the map lock for one minute
//! bucket at a time, so ingest waits at most one such short step behind a query.

mod histogram;
mod names;
mod service_map;
mod traces;
mod writer;

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

pub use histogram::Histogram;
pub use service_map::{Edge, MapNode, NodeKind, ServiceMap};
pub use traces::{StoredTrace, TraceFilter, TraceSummary};
pub use writer::StoreWriter;

use crate::metrics::{Counter, Registry};
use crate::model::{CompletedTrace, TraceId, TraceSink};
use names::NameCache;
use service_map::{MapAccumulator, MinuteBuckets};
use traces::TraceTable;

/// Most table entries a query looks at per lock hold.
pub const SCAN_CHUNK: usize = 256;

/// Limits of the store (flags of `weft-stitcher`).
#[derive(Debug, Clone, clap::Args)]
pub struct StoreConfig {
    /// Most traces kept for the Query API; the oldest are evicted first.
    #[arg(
        long = "store-max-traces",
        env = "WEFT_STORE_MAX_TRACES",
        default_value_t = 10_000
    )]
    pub max_traces: usize,
    /// Approximate memory for kept traces, in bytes (suffixes KiB, MiB, GiB allowed).
    #[arg(
        long = "store-max-bytes",
        env = "WEFT_STORE_MAX_BYTES",
        default_value = "64MiB",
        value_parser = parse_bytes
    )]
    pub max_bytes: u64,
    /// How far back ServiceMap can look (longer windows are clamped to this).
    #[arg(
        long = "service-map-retention",
        env = "WEFT_SERVICE_MAP_RETENTION",
        default_value = "1h",
        value_parser = humantime::parse_duration
    )]
    pub map_retention: Duration,
    /// Most distinct edges per minute in the service map; more are counted and dropped.
    #[arg(
        long = "service-map-max-edges",
        env = "WEFT_SERVICE_MAP_MAX_EDGES",
        default_value_t = 1_000
    )]
    pub map_max_edges: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_traces: 10_000,
            max_bytes: 64 << 20,
            map_retention: Duration::from_secs(3600),
            map_max_edges: 1_000,
        }
    }
}

/// Parses `1048576`, `64MiB`, `512KiB`, `1GiB` (also `MB`/`KB`/`GB`, as powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of bytes, e.g. 64MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use KiB, MiB, GiB)")),
    };
    num.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// What the store holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub traces: usize,
    pub spans: usize,
    pub bytes: usize,
    pub map_edges: usize,
}

struct StoreMetrics {
    traces: Counter,
    spans: Counter,
    bytes: Counter,
    evicted: Counter,
    evicted_bytes: Counter,
    late_merged: Counter,
    late_unmatched: Counter,
    rejected_too_large: Counter,
    rejected_empty: Counter,
    map_edges: Counter,
    map_nodes: Counter,
    map_edges_full: Counter,
    map_expired: Counter,
}

impl StoreMetrics {
    fn new(r: &Registry, config: &StoreConfig) -> Self {
        r.counter("store.max_traces", "configured trace limit of the store")
            .set(config.max_traces as u64);
        r.counter("store.max_bytes", "configured byte limit of the store")
            .set(config.max_bytes);
        StoreMetrics {
            traces: r.counter("store.traces", "traces held by the store (gauge)"),
            spans: r.counter("store.spans", "spans held by the store (gauge)"),
            bytes: r.counter("store.bytes", "approximate bytes held by the store (gauge)"),
            evicted: r.counter("store.evicted", "traces evicted to stay within limits"),
            evicted_bytes: r.counter("store.evicted_bytes", "bytes of evicted traces"),
            late_merged: r.counter(
                "store.late_merged",
                "late traces merged into a stored trace",
            ),
            late_unmatched: r.counter(
                "store.late_unmatched",
                "late traces whose earlier part was not stored (kept on their own)",
            ),
            rejected_too_large: r.counter(
                "store.rejected.too_large",
                "traces larger than the whole store byte limit (not stored)",
            ),
            rejected_empty: r.counter("store.rejected.empty", "traces without spans"),
            map_edges: r.counter(
                "store.map.edges",
                "edge entries over all minute buckets of the service map (gauge)",
            ),
            map_nodes: r.counter(
                "store.map.nodes",
                "service-map nodes interned for the kept minute buckets (gauge)",
            ),
            map_edges_full: r.counter(
                "store.map.dropped.edges_full",
                "requests not added to the service map: the minute had too many edges",
            ),
            map_expired: r.counter(
                "store.map.dropped.expired",
                "requests not added to the service map: older than its retention",
            ),
        }
    }
}

/// Logs `msg` the first time `flag` is raised.
fn warn_once(flag: &std::sync::Once, msg: impl FnOnce()) {
    flag.call_once(msg);
}

/// The bounded store of traces and the service map.
pub struct Store {
    config: StoreConfig,
    traces: Mutex<TraceTable>,
    map: Mutex<MinuteBuckets>,
    /// Service names for summaries (taken while building a trace, outside the table lock).
    names: Mutex<NameCache>,
    metrics: StoreMetrics,
    warned_too_large: std::sync::Once,
    warned_edges_full: std::sync::Once,
    warned_expired: std::sync::Once,
}

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Store {
    pub fn new(config: StoreConfig, registry: &Registry) -> Self {
        let retention_minutes = config.map_retention.as_secs().div_ceil(60);
        Store {
            metrics: StoreMetrics::new(registry, &config),
            map: Mutex::new(MinuteBuckets::new(retention_minutes, config.map_max_edges)),
            traces: Mutex::new(TraceTable::default()),
            names: Mutex::new(NameCache::default()),
            config,
            warned_too_large: std::sync::Once::new(),
            warned_edges_full: std::sync::Once::new(),
            warned_expired: std::sync::Once::new(),
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Takes a completed (or late) trace in; `now_unix_nanos` ages the service map.
    pub fn insert_at(&self, incoming: &Arc<CompletedTrace>, now_unix_nanos: u64) {
        // Optimistic: build outside the lock from the stored version, commit if it is
        // still the stored version. Inserts come from one thread (the writer), so a
        // retry is rare; after a few, build under the lock.
        const OPTIMISTIC_TRIES: usize = 3;
        let mut committed = None;
        for _ in 0..OPTIMISTIC_TRIES {
            let base = self
                .traces
                .lock()
                .get(&incoming.trace_id)
                .map(|(_, t)| t.clone());
            let built = self.build(base.as_deref(), incoming);
            let mut table = self.traces.lock();
            let current = table.get(&incoming.trace_id).map(|(_, t)| t);
            let unchanged = match (&base, current) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if unchanged {
                committed = Some(self.commit(&mut table, base.is_some(), built, incoming));
                break;
            }
        }
        let outcome = match committed {
            Some(c) => c,
            None => {
                let mut table = self.traces.lock();
                let base = table.get(&incoming.trace_id).map(|(_, t)| t.clone());
                let built = self.build(base.as_deref(), incoming);
                self.commit(&mut table, base.is_some(), built, incoming)
            }
        };
        // Dropped here, after the lock: the memory of replaced and evicted traces.
        drop(outcome.released);
        if let Some((trace, new)) = outcome.added {
            let samples = service_map::samples(&trace, &new);
            if !samples.is_empty() {
                let (recorded, edges, nodes) = {
                    let mut map = self.map.lock();
                    let recorded = map.record(&samples, now_unix_nanos);
                    (recorded, map.edge_entries(), map.interned_nodes())
                };
                self.metrics.map_edges.set(edges as u64);
                self.metrics.map_nodes.set(nodes as u64);
                self.count_map_drops(recorded);
            }
        }
    }

    /// The merged trace, built outside the table lock.
    fn build(&self, base: Option<&StoredTrace>, incoming: &Arc<CompletedTrace>) -> Option<Built> {
        let merged = StoredTrace::merge(base, incoming, &mut self.names.lock())?;
        Some(Built {
            trace: merged.trace,
            new: merged.new,
        })
    }

    /// Table update under the lock: put, evict, update gauges.
    fn commit(
        &self,
        table: &mut TraceTable,
        had_base: bool,
        built: Option<Built>,
        incoming: &CompletedTrace,
    ) -> Committed {
        let mut released = Vec::new();
        let Some(Built { trace, new }) = built else {
            self.metrics.rejected_empty.inc();
            return Committed::default();
        };
        if trace.bytes as u64 > self.config.max_bytes {
            self.metrics.rejected_too_large.inc();
            warn_once(&self.warned_too_large, || {
                tracing::warn!(
                    trace_id = ?trace.trace_id,
                    bytes = trace.bytes,
                    max_bytes = self.config.max_bytes,
                    "trace larger than --store-max-bytes is not stored (counted in store.rejected.too_large; logged once)"
                )
            });
            return Committed::default();
        }
        if incoming.late {
            if had_base {
                self.metrics.late_merged.inc();
            } else {
                self.metrics.late_unmatched.inc();
            }
        }
        let trace = Arc::new(trace);
        released.extend(table.put(trace.clone()));
        while table.len() > self.config.max_traces || table.bytes as u64 > self.config.max_bytes {
            let Some(evicted) = table.pop_oldest() else {
                break;
            };
            self.metrics.evicted.inc();
            self.metrics.evicted_bytes.add(evicted.bytes as u64);
            released.push(evicted);
        }
        self.metrics.traces.set(table.len() as u64);
        self.metrics.spans.set(table.spans as u64);
        self.metrics.bytes.set(table.bytes as u64);
        Committed {
            released,
            added: Some((trace, new)),
        }
    }

    fn count_map_drops(&self, r: service_map::RecordOutcome) {
        if r.edges_full > 0 {
            self.metrics.map_edges_full.add(r.edges_full);
            warn_once(&self.warned_edges_full, || {
                tracing::warn!(
                    max_edges = self.config.map_max_edges,
                    "service map minute bucket full: requests on new edges are not mapped (counted in store.map.dropped.edges_full; logged once)"
                )
            });
        }
        if r.expired > 0 {
            self.metrics.map_expired.add(r.expired);
            warn_once(&self.warned_expired, || {
                tracing::warn!(
                    retention = ?self.config.map_retention,
                    "requests older than the service map retention are not mapped (counted in store.map.dropped.expired; logged once)"
                )
            });
        }
    }

    /// The stored trace with this id.
    pub fn get(&self, id: &TraceId) -> Option<Arc<StoredTrace>> {
        self.traces.lock().get(id).map(|(_, t)| t.clone())
    }

    /// Up to `limit` traces matching `filter`, newest start first. Scans in chunks of
    /// [`SCAN_CHUNK`] entries per lock hold, using the start-time order to skip
    /// whatever lies outside the filter's time range.
    pub fn list(&self, filter: &TraceFilter, limit: usize) -> Vec<Arc<StoredTrace>> {
        let mut out: Vec<Arc<StoredTrace>> = Vec::new();
        let before = filter.start_before_unix_nanos;
        let after = filter.start_after_unix_nanos;
        if limit == 0 || (before != 0 && after > before) {
            return out;
        }
        let lower = Bound::Included((after, 0));
        let mut upper = if before == 0 {
            Bound::Unbounded
        } else {
            Bound::Included((before, u64::MAX))
        };
        // A late merge can move a trace to an earlier start while we scan.
        let mut seen = HashSet::new();
        loop {
            let table = self.traces.lock();
            let mut scanned = 0;
            for (key, trace) in table.by_start.range((lower, upper)).rev() {
                scanned += 1;
                upper = Bound::Excluded(*key);
                if filter.matches(trace) && seen.insert(trace.trace_id) {
                    out.push(trace.clone());
                    if out.len() >= limit {
                        return out;
                    }
                }
                if scanned == SCAN_CHUNK {
                    break;
                }
            }
            drop(table);
            if scanned < SCAN_CHUNK {
                return out;
            }
        }
    }

    /// The service map over the last `window` (clamped to the retention) as of
    /// `now_unix_nanos`.
    pub fn service_map_at(&self, window: Duration, now_unix_nanos: u64) -> ServiceMap {
        let window = window.min(self.config.map_retention);
        let window_nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let minutes = self.map.lock().minutes_since(window_nanos, now_unix_nanos);
        let mut acc = MapAccumulator::default();
        for minute in minutes {
            self.map.lock().merge_minute_into(minute, &mut acc);
        }
        acc.finish()
    }

    pub fn service_map(&self, window: Duration) -> ServiceMap {
        self.service_map_at(window, now_unix_nanos())
    }

    pub fn occupancy(&self) -> Occupancy {
        let (traces, spans, bytes) = {
            let t = self.traces.lock();
            (t.len(), t.spans, t.bytes)
        };
        let map_edges = self.map.lock().edge_entries();
        Occupancy {
            traces,
            spans,
            bytes,
            map_edges,
        }
    }
}

/// A merged trace and which of its spans are new, built before taking the table lock.
struct Built {
    trace: StoredTrace,
    new: Vec<bool>,
}

#[derive(Default)]
struct Committed {
    released: Vec<Arc<StoredTrace>>,
    /// The trace put in and which of its spans are new (for the service map).
    added: Option<(Arc<StoredTrace>, Vec<bool>)>,
}

impl TraceSink for Store {
    fn on_trace(&self, trace: &Arc<CompletedTrace>) {
        self.insert_at(trace, now_unix_nanos());
    }
}

#[cfg(test)]
mod tests;
