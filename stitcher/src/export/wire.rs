//! OTLP protobuf written straight from span records: the bytes of the very
//! `ExportTraceServiceRequest` that [`super::otlp::to_request`] builds, without building it.
//!
//! Why: building the `opentelemetry-proto` structs costs about twenty small allocations
//! per span (every attribute key and value is an owned `String`), which made export the
//! slowest stage of the stitch path. Here a span is encoded into reused buffers; the only
//! allocations are the buffers' growth. A test decodes these bytes with the
//! `opentelemetry-proto` types and compares them with `to_request`, field by field.
//!
//! Sent over gRPC with a pass-through codec ([`RawCodec`]) on the generated service's path,
//! and over HTTP as the request body.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use weft_proto::v1::Side;

use super::otlp::ResourceId;
use super::{owner, peer};
use crate::model::{CompletedTrace, FastMap, LinkKind, SpanRecord};
use crate::resolve::Identity;

/// Reusable buffers for encoding requests.
#[derive(Default)]
pub struct WireEncoder {
    span: Vec<u8>,
    scope: Vec<u8>,
    resource: Vec<u8>,
    kv: Vec<u8>,
    any: Vec<u8>,
    text: String,
}

fn put_len_delimited(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(body.len() as u64, out);
    out.extend_from_slice(body);
}

fn put_str(out: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        put_len_delimited(out, tag, s.as_bytes());
    }
}

fn put_varint(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn put_fixed64(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, out);
        out.put_u64_le(v);
    }
}

fn put_fixed32(out: &mut Vec<u8>, tag: u32, v: u32) {
    if v != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, out);
        out.put_u32_le(v);
    }
}

/// An attribute value.
enum Val<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

impl WireEncoder {
    /// `KeyValue { key = 1, value = 2: AnyValue { string = 1 | bool = 2 | int = 3 } }`,
    /// appended to `out` as field `tag`.
    fn put_kv(
        kv: &mut Vec<u8>,
        any: &mut Vec<u8>,
        out: &mut Vec<u8>,
        tag: u32,
        key: &str,
        v: Val<'_>,
    ) {
        any.clear();
        match v {
            // AnyValue is a oneof: present even when empty or zero.
            Val::Str(s) => put_len_delimited(any, 1, s.as_bytes()),
            Val::Bool(b) => {
                encode_key(2, WireType::Varint, any);
                encode_varint(u64::from(b), any);
            }
            Val::Int(i) => {
                encode_key(3, WireType::Varint, any);
                encode_varint(i as u64, any);
            }
        }
        kv.clear();
        put_str(kv, 1, key);
        put_len_delimited(kv, 2, any);
        put_len_delimited(out, tag, kv);
    }

    /// Encodes one request for `traces` into `out` (cleared first).
    pub fn encode(&mut self, traces: &[Arc<CompletedTrace>], out: &mut Vec<u8>) {
        out.clear();
        let mut by_resource: FastMap<ResourceId, (&Identity, Vec<&SpanRecord>)> =
            FastMap::default();
        for trace in traces {
            for s in &trace.spans {
                let id = owner(s);
                by_resource
                    .entry(ResourceId::of(id))
                    .or_insert_with(|| (id, Vec::new()))
                    .1
                    .push(s);
            }
        }
        for (id, spans) in by_resource.into_values() {
            // ScopeSpans { scope = 1, spans = 2 }
            self.scope.clear();
            self.span.clear();
            put_str(&mut self.span, 1, "weft");
            put_str(&mut self.span, 2, env!("CARGO_PKG_VERSION"));
            put_len_delimited(&mut self.scope, 1, &self.span);
            for s in spans {
                self.encode_span(s);
                put_len_delimited(&mut self.scope, 2, &self.span);
            }
            // ResourceSpans { resource = 1, scope_spans = 2 }
            self.resource.clear();
            self.encode_resource(id);
            put_len_delimited(&mut self.resource, 2, &self.scope);
            put_len_delimited(out, 1, &self.resource);
        }
    }

    /// `Resource { attributes = 1 }` as field 1 of `self.resource`.
    fn encode_resource(&mut self, id: &Identity) {
        let mut attrs = std::mem::take(&mut self.span);
        attrs.clear();
        let (kv, any) = (&mut self.kv, &mut self.any);
        match id.meta.as_deref() {
            Some(m) => {
                Self::put_kv(
                    kv,
                    any,
                    &mut attrs,
                    1,
                    "service.name",
                    Val::Str(&m.workload),
                );
                if !m.namespace.is_empty() {
                    Self::put_kv(
                        kv,
                        any,
                        &mut attrs,
                        1,
                        "service.namespace",
                        Val::Str(&m.namespace),
                    );
                    Self::put_kv(
                        kv,
                        any,
                        &mut attrs,
                        1,
                        "k8s.namespace.name",
                        Val::Str(&m.namespace),
                    );
                }
                if let Some(p) = &m.pod {
                    Self::put_kv(kv, any, &mut attrs, 1, "k8s.pod.name", Val::Str(p));
                }
                if let Some(n) = &m.node {
                    Self::put_kv(kv, any, &mut attrs, 1, "k8s.node.name", Val::Str(n));
                }
                if m.workload_kind == "Deployment" {
                    Self::put_kv(
                        kv,
                        any,
                        &mut attrs,
                        1,
                        "k8s.deployment.name",
                        Val::Str(&m.workload),
                    );
                }
            }
            None => {
                self.text.clear();
                let _ = write!(self.text, "{}", id.addr.ip());
                Self::put_kv(kv, any, &mut attrs, 1, "service.name", Val::Str(&self.text));
            }
        }
        put_len_delimited(&mut self.resource, 1, &attrs);
        self.span = attrs;
    }

