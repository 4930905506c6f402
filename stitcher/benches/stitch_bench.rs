//! Throughput and pending-state memory of the full stitch path.
//!
//! ```text
//! cargo bench -p weft-stitcher --bench stitch_bench -- [--requests 150000] [--concurrency 64]
//!     [--callers 64] [--propagate] [--batch 256] [--sink otlp|none]
//!     [--store|--store-inline|--store-alone]
//! ```
//!
//! What it drives: synthetic collectors' `EventBatch`es for 3-hop chains (caller →
//! svc0 → svc1 → svc2 through ClusterIP DNAT, every hop crossing nodes, random TCP
//! seqs; 6 exchanges per request), pre-encoded as protobuf. Timed: ingest's decode
//! (`EventBatch` bytes → `ObservedBatch`), resolve (static inventory), join, link,
//! assemble on one thread (as `pipeline::spawn` runs them), and export: completed traces
//! go through a bounded queue to a second thread that encodes OTLP
//! `ExportTraceServiceRequest`s (4096 spans each, the exporter's own encoder) and discards
//! the bytes (a null OTLP sink). Each turn's completed traces go over as one batch, as
//! `pipeline::deliver` hands them to the sinks. With `--store`, every completed trace is
//! also inserted into the Query API's [`Store`] (default configuration) through its
//! [`StoreWriter`], as the binary does: the stitch thread pays the hand-off, the
//! `weft-store` thread the insertion (its CPU is reported too), and the heap figures
//! include the traces the store holds. `--store-inline` inserts on the stitch thread
//! instead (as the binary did before the writer thread), for comparison.
//! `--store-alone` times the store by itself: the stitched traces are kept (not encoded),
//! then inserted one by one into a fresh [`Store`] on the main thread, whose CPU time per
//! exchange is printed (`callgrind --toggle-collect='*insert_all*'` selects just that).
//! The stages' clock is the data's own time, so windows hold what they would hold at the
//! data's rate (the generated load runs at about `concurrency / 1.9 ms` requests per second).
//!
//! Prints: exchanges/s (wall clock: on a shared machine this is what the other load left),
//! the CPU time per exchange of the stitch thread and of the export thread (from
//! `/proc/thread-self/schedstat`) and the rate they sustain with a core each, the store
//! thread's (the process's CPU time in 10 ms ticks less the other two), spans exported, the peak of pending state (halves waiting to
//! join, calls waiting to link, spans in open traces) with its estimated bytes per pending
//! exchange and the heap held then (counted by the allocator), what the pending bounds
//! evicted, and the process's peak RSS.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::Instant;

use prost::Message;
use weft_proto::v1;
use weft_stitcher::export::wire::WireEncoder;
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::{CompletedTrace, ObservedBatch, TraceSink};
use weft_stitcher::pipeline::{PipelineConfig, Stitcher, synth};
use weft_stitcher::resolve::directory::CacheConfig;
use weft_stitcher::resolve::inventory::StaticInventory;
use weft_stitcher::store::{Store, StoreConfig, StoreWriter};

#[path = "support/cpu.rs"]
mod cpu;
use cpu::{process_cpu_nanos, thread_cpu_nanos};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

