//! Store behaviour: bounds, eviction, late merges, filters, the service map.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use weft_proto::v1::Side;

use super::*;
use crate::model::{LinkKind, SpanId, SpanRecord};
use crate::resolve::{Identity, PeerKind, PeerMeta};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// A fixed "now" on a minute boundary plus 30 s.
const NOW: u64 = 1_795_000_000 * SEC + 30 * SEC;

fn meta(ns: &str, workload: &str, kind: &str) -> Arc<PeerMeta> {
    Arc::new(PeerMeta {
        namespace: ns.into(),
        workload: workload.into(),
        workload_kind: kind.into(),
        ..Default::default()
    })
}

fn pod(addr: &str, ns: &str, workload: &str) -> Identity {
    Identity {
        kind: PeerKind::Pod,
        addr: addr.parse().unwrap(),
        meta: Some(meta(ns, workload, "Deployment")),
    }
}

fn service(addr: &str, ns: &str, name: &str) -> Identity {
    Identity {
        kind: PeerKind::Service,
        addr: addr.parse().unwrap(),
        meta: Some(meta(ns, name, "Service")),
    }
}

fn external(addr: &str) -> Identity {
    Identity::external(addr.parse::<SocketAddr>().unwrap())
}

struct SpanSpec {
    side: Side,
    parent: Option<SpanId>,
    link: LinkKind,
    client: Identity,
    server: Identity,
    start: u64,
    duration: u64,
    status: u32,
    joined: bool,
}

fn span(trace_id: TraceId, spec: SpanSpec) -> SpanRecord {
    SpanRecord {
        trace_id,
        span_id: SpanId::random(),
        parent: spec.parent,
        link: spec.link,
        side: spec.side,
        name: "GET /api/items".into(),
        start_unix_nanos: spec.start,
        end_unix_nanos: spec.start + spec.duration,
        method: "GET".into(),
        path: "/api/items".into(),
        status: spec.status,
        error: spec.status >= 500,
        client: spec.client,
        server: spec.server,
        joined: spec.joined,
        node: Arc::from("node-a"),
        source: (Arc::from("instance-1"), 1),
        request_bytes: 0,
        response_bytes: 10,
    }
}

/// external caller → frontend (SERVER, unmatched root) → backend via Service
/// `backend-svc` (CLIENT, joined) → backend pod (SERVER under its CLIENT half).
fn demo_trace(start: u64, backend_latency: u64, backend_status: u32) -> CompletedTrace {
    let id = TraceId::random();
    let frontend = pod("10.244.1.9:8080", "demo", "frontend");
    let root = span(
        id,
        SpanSpec {
            side: Side::Server,
            parent: None,
            link: LinkKind::Root,
            client: external("192.0.2.7:50000"),
            server: frontend.clone(),
            start,
            duration: backend_latency + 2 * MS,
            status: 200,
            joined: false,
        },
    );
    let call = span(
        id,
        SpanSpec {
            side: Side::Client,
            parent: Some(root.span_id),
            link: LinkKind::Timing,
            client: pod("10.244.1.9:37450", "demo", "frontend"),
            server: service("10.96.0.20:80", "demo", "backend-svc"),
            start: start + MS / 2,
            duration: backend_latency,
            status: backend_status,
            joined: true,
        },
    );
    let served = span(
        id,
        SpanSpec {
            side: Side::Server,
            parent: Some(call.span_id),
            link: LinkKind::Join,
            client: pod("10.244.1.9:37450", "demo", "frontend"),
            server: pod("10.244.2.5:8080", "demo", "backend"),
            start: start + MS / 2 + 100_000,
            duration: backend_latency - 200_000,
            status: backend_status,
            joined: true,
        },
    );
    CompletedTrace {
        trace_id: id,
        spans: vec![root, call, served],
        late: false,
    }
}

fn store(max_traces: usize, max_bytes: u64) -> (Store, Registry) {
    let registry = Registry::new();
    let config = StoreConfig {
        max_traces,
        max_bytes,
        ..StoreConfig::default()
    };
    (Store::new(config, &registry), registry)
}

