//! The stitch path end to end, in process: synthetic collectors' batches (3-hop chains
//! through Service DNAT, every hop crossing nodes, random TCP seqs) → `pipeline::spawn`
//! with the static inventory → OTLP/gRPC and OTLP/HTTP into a real OTLP receiver (the
//! `opentelemetry-proto` TraceService over tonic / HTTP on 127.0.0.1). The checks read
//! what the receiver got, never the stitcher's state.
//!
//! Ground truth: every exchange's path is `/hop<i>/<request>`.

mod stitch_common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use stitch_common::{Got, by_trace, grpc_receiver, http_receiver};
use tokio::sync::mpsc;
use weft_proto::v1;
use weft_stitcher::export::otlp::{OtlpConfig, OtlpExporter, OtlpProtocol};
use weft_stitcher::metrics::Registry;
use weft_stitcher::model::{ObservedBatch, TraceSink};
use weft_stitcher::pipeline::{self, PipelineConfig, synth};
use weft_stitcher::resolve::directory::CacheConfig;
use weft_stitcher::resolve::inventory::StaticInventory;

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// (hop, request) from the synthetic path `/hop<i>/<r>`.
trait HopRequest {
    fn hop_request(&self) -> (usize, usize);
}

impl HopRequest for Got {
    fn hop_request(&self) -> (usize, usize) {
        let mut it = self.path().trim_start_matches("/hop").split('/');
        let hop = it.next().unwrap().parse().unwrap();
        let r = it.next().unwrap().parse().unwrap();
        (hop, r)
    }
}

fn config() -> PipelineConfig {
    PipelineConfig {
        join_window: Duration::from_millis(150),
        link_wait: Duration::from_millis(60),
        link_max_wait: Duration::from_millis(250),
        trace_idle: Duration::from_millis(400),
        tick: Duration::from_millis(10),
        ..PipelineConfig::default()
    }
}

struct Run {
    spans: Vec<Got>,
    metrics: Registry,
}

/// Feeds `batches` through the pipeline into a receiver; waits until `expect_spans`
/// arrived (plus one idle window more, so a duplicate export would show).
async fn stitch(
    spec: &synth::ChainSpec,
    batches: Vec<ObservedBatch>,
    expect_spans: usize,
    protocol: OtlpProtocol,
) -> Run {
    let metrics = Registry::new();
    let resolver = StaticInventory::from_yaml(
        &synth::inventory_yaml(spec),
        CacheConfig::default(),
        &metrics,
    )
    .unwrap();
    let (endpoint, received) = match protocol {
        OtlpProtocol::Grpc => grpc_receiver().await,
        OtlpProtocol::HttpProtobuf => http_receiver().await,
    };
    let mut otlp = OtlpConfig::new(endpoint);
    otlp.protocol = protocol;
    let exporter: Arc<dyn TraceSink> = OtlpExporter::spawn(otlp, &metrics).unwrap();
    let (tx, rx) = mpsc::channel(16);
    let cfg = config();
    let idle = cfg.trace_idle;
    let handle = pipeline::spawn(cfg, resolver, metrics.clone(), rx, vec![exporter]);
    for b in batches {
        tx.send(b).await.unwrap();
    }
    // The windows close by themselves: nothing is flushed by stopping.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < expect_spans && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(idle * 2).await;
    assert_eq!(
        received.len(),
        expect_spans,
        "spans received before stopping; metrics: {:?}",
        metrics.snapshot()
    );
    drop(tx);
    handle.stopped().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spans = received.0.lock().clone();
    Run { spans, metrics }
}

