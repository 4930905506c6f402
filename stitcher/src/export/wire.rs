//! OTLP protobuf written straight from span records: the bytes of the very
//! `ExportTraceServiceRequest` that [`super::otlp::to_request`] builds, without building it.
//!
//! Why: building the `opentelemetry-proto` structs costs about twenty small allocations
//! per span (every attribute key and value is an owned `String`), which made export the
//! slowest stage of the stitch path. Here a span is written once, in place, into a reused
//! buffer: attribute lengths are computed rather than encoded into scratch buffers and
//! copied, a span's own length is patched in after it is written, addresses and numbers
//! are formatted by hand (no `fmt` machinery, no `String`s). The only allocations are the
//! reused buffers' growth. A test decodes these bytes with the `opentelemetry-proto` types
//! and compares them with `to_request`, field by field.
//!
//! Sent over gRPC with a pass-through codec ([`RawCodec`]) on the generated service's path,
//! and over HTTP as the request body.

use std::io::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
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
    /// The `ScopeSpans` of the resource being written: scope, then its spans.
    scope: Vec<u8>,
    /// The `Resource` attributes of the resource being written.
    attrs: Vec<u8>,
    /// Resource → its group number (order of first appearance).
    groups: FastMap<ResourceId, u32>,
    /// (group, trace index, span index) of every span, sorted by group.
    order: Vec<(u32, u32, u32)>,
}

/// A field key. Every tag here is below 16: one byte.
#[inline]
fn put_key(tag: u32, wire_type: WireType, out: &mut Vec<u8>) {
    if tag < 16 {
        out.push(((tag << 3) | wire_type as u32) as u8);
    } else {
        encode_key(tag, wire_type, out);
    }
}

/// A varint (a length or a number): inline for the one- and two-byte values nearly all
/// of them are.
#[inline]
fn put_len(v: u64, out: &mut Vec<u8>) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v < 0x4000 {
        out.extend_from_slice(&[(v as u8) | 0x80, (v >> 7) as u8]);
    } else {
        encode_varint(v, out);
    }
}

/// The `ScopeSpans.scope` field: `InstrumentationScope { name = "weft", version }`,
/// the same for every request.
fn put_scope(out: &mut Vec<u8>) {
    let version = env!("CARGO_PKG_VERSION");
    let len = 2 + 4 + 1 + encoded_len_varint(version.len() as u64) as usize + version.len();
    put_key(1, WireType::LengthDelimited, out);
    put_len(len as u64, out);
    put_str(out, 1, "weft");
    put_str(out, 2, version);
}

fn put_len_delimited(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
    put_key(tag, WireType::LengthDelimited, out);
    put_len(body.len() as u64, out);
    out.extend_from_slice(body);
}

fn put_str(out: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        put_len_delimited(out, tag, s.as_bytes());
    }
}

fn put_varint(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        put_key(tag, WireType::Varint, out);
        put_len(v, out);
    }
}

fn put_fixed64(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        put_key(tag, WireType::SixtyFourBit, out);
        out.put_u64_le(v);
    }
}

fn put_fixed32(out: &mut Vec<u8>, tag: u32, v: u32) {
    if v != 0 {
        put_key(tag, WireType::ThirtyTwoBit, out);
        out.put_u32_le(v);
    }
}

/// Writes field `tag` as a message whose body `body` writes in place. The length is
/// patched in afterwards: two bytes are reserved, which fits every body of 128 to 16383
/// bytes (a span is ~400); other lengths move the body once.
fn put_message(out: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    put_key(tag, WireType::LengthDelimited, out);
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    body(out);
    let len = out.len() - at - 2;
    if (128..16384).contains(&len) {
        out[at] = (len as u8 & 0x7f) | 0x80;
        out[at + 1] = (len >> 7) as u8;
    } else {
        let mut prefix = Vec::with_capacity(10);
        encode_varint(len as u64, &mut prefix);
        out.splice(at..at + 2, prefix);
    }
}

/// An attribute value.
enum Val<'a> {
    Str(&'a str),
    /// A string in two parts (`workload.namespace`), written without joining them.
    Str2(&'a str, &'a str, &'a str),
    Int(i64),
    Bool(bool),
}

impl Val<'_> {
    /// Length of the `AnyValue` message.
    fn any_len(&self) -> usize {
        let s = |n: usize| 1 + encoded_len_varint(n as u64) as usize + n;
        match self {
            Val::Str(v) => s(v.len()),
            Val::Str2(a, b, c) => s(a.len() + b.len() + c.len()),
            Val::Int(i) => 1 + encoded_len_varint(*i as u64) as usize,
            Val::Bool(_) => 2,
        }
    }
}

