//! query: the store → `weft.v1.Query` over gRPC (for grpcurl and tools).
//!
//! In: gRPC requests (`ListTraces`, `GetTrace`, `ServiceMap`, `ListCollectors`, `Stats`).
//! Out: views of the [`Store`], the collectors' status ([`CollectorSource`]) and the
//! counter [`Registry`], converted to `weft.v1` messages (hex ids, names as
//! `workload.namespace`).
//!
//! Every call reads in-memory state; none waits on ingest (see [`crate::store`] for how
//! the locks are held). Bad arguments are `INVALID_ARGUMENT`, unknown trace ids
//! `NOT_FOUND`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use weft_proto::v1::{self, query_server::QueryServer};

use crate::metrics::{Counter, Registry};
use crate::model::{SpanRecord, TraceId};
use crate::resolve::Identity;
use crate::store::{ServiceMap, Store, StoredTrace, TraceFilter};

/// ListTraces limit when the request gives none.
pub const DEFAULT_LIMIT: u32 = 20;
/// Most traces one ListTraces returns.
pub const MAX_LIMIT: u32 = 1000;
/// ServiceMap window when the request gives none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);

/// Where ListCollectors gets the collectors' status (implemented by ingest).
pub trait CollectorSource: Send + Sync {
    fn list(&self) -> Vec<v1::CollectorStatus>;
}

impl CollectorSource for crate::ingest::Collectors {
    fn list(&self) -> Vec<v1::CollectorStatus> {
        crate::ingest::Collectors::list(self)
    }
}

impl<F> CollectorSource for F
where
    F: Fn() -> Vec<v1::CollectorStatus> + Send + Sync,
{
    fn list(&self) -> Vec<v1::CollectorStatus> {
        self()
    }
}

/// The `weft.v1.Query` service.
pub struct QueryService {
    store: Arc<Store>,
    collectors: Arc<dyn CollectorSource>,
    registry: Registry,
    calls: Counter,
    invalid: Counter,
}

impl QueryService {
    /// The service, ready to add to a tonic server (next to ingest, reflection, health).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(
        store: Arc<Store>,
        collectors: Arc<dyn CollectorSource>,
        registry: Registry,
    ) -> QueryServer<QueryService> {
        QueryServer::new(QueryService {
            calls: registry.counter("query.calls", "Query API calls"),
            invalid: registry.counter(
                "query.invalid_argument",
                "Query API calls rejected for a bad argument",
            ),
            store,
            collectors,
            registry,
        })
    }

    fn invalid(&self, msg: String) -> Status {
        self.invalid.inc();
        Status::invalid_argument(msg)
    }
}

#[tonic::async_trait]
impl v1::query_server::Query for QueryService {
    async fn list_traces(
        &self,
        request: Request<v1::ListTracesRequest>,
    ) -> Result<Response<v1::ListTracesResponse>, Status> {
        self.calls.inc();
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            n if n <= MAX_LIMIT => n,
            n => return Err(self.invalid(format!("limit {n} is above {MAX_LIMIT}"))),
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let filter = TraceFilter {
            service: non_empty(req.service),
            namespace: non_empty(req.namespace),
            min_duration_nanos: req.min_duration_nanos,
            error_only: req.error_only,
            start_after_unix_nanos: req.start_after_unix_nanos,
            start_before_unix_nanos: req.start_before_unix_nanos,
        };
        let traces = self
            .store
            .list(&filter, limit as usize)
            .iter()
            .map(|t| summary_to_proto(t))
            .collect();
        Ok(Response::new(v1::ListTracesResponse { traces }))
    }

    async fn get_trace(
        &self,
        request: Request<v1::GetTraceRequest>,
    ) -> Result<Response<v1::GetTraceResponse>, Status> {
        self.calls.inc();
        let raw = request.into_inner().trace_id;
        let id = parse_trace_id(&raw).map_err(|m| self.invalid(m))?;
        let trace = self.store.get(&id).ok_or_else(|| {
            Status::not_found(format!("trace {} is not in the store", id.to_hex()))
        })?;
        Ok(Response::new(v1::GetTraceResponse {
            trace_id: trace.trace_id.to_hex(),
            spans: trace.spans().map(span_to_proto).collect(),
        }))
    }

    async fn service_map(
        &self,
        request: Request<v1::ServiceMapRequest>,
    ) -> Result<Response<v1::ServiceMapResponse>, Status> {
        self.calls.inc();
        let window = match request.into_inner().window_seconds {
            0 => DEFAULT_WINDOW,
            s => Duration::from_secs(s),
        };
        Ok(Response::new(map_to_proto(self.store.service_map(window))))
    }

    async fn list_collectors(
        &self,
        _request: Request<v1::ListCollectorsRequest>,
    ) -> Result<Response<v1::ListCollectorsResponse>, Status> {
        self.calls.inc();
        let mut collectors = self.collectors.list();
        collectors
            .sort_by(|a, b| (&a.node_name, &a.instance_id).cmp(&(&b.node_name, &b.instance_id)));
        Ok(Response::new(v1::ListCollectorsResponse { collectors }))
    }

