//! pipeline: the stitch path chained on one thread.
//!
//! In: [`ObservedBatch`]es from ingest (a bounded tokio mpsc). Out: [`CompletedTrace`]s,
//! shared with every [`TraceSink`] (OTLP exporter, printer, store).
//!
//! ```text
//! ObservedBatch ─resolve→ Half ─join→ Call ─link→ LinkedCall ─assemble→ CompletedTrace ─→ sinks
//!                           └──(SERVER halves, at once)→ link's candidate index
//! ```
//!
//! One thread owns all pending state ([`Stitcher`]): no locks on the hot path, and the
//! stages see every event in one order. A periodic tick (`tick`, default 50 ms) drives
//! the windows (join, link wait, trace idle). Every time in the stages is the stitcher's
//! monotonic clock; event timestamps only serve matching (join proximity, link
//! containment), so collectors' batching delays never reorder decisions.
//!
//! Wiring (main): `pipeline::spawn(PipelineConfig::default().with_trace_idle(idle),
//! resolver, registry, batches_rx, export::sinks(otlp, print, &registry)? + the store)`;
//! dropping every sender of the channel stops it after it delivered everything pending
//! ([`PipelineHandle::stopped`]).
//!
//! Every window counts from the moment a half reached the stitch path ([`Half::arrived`],
//! the stitcher clock when its batch is taken in), not from when it reached a stage: the
//! join window, the link wait (from the CLIENT half's arrival) and the trace's idle window
//! (from its latest span's arrival) run at the same time, so a trace is exported
//! `trace_idle` (plus at most a tick) after its last span came in, however long link held
//! a call. The arrival is taken on the stitch thread rather than in ingest: under a
//! backlog in the channel the windows then still see the spans that were sent with them.
//!
//! The windows nest on purpose: `link_wait` ≤ `link_max_wait` < `trace_idle` and
//! `join_window` < `trace_idle`, so a call is linked by max(`join_window`,
//! `link_max_wait`) after its halves arrived (plus a tick), before the trace its spans
//! belong to (idle from their arrival at the earliest) can complete. A lone half is
//! emitted after `join_window` and, waited long enough by then, linked on the same tick.
//! A call that still comes later (its node's queue held behind a call waiting for
//! progress) joins the exported trace id as a late trace within `late_grace`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weft_proto::v1;

use crate::assemble::{AssembleConfig, Assembler};
use crate::export::LogOnce;
use crate::join::{Call, JoinConfig, Joiner};
use crate::link::{LinkConfig, LinkedCall, Linker};
use crate::metrics::{Counter, Registry};
use crate::model::{
    CompletedTrace, FastMap, Half, ObservedBatch, Rare, Source, SpanId, TraceParent, TraceSink,
};
use crate::resolve::{Resolve, endpoint_addr};

pub mod synth;

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// How long a half waits for its other half.
    pub join_window: Duration,
    /// Clock difference tolerated between nodes when confirming a join.
    pub max_clock_skew: Duration,
    /// Least time a call waits for the server span that caused it.
    pub link_wait: Duration,
    /// Most time a call waits for its node's collector to report past it.
    pub link_max_wait: Duration,
    /// How far past a call's end its node must have reported before it is linked.
    pub link_progress_slack: Duration,
    /// How long a server span stays a candidate parent.
    pub link_retention: Duration,
    /// A trace is complete after this long without new spans (`--trace-idle`).
    pub trace_idle: Duration,
    /// How long an exported trace accepts late spans under its id.
    pub late_grace: Duration,
    pub max_pending_halves: usize,
    pub max_pending_calls: usize,
    pub max_link_candidates: usize,
    pub max_pending_spans: usize,
    pub max_remembered_spans: usize,
    /// Period of the clock that drives the windows.
    pub tick: Duration,
}