/// Inserts a copy of `t` as the pipeline does (shared with the other sinks).
fn insert(store: &Store, t: &CompletedTrace, now: u64) {
    store.insert_at(&Arc::new(t.clone()), now);
}

fn all(store: &Store) -> Vec<Arc<StoredTrace>> {
    store.list(&TraceFilter::default(), usize::MAX)
}

#[test]
fn count_bound_evicts_oldest_start_first() {
    let (store, registry) = store(3, 1 << 30);
    let traces: Vec<_> = (0..5)
        .map(|i| demo_trace(NOW - (10 - i) * SEC, 5 * MS, 200))
        .collect();
    // Insert the oldest-starting trace last: it is still the first to go.
    for t in traces[1..].iter().chain(&traces[..1]) {
        insert(&store, t, NOW);
    }
    let kept: Vec<TraceId> = all(&store).iter().map(|t| t.trace_id).collect();
    assert_eq!(
        kept,
        vec![traces[4].trace_id, traces[3].trace_id, traces[2].trace_id],
        "newest first, the two oldest evicted"
    );
    let snap = registry.snapshot();
    assert_eq!(snap["store.evicted"], 2);
    assert_eq!(snap["store.traces"], 3);
    assert_eq!(snap["store.spans"], 9);
    assert_eq!(snap["store.bytes"], store.occupancy().bytes as u64);
    assert!(store.get(&traces[0].trace_id).is_none());
    assert!(store.get(&traces[1].trace_id).is_none());
}

#[test]
fn byte_bound_evicts_until_under_the_limit() {
    let (probe, _) = store(100, 1 << 30);
    insert(&probe, &demo_trace(NOW, 5 * MS, 200), NOW);
    let one = probe.occupancy().bytes as u64;
    assert!(one > 3 * size_of::<SpanRecord>() as u64);

    // Room for two and a half traces of this size.
    let (store, registry) = store(100, one * 5 / 2);
    for i in 0..6 {
        insert(&store, &demo_trace(NOW + i * SEC, 5 * MS, 200), NOW);
        assert!(store.occupancy().bytes as u64 <= one * 5 / 2);
    }
    assert_eq!(store.occupancy().traces, 2);
    let snap = registry.snapshot();
    assert_eq!(snap["store.evicted"], 4);
    assert_eq!(snap["store.evicted_bytes"], 4 * one);
    assert_eq!(snap["store.bytes"], 2 * one);
}

#[test]
fn a_trace_larger_than_the_store_is_rejected_and_counted() {
    let (store, registry) = store(100, 100);
    insert(&store, &demo_trace(NOW, 5 * MS, 200), NOW);
    assert_eq!(store.occupancy().traces, 0);
    assert_eq!(registry.snapshot()["store.rejected.too_large"], 1);
    let empty = CompletedTrace {
        trace_id: TraceId::random(),
        spans: vec![],
        late: false,
    };
    insert(&store, &empty, NOW);
    assert_eq!(registry.snapshot()["store.rejected.empty"], 1);
}