    async fn stats(
        &self,
        _request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        self.calls.inc();
        // Occupancy read now, so the gauges are current even between inserts.
        let occupancy = self.store.occupancy();
        let mut counters: std::collections::HashMap<String, u64> =
            self.registry.snapshot().into_iter().collect();
        counters.insert("store.traces".into(), occupancy.traces as u64);
        counters.insert("store.spans".into(), occupancy.spans as u64);
        counters.insert("store.bytes".into(), occupancy.bytes as u64);
        counters.insert("store.map.edges".into(), occupancy.map_edges as u64);
        Ok(Response::new(v1::StatsResponse { counters }))
    }
}

/// A trace id from its 32 hex digits (not all zero).
pub fn parse_trace_id(raw: &str) -> Result<TraceId, String> {
    let s = raw.trim();
    if s.len() != 32 {
        return Err(format!(
            "trace_id {raw:?}: expected 32 hex digits, got {} characters",
            s.len()
        ));
    }
    TraceId::from_hex(s)
        .ok_or_else(|| format!("trace_id {raw:?}: expected 32 hex digits, not all zero"))
}

pub fn summary_to_proto(t: &StoredTrace) -> v1::TraceSummary {
    let s = &t.summary;
    v1::TraceSummary {
        trace_id: t.trace_id.to_hex(),
        root_name: s.root_name.clone(),
        root_service: s.root_service.to_string(),
        start_unix_nanos: s.start_unix_nanos,
        duration_nanos: s.duration_nanos,
        span_count: s.span_count,
        services: s.services.iter().map(|n| n.to_string()).collect(),
        error: s.error,
    }
}

pub fn peer_to_proto(id: &Identity) -> v1::Peer {
    let meta = id.meta.as_deref();
    v1::Peer {
        kind: id.kind.as_str().to_string(),
        address: id.addr.to_string(),
        namespace: meta.map(|m| m.namespace.clone()).unwrap_or_default(),
        workload: meta.map_or_else(|| id.addr.ip().to_string(), |m| m.workload.clone()),
        pod: meta.and_then(|m| m.pod.clone()).unwrap_or_default(),
        node: meta.and_then(|m| m.node.clone()).unwrap_or_default(),
    }
}

/// A stored span as `weft.v1.Span`: hex ids, both peers, and the attributes an OTLP
/// exporter would attach (semantic-convention names where one exists).
pub fn span_to_proto(s: &SpanRecord) -> v1::Span {
    let attributes = [
        ("http.request.method", s.method.clone()),
        ("url.path", s.path.clone()),
        ("http.response.status_code", s.status.to_string()),
        ("http.request.body.size", s.request_bytes.to_string()),
        ("http.response.body.size", s.response_bytes.to_string()),
        ("client.address", s.client.addr.ip().to_string()),
        ("client.port", s.client.addr.port().to_string()),
        ("server.address", s.server.addr.ip().to_string()),
        ("server.port", s.server.addr.port().to_string()),
        ("weft.link", s.link.as_str().to_string()),
        ("weft.joined", s.joined.to_string()),
        ("weft.node", s.node.to_string()),
        ("weft.collector.instance", s.source.0.to_string()),
        ("weft.exchange.id", s.source.1.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    v1::Span {
        trace_id: s.trace_id.to_hex(),
        span_id: s.span_id.to_hex(),
        parent_span_id: s.parent.map(|p| p.to_hex()).unwrap_or_default(),
        name: s.name.clone(),
        side: s.side as i32,
        start_unix_nanos: s.start_unix_nanos,
        end_unix_nanos: s.end_unix_nanos,
        method: s.method.clone(),
        path: s.path.clone(),
        status: s.status,
        error: s.error,
        client: Some(peer_to_proto(&s.client)),
        server: Some(peer_to_proto(&s.server)),
        link: s.link.as_str().to_string(),
        joined: s.joined,
        node: s.node.to_string(),
        attributes,
    }
}

pub fn map_to_proto(map: ServiceMap) -> v1::ServiceMapResponse {
    v1::ServiceMapResponse {
        nodes: map
            .nodes
            .into_iter()
            .map(|n| v1::ServiceMapNode {
                kind: n.kind.as_str().to_string(),
                id: n.id,
                namespace: n.namespace,
                name: n.name,
            })
            .collect(),
        edges: map
            .edges
            .into_iter()
            .map(|e| v1::ServiceMapEdge {
                client: e.client,
                server: e.server,
                requests: e.requests,
                errors: e.errors,
                latency_p50_nanos: e.p50_nanos,
                latency_p90_nanos: e.p90_nanos,
                latency_p99_nanos: e.p99_nanos,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_are_validated() {
        let id = TraceId([0xab; 16]);
        assert_eq!(parse_trace_id(&id.to_hex()), Ok(id));
        assert_eq!(parse_trace_id(&id.to_hex().to_uppercase()), Ok(id));
        for bad in ["", "abc", &"0".repeat(32), &"g".repeat(32), &"a".repeat(33)] {
            assert!(parse_trace_id(bad).is_err(), "{bad:?}");
        }
    }
}