impl Default for PipelineConfig {
    /// Windows as documented on the fields; bounds from [`DEFAULT_PENDING_MEMORY`].
    fn default() -> Self {
        PipelineConfig {
            join_window: Duration::from_secs(1),
            max_clock_skew: Duration::from_millis(250),
            link_wait: Duration::from_millis(200),
            link_max_wait: Duration::from_millis(1500),
            link_progress_slack: Duration::from_millis(250),
            link_retention: Duration::from_secs(5),
            trace_idle: Duration::from_secs(2),
            late_grace: Duration::from_secs(10),
            max_pending_halves: 0,
            max_pending_calls: 0,
            max_link_candidates: 0,
            max_pending_spans: 0,
            max_remembered_spans: 0,
            tick: Duration::from_millis(50),
        }
        .with_memory_budget(DEFAULT_PENDING_MEMORY)
    }
}

/// Most collector instances whose [`Source`] is kept for reuse.
const MAX_SOURCES: usize = 4096;

/// Default budget of pending stitch state (`--max-pending-memory`): 1 GiB, enough for
/// about 300,000 exchanges/s with the default windows without pushing anything on early.
/// Open traces hold `trace_idle` (2 s) plus the link wait of spans, ~2.2 s of the rate;
/// at 576 B per exchange in a 50 % share that is ~340 MiB of budget per 100,000
/// exchanges/s (256 MiB evicted 0.4 % of calls and completed a third of the traces early
/// at 300k/s, issue #5).
pub const DEFAULT_PENDING_MEMORY: u64 = 1 << 30;

/// Bytes one pending exchange costs, all in: the `Half` (216 B), its box, its share of
/// the index entries (join key / span id → group), allocator overhead and a typical path.
/// Measured by `stitch_bench` (allocator-counted heap at the peak of pending state, 3-hop
/// chains, no propagation): ~580 B per pending exchange including the late-span index
/// and the traces queued for export; the stitcher's own `pipeline.pending_bytes`
/// estimate (structures only) says ~390 B.
const BYTES_PER_PENDING_EXCHANGE: u64 = 576;
/// Bytes of one link candidate (server span in the time index and the by-trace index).
const BYTES_PER_LINK_CANDIDATE: u64 = 160;
/// Bytes of one remembered exported span id (hash entry + order queue entry + slack).
const BYTES_PER_REMEMBERED_SPAN: u64 = 80;

impl PipelineConfig {
    /// Sizes every pending bound from one memory budget, so that the worst case of all
    /// pending stitch state together stays near `bytes`. Shares follow where exchanges
    /// wait in steady state (every window counts from arrival): open traces hold
    /// `trace_idle` worth of spans; calls wait in link up to `link_max_wait` when their
    /// node's collector lags; the join holds only halves whose partner is late or absent.
    /// Open traces' spans 50 %, calls waiting for their parent 20 %, halves waiting for
    /// their other half 10 %, link candidates 10 %, the late-arrival index 10 %. What a
    /// bound pushes out is counted: `join.evicted`, `link.evicted`,
    /// `link.candidates_evicted`, `assemble.evicted`, `assemble.late_index_evicted`.
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        let share = |percent: u64, per_entry: u64| -> usize {
            let n = bytes / 100 * percent / per_entry;
            usize::try_from(n).unwrap_or(usize::MAX).max(1)
        };
        self.max_pending_spans = share(50, BYTES_PER_PENDING_EXCHANGE);
        // A call holds up to two halves.
        self.max_pending_calls = share(20, 2 * BYTES_PER_PENDING_EXCHANGE);
        self.max_pending_halves = share(10, BYTES_PER_PENDING_EXCHANGE);
        self.max_link_candidates = share(10, BYTES_PER_LINK_CANDIDATE);
        self.max_remembered_spans = share(10, BYTES_PER_REMEMBERED_SPAN);
        self
    }

    /// Sets `trace_idle` and shrinks the inner windows to fit under it.
    pub fn with_trace_idle(mut self, idle: Duration) -> Self {
        self.trace_idle = idle;
        self.join_window = self.join_window.min(idle / 2);
        self.link_wait = self.link_wait.min(idle / 8);
        self.link_max_wait = self.link_max_wait.min(idle * 3 / 4);
        self
    }

    fn nanos(d: Duration) -> u64 {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }

    fn join(&self) -> JoinConfig {
        JoinConfig {
            window_nanos: Self::nanos(self.join_window),
            max_skew_nanos: Self::nanos(self.max_clock_skew),
            max_pending: self.max_pending_halves,
        }
    }

    fn link(&self) -> LinkConfig {
        LinkConfig {
            wait_nanos: Self::nanos(self.link_wait),
            max_wait_nanos: Self::nanos(self.link_max_wait.max(self.link_wait)),
            progress_slack_nanos: Self::nanos(self.link_progress_slack),
            retention_nanos: Self::nanos(self.link_retention.max(self.link_wait * 2)),
            max_pending: self.max_pending_calls,
            max_candidates: self.max_link_candidates,
        }
    }

    fn assemble(&self) -> AssembleConfig {
        AssembleConfig {
            idle_nanos: Self::nanos(self.trace_idle),
            late_grace_nanos: Self::nanos(self.late_grace),
            max_pending_spans: self.max_pending_spans,
            max_remembered_spans: self.max_remembered_spans,
        }
    }
}