/// Counts the heap the process holds (bytes asked for and live allocations), so the
/// memory of pending state is measured, not estimated: RSS cannot show it here (the
/// generated input's freed memory is reused).
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to mimalloc (the binary's allocator) unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the allocator's.
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { MiMalloc.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap held: bytes asked for plus the allocator's overhead, taken as 16 bytes per live
/// allocation (mimalloc has no chunk header but rounds up to its size classes; glibc's
/// header and rounding came to about the same).
fn heap_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed) + 16 * LIVE_ALLOCS.load(Ordering::Relaxed)
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let spec = synth::ChainSpec {
        requests: arg(&args, "--requests", 150_000),
        concurrency: arg(&args, "--concurrency", 64),
        callers: arg(&args, "--callers", 64),
        propagate: args.iter().any(|a| a == "--propagate"),
        batch: arg(&args, "--batch", 256),
        ..Default::default()
    };
    // `--sink none` drops completed traces unencoded (to see the stitch thread alone).
    let encode = !args.windows(2).any(|w| w[0] == "--sink" && w[1] == "none");
    // `--store-inline`: the stitch thread inserts into the store itself (as before the
    // store had its writer thread), for comparison.
    let store_inline = args.iter().any(|a| a == "--store-inline");
    let with_store = store_inline || args.iter().any(|a| a == "--store");
    let store_alone = args.iter().any(|a| a == "--store-alone");
    let encode = encode && !store_alone;
    let t0 = 1_795_341_600_000_000_000;

    // Collectors' wire batches, generated and encoded before the clock starts.
    let encoded: Vec<Vec<u8>> = synth::generate(&spec, t0)
        .into_iter()
        .map(|b| {
            v1::EventBatch {
                node_name: b.node.to_string(),
                instance_id: b.instance.to_string(),
                seq: b.seq,
                exchanges: b.exchanges,
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    let exchanges = spec.requests * spec.hops * 2;
    let wire_bytes: usize = encoded.iter().map(Vec::len).sum();

    let metrics = Registry::new();
    let resolver = StaticInventory::from_yaml(
        &synth::inventory_yaml(&spec),
        CacheConfig::default(),
        &metrics,
    )?;
    let mut stitcher = Stitcher::new(&PipelineConfig::default(), resolver, &metrics);
    let process_cpu0 = process_cpu_nanos();
    let store = with_store
        .then(|| {
            let store = Arc::new(Store::new(StoreConfig::default(), &metrics));
            StoreWriter::spawn(store.clone(), StoreWriter::DEFAULT_QUEUE_SPANS, &metrics)
                .map(|(writer, thread)| (store, writer, thread))
        })
        .transpose()?;

    // The null OTLP sink on the second core.
    let (tx, rx) = sync_channel::<Vec<Arc<CompletedTrace>>>(64);
    let sink = std::thread::spawn(move || {
        let cpu0 = thread_cpu_nanos();
        let (mut spans, mut bytes, mut batch, mut in_batch) = (0usize, 0usize, Vec::new(), 0);
        let (mut encoder, mut buf) = (WireEncoder::default(), Vec::new());
        let mut kept = Vec::new();
        for t in rx.into_iter().flatten() {
            if store_alone {
                spans += t.spans.len();
                kept.push(t);
                continue;
            }
            if !encode {
                spans += t.spans.len();
                continue;
            }
            in_batch += t.spans.len();
            batch.push(t);
            if in_batch >= 4096 {
                encoder.encode(&batch, &mut buf);
                bytes += buf.len();
                spans += in_batch;
                batch.clear();
                in_batch = 0;
            }
        }
        if !batch.is_empty() {
            encoder.encode(&batch, &mut buf);
            bytes += buf.len();
            spans += in_batch;
        }
        (spans, bytes, thread_cpu_nanos() - cpu0, kept)
    });

    let started = Instant::now();
    let cpu0 = thread_cpu_nanos();
    let heap0 = heap_bytes();
    let writer: Option<&dyn TraceSink> = match &store {
        Some((store, _, _)) if store_inline => Some(&**store),
        Some((_, writer, _)) => Some(&**writer),
        None => None,
    };
    let (peak_pending, peak_bytes, peak_heap) =
        stitch_all(&mut stitcher, &encoded, t0, writer, &tx)?;
    let stitch_cpu = thread_cpu_nanos() - cpu0;
    drop(tx);
    let (spans, otlp_bytes, export_cpu, kept) = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))?;
    let stored = match store {
        Some((store, writer, thread)) => {
            // The writer thread stops once its queue is inserted.
            drop(writer);
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("store thread panicked"))?;
            Some(store.occupancy())
        }
        None => None,
    };
    let elapsed = started.elapsed().as_secs_f64();
    let store_cpu = process_cpu_nanos()
        .saturating_sub(process_cpu0)
        .saturating_sub(stitch_cpu + export_cpu);

    let alone = store_alone.then(|| insert_all(&kept));
    drop(kept);

    let m = metrics.snapshot();
    println!(
        "stitch_bench: {} requests × {} hops, concurrency {}, callers {}, propagate {}, store {}",
        spec.requests,
        spec.hops,
        spec.concurrency,
        spec.callers,
        spec.propagate,
        match (with_store, store_inline) {
            (false, _) => "no",
            (true, false) => "writer thread",
            (true, true) => "inline on the stitch thread",
        }
    );
    println!(
        "  exchanges         {exchanges} ({:.1} MB on the wire)",
        wire_bytes as f64 / 1e6
    );
    println!("  elapsed           {elapsed:.3} s");
    println!(
        "  throughput        {:.0} exchanges/s (ingest decode → resolve → join → link → assemble → OTLP encode)",
        exchanges as f64 / elapsed
    );
    let per = |cpu: u64| cpu as f64 / exchanges as f64;
    println!(
        "  CPU per exchange  stitch thread {:.2} µs, export thread {:.2} µs → {:.0} exchanges/s when each has a core to itself",
        per(stitch_cpu) / 1e3,
        per(export_cpu) / 1e3,
        1e9 / per(stitch_cpu.max(export_cpu)),
    );
    if let Some(o) = stored {
        println!(
            "  store             thread ≈ {:.2} µs CPU per exchange (process CPU less the two above); holds {} traces, {} spans; dropped {}",
            per(store_cpu) / 1e3,
            o.traces,
            o.spans,
            m.get("store.dropped").copied().unwrap_or(0),
        );
    }
    if let Some((cpu, o)) = alone {
        println!(
            "  store alone       {:.3} µs CPU per exchange inserting every trace into a fresh store on one thread; holds {} traces, {} spans, {} map edges",
            per(cpu) / 1e3,
            o.traces,
            o.spans,
            o.map_edges,
        );
    }
    println!(
        "  exported          {spans} spans, {:.1} MB OTLP; traces {}, joined {}, links: traceparent {} timing {} ambiguous {} root {}",
        otlp_bytes as f64 / 1e6,
        m.get("assemble.traces").copied().unwrap_or(0),
        m.get("join.matched").copied().unwrap_or(0),
        m.get("link.traceparent").copied().unwrap_or(0),
        m.get("link.timing").copied().unwrap_or(0),
        m.get("link.ambiguous").copied().unwrap_or(0),
        m.get("link.root").copied().unwrap_or(0),
    );
    println!(
        "  pending state     peak {peak_pending} exchanges, {:.1} MB ≈ {} bytes per pending exchange",
        peak_bytes as f64 / 1e6,
        peak_bytes / peak_pending.max(1)
    );
    let grown = peak_heap.saturating_sub(heap0);
    println!(
        "  heap growth       {:.1} MB at that peak ≈ {} bytes per pending exchange (measured; includes the late-span index and traces queued for export)",
        grown as f64 / 1e6,
        grown / peak_pending.max(1)
    );
    println!(
        "  bounds evicted    join {} link {} assemble {} late index {}",
        m.get("join.evicted").copied().unwrap_or(0),
        m.get("link.evicted").copied().unwrap_or(0),
        m.get("assemble.evicted").copied().unwrap_or(0),
        m.get("assemble.late_index_evicted").copied().unwrap_or(0),
    );
    println!(
        "  late-span index   {:.1} MB at the end (exported ids kept for the late grace)",
        stitcher.remembered_bytes() as f64 / 1e6
    );
    println!(
        "  peak RSS          {:.1} MB (includes the pre-encoded input)",
        peak_rss_kib() as f64 / 1024.0
    );
    anyhow::ensure!(spans == exchanges, "every exchange exported as one span");
    Ok(())
}