#[test]
fn late_spans_merge_into_the_stored_trace() {
    let (store, registry) = store(100, 1 << 30);
    let full = demo_trace(NOW - 10 * SEC, 5 * MS, 200);
    // The trace is first completed without the backend's SERVER half...
    let early = CompletedTrace {
        spans: full.spans[..2].to_vec(),
        ..full.clone()
    };
    insert(&store, &early, NOW);
    // ... which arrives late, together with a re-send of the root (same span id) and a
    // new late span that ends later than everything else.
    let mut extra = full.spans[2].clone();
    extra.span_id = SpanId::random();
    extra.start_unix_nanos = NOW - 10 * SEC + 20 * MS;
    extra.end_unix_nanos = NOW - 10 * SEC + 40 * MS;
    extra.status = 503;
    extra.error = true;
    let late = CompletedTrace {
        trace_id: full.trace_id,
        spans: vec![full.spans[2].clone(), full.spans[0].clone(), extra],
        late: true,
    };
    insert(&store, &late, NOW);

    let stored = store.get(&full.trace_id).expect("stored");
    assert_eq!(stored.spans().len(), 4, "root not duplicated");
    assert_eq!(stored.summary.span_count, 4);
    assert_eq!(stored.summary.duration_nanos, 40 * MS);
    assert!(stored.summary.error);
    assert_eq!(&*stored.summary.root_service, "frontend.demo");
    assert_eq!(all(&store).len(), 1);
    let snap = registry.snapshot();
    assert_eq!(snap["store.late_merged"], 1);
    assert_eq!(snap["store.traces"], 1);
    assert_eq!(snap["store.spans"], 4);

    // A late trace whose earlier part is gone is kept on its own and counted.
    let orphan = CompletedTrace {
        late: true,
        ..demo_trace(NOW, MS, 200)
    };
    insert(&store, &orphan, NOW);
    assert_eq!(registry.snapshot()["store.late_unmatched"], 1);
    assert!(store.get(&orphan.trace_id).is_some());
}

#[test]
fn summary_names_root_services_and_errors() {
    let (store, _) = store(100, 1 << 30);
    let t = demo_trace(NOW, 5 * MS, 500);
    insert(&store, &t, NOW);
    let s = &store.get(&t.trace_id).unwrap().summary;
    assert_eq!(s.root_name, "GET /api/items");
    assert_eq!(&*s.root_service, "frontend.demo");
    assert_eq!(s.start_unix_nanos, NOW);
    assert_eq!(s.duration_nanos, 7 * MS);
    assert_eq!(s.span_count, 3);
    let services: Vec<&str> = s.services.iter().map(|n| &**n).collect();
    assert_eq!(services, vec!["backend.demo", "frontend.demo"]);
    assert!(s.error);
}

#[test]
fn filters_select_and_order_traces() {
    let (store, _) = store(1000, 1 << 30);
    // 10 demo traces, one per second; odd ones failed, latency grows with i.
    let demo: Vec<_> = (0..10u64)
        .map(|i| {
            demo_trace(
                NOW + i * SEC,
                (i + 1) * MS,
                if i % 2 == 1 { 500 } else { 200 },
            )
        })
        .collect();
    for t in &demo {
        insert(&store, t, NOW);
    }
    // One trace in another namespace: shop/cart → shop/db without a Service.
    let other_id = TraceId::random();
    let other = CompletedTrace {
        trace_id: other_id,
        spans: vec![span(
            other_id,
            SpanSpec {
                side: Side::Client,
                parent: None,
                link: LinkKind::Root,
                client: pod("10.244.3.3:40000", "shop", "cart"),
                server: pod("10.244.3.4:5432", "shop", "db"),
                start: NOW + 20 * SEC,
                duration: MS,
                status: 200,
                joined: false,
            },
        )],
        late: false,
    };
    insert(&store, &other, NOW);

    let ids = |f: TraceFilter, limit: usize| -> Vec<TraceId> {
        store.list(&f, limit).iter().map(|t| t.trace_id).collect()
    };
    let newest_demo: Vec<TraceId> = demo.iter().rev().map(|t| t.trace_id).collect();

    assert_eq!(ids(TraceFilter::default(), 3)[0], other_id, "newest first");
    assert_eq!(ids(TraceFilter::default(), 100).len(), 11);
    let by = |service: Option<&str>, namespace: Option<&str>| TraceFilter {
        service: service.map(Into::into),
        namespace: namespace.map(Into::into),
        ..Default::default()
    };
    assert_eq!(ids(by(Some("backend"), None), 100), newest_demo);
    assert_eq!(
        ids(by(Some("backend-svc"), None), 100),
        newest_demo,
        "the Service too"
    );
    assert_eq!(ids(by(Some("backend.demo"), None), 100), newest_demo);
    assert!(ids(by(Some("backend.shop"), None), 100).is_empty());
    assert_eq!(ids(by(Some("db"), None), 100), vec![other_id]);
    assert_eq!(ids(by(None, Some("shop")), 100), vec![other_id]);
    assert_eq!(ids(by(None, Some("demo")), 100), newest_demo);
    assert!(
        ids(by(Some("cart"), Some("demo")), 100).is_empty(),
        "same peer"
    );
    assert!(ids(by(Some("nothing"), None), 100).is_empty());

    let errors = ids(
        TraceFilter {
            error_only: true,
            ..Default::default()
        },
        100,
    );
    let want: Vec<TraceId> = demo.iter().rev().step_by(2).map(|t| t.trace_id).collect();
    assert_eq!(errors, want, "the odd ones, newest first");

    // Durations are (i + 1) ms + 2 ms: at least 10 ms means i >= 7.
    let slow = ids(
        TraceFilter {
            min_duration_nanos: 10 * MS,
            ..Default::default()
        },
        100,
    );
    assert_eq!(slow, newest_demo[..3].to_vec());

    // Inclusive time range: starts at NOW+2s ..= NOW+4s.
    let range = ids(
        TraceFilter {
            start_after_unix_nanos: NOW + 2 * SEC,
            start_before_unix_nanos: NOW + 4 * SEC,
            ..Default::default()
        },
        100,
    );
    assert_eq!(
        range,
        vec![demo[4].trace_id, demo[3].trace_id, demo[2].trace_id]
    );
    let inverted = TraceFilter {
        start_after_unix_nanos: NOW + 4 * SEC,
        start_before_unix_nanos: NOW + 2 * SEC,
        ..Default::default()
    };
    assert!(ids(inverted, 100).is_empty());
    assert_eq!(ids(by(Some("backend"), None), 4), newest_demo[..4].to_vec());
}