struct Counters {
    batches: Counter,
    exchanges: Counter,
    invalid: Counter,
    bad_traceparent: Counter,
    pending_halves: Counter,
    pending_calls: Counter,
    link_candidates: Counter,
    remembered_spans: Counter,
    pending_bytes: Counter,
    pending_bytes_exchanges: Counter,
}

/// All pending state of the stitch path, driven by an explicit monotonic clock (nanos).
pub struct Stitcher {
    resolver: Arc<dyn Resolve>,
    joiner: Joiner,
    linker: Linker,
    assembler: Assembler,
    /// Method names are few: one shared string each.
    methods: FastMap<Box<str>, Arc<str>>,
    /// Collectors by instance (bounded by [`MAX_SOURCES`]: emptied when full).
    sources: FastMap<Arc<str>, Arc<Source>>,
    calls: Vec<Call>,
    linked: Vec<LinkedCall>,
    counters: Counters,
    log_invalid: LogOnce,
}

impl Stitcher {
    pub fn new(cfg: &PipelineConfig, resolver: Arc<dyn Resolve>, metrics: &Registry) -> Self {
        let c = |name: &str, help| metrics.counter(name, help);
        Stitcher {
            resolver,
            joiner: Joiner::new(cfg.join(), metrics),
            linker: Linker::new(cfg.link(), metrics),
            assembler: Assembler::new(cfg.assemble(), metrics),
            methods: FastMap::default(),
            sources: FastMap::default(),
            calls: Vec::new(),
            linked: Vec::new(),
            counters: Counters {
                batches: c("pipeline.batches", "batches taken into the stitch path"),
                exchanges: c("pipeline.exchanges", "exchanges taken into the stitch path"),
                invalid: c(
                    "pipeline.invalid_exchanges",
                    "exchanges dropped: malformed endpoint or side",
                ),
                bad_traceparent: c(
                    "pipeline.bad_traceparent",
                    "exchanges whose traceparent was malformed (ignored; the exchange is kept)",
                ),
                pending_halves: c(
                    "pipeline.pending_halves",
                    "halves waiting to be joined (gauge)",
                ),
                pending_calls: c(
                    "pipeline.pending_calls",
                    "calls waiting to be linked (gauge)",
                ),
                link_candidates: c(
                    "pipeline.link_candidates",
                    "server spans kept as candidate parents for linking (gauge)",
                ),
                remembered_spans: c(
                    "pipeline.remembered_spans",
                    "exported span ids kept for late arrivals (gauge)",
                ),
                pending_bytes: c(
                    "pipeline.pending_bytes",
                    "approximate bytes of pending stitch state (gauge)",
                ),
                pending_bytes_exchanges: c(
                    "pipeline.pending_bytes_exchanges",
                    "exchanges held in pending state when pipeline.pending_bytes was taken (gauge)",
                ),
            },
            log_invalid: LogOnce::default(),
        }
    }

