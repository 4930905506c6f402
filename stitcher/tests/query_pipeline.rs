//! The Query API over what the real stitch pipeline produced: synthetic collectors'
//! batches (3-hop chains through Service DNAT, every hop crossing nodes) → resolve
//! (static inventory) → join → link → assemble → the store, asked with the real grpcurl.
//! Expectations come from the generated exchanges (ground truth), not from the store.

mod query_common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_proto::v1;
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::TraceSink;
use weft_stitcher::pipeline::{self, PipelineConfig, synth};
use weft_stitcher::resolve::directory::CacheConfig;
use weft_stitcher::resolve::inventory::StaticInventory;
use weft_stitcher::store::{Store, StoreConfig, TraceFilter};

use query_common::grpc::*;
use query_common::*;

/// Nearest-rank percentile of unsorted values.
fn nearest_rank(values: &mut [u64], q: f64) -> u64 {
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[test]
fn grpcurl_answers_match_the_traffic_through_the_pipeline() {
    const REQUESTS: usize = 200;
    let spec = synth::ChainSpec {
        requests: REQUESTS,
        // Sequential requests: timing links are unambiguous, so every trace is exactly
        // one request (overlapping ones are the link stage's tests' business).
        concurrency: 1,
        callers: 4,
        ..Default::default()
    };
    let batches = synth::generate(&spec, now_unix_nanos() - 30 * SEC);

    // Ground truth: CLIENT-side durations per hop, and the requests' paths.
    let mut client_latency: HashMap<usize, Vec<u64>> = HashMap::new();
    for ex in batches.iter().flat_map(|b| &b.exchanges) {
        if ex.side == v1::Side::Client as i32 {
            let hop: usize = ex.path[4..5].parse().expect("path /hop<i>/<r>");
            client_latency
                .entry(hop)
                .or_default()
                .push(ex.end_unix_nanos - ex.start_unix_nanos);
        }
    }
    assert_eq!(client_latency.len(), 3);

    let registry = Registry::new();
    let store = Arc::new(Store::new(StoreConfig::default(), &registry));
    let resolver = StaticInventory::from_yaml(
        &synth::inventory_yaml(&spec),
        CacheConfig::default(),
        &registry,
    )
    .expect("inventory");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let cfg = PipelineConfig::default().with_trace_idle(Duration::from_millis(500));
    let sink: Arc<dyn TraceSink> = store.clone();
    let handle = pipeline::spawn(cfg, resolver, registry.clone(), rx, vec![sink]);
    rt.block_on(async {
        for b in batches {
            tx.send(b).await.expect("pipeline running");
        }
    });
    // The windows close by themselves; wait (bounded) until every trace is stored.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.occupancy().spans < REQUESTS * 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        store.occupancy().spans,
        REQUESTS * 6,
        "spans stored; counters: {:?}",
        registry.snapshot()
    );
    // Nothing else should arrive: the pipeline is idle.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(store.occupancy().traces, REQUESTS);

    let server = Server::start(store.clone(), vec![], registry.clone());
    let addr = server.addr;
    let calls = AtomicU64::new(0);

    // One trace per request, 6 spans each, rooted at the caller.
    let list = call(
        addr,
        &calls,
        "weft.v1.Query/ListTraces",
        r#"{"limit": 1000}"#,
    );
    let traces = list["traces"].as_array().expect("traces");
    assert_eq!(traces.len(), REQUESTS);
    for t in traces {
        assert_eq!(t["spanCount"], 6, "{t}");
        assert_eq!(t["rootService"], "caller.demo");
        assert_eq!(
            t["rootName"].as_str().map(|n| n.starts_with("GET /hop0/")),
            Some(true)
        );
        assert_eq!(
            strings(&t["services"]),
            vec!["caller.demo", "svc0.demo", "svc1.demo", "svc2.demo"]
        );
        assert_eq!(t["error"], false);
    }
    let starts: Vec<u64> = traces.iter().map(|t| num(&t["startUnixNanos"])).collect();
    assert!(starts.windows(2).all(|w| w[0] >= w[1]), "newest first");
    let by_leaf = call(
        addr,
        &calls,
        "weft.v1.Query/ListTraces",
        r#"{"service": "svc2", "limit": 1000}"#,
    );
    assert_eq!(by_leaf["traces"].as_array().map(Vec::len), Some(REQUESTS));

    // GetTrace: the chain's shape, from the ids the pipeline gave.
    let id = traces[0]["traceId"].as_str().expect("id");
    let got = call(
        addr,
        &calls,
        "weft.v1.Query/GetTrace",
        &format!(r#"{{"trace_id": "{id}"}}"#),
    );
    let spans = got["spans"].as_array().expect("spans");
    assert_eq!(spans.len(), 6);
    let by_id: HashMap<&str, &Value> = spans
        .iter()
        .map(|s| (s["spanId"].as_str().unwrap(), s))
        .collect();
    let roots: Vec<&&Value> = by_id.values().filter(|s| s["parentSpanId"] == "").collect();
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0]["side"], "SIDE_CLIENT");
    let request = roots[0]["path"].as_str().unwrap()["/hop0/".len()..].to_string();
    for s in spans {
        assert_eq!(s["traceId"], id);
        let hop = &s["path"].as_str().unwrap()[..5];
        assert_eq!(
            s["path"],
            format!("{hop}/{request}"),
            "one request per trace"
        );
        let parent = s["parentSpanId"].as_str().unwrap();
        if s["side"] == "SIDE_SERVER" {
            // Under its CLIENT half, the same request.
            assert_eq!(s["link"], "join");
            assert_eq!(by_id[parent]["side"], "SIDE_CLIENT");
            assert_eq!(by_id[parent]["path"], s["path"]);
            assert_eq!(s["joined"], true);
            assert_eq!(s["server"]["kind"], "pod");
        } else if !parent.is_empty() {
            // A call made while serving the previous hop.
            assert_eq!(s["link"], "timing");
            assert_eq!(by_id[parent]["side"], "SIDE_SERVER");
            assert_eq!(s["server"]["kind"], "service");
        }
    }

    // ServiceMap: each hop is one edge from the caller's workload to the workload that
    // served it (not the Service), every request counted once, latency as clients saw it.
    let map = call(addr, &calls, "weft.v1.Query/ServiceMap", "{}");
    let edges = map["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 3, "{map}");
    for (hop, (client, server)) in [
        ("caller.demo", "svc0.demo"),
        ("svc0.demo", "svc1.demo"),
        ("svc1.demo", "svc2.demo"),
    ]
    .into_iter()
    .enumerate()
    {
        let e = edges
            .iter()
            .find(|e| e["client"] == client && e["server"] == server)
            .unwrap_or_else(|| panic!("no edge {client} -> {server}: {map}"));
        assert_eq!(num(&e["requests"]), REQUESTS as u64);
        assert_eq!(num(&e["errors"]), 0);
        let truth = client_latency.get_mut(&hop).unwrap();
        for (field, q) in [
            ("latencyP50Nanos", 0.5),
            ("latencyP90Nanos", 0.9),
            ("latencyP99Nanos", 0.99),
        ] {
            let (got, want) = (num(&e[field]), nearest_rank(truth, q));
            assert!(
                got.abs_diff(want) * 16 <= want,
                "{client}->{server} {field}: {got} vs {want}"
            );
        }
    }
    let kinds: Vec<&str> = map["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["workload"; 4]);

    // Stats: the pipeline's counters and the store's, from one registry.
    let stats = call(addr, &calls, "weft.v1.Query/Stats", "{}");
    let c = &stats["counters"];
    assert_eq!(num(&c["store.traces"]), REQUESTS as u64);
    assert_eq!(num(&c["store.spans"]), REQUESTS as u64 * 6);
    assert_eq!(num(&c["store.late_merged"]), 0);
    assert_eq!(
        store.list(&TraceFilter::default(), 1000).len(),
        REQUESTS,
        "the store agrees with the API"
    );

    drop(server);
    drop(tx);
    rt.block_on(handle.stopped());
}