/// The acceptance shape of one chain trace: 2·hops spans, SERVER under its CLIENT,
/// inner CLIENT under the enclosing SERVER, names right.
fn check_chain_trace(spans: &[Got], hops: usize) {
    assert_eq!(spans.len(), 2 * hops, "{spans:#?}");
    let r = spans[0].hop_request().1;
    let mut client = HashMap::new();
    let mut server = HashMap::new();
    for s in spans {
        let (hop, req) = s.hop_request();
        assert_eq!(req, r, "one request per trace");
        match s.kind {
            SpanKind::Client => assert!(client.insert(hop, s).is_none()),
            SpanKind::Server => assert!(server.insert(hop, s).is_none()),
            k => panic!("unexpected kind {k:?}"),
        }
    }
    assert_eq!(client.len(), hops);
    assert_eq!(server.len(), hops);
    for hop in 0..hops {
        let (c, s) = (client[&hop], server[&hop]);
        assert_eq!(s.parent, c.span_id, "SERVER under its CLIENT");
        assert_eq!(s.link(), "join");
        assert_eq!(s.attrs["weft.joined"], "true");
        assert_eq!(s.service, format!("svc{hop}"));
        if hop == 0 {
            assert_eq!(c.parent, "", "the first call is the root");
            assert_eq!(c.service, "caller");
        } else {
            assert_eq!(
                c.parent,
                server[&(hop - 1)].span_id,
                "CLIENT under the enclosing SERVER"
            );
            assert_eq!(c.service, format!("svc{}", hop - 1));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_chains_become_one_trace_each_over_otlp_grpc() {
    let spec = synth::ChainSpec {
        requests: 500,
        ..Default::default()
    };
    let batches = synth::generate(&spec, now_nanos());
    let run = stitch(&spec, batches, 500 * 6, OtlpProtocol::Grpc).await;
    let ids: HashSet<_> = run.spans.iter().map(|s| s.span_id.clone()).collect();
    assert_eq!(ids.len(), run.spans.len(), "no span exported twice");
    let traces = by_trace(&run.spans);
    assert_eq!(traces.len(), 500);
    for spans in traces.values() {
        check_chain_trace(spans, 3);
        let inner: Vec<_> = spans
            .iter()
            .filter(|s| s.kind == SpanKind::Client && s.hop_request().0 > 0)
            .collect();
        assert!(inner.iter().all(|s| s.link() == "timing"));
    }
    let m = run.metrics.snapshot();
    assert_eq!(m["join.matched"], 1500);
    assert_eq!(m["assemble.traces"], 500);
    assert_eq!(m["export.otlp.spans"], 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagated_traceparent_links_exactly_under_concurrency_and_keeps_trace_ids() {
    let spec = synth::ChainSpec {
        requests: 2000,
        concurrency: 32,
        callers: 32,
        propagate: true,
        ..Default::default()
    };
    let batches = synth::generate(&spec, now_nanos());
    // The application's trace id of each request, from what the load sent.
    let mut app_trace: HashMap<usize, String> = HashMap::new();
    for b in &batches {
        for e in &b.exchanges {
            if e.path.starts_with("/hop0/") {
                let r: usize = e.path["/hop0/".len()..].parse().unwrap();
                app_trace.insert(r, e.traceparent[3..35].to_string());
            }
        }
    }
    let run = stitch(&spec, batches, 2000 * 6, OtlpProtocol::Grpc).await;
    let traces = by_trace(&run.spans);
    assert_eq!(traces.len(), 2000);
    for (trace_id, spans) in &traces {
        check_chain_trace(spans, 3);
        let r = spans[0].hop_request().1;
        assert_eq!(
            trace_id, &app_trace[&r],
            "the application's trace id is kept"
        );
        for s in spans
            .iter()
            .filter(|s| s.kind == SpanKind::Client && s.hop_request().0 > 0)
        {
            assert_eq!(s.link(), "traceparent");
        }
    }
}

/// Link outcomes of inner CLIENT spans: (correct, total, timing, timing correct, ambiguous).
fn link_shares(spans: &[Got]) -> (usize, usize, usize, usize, usize) {
    let by_id: HashMap<&str, &Got> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let (mut correct, mut total, mut timing, mut timing_ok, mut ambiguous) = (0, 0, 0, 0, 0);
    for s in spans {
        let (hop, r) = s.hop_request();
        if s.kind != SpanKind::Client || hop == 0 {
            continue;
        }
        total += 1;
        let ok = by_id
            .get(s.parent.as_str())
            .is_some_and(|p| p.kind == SpanKind::Server && p.hop_request() == (hop - 1, r));
        correct += usize::from(ok);
        match s.link() {
            "timing" => {
                timing += 1;
                timing_ok += usize::from(ok);
            }
            "ambiguous" => ambiguous += 1,
            _ => {}
        }
    }
    (correct, total, timing, timing_ok, ambiguous)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing_links_without_propagation_are_right_or_marked_ambiguous() {
    // Concurrency 1: every link is the only containing span, and right.
    let spec = synth::ChainSpec {
        requests: 300,
        ..Default::default()
    };
    let run = stitch(
        &spec,
        synth::generate(&spec, now_nanos()),
        300 * 6,
        OtlpProtocol::Grpc,
    )
    .await;
    let (correct, total, timing, timing_ok, ambiguous) = link_shares(&run.spans);
    assert_eq!(
        (correct, total, timing, timing_ok, ambiguous),
        (600, 600, 600, 600, 0)
    );

    // Concurrency 8 on single-pod services: containment is often ambiguous. Whatever
    // is marked `timing` must be right; doubt must be marked.
    let spec = synth::ChainSpec {
        requests: 400,
        concurrency: 8,
        callers: 8,
        ..Default::default()
    };
    let run = stitch(
        &spec,
        synth::generate(&spec, now_nanos()),
        400 * 6,
        OtlpProtocol::Grpc,
    )
    .await;
    let (correct, total, timing, timing_ok, ambiguous) = link_shares(&run.spans);
    println!(
        "concurrency 8: {correct}/{total} links correct ({:.1}%), {ambiguous} ambiguous ({:.1}%), \
         {timing_ok}/{timing} timing links right",
        100.0 * correct as f64 / total as f64,
        100.0 * ambiguous as f64 / total as f64,
    );
    assert_eq!(total, 800);
    assert!(
        ambiguous > 0,
        "overlapping requests must produce marked doubt"
    );
    assert!(
        timing_ok * 100 >= timing * 99,
        "{timing_ok}/{timing} timing links right"
    );
    assert_eq!(correct + (total - correct), total);
    let m = run.metrics.snapshot();
    assert_eq!(m["link.ambiguous"] as usize, ambiguous);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_caller_still_yields_its_server_span_named_by_ip_over_otlp_http() {
    let spec = synth::ChainSpec {
        requests: 20,
        ..Default::default()
    };
    let mut batches = synth::generate(&spec, now_nanos());
    // A caller outside the inventory (and outside the cluster: no client half) calls svc0,
    // after the chains (overlapping them it would be a second candidate parent).
    let t = batches
        .iter()
        .flat_map(|b| b.exchanges.iter().map(|e| e.end_unix_nanos))
        .max()
        .unwrap()
        + 10_000_000;
    batches.push(ObservedBatch {
        node: Arc::from("node-b"),
        instance: Arc::from("node-b-extra"),
        seq: 1,
        exchanges: vec![v1::Exchange {
            id: 1,
            side: v1::Side::Server as i32,
            client: Some(v1::Endpoint {
                ip: vec![192, 168, 77, 7],
                port: 50_000,
            }),
            server: Some(v1::Endpoint {
                ip: synth::pod_ip(0).to_vec(),
                port: 8080,
            }),
            request_seq: 1,
            response_seq: 2,
            start_unix_nanos: t,
            end_unix_nanos: t + 1_000_000,
            method: "POST".into(),
            path: "/hop0/999999".into(),
            status: 503,
            ..Default::default()
        }],
        connections: Vec::new(),
    });
    let run = stitch(&spec, batches, 20 * 6 + 1, OtlpProtocol::HttpProtobuf).await;
    let lone: Vec<_> = run
        .spans
        .iter()
        .filter(|s| s.path() == "/hop0/999999")
        .collect();
    assert_eq!(lone.len(), 1);
    let s = lone[0];
    assert_eq!(s.kind, SpanKind::Server);
    assert_eq!(s.parent, "");
    assert_eq!(s.service, "svc0");
    assert_eq!(s.attrs["client.address"], "192.168.77.7");
    assert_eq!(s.attrs["weft.joined"], "false");
    let m = run.metrics.snapshot();
    assert_eq!(m["join.unmatched.client"], 1);
    assert_eq!(m["join.unmatched.server"], 0);
    for spans in by_trace(&run.spans).values().filter(|t| t.len() > 1) {
        check_chain_trace(spans, 3);
    }
}