    /// Takes one batch at stitcher time `now`; completed traces (bounds) go to `out`.
    pub fn push_batch(&mut self, batch: ObservedBatch, now: u64, out: &mut Vec<CompletedTrace>) {
        self.counters.batches.inc();
        self.counters.exchanges.add(batch.exchanges.len() as u64);
        let ObservedBatch {
            node,
            instance,
            exchanges,
            ..
        } = batch;
        let source = self.source(node, instance);
        let mut reported_to = None;
        for ex in exchanges {
            match self.resolve(&source, ex, now) {
                Ok(half) => {
                    reported_to = reported_to.max(Some(half.end_unix_nanos));
                    if half.side == v1::Side::Server {
                        self.linker.observe_server(&half, now);
                    }
                    self.joiner.push(Box::new(half), now, &mut self.calls);
                }
                Err(reason) => {
                    self.counters.invalid.inc();
                    self.log_invalid
                        .warn("dropping malformed exchanges", reason);
                }
            }
        }
        if let Some(end) = reported_to {
            self.linker.note_node_progress(&source.node, end);
        }
        self.advance(now, out);
    }

    /// The batch's collector as one shared value, reused while batches keep coming from
    /// the same collector instance (halves point at it instead of holding two strings).
    fn source(&mut self, node: Arc<str>, instance: Arc<str>) -> Arc<Source> {
        if let Some(s) = self.sources.get(&*instance)
            && s.node == node
        {
            return s.clone();
        }
        if self.sources.len() >= MAX_SOURCES {
            self.sources.clear();
        }
        let s = Source::new(node, instance.clone());
        self.sources.insert(instance, s.clone());
        s
    }

    /// Moves the windows to `now`.
    pub fn tick(&mut self, now: u64, out: &mut Vec<CompletedTrace>) {
        self.joiner.expire(now, &mut self.calls);
        self.advance(now, out);
        self.linker.tick(now, &mut self.linked);
        self.drain_linked(now, out);
        self.assembler.tick(now, out);
        self.counters
            .pending_halves
            .set(self.joiner.pending() as u64);
        self.counters
            .pending_calls
            .set(self.linker.pending() as u64);
        self.counters
            .link_candidates
            .set(self.linker.candidates() as u64);
        self.counters
            .remembered_spans
            .set(self.assembler.remembered_spans() as u64);
    }

    /// Completes everything pending (shutdown).
    pub fn flush(&mut self, now: u64, out: &mut Vec<CompletedTrace>) {
        self.joiner.flush(&mut self.calls);
        self.advance(now, out);
        self.linker.flush(&mut self.linked);
        self.drain_linked(now, out);
        self.assembler.flush(now, out);
    }

    fn advance(&mut self, now: u64, out: &mut Vec<CompletedTrace>) {
        for call in self.calls.drain(..) {
            self.linker.push(call, &mut self.linked);
        }
        self.drain_linked(now, out);
    }

    fn drain_linked(&mut self, now: u64, out: &mut Vec<CompletedTrace>) {
        for lc in self.linked.drain(..) {
            self.assembler.push(lc, now, out);
        }
    }

    /// Halves, calls and spans pending, in that order.
    pub fn pending(&self) -> (usize, usize, usize) {
        (
            self.joiner.pending(),
            self.linker.pending(),
            self.assembler.pending_spans(),
        )
    }

    /// Exchanges held in pending state (halves waiting to join, in calls waiting to
    /// link, and spans of open traces). O(n) in waiting calls: for figures.
    pub fn pending_exchanges(&self) -> usize {
        self.joiner.pending() + self.linker.pending_halves() + self.assembler.pending_spans()
    }

    /// Approximate bytes of pending state: halves, calls, open traces and link
    /// candidates (not the late-arrival index, see [`Stitcher::remembered_bytes`]).
    /// Sets the `pipeline.pending_bytes` gauge and, with it, the exchanges they hold
    /// (`pipeline.pending_bytes_exchanges`), so that bytes per exchange is one moment's.
    pub fn pending_bytes(&self) -> usize {
        let b = self.joiner.pending_bytes()
            + self.linker.pending_bytes()
            + self.assembler.pending_bytes();
        self.counters.pending_bytes.set(b as u64);
        self.counters
            .pending_bytes_exchanges
            .set(self.pending_exchanges() as u64);
        b
    }