#[test]
fn listing_scans_across_lock_chunks() {
    let n = SCAN_CHUNK * 2 + 17;
    let (store, _) = store(10_000, 1 << 30);
    let traces: Vec<_> = (0..n as u64)
        .map(|i| demo_trace(NOW + i * MS, MS, if i % 100 == 0 { 500 } else { 200 }))
        .collect();
    for t in &traces {
        insert(&store, t, NOW);
    }
    assert_eq!(all(&store).len(), n);
    let errors: Vec<TraceId> = store
        .list(
            &TraceFilter {
                error_only: true,
                ..Default::default()
            },
            1000,
        )
        .iter()
        .map(|t| t.trace_id)
        .collect();
    let want: Vec<TraceId> = traces
        .iter()
        .enumerate()
        .rev()
        .filter(|(i, _)| i % 100 == 0)
        .map(|(_, t)| t.trace_id)
        .collect();
    assert_eq!(errors, want);
}

#[test]
fn service_map_edges_follow_the_rule() {
    let (store, _) = store(1000, 1 << 30);
    // 100 requests, backend latency 1..=100 ms; every 10th fails.
    for i in 1..=100u64 {
        let status = if i % 10 == 0 { 500 } else { 200 };
        insert(
            &store,
            &demo_trace(NOW - 60 * SEC + i * 100 * MS, i * MS, status),
            NOW,
        );
    }
    // A call that found no server half stays on the Service.
    let id = TraceId::random();
    let unjoined = CompletedTrace {
        trace_id: id,
        spans: vec![span(
            id,
            SpanSpec {
                side: Side::Client,
                parent: None,
                link: LinkKind::Root,
                client: pod("10.244.1.9:37999", "demo", "frontend"),
                server: service("10.96.0.20:80", "demo", "backend-svc"),
                start: NOW - 10 * SEC,
                duration: 3 * MS,
                status: 200,
                joined: false,
            },
        )],
        late: false,
    };
    insert(&store, &unjoined, NOW);
    // Outside a 5 minute window (10 minutes ago), inside a 15 minute one.
    insert(&store, &demo_trace(NOW - 600 * SEC, 7 * MS, 200), NOW);

    let map = store.service_map_at(Duration::from_secs(300), NOW);
    let edge = |c: &str, s: &str| {
        map.edges
            .iter()
            .find(|e| e.client == c && e.server == s)
            .unwrap_or_else(|| panic!("no edge {c} -> {s} in {:?}", map.edges))
            .clone()
    };
    assert_eq!(map.edges.len(), 3, "{:?}", map.edges);
    let backend = edge("frontend.demo", "backend.demo");
    assert_eq!((backend.requests, backend.errors), (100, 10));
    for (got, want) in [
        (backend.p50_nanos, 50 * MS),
        (backend.p90_nanos, 90 * MS),
        (backend.p99_nanos, 99 * MS),
    ] {
        assert!(got.abs_diff(want) * 16 <= want, "{got} vs {want}");
    }
    let front = edge("192.0.2.7", "frontend.demo");
    assert_eq!((front.requests, front.errors), (100, 0));
    let svc = edge("frontend.demo", "svc:backend-svc.demo");
    assert_eq!((svc.requests, svc.errors), (1, 0));
    assert_eq!((svc.p50_nanos, svc.p99_nanos), (3 * MS, 3 * MS));

    let kinds: Vec<(&str, &str)> = map
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("192.0.2.7", "external"),
            ("backend.demo", "workload"),
            ("frontend.demo", "workload"),
            ("svc:backend-svc.demo", "service"),
        ]
    );

    let wide = store.service_map_at(Duration::from_secs(900), NOW);
    let wide_backend = wide
        .edges
        .iter()
        .find(|e| e.client == "frontend.demo" && e.server == "backend.demo")
        .unwrap();
    assert_eq!(wide_backend.requests, 101);
}