/// `KeyValue { key = 1, value = 2: AnyValue { string = 1 | bool = 2 | int = 3 } }`,
/// appended to `out` as field `tag`, lengths computed up front (no scratch buffers).
#[inline]
fn put_kv(out: &mut Vec<u8>, tag: u32, key: &str, v: Val<'_>) {
    let any = v.any_len();
    let kv = 1
        + encoded_len_varint(key.len() as u64) as usize
        + key.len()
        + 1
        + encoded_len_varint(any as u64) as usize
        + any;
    put_key(tag, WireType::LengthDelimited, out);
    put_len(kv as u64, out);
    put_len_delimited(out, 1, key.as_bytes());
    put_key(2, WireType::LengthDelimited, out);
    put_len(any as u64, out);
    // AnyValue is a oneof: present even when empty or zero.
    match v {
        Val::Str(s) => put_len_delimited(out, 1, s.as_bytes()),
        Val::Str2(a, b, c) => {
            put_key(1, WireType::LengthDelimited, out);
            put_len((a.len() + b.len() + c.len()) as u64, out);
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b.as_bytes());
            out.extend_from_slice(c.as_bytes());
        }
        Val::Bool(b) => {
            put_key(2, WireType::Varint, out);
            put_len(u64::from(b), out);
        }
        Val::Int(i) => {
            put_key(3, WireType::Varint, out);
            put_len(i as u64, out);
        }
    }
}

/// Short ASCII text formatted on the stack: an IP address (what `IpAddr`'s `Display`
/// writes) or a status message.
struct Text {
    buf: [u8; 45],
    len: usize,
}

impl Text {
    fn empty() -> Text {
        Text {
            buf: [0; 45],
            len: 0,
        }
    }