    /// Bytes of the index of exported span ids kept for late arrivals.
    pub fn remembered_bytes(&self) -> usize {
        self.assembler.remembered_bytes()
    }

    /// resolve: one wire exchange → a [`Half`], both ends named as of its start time.
    fn resolve(
        &mut self,
        source: &Arc<Source>,
        ex: v1::Exchange,
        now: u64,
    ) -> Result<Half, &'static str> {
        let side = v1::Side::try_from(ex.side).map_err(|_| "unknown side")?;
        if side == v1::Side::Unspecified {
            return Err("unspecified side");
        }
        let client = endpoint_addr(ex.client.as_ref()).ok_or("malformed client endpoint")?;
        let server = endpoint_addr(ex.server.as_ref()).ok_or("malformed server endpoint")?;
        let start = ex.start_unix_nanos;
        let traceparent = if ex.traceparent.is_empty() {
            None
        } else {
            let tp = TraceParent::parse(&ex.traceparent);
            if tp.is_none() {
                self.counters.bad_traceparent.inc();
            }
            tp
        };
        let span_id = match (side, traceparent) {
            // The header on a request names the span that sent it: the CLIENT span.
            (v1::Side::Client, Some(tp)) => tp.parent_id,
            _ => SpanId::random(),
        };
        let method = match self.methods.get(ex.method.as_str()) {
            Some(m) => m.clone(),
            None if self.methods.len() < 64 => {
                let m: Arc<str> = Arc::from(ex.method.as_str());
                self.methods
                    .insert(Box::from(ex.method.as_str()), m.clone());
                m
            }
            None => Arc::from(ex.method.as_str()),
        };
        Ok(Half {
            span_id,
            side,
            source: source.clone(),
            exchange_id: ex.id,
            arrived: now,
            client: self.resolver.resolve(client, start),
            server: self.resolver.resolve(server, start),
            request_seq: ex.request_seq,
            response_seq: ex.response_seq,
            start_unix_nanos: start,
            end_unix_nanos: ex.end_unix_nanos.max(start),
            method,
            path: ex.path.into_boxed_str(),
            status: u16::try_from(ex.status).map_err(|_| "status out of range")?,
            request_bytes: ex.request_bytes,
            response_bytes: ex.response_bytes,
            rare: Rare::boxed(traceparent, ex.pid, ex.tid),
        })
    }
}

/// The running pipeline. Dropping every sender of its channel stops it: it then
/// completes and delivers everything still pending.
pub struct PipelineHandle {
    done: tokio::sync::oneshot::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PipelineHandle {
    /// Waits until the pipeline has stopped and delivered everything.
    pub async fn stopped(mut self) {
        let _ = (&mut self.done).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Starts the pipeline on its own thread.
pub fn spawn(
    cfg: PipelineConfig,
    resolver: Arc<dyn Resolve>,
    metrics: Registry,
    rx: mpsc::Receiver<ObservedBatch>,
    sinks: Vec<Arc<dyn TraceSink>>,
) -> PipelineHandle {
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("weft-stitch".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt.block_on(run(cfg, resolver, metrics, rx, sinks)),
                Err(e) => tracing::error!(error = %e, "cannot start the stitch pipeline"),
            }
            let _ = done_tx.send(());
        })
        .expect("spawning the stitch thread");
    PipelineHandle {
        done,
        thread: Some(thread),
    }
}

async fn run(
    cfg: PipelineConfig,
    resolver: Arc<dyn Resolve>,
    metrics: Registry,
    mut rx: mpsc::Receiver<ObservedBatch>,
    sinks: Vec<Arc<dyn TraceSink>>,
) {
    let mut stitcher = Stitcher::new(&cfg, resolver, &metrics);
    let epoch = Instant::now();
    let now = || u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut ticker = tokio::time::interval(cfg.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    let mut last_gauge = Instant::now();
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    stitcher.push_batch(batch, now(), &mut out);
                    // Take what else is queued before going back to the clock, but only
                    // up to a tick's worth: under sustained load the channel is never
                    // empty, and a loop that drains it to the end starves the clock, so
                    // nothing is ever joined late, linked or completed and all pending
                    // state grows until the bounds (measured: 0 traces, 0.9 GB in 20 s).
                    let mut taken = 1;
                    while taken < MAX_BATCHES_PER_TURN && out.len() <= 1024 && last_tick.elapsed() < cfg.tick {
                        let Ok(batch) = rx.try_recv() else { break };
                        stitcher.push_batch(batch, now(), &mut out);
                        taken += 1;
                    }
                }
                None => break,
            },
            _ = ticker.tick() => {}
        }
        // The clock runs whichever branch won: `select!` may pick a ready batch over a
        // due tick many times in a row.
        if last_tick.elapsed() >= cfg.tick {
            last_tick = Instant::now();
            stitcher.tick(now(), &mut out);
            if last_gauge.elapsed() > Duration::from_secs(1) {
                stitcher.pending_bytes();
                last_gauge = Instant::now();
            }
        }
        deliver(&mut out, &sinks);
    }
    stitcher.flush(now(), &mut out);
    deliver(&mut out, &sinks);
}

