//! Shared by the stitch tests: a real OTLP receiver (the `opentelemetry-proto`
//! TraceService over tonic, or OTLP/HTTP protobuf over hyper) on 127.0.0.1, and what it got.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use parking_lot::Mutex;

/// A span as the receiver got it, with its resource's service name.
#[derive(Debug, Clone)]
pub struct Got {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent: String,
    pub kind: SpanKind,
    pub attrs: HashMap<String, String>,
}

impl Got {
    pub fn path(&self) -> &str {
        &self.attrs["url.path"]
    }
    pub fn link(&self) -> &str {
        self.attrs.get("weft.link").map_or("", |s| s.as_str())
    }
}

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

#[derive(Clone, Default)]
pub struct Received(pub Arc<Mutex<Vec<Got>>>);

impl Received {
    pub fn take(&self, req: ExportTraceServiceRequest) {
        let mut got = self.0.lock();
        for rs in req.resource_spans {
            let res = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: res.get("service.name").cloned().unwrap_or_default(),
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent: hex::encode(&s.parent_span_id),
                        kind: s.kind(),
                        attrs: attrs(&s.attributes),
                    });
                }
            }
        }
    }
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
    /// Everything received so far, emptying the receiver.
    pub fn drain(&self) -> Vec<Got> {
        std::mem::take(&mut *self.0.lock())
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on 127.0.0.1 (port 0).
pub async fn grpc_receiver() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("http://{addr}"), received)
}

/// An OTLP/HTTP (protobuf) receiver on 127.0.0.1 (port 0): POST /v1/traces.
pub async fn http_receiver() -> (String, Received) {
    use http_body_util::BodyExt;
    use prost::Message;
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let r = r.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let r = r.clone();
                        async move {
                            let ok = req.uri().path() == "/v1/traces"
                                && req.headers()["content-type"] == "application/x-protobuf";
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let status = match ExportTraceServiceRequest::decode(body) {
                                Ok(m) if ok => {
                                    r.take(m);
                                    200
                                }
                                _ => 400,
                            };
                            let resp = ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(resp)))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), received)
}

pub fn by_trace(spans: &[Got]) -> HashMap<String, Vec<Got>> {
    let mut m: HashMap<String, Vec<Got>> = HashMap::new();
    for s in spans {
        m.entry(s.trace_id.clone()).or_default().push(s.clone());
    }
    m
}