    /// One `Span` into `self.span` (the same fields as `otlp::to_span`).
    fn encode_span(&mut self, r: &SpanRecord) {
        let out = &mut self.span;
        out.clear();
        put_len_delimited(out, 1, &r.trace_id.0);
        put_len_delimited(out, 2, &r.span_id.0);
        if let Some(p) = r.parent {
            put_len_delimited(out, 4, &p.0);
        }
        put_str(out, 5, &r.name);
        let kind = match r.side {
            Side::Client => 3u64,
            _ => 2u64,
        };
        put_varint(out, 6, kind);
        put_fixed64(out, 7, r.start_unix_nanos);
        put_fixed64(out, 8, r.end_unix_nanos);
        let (kv, any, text) = (&mut self.kv, &mut self.any, &mut self.text);
        Self::put_kv(kv, any, out, 9, "http.request.method", Val::Str(&r.method));
        Self::put_kv(kv, any, out, 9, "url.path", Val::Str(&r.path));
        Self::put_kv(
            kv,
            any,
            out,
            9,
            "http.response.status_code",
            Val::Int(i64::from(r.status)),
        );
        let ip = |text: &mut String, id: &Identity| {
            text.clear();
            let _ = write!(text, "{}", id.addr.ip());
        };
        ip(text, &r.server);
        Self::put_kv(kv, any, out, 9, "server.address", Val::Str(text));
        Self::put_kv(
            kv,
            any,
            out,
            9,
            "server.port",
            Val::Int(i64::from(r.server.addr.port())),
        );
        ip(text, &r.client);
        Self::put_kv(kv, any, out, 9, "client.address", Val::Str(text));
        Self::put_kv(
            kv,
            any,
            out,
            9,
            "client.port",
            Val::Int(i64::from(r.client.addr.port())),
        );
        ip(text, peer(r));
        Self::put_kv(kv, any, out, 9, "network.peer.address", Val::Str(text));
        Self::put_kv(kv, any, out, 9, "weft.joined", Val::Bool(r.joined));
        Self::put_kv(kv, any, out, 9, "weft.node", Val::Str(&r.node));
        if r.link != LinkKind::Root {
            Self::put_kv(kv, any, out, 9, "weft.link", Val::Str(r.link.as_str()));
        }
        if peer(r).meta.is_some() {
            text.clear();
            text.push_str(&peer(r).name());
            Self::put_kv(kv, any, out, 9, "weft.peer.name", Val::Str(text));
        }
        // Status { message = 2, code = 3 }
        any.clear();
        if r.error {
            text.clear();
            let _ = write!(text, "HTTP {}", r.status);
            put_str(any, 2, text);
            put_varint(any, 3, 2);
        }
        put_len_delimited(out, 15, any);
        put_fixed32(out, 16, 0x01);
    }
}

/// A gRPC codec that sends already encoded protobuf and decodes the OTLP response.
#[derive(Default, Clone, Copy)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct ResponseDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        ExportTraceServiceResponse::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("bad OTLP response: {e}")))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::otlp::to_request;
    use crate::export::printer::tests::example_trace;
    use crate::model::SpanId;
    use crate::resolve::Identity;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    /// Sorts what has no order on the wire (resources come out of a hash map).
    fn canonical(mut r: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
        r.resource_spans
            .sort_by_key(|rs| format!("{:?}", rs.resource));
        r
    }

    #[test]
    fn hand_encoded_bytes_decode_to_the_built_request() {
        let mut t = example_trace();
        // Cover the other shapes: an error span, an unnamed peer, a timing link.
        t.spans[1].status = 503;
        t.spans[1].error = true;
        let mut unnamed = t.spans[0].clone();
        unnamed.span_id = SpanId::random();
        unnamed.parent = Some(t.spans[1].span_id);
        unnamed.link = LinkKind::Timing;
        unnamed.client = Identity::external("192.168.1.1:5000".parse().unwrap());
        unnamed.server = Identity::external("[2001:db8::1]:443".parse().unwrap());
        t.spans.push(unnamed);
        let traces = vec![Arc::new(t), Arc::new(example_trace())];
        let mut bytes = Vec::new();
        WireEncoder::default().encode(&traces, &mut bytes);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(canonical(decoded), canonical(to_request(&traces)));
    }
}
