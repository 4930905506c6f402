//! Decoding `EventBatch`es off the ingest stream, and the service that serves
//! `weft.v1.Ingest/Stream` with it.
//!
//! In: the bytes of one `EventBatch` message (tonic has already decompressed it and
//! enforced `--max-message-bytes`). Out: the `v1::EventBatch`, equal to what the generated
//! prost decoder makes of it except for the fields below.
//!
//! Why not the generated decoder: it grows the exchange vector by doubling (each growth
//! moves every decoded exchange) and allocates every string field, also the ones nothing
//! downstream reads. Here the exchanges are counted first and decoded into a vector of the
//! right size, and `host`, `request_id`, `tracestate` and `interface` are checked (UTF-8,
//! framing) but not copied unless `--print-exchanges` shows them. Every other field goes
//! through prost's own field decoder, so errors read as before ("failed to decode Protobuf
//! message: ...", mapped to `INVALID_ARGUMENT` by the stream).

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut};
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint};
use tonic::Status;
use tonic::codec::{
    Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings, EncodeBuf, Encoder,
};
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::NamedService;
use weft_proto::v1;

use super::Ingest;

/// `Exchange` fields the stitch path never reads (see the module docs).
const UNREAD_EXCHANGE_FIELDS: [u32; 4] = [
    15, // tracestate
    16, // host
    17, // request_id
    19, // interface
];
const EXCHANGES: u32 = 4;

/// Decodes one `EventBatch` (see the module docs). `keep_all`: also copy the fields the
/// stitch path does not read.
pub fn decode_batch(bytes: &[u8], keep_all: bool) -> Result<v1::EventBatch, DecodeError> {
    let mut batch = v1::EventBatch::default();
    batch.exchanges.reserve_exact(count_exchanges(bytes));
    let mut buf = bytes;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if tag == EXCHANGES && wire_type == WireType::LengthDelimited {
            let body = take_len_delimited(&mut buf)?;
            batch.exchanges.push(decode_exchange(body, keep_all)?);
        } else {
            batch.merge_field(tag, wire_type, &mut buf, DecodeContext::default())?;
        }
    }
    Ok(batch)
}

/// How many exchange fields the batch holds (a bad framing is left for the decoder to
/// report).
fn count_exchanges(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while !buf.is_empty() {
        let Ok((tag, wire_type)) = decode_key(&mut buf) else {
            break;
        };
        let skipped = match wire_type {
            WireType::LengthDelimited => take_len_delimited(&mut buf).is_ok(),
            _ => prost::encoding::skip_field(wire_type, tag, &mut buf, DecodeContext::default())
                .is_ok(),
        };
        if !skipped {
            break;
        }
        n += usize::from(tag == EXCHANGES);
    }
    n
}

/// Why bytes are not an `EventBatch`; reads like prost's own errors.
#[derive(Debug)]
pub struct DecodeError(String);

impl DecodeError {
    fn new(what: &str) -> DecodeError {
        DecodeError(format!("failed to decode Protobuf message: {what}"))
    }
}

impl From<prost::DecodeError> for DecodeError {
    fn from(e: prost::DecodeError) -> Self {
        DecodeError(e.to_string())
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn take_len_delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let len = decode_varint(buf)?;
    let Some(len) = usize::try_from(len).ok().filter(|l| *l <= buf.len()) else {
        return Err(DecodeError::new("buffer underflow"));
    };
    let (body, rest) = buf.split_at(len);
    *buf = rest;
    Ok(body)
}

fn decode_exchange(mut buf: &[u8], keep_all: bool) -> Result<v1::Exchange, DecodeError> {
    let mut x = v1::Exchange::default();
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if !keep_all
            && wire_type == WireType::LengthDelimited
            && UNREAD_EXCHANGE_FIELDS.contains(&tag)
        {
            // Still a string: refuse what the full decoder would refuse.
            let body = take_len_delimited(&mut buf)?;
            if std::str::from_utf8(body).is_err() {
                return Err(DecodeError::new(
                    "invalid string value: data is not UTF-8 encoded",
                ));
            }
            continue;
        }
        x.merge_field(tag, wire_type, &mut buf, DecodeContext::default())?;
    }
    Ok(x)
}

/// The gRPC codec: [`decode_batch`] in, prost-encoded `Ack`s out.
#[derive(Clone, Copy)]
pub struct BatchCodec {
    pub keep_all: bool,
}

pub struct AckEncoder;

pub struct BatchDecoder {
    keep_all: bool,
    /// For a message tonic holds in more than one piece (not seen in practice).
    scratch: Vec<u8>,
}

