//! Synthetic completed traces for the Query API tests and the query benchmark.
#![allow(dead_code)]

pub mod grpc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use weft_proto::v1::Side;
use weft_stitcher::model::{CompletedTrace, LinkKind, SpanId, SpanRecord, TraceId};
use weft_stitcher::resolve::{Identity, PeerKind, PeerMeta};

pub const MS: u64 = 1_000_000;
pub const SEC: u64 = 1_000_000_000;

pub fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

fn meta(ns: &str, workload: &str, kind: &str, pod: Option<&str>) -> Arc<PeerMeta> {
    Arc::new(PeerMeta {
        namespace: ns.into(),
        workload: workload.into(),
        workload_kind: kind.into(),
        pod: pod.map(Into::into),
        node: pod.map(|_| "node-a".into()),
        ..Default::default()
    })
}

pub fn pod(addr: &str, ns: &str, workload: &str) -> Identity {
    Identity {
        kind: PeerKind::Pod,
        addr: addr.parse().expect("address"),
        meta: Some(meta(
            ns,
            workload,
            "Deployment",
            Some(&format!("{workload}-0")),
        )),
    }
}

pub fn service(addr: &str, ns: &str, name: &str) -> Identity {
    Identity {
        kind: PeerKind::Service,
        addr: addr.parse().expect("address"),
        meta: Some(meta(ns, name, "Service", None)),
    }
}

pub fn external(addr: &str) -> Identity {
    Identity::external(addr.parse::<SocketAddr>().expect("address"))
}

#[allow(clippy::too_many_arguments)]
pub fn span(
    trace_id: TraceId,
    side: Side,
    parent: Option<SpanId>,
    link: LinkKind,
    (client, server): (Identity, Identity),
    (start, duration): (u64, u64),
    (name, status): (&str, u32),
    joined: bool,
) -> SpanRecord {
    let (method, path) = name.split_once(' ').unwrap_or(("GET", name));
    SpanRecord {
        trace_id,
        span_id: SpanId::random(),
        parent,
        link,
        side,
        name: name.into(),
        start_unix_nanos: start,
        end_unix_nanos: start + duration,
        method: method.into(),
        path: path.into(),
        status,
        error: status >= 500,
        client,
        server,
        joined,
        node: Arc::from(if side == Side::Client {
            "node-a"
        } else {
            "node-b"
        }),
        source: (Arc::from("instance-1"), 7),
        request_bytes: 0,
        response_bytes: 42,
    }
}

/// external caller 192.0.2.7 → frontend.demo (SERVER, unmatched root, "GET /") →
/// Service backend-svc.demo (CLIENT, joined, timing link) → backend.demo pod (SERVER
/// under its CLIENT half). Duration `backend_latency + 2 ms`.
pub fn demo_trace(start: u64, backend_latency: u64, backend_status: u32) -> CompletedTrace {
    let id = TraceId::random();
    let root = span(
        id,
        Side::Server,
        None,
        LinkKind::Root,
        (
            external("192.0.2.7:50000"),
            pod("10.244.1.9:8080", "demo", "frontend"),
        ),
        (start, backend_latency + 2 * MS),
        ("GET /", 200),
        false,
    );
    let call = span(
        id,
        Side::Client,
        Some(root.span_id),
        LinkKind::Timing,
        (
            pod("10.244.1.9:37450", "demo", "frontend"),
            service("10.96.0.20:80", "demo", "backend-svc"),
        ),
        (start + MS / 2, backend_latency),
        ("GET /api/items", backend_status),
        true,
    );
    let served = span(
        id,
        Side::Server,
        Some(call.span_id),
        LinkKind::Join,
        (
            pod("10.244.1.9:37450", "demo", "frontend"),
            pod("10.244.2.5:8080", "demo", "backend"),
        ),
        (start + MS / 2 + 100_000, backend_latency - 200_000),
        ("GET /api/items", backend_status),
        true,
    );
    CompletedTrace {
        trace_id: id,
        spans: vec![root, call, served],
        late: false,
    }
}

/// shop/cart → shop/db, a CLIENT root whose server half was not seen.
pub fn shop_trace(start: u64, latency: u64) -> CompletedTrace {
    let id = TraceId::random();
    CompletedTrace {
        trace_id: id,
        spans: vec![span(
            id,
            Side::Client,
            None,
            LinkKind::Root,
            (
                pod("10.244.3.3:40000", "shop", "cart"),
                pod("10.244.3.4:5432", "shop", "db"),
            ),
            (start, latency),
            ("POST /query", 200),
            false,
        )],
        late: false,
    }
}