/// Batches taken from the channel in one turn before the clock is looked at again.
const MAX_BATCHES_PER_TURN: usize = 16;

/// Hands this turn's completed traces to every sink as one batch: sinks with a queue
/// wake their worker once per turn, not once per trace.
fn deliver(out: &mut Vec<CompletedTrace>, sinks: &[Arc<dyn TraceSink>]) {
    if out.is_empty() {
        return;
    }
    let traces: Vec<Arc<CompletedTrace>> = out.drain(..).map(Arc::new).collect();
    for sink in sinks {
        sink.on_traces(&traces);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::directory::CacheConfig;
    use crate::resolve::inventory::StaticInventory;

    const MS: u64 = 1_000_000;

    /// The default windows: join 1 s, link 200 ms..1.5 s, idle 2 s, tick 50 ms.
    /// One request through the default chain, one exchange per batch.
    fn one_chain() -> synth::ChainSpec {
        synth::ChainSpec {
            requests: 1,
            batch: 1,
            ..Default::default()
        }
    }

    fn stitcher(spec: &synth::ChainSpec, reg: &Registry) -> Stitcher {
        let inv =
            StaticInventory::from_yaml(&synth::inventory_yaml(spec), CacheConfig::default(), reg)
                .unwrap();
        Stitcher::new(&PipelineConfig::default(), inv, reg)
    }

    #[test]
    fn halves_of_one_collector_share_one_source_and_spans_keep_its_names() {
        let spec = one_chain();
        let reg = Registry::new();
        let mut s = stitcher(&spec, &reg);
        let a = s.source(Arc::from("node-a"), Arc::from("i-1"));
        let again = s.source(Arc::from("node-a"), Arc::from("i-1"));
        assert!(Arc::ptr_eq(&a, &again), "one Source per collector instance");
        // A restarted collector (new instance) and another node are sources of their own.
        let restarted = s.source(Arc::from("node-a"), Arc::from("i-2"));
        assert!(!Arc::ptr_eq(&a, &restarted));
        let moved = s.source(Arc::from("node-b"), Arc::from("i-1"));
        assert_eq!((&*moved.node, &*moved.instance), ("node-b", "i-1"));
        // Spans carry the node and instance of the batch that observed them.
        let (_, trace, _) = one_request(0);
        let batches = synth::generate(&spec, 1_700_000_000_000_000_000);
        for span in &trace.spans {
            assert!(
                batches
                    .iter()
                    .any(|b| b.node == span.node && b.instance == span.source.0),
                "{:?} / {:?}",
                span.node,
                span.source
            );
        }
    }

    /// One 3-hop request, every batch of it taken in at stitcher time `at`; then the
    /// clock ticks every 50 ms from `at` on. Returns when (stitcher time) its trace was
    /// completed, and the trace.
    fn one_request(at: u64) -> (u64, CompletedTrace, Registry) {
        let spec = one_chain();
        let reg = Registry::new();
        let mut s = stitcher(&spec, &reg);
        let mut out = Vec::new();
        for b in synth::generate(&spec, 1_700_000_000_000_000_000) {
            s.push_batch(b, at, &mut out);
        }
        assert!(out.is_empty());
        let mut t = at;
        while out.is_empty() && t < at + 10_000 * MS {
            t += 50 * MS;
            s.tick(t, &mut out);
        }
        assert_eq!(out.len(), 1, "one trace");
        (t, out.pop().unwrap(), reg)
    }

    #[test]
    fn a_trace_completes_one_idle_window_after_its_last_span_arrived_not_after_link() {
        // The collectors report nothing after this request: every call waits in link
        // for its node's progress until link_max_wait (1.5 s). Counted from link's
        // decision, the trace would complete after 1.5 + 2 s; counted from the spans'
        // arrival, after 2 s (and at most one 50 ms tick and a 1 ms bucket later).
        let at = 5_000 * MS;
        let (done, trace, reg) = one_request(at);
        assert_eq!(trace.spans.len(), 6);
        assert!(!trace.late);
        let idle = PipelineConfig::default().trace_idle.as_nanos() as u64;
        assert!(done >= at + idle, "not before the idle window: {done}");
        assert!(
            done <= at + idle + 50 * MS,
            "completed {} ms after the last arrival",
            (done - at) / MS
        );
        let m = reg.snapshot();
        assert_eq!(m["join.matched"], 3);
        assert_eq!(m["link.timing"], 2, "both inner calls linked");
        assert_eq!(m["assemble.traces"], 1);
        assert_eq!(m["assemble.late_traces"], 0);
    }

    #[test]
    fn a_join_that_found_both_halves_goes_on_to_link_at_once() {
        let spec = synth::ChainSpec {
            requests: 1,
            hops: 1,
            batch: 1,
            ..Default::default()
        };
        let reg = Registry::new();
        let mut s = stitcher(&spec, &reg);
        let mut out = Vec::new();
        let batches = synth::generate(&spec, 1_700_000_000_000_000_000);
        assert_eq!(batches.len(), 2);
        for b in batches {
            s.push_batch(b, 7 * MS, &mut out);
        }
        // Same instant: nothing waits for the join window, the call waits in link.
        assert_eq!(s.pending(), (0, 1, 0));
        assert_eq!(reg.snapshot()["join.matched"], 1);
    }

    #[test]
    fn spans_arriving_later_keep_the_trace_open_from_their_own_arrival() {
        // The leaf's SERVER half comes 500 ms after the rest (its node's collector was
        // slow): the join holds the leaf call's client half until then, link decides it
        // at its max wait from the client half's arrival (1.5 s), and the trace is idle
        // 2 s after the last arrival (2.5 s), one trace.
        let spec = one_chain();
        let reg = Registry::new();
        let mut s = stitcher(&spec, &reg);
        let mut out = Vec::new();
        let (leaf, rest): (Vec<_>, Vec<_>) = synth::generate(&spec, 1_700_000_000_000_000_000)
            .into_iter()
            .partition(|b| {
                b.exchanges
                    .iter()
                    .all(|e| e.path.starts_with("/hop2/") && e.side == v1::Side::Server as i32)
            });
        assert_eq!(leaf.len(), 1);
        for b in rest {
            s.push_batch(b, 0, &mut out);
        }
        let mut t = 0;
        while t < 500 * MS {
            t += 50 * MS;
            s.tick(t, &mut out);
        }
        for b in leaf {
            s.push_batch(b, t, &mut out);
        }
        let last = t;
        while out.is_empty() && t < 10_000 * MS {
            t += 50 * MS;
            s.tick(t, &mut out);
        }
        assert_eq!(out.len(), 1, "one trace, not split");
        assert_eq!(out[0].spans.len(), 6);
        assert!(t >= last + 2_000 * MS && t <= last + 2_050 * MS, "{t}");
        assert_eq!(reg.snapshot()["join.matched"], 3);
    }
}