/// The timed part on the stitch thread: decode, stitch, hand completed traces to the
/// sink. Returns the peak of pending exchanges, their estimated bytes and the process's
/// heap then. Its own function so that a profiler can select it (`callgrind
/// --toggle-collect='*stitch_all*'`).
#[inline(never)]
fn stitch_all(
    stitcher: &mut Stitcher,
    encoded: &[Vec<u8>],
    t0: u64,
    store: Option<&dyn TraceSink>,
    tx: &SyncSender<Vec<Arc<CompletedTrace>>>,
) -> anyhow::Result<(usize, usize, usize)> {
    let mut out = Vec::new();
    let (mut peak_pending, mut peak_bytes, mut peak_heap) = (0usize, 0usize, 0usize);
    let mut node: Arc<str> = Arc::from("");
    let mut instance: Arc<str> = Arc::from("");
    for (i, bytes) in encoded.iter().enumerate() {
        // ingest: decode and hand over.
        let b = v1::EventBatch::decode(bytes.as_slice())?;
        if *node != *b.node_name {
            node = Arc::from(b.node_name.as_str());
        }
        if *instance != *b.instance_id {
            instance = Arc::from(b.instance_id.as_str());
        }
        let now = b
            .exchanges
            .last()
            .map_or(0, |e| e.end_unix_nanos.saturating_sub(t0));
        stitcher.push_batch(
            ObservedBatch {
                node: node.clone(),
                instance: instance.clone(),
                seq: b.seq,
                exchanges: b.exchanges,
                connections: b.connections,
            },
            now,
            &mut out,
        );
        stitcher.tick(now, &mut out);
        deliver(&mut out, store, tx)?;
        if i % 1024 == 0 {
            let pending = stitcher.pending_exchanges();
            if pending > peak_pending {
                peak_pending = pending;
                peak_bytes = stitcher.pending_bytes();
                peak_heap = heap_bytes();
            }
        }
    }
    stitcher.flush(u64::MAX / 2, &mut out);
    deliver(&mut out, store, tx)?;
    Ok((peak_pending, peak_bytes, peak_heap))
}

/// `--store-alone`: inserts every trace into a fresh store (default configuration) on
/// this thread; returns the thread's CPU time for it and what the store holds then.
#[inline(never)]
fn insert_all(traces: &[Arc<CompletedTrace>]) -> (u64, weft_stitcher::store::Occupancy) {
    let store = Store::new(StoreConfig::default(), &Registry::new());
    // The traces' own time, so the service map keeps them (its retention is an hour).
    let now = traces
        .iter()
        .flat_map(|t| t.spans.iter().map(|s| s.end_unix_nanos))
        .max()
        .unwrap_or(0);
    let cpu0 = thread_cpu_nanos();
    for t in traces {
        store.insert_at(t, now);
    }
    let cpu = thread_cpu_nanos() - cpu0;
    (cpu, store.occupancy())
}

/// As `pipeline::deliver`: the turn's traces go to the store's writer as one batch, and
/// to the OTLP stand-in as one batch.
fn deliver(
    out: &mut Vec<CompletedTrace>,
    store: Option<&dyn TraceSink>,
    tx: &SyncSender<Vec<Arc<CompletedTrace>>>,
) -> anyhow::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let traces: Vec<Arc<CompletedTrace>> = out.drain(..).map(Arc::new).collect();
    if let Some(store) = store {
        store.on_traces(&traces);
    }
    // Blocks when the sink falls behind: the figure is end-to-end throughput.
    tx.send(traces)?;
    Ok(())
}