#[test]
fn late_server_half_is_not_counted_twice() {
    let (store, _) = store(100, 1 << 30);
    let full = demo_trace(NOW - 5 * SEC, 5 * MS, 200);
    insert(
        &store,
        &CompletedTrace {
            spans: full.spans[..2].to_vec(),
            ..full.clone()
        },
        NOW,
    );
    insert(
        &store,
        &CompletedTrace {
            spans: vec![full.spans[2].clone()],
            late: true,
            ..full.clone()
        },
        NOW,
    );
    // Re-sending spans already stored adds nothing either.
    insert(
        &store,
        &CompletedTrace {
            late: true,
            ..full.clone()
        },
        NOW,
    );
    let map = store.service_map_at(Duration::from_secs(300), NOW);
    let total: u64 = map.edges.iter().map(|e| e.requests).sum();
    assert_eq!(total, 2, "{:?}", map.edges);
    // The client counted first, when its server half was not there: the Service.
    assert!(
        map.edges
            .iter()
            .any(|e| e.server == "svc:backend-svc.demo" && e.requests == 1)
    );
}

#[test]
fn service_map_retention_and_edge_bound_are_counted() {
    let registry = Registry::new();
    let store = Store::new(
        StoreConfig {
            map_retention: Duration::from_secs(120),
            map_max_edges: 2,
            ..StoreConfig::default()
        },
        &registry,
    );
    insert(&store, &demo_trace(NOW - 3600 * SEC, MS, 200), NOW);
    assert_eq!(registry.snapshot()["store.map.dropped.expired"], 2);
    insert(&store, &demo_trace(NOW, MS, 200), NOW);
    let id = TraceId::random();
    let third_edge = CompletedTrace {
        trace_id: id,
        spans: vec![span(
            id,
            SpanSpec {
                side: Side::Client,
                parent: None,
                link: LinkKind::Root,
                client: pod("10.244.3.3:40000", "shop", "cart"),
                server: pod("10.244.3.4:5432", "shop", "db"),
                start: NOW,
                duration: MS,
                status: 200,
                joined: false,
            },
        )],
        late: false,
    };
    insert(&store, &third_edge, NOW);
    assert_eq!(registry.snapshot()["store.map.dropped.edges_full"], 1);
    assert_eq!(
        store
            .service_map_at(Duration::from_secs(3600), NOW)
            .edges
            .len(),
        2
    );
    assert_eq!(registry.snapshot()["store.map.edges"], 2);
}

