//! The counting receiver: `TraceService/Export` served with a codec that walks the
//! request's protobuf framing and counts spans instead of building them.
//!
//! In: `ExportTraceServiceRequest` bytes. Out: the number of spans (or `INVALID_ARGUMENT`
//! style `INTERNAL` errors for bytes that are not a well-framed request), an empty
//! `ExportTraceServiceResponse`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use prost::encoding::{WireType, decode_key, decode_varint};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::{Status, server::NamedService};

use super::Totals;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[derive(Clone)]
pub struct CountingService {
    pub totals: Arc<Totals>,
    pub max_message_bytes: usize,
}

impl NamedService for CountingService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

/// What the codec makes of one request.
pub struct Counted {
    spans: u64,
    bytes: u64,
}

impl<B> Service<http::Request<B>> for CountingService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if req.uri().path() != EXPORT_PATH {
                return Ok(Status::unimplemented(req.uri().path().to_string()).into_http());
            }
            let mut grpc = tonic::server::Grpc::new(CountCodec)
                .apply_compression_config(
                    tonic::codec::EnabledCompressionEncodings::default(),
                    tonic::codec::EnabledCompressionEncodings::default(),
                )
                .apply_max_message_size_config(Some(this.max_message_bytes), None);
            Ok(grpc.unary(Export(this.totals), req).await)
        })
    }
}

struct Export(Arc<Totals>);

impl tonic::server::UnaryService<Counted> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, Status>>;

    fn call(&mut self, request: tonic::Request<Counted>) -> Self::Future {
        let c = request.into_inner();
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        self.0.spans.fetch_add(c.spans, Ordering::Relaxed);
        self.0.bytes.fetch_add(c.bytes, Ordering::Relaxed);
        std::future::ready(Ok(tonic::Response::new(
            ExportTraceServiceResponse::default(),
        )))
    }
}

#[derive(Clone, Copy)]
struct CountCodec;
struct ResponseEncoder;
struct CountDecoder;

impl Encoder for ResponseEncoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;
    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for CountDecoder {
    type Item = Counted;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Counted>, Status> {
        let len = src.remaining();
        // The message is contiguous in tonic's buffer; copy only if it is not.
        let spans = if src.chunk().len() == len {
            count_spans(src.chunk())
        } else {
            let mut v = Vec::with_capacity(len);
            v.put(&mut *src);
            count_spans(&v)
        }
        .map_err(|e| Status::internal(format!("failed to decode request: {e}")))?;
        src.advance(src.remaining());
        Ok(Some(Counted {
            spans,
            bytes: len as u64,
        }))
    }
}

impl Codec for CountCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = Counted;
    type Encoder = ResponseEncoder;
    type Decoder = CountDecoder;
    fn encoder(&mut self) -> ResponseEncoder {
        ResponseEncoder
    }
    fn decoder(&mut self) -> CountDecoder {
        CountDecoder
    }
}

/// Bytes that are not a well-framed message.
#[derive(Debug)]
struct Framing(String);

impl From<&str> for Framing {
    fn from(s: &str) -> Self {
        Framing(s.to_string())
    }
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Calls `f(tag, body)` for every length-delimited field of `msg`, skipping the others;
/// fails on framing that does not fit.
fn for_each_field(
    mut msg: &[u8],
    mut f: impl FnMut(u32, &[u8]) -> Result<(), Framing>,
) -> Result<(), Framing> {
    while !msg.is_empty() {
        let (tag, wire_type) = decode_key(&mut msg).map_err(|e| Framing(e.to_string()))?;
        match wire_type {
            WireType::LengthDelimited => {
                let len = decode_varint(&mut msg).map_err(|e| Framing(e.to_string()))? as usize;
                if len > msg.len() {
                    return Err(Framing::from("field runs past its message"));
                }
                let (body, rest) = msg.split_at(len);
                f(tag, body)?;
                msg = rest;
            }
            WireType::Varint => {
                decode_varint(&mut msg).map_err(|e| Framing(e.to_string()))?;
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire_type == WireType::SixtyFourBit {
                    8
                } else {
                    4
                };
                if n > msg.len() {
                    return Err(Framing::from("fixed field runs past its message"));
                }
                msg = &msg[n..];
            }
            _ => return Err(Framing::from("unsupported wire type")),
        }
    }
    Ok(())
}

/// Spans in an `ExportTraceServiceRequest { resource_spans = 1: ResourceSpans {
/// scope_spans = 2: ScopeSpans { spans = 2 } } }`.
fn count_spans(request: &[u8]) -> Result<u64, Framing> {
    let mut spans = 0u64;
    for_each_field(request, |tag, resource_spans| {
        if tag != 1 {
            return Ok(());
        }
        for_each_field(resource_spans, |tag, scope_spans| {
            if tag != 2 {
                return Ok(());
            }
            for_each_field(scope_spans, |tag, _span| {
                spans += u64::from(tag == 2);
                Ok(())
            })
        })
    })?;
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    #[test]
    fn counts_the_spans_of_a_request_and_refuses_cut_bytes() {
        let request: ExportTraceServiceRequest = super::super::synthetic_request(1000);
        let bytes = request.encode_to_vec();
        assert_eq!(count_spans(&bytes).unwrap(), 1000);
        assert!(count_spans(&bytes[..bytes.len() - 3]).is_err());
    }
}