impl Encoder for AckEncoder {
    type Item = v1::Ack;
    type Error = Status;
    fn encode(&mut self, item: v1::Ack, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for BatchDecoder {
    type Item = v1::EventBatch;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<v1::EventBatch>, Status> {
        let len = src.remaining();
        let decoded = if src.chunk().len() == len {
            decode_batch(src.chunk(), self.keep_all)
        } else {
            self.scratch.clear();
            self.scratch.put(src.take(len));
            decode_batch(&self.scratch, self.keep_all)
        };
        if src.remaining() > 0 {
            src.advance(src.remaining());
        }
        decoded
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Codec for BatchCodec {
    type Encode = v1::Ack;
    type Decode = v1::EventBatch;
    type Encoder = AckEncoder;
    type Decoder = BatchDecoder;
    fn encoder(&mut self) -> AckEncoder {
        AckEncoder
    }
    fn decoder(&mut self) -> BatchDecoder {
        BatchDecoder {
            keep_all: self.keep_all,
            scratch: Vec::new(),
        }
    }
}

/// `weft.v1.Ingest` served with [`BatchCodec`] (what the generated `IngestServer` does,
/// with this codec instead of the generic prost one).
#[derive(Clone)]
pub struct IngestService {
    pub(super) ingest: Ingest,
    pub(super) max_message_bytes: usize,
    pub(super) keep_all: bool,
}

impl NamedService for IngestService {
    const NAME: &'static str = "weft.v1.Ingest";
}

const STREAM_PATH: &str = "/weft.v1.Ingest/Stream";

struct StreamMethod(Ingest);

impl tonic::server::StreamingService<v1::EventBatch> for StreamMethod {
    type Response = v1::Ack;
    type ResponseStream = super::AckStream;
    type Future = BoxFuture<tonic::Response<super::AckStream>, Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<v1::EventBatch>>) -> Self::Future {
        let ingest = self.0.clone();
        Box::pin(
            async move { <Ingest as v1::ingest_server::Ingest>::stream(&ingest, request).await },
        )
    }
}

impl<B> Service<http::Request<B>> for IngestService
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
            if req.uri().path() != STREAM_PATH {
                return Ok(Status::unimplemented(req.uri().path().to_string()).into_http());
            }
            let mut accept = EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            accept.enable(CompressionEncoding::Zstd);
            let mut grpc = tonic::server::Grpc::new(BatchCodec {
                keep_all: this.keep_all,
            })
            .apply_compression_config(accept, EnabledCompressionEncodings::default())
            .apply_max_message_size_config(Some(this.max_message_bytes), None);
            Ok(grpc.streaming(StreamMethod(this.ingest), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> v1::EventBatch {
        let ep = |ip: [u8; 4], port| {
            Some(v1::Endpoint {
                ip: ip.to_vec(),
                port,
            })
        };
        let x = |id| v1::Exchange {
            id,
            side: v1::Side::Client as i32,
            client: ep([10, 0, 0, 1], 40000),
            server: ep([10, 0, 0, 2], 80),
            request_seq: 7,
            response_seq: 9,
            start_unix_nanos: 10,
            end_unix_nanos: 20,
            method: "GET".into(),
            path: "/api/items/1".into(),
            status: 200,
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "a=b".into(),
            host: "backend.demo".into(),
            request_id: "r-1".into(),
            ifindex: 4,
            interface: "veth1".into(),
            connection_id: 3,
            pid: 11,
            tid: 12,
            ..Default::default()
        };
        v1::EventBatch {
            node_name: "node-a".into(),
            instance_id: "i-1".into(),
            seq: 5,
            low_water_seq: 2,
            exchanges: (1..=100).map(x).collect(),
            connections: vec![v1::Connection {
                event: 1,
                local: ep([10, 0, 0, 1], 40000),
                remote: ep([10, 0, 0, 2], 80),
                unix_nanos: 5,
                connection_id: 3,
            }],
            info: Some(v1::CollectorInfo {
                version: "1".into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decodes_what_prost_decodes_less_the_unread_fields() {
        let b = batch();
        let bytes = b.encode_to_vec();
        let all = decode_batch(&bytes, true).unwrap();
        assert_eq!(all, b);
        assert_eq!(all.exchanges.capacity(), 100, "sized once");
        let mut want = b.clone();
        for x in &mut want.exchanges {
            x.tracestate.clear();
            x.host.clear();
            x.request_id.clear();
            x.interface.clear();
        }
        assert_eq!(decode_batch(&bytes, false).unwrap(), want);
    }

    #[test]
    fn refuses_what_prost_refuses() {
        let b = batch();
        let bytes = b.encode_to_vec();
        for cut in [1, 7, bytes.len() / 2, bytes.len() - 1] {
            let prost = v1::EventBatch::decode(&bytes[..cut]).is_err();
            assert_eq!(
                decode_batch(&bytes[..cut], false).is_err(),
                prost,
                "cut at {cut}"
            );
            assert!(decode_batch(&bytes[..cut], false).is_err(), "cut at {cut}");
        }
        assert!(decode_batch(&[0xff; 64], false).is_err());
        // Invalid UTF-8 in a field that is not copied is still refused.
        let mut bad = batch();
        bad.exchanges.truncate(1);
        bad.exchanges[0].host = "HOST".into();
        let mut bytes = bad.encode_to_vec();
        let at = bytes.windows(4).position(|w| w == b"HOST").unwrap();
        bytes[at] = 0xff;
        let err = decode_batch(&bytes, false).unwrap_err().to_string();
        assert!(err.contains("UTF-8"), "{err}");
        assert!(v1::EventBatch::decode(bytes.as_slice()).is_err());
    }
}