    fn ip(ip: IpAddr) -> Text {
        let mut t = Text::empty();
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b'.');
                    }
                    t.push_u32(u32::from(octet));
                }
            }
            IpAddr::V6(v6) => {
                // Rare; the standard formatter handles the `::` compression rules.
                let mut cursor = std::io::Cursor::new(&mut t.buf[..]);
                let _ = write!(cursor, "{v6}");
                t.len = cursor.position() as usize;
            }
        }
        t
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn push_str(&mut self, s: &str) {
        for b in s.bytes() {
            self.push(b);
        }
    }

    /// Decimal digits of `v` (at most 10).
    fn push_u32(&mut self, v: u32) {
        let mut digits = [0u8; 10];
        let mut n = 0;
        let mut v = v;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for d in digits[..n].iter().rev() {
            self.push(*d);
        }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits, dots, colons and hex letters were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl WireEncoder {
    /// Encodes one request for `traces` into `out` (cleared first): one `ResourceSpans`
    /// per workload pod, in order of first appearance, spans in trace order.
    pub fn encode(&mut self, traces: &[Arc<CompletedTrace>], out: &mut Vec<u8>) {
        out.clear();
        self.groups.clear();
        self.order.clear();
        for (t, trace) in traces.iter().enumerate() {
            for (i, s) in trace.spans.iter().enumerate() {
                let next = self.groups.len() as u32;
                let g = *self.groups.entry(ResourceId::of(owner(s))).or_insert(next);
                self.order.push((g, t as u32, i as u32));
            }
        }
        // Stable: spans keep their order within a resource.
        self.order.sort_by_key(|&(g, _, _)| g);
        let span = |&(_, t, i): &(u32, u32, u32)| &traces[t as usize].spans[i as usize];
        let mut at = 0;
        while at < self.order.len() {
            let group = self.order[at].0;
            let end = at + self.order[at..].partition_point(|&(g, _, _)| g == group);
            // ScopeSpans { scope = 1, spans = 2 }
            self.scope.clear();
            put_scope(&mut self.scope);
            for key in &self.order[at..end] {
                put_message(&mut self.scope, 2, |out| encode_span(out, span(key)));
            }
            // Resource { attributes = 1 }
            self.attrs.clear();
            encode_resource(&mut self.attrs, owner(span(&self.order[at])));
            // ResourceSpans { resource = 1, scope_spans = 2 }
            let field = |n: usize| 1 + encoded_len_varint(n as u64) as usize + n;
            let len = field(self.attrs.len()) + field(self.scope.len());
            put_key(1, WireType::LengthDelimited, out);
            put_len(len as u64, out);
            put_len_delimited(out, 1, &self.attrs);
            put_len_delimited(out, 2, &self.scope);
            at = end;
        }
    }

    /// An upper estimate of the bytes `span` adds to a request, for bounding batches by
    /// size before they are encoded (each resource adds a header of a few hundred bytes
    /// once per request on top).
    pub fn estimate(span: &SpanRecord) -> usize {
        // Ids, times, kind, status, flags, twelve attribute keys with their framing and
        // numbers: ≤ 450 bytes; addresses at most 45 bytes each (three of them); then the
        // variable strings.
        const FIXED: usize = 450 + 3 * 45;
        FIXED
            + span.name.len()
            + span.method.len()
            + span.path.len()
            + span.node.len()
            + peer(span)
                .meta
                .as_ref()
                .map_or(0, |m| m.workload.len() + 1 + m.namespace.len())
    }
}

/// `Resource { attributes = 1 }` as the attributes' bytes.
fn encode_resource(attrs: &mut Vec<u8>, id: &Identity) {
    match id.meta.as_deref() {
        Some(m) => {
            put_kv(attrs, 1, "service.name", Val::Str(&m.workload));
            if !m.namespace.is_empty() {
                put_kv(attrs, 1, "service.namespace", Val::Str(&m.namespace));
                put_kv(attrs, 1, "k8s.namespace.name", Val::Str(&m.namespace));
            }
            if let Some(p) = &m.pod {
                put_kv(attrs, 1, "k8s.pod.name", Val::Str(p));
            }
            if let Some(n) = &m.node {
                put_kv(attrs, 1, "k8s.node.name", Val::Str(n));
            }
            if m.workload_kind == "Deployment" {
                put_kv(attrs, 1, "k8s.deployment.name", Val::Str(&m.workload));
            }
        }
        None => {
            let ip = Text::ip(id.addr.ip());
            put_kv(attrs, 1, "service.name", Val::Str(ip.as_str()));
        }
    }
}

/// One `Span`'s fields (the same as `otlp::to_span`), appended to `out`.
fn encode_span(out: &mut Vec<u8>, r: &SpanRecord) {
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
    put_kv(out, 9, "http.request.method", Val::Str(&r.method));
    put_kv(out, 9, "url.path", Val::Str(&r.path));
    put_kv(
        out,
        9,
        "http.response.status_code",
        Val::Int(i64::from(r.status)),
    );
    let server = Text::ip(r.server.addr.ip());
    let client = Text::ip(r.client.addr.ip());
    put_kv(out, 9, "server.address", Val::Str(server.as_str()));
    put_kv(
        out,
        9,
        "server.port",
        Val::Int(i64::from(r.server.addr.port())),
    );
    put_kv(out, 9, "client.address", Val::Str(client.as_str()));
    put_kv(
        out,
        9,
        "client.port",
        Val::Int(i64::from(r.client.addr.port())),
    );
    let peer_ip = match r.side {
        Side::Client => &server,
        _ => &client,
    };
    put_kv(out, 9, "network.peer.address", Val::Str(peer_ip.as_str()));
    put_kv(out, 9, "weft.joined", Val::Bool(r.joined));
    put_kv(out, 9, "weft.node", Val::Str(&r.node));
    if r.link != LinkKind::Root {
        put_kv(out, 9, "weft.link", Val::Str(r.link.as_str()));
    }
    if let Some(m) = peer(r).meta.as_deref() {
        // `Identity::name`: `workload.namespace`, or the workload alone.
        let name = if m.namespace.is_empty() {
            Val::Str(&m.workload)
        } else {
            Val::Str2(&m.workload, ".", &m.namespace)
        };
        put_kv(out, 9, "weft.peer.name", name);
    }
    // Status { message = 2, code = 3 }
    if r.error {
        let mut message = Text::empty();
        message.push_str("HTTP ");
        message.push_u32(r.status);
        let text = message.as_str();
        let len = 1 + encoded_len_varint(text.len() as u64) as usize + text.len() + 2;
        put_key(15, WireType::LengthDelimited, out);
        put_len(len as u64, out);
        put_str(out, 2, text);
        put_varint(out, 3, 2);
    } else {
        // An empty `Status` (the original writes the field even when unset).
        put_key(15, WireType::LengthDelimited, out);
        out.push(0);
    }
    put_fixed32(out, 16, 0x01);
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
        // A span longer than the two length bytes reserved for it (16 KiB and more), and
        // a peer with a namespace-less name.
        let mut long = t.spans[0].clone();
        long.span_id = SpanId::random();
        long.path = format!("/{}", "x".repeat(20_000));
        t.spans.push(long);
        let traces = vec![Arc::new(t), Arc::new(example_trace())];
        let mut bytes = Vec::new();
        WireEncoder::default().encode(&traces, &mut bytes);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(canonical(decoded), canonical(to_request(&traces)));
    }

    #[test]
    fn addresses_are_formatted_like_display() {
        for ip in [
            "0.0.0.0",
            "10.244.1.9",
            "255.255.255.255",
            "192.168.100.1",
            "::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
            "fe80::1:2:3:4",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(Text::ip(ip).as_str(), ip.to_string());
        }
    }

    #[test]
    fn estimate_bounds_the_encoded_size() {
        // Many traces of the same two workloads: the per-resource header (its attributes,
        // the scope) is shared, as in real batches.
        let traces: Vec<_> = (0..100).map(|_| Arc::new(example_trace())).collect();
        let mut bytes = Vec::new();
        WireEncoder::default().encode(&traces, &mut bytes);
        let estimate: usize = traces
            .iter()
            .flat_map(|t| &t.spans)
            .map(WireEncoder::estimate)
            .sum();
        assert!(
            estimate >= bytes.len(),
            "estimate {estimate} < {} encoded",
            bytes.len()
        );
        assert!(estimate < 2 * bytes.len(), "estimate {estimate} too loose");
    }
}