#[test]
fn byte_sizes_parse() {
    assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
    assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
    assert_eq!(parse_bytes("1gb"), Ok(1 << 30));
    assert_eq!(parse_bytes("1000"), Ok(1000));
    assert!(parse_bytes("lots").is_err());
    assert!(parse_bytes("5XB").is_err());
    assert!(parse_bytes("99999999999999GiB").is_err());
}

#[test]
fn the_writer_inserts_every_batch_on_its_own_thread() {
    let registry = Registry::new();
    let store = Arc::new(Store::new(StoreConfig::default(), &registry));
    let (writer, thread) = StoreWriter::spawn(store.clone(), 64, &registry).unwrap();
    let turns: Vec<Vec<Arc<CompletedTrace>>> = (0..3)
        .map(|turn| {
            (0..5)
                .map(|i| Arc::new(demo_trace(NOW - (turn * 5 + i) * SEC, MS, 200)))
                .collect()
        })
        .collect();
    for turn in &turns {
        writer.on_traces(turn);
    }
    drop(writer);
    thread.join().unwrap();
    let ids: HashSet<TraceId> = all(&store).iter().map(|t| t.trace_id).collect();
    let sent: HashSet<TraceId> = turns.iter().flatten().map(|t| t.trace_id).collect();
    assert_eq!(ids, sent);
    assert_eq!(registry.snapshot()["store.dropped"], 0);
}

#[test]
fn a_writer_that_falls_behind_drops_and_counts_never_blocks() {
    let registry = Registry::new();
    let store = Arc::new(Store::new(StoreConfig::default(), &registry));
    // Room for 6 spans: two 3-span traces.
    let (writer, thread) = StoreWriter::spawn(store.clone(), 6, &registry).unwrap();
    let traces: Vec<Arc<CompletedTrace>> = (0..6)
        .map(|i| Arc::new(demo_trace(NOW - i * SEC, MS, 200)))
        .collect();
    {
        // The writer thread stalls on the table lock (a long query, say): the queue of 2
        // traces fills and the rest of the turns are dropped at once.
        let _held = store.traces.lock();
        writer.on_traces(&traces[..1]);
        writer.on_traces(&traces[1..3]);
        writer.on_traces(&traces[3..]);
    }
    drop(writer);
    thread.join().unwrap();
    let dropped = registry.snapshot()["store.dropped"];
    // Stored: what the queue held (2), plus the first turn if the thread took it before
    // stalling.
    assert!((3..=4).contains(&dropped), "dropped {dropped}");
    assert_eq!(
        store.occupancy().traces as u64 + dropped,
        6,
        "each trace stored or counted"
    );
}

#[test]
fn a_large_trace_maps_as_its_small_parts_do() {
    // 8 demo requests in one trace: 24 spans, past the size where samples are found by
    // scanning; the map must count them as 8 separate traces would.
    let (store, _) = store(100, 1 << 30);
    let id = TraceId::random();
    let spans: Vec<SpanRecord> = (0..8u64)
        .flat_map(|i| demo_trace(NOW - 30 * SEC + i * SEC, (i + 1) * MS, 200).spans)
        .map(|mut s| {
            s.trace_id = id;
            s
        })
        .collect();
    assert!(spans.len() > 16);
    let big = CompletedTrace {
        trace_id: id,
        spans,
        late: false,
    };
    insert(&store, &big, NOW);
    let map = store.service_map_at(Duration::from_secs(300), NOW);
    assert_eq!(
        map.edge_counts(),
        vec![
            ("192.0.2.7", "frontend.demo", 8),
            ("frontend.demo", "backend.demo", 8)
        ]
    );
    let stored = store.get(&id).expect("stored");
    assert_eq!(stored.summary.span_count, 24);
    assert_eq!(stored.summary.start_unix_nanos, NOW - 30 * SEC);
    let starts: Vec<u64> = stored.spans().map(|s| s.start_unix_nanos).collect();
    assert!(starts.is_sorted(), "spans sorted by start");
}
