//! The batch on the wire: a queued batch's remaining events as a `weft.v1.EventBatch`,
//! encoded straight from the queue's shared copy.
//!
//! In: an [`Outgoing`](super::queue::Outgoing) batch and this send's header (node, instance,
//! collector info). Out: a [`WireBatch`], whose protobuf encoding is byte for byte that of
//! the `EventBatch` it stands for. Building that `EventBatch` meant cloning every event for
//! every send, which cost the collector more CPU than capturing and parsing them (about
//! seven allocations and their frees per Exchange); a `WireBatch` shares the events.
//!
//! Exchanges are encoded once, as they are queued ([`EncodedExchanges`]): the queue keeps
//! their bytes for retransmission, and each Exchange goes back to the parser at once, its
//! buffers still in cache, to be written again (see `parse::spare`).

use std::sync::Arc;

use prost::bytes::BufMut;
use prost::encoding;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;
use weft_proto::v1;

// Field numbers of `weft.v1.EventBatch` (proto/weft/v1/events.proto).
const NODE_NAME: u32 = 1;
const INSTANCE_ID: u32 = 2;
const SEQ: u32 = 3;
const EXCHANGES: u32 = 4;
const CONNECTIONS: u32 = 5;
const INFO: u32 = 6;
const LOW_WATER_SEQ: u32 = 7;

/// Exchanges as the `exchanges` fields of an `EventBatch` (key, length, message), back to
/// back, encoded as they were queued.
#[derive(Debug, Default)]
pub struct EncodedExchanges {
    bytes: Vec<u8>,
    /// Where each exchange's field starts in `bytes`.
    starts: Vec<usize>,
    ids: Vec<u64>,
}

impl EncodedExchanges {
    /// Room for `exchanges` exchanges of `bytes` bytes in all.
    pub fn with_capacity(exchanges: usize, bytes: usize) -> Self {
        EncodedExchanges {
            bytes: Vec::with_capacity(bytes),
            starts: Vec::with_capacity(exchanges),
            ids: Vec::with_capacity(exchanges),
        }
    }

    pub fn push(&mut self, ex: &v1::Exchange) {
        self.starts.push(self.bytes.len());
        self.ids.push(ex.id);
        encoding::message::encode(EXCHANGES, ex, &mut self.bytes);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The ids of the exchanges from the `skip`th on.
    pub fn ids(&self, skip: usize) -> &[u64] {
        self.ids.get(skip..).unwrap_or_default()
    }

    /// The encoded fields of the exchanges from the `skip`th on.
    fn fields(&self, skip: usize) -> &[u8] {
        let start = self.starts.get(skip).copied().unwrap_or(self.bytes.len());
        &self.bytes[start..]
    }
}

/// A sealed batch's events, shared by the queue (until the ack) and its sends.
#[derive(Debug, Default)]
pub struct SealedEvents {
    pub exchanges: EncodedExchanges,
    pub connections: Vec<v1::Connection>,
}

/// One send of a batch: the events of `events` from the skips on, with this send's header.
#[derive(Debug)]
pub struct WireBatch {
    pub node_name: String,
    pub instance_id: String,
    pub seq: u64,
    /// The queue's copy, shared until the stitcher acknowledges the batch.
    pub events: Arc<SealedEvents>,
    /// Events pushed out of the queue by its bound since the batch was sealed.
    pub skip_exchanges: usize,
    pub skip_connections: usize,
    pub info: v1::CollectorInfo,
    pub low_water_seq: u64,
}

impl WireBatch {
    fn exchanges(&self) -> &[u8] {
        self.events.exchanges.fields(self.skip_exchanges)
    }

    fn connections(&self) -> &[v1::Connection] {
        self.events
            .connections
            .get(self.skip_connections..)
            .unwrap_or_default()
    }

    /// Writes the `EventBatch` encoding: fields in number order, proto3 defaults left out,
    /// `info` always present. Room for the whole batch is reserved first (a batch is
    /// hundreds of KiB: the buffer would otherwise grow, copying what it holds, several
    /// times).
    fn encode_into(&self, dst: &mut impl Reserve) {
        let exchanges = self.exchanges();
        dst.reserve(self.len_without_exchanges() + exchanges.len());
        self.encode_head(dst);
        dst.put_slice(exchanges);
        self.encode_tail(dst);
    }

    /// The fields before the exchanges: node, instance, seq.
    fn encode_head(&self, buf: &mut impl BufMut) {
        if !self.node_name.is_empty() {
            encoding::string::encode(NODE_NAME, &self.node_name, buf);
        }
        if !self.instance_id.is_empty() {
            encoding::string::encode(INSTANCE_ID, &self.instance_id, buf);
        }
        if self.seq != 0 {
            encoding::uint64::encode(SEQ, &self.seq, buf);
        }
    }

    /// The fields after the exchanges: connections, info, low-water seq.
    fn encode_tail(&self, buf: &mut impl BufMut) {
        for c in self.connections() {
            encoding::message::encode(CONNECTIONS, c, buf);
        }
        encoding::message::encode(INFO, &self.info, buf);
        if self.low_water_seq != 0 {
            encoding::uint64::encode(LOW_WATER_SEQ, &self.low_water_seq, buf);
        }
    }

    fn len_without_exchanges(&self) -> usize {
        let string = |tag, s: &String| match s.is_empty() {
            true => 0,
            false => encoding::string::encoded_len(tag, s),
        };
        let uint64 = |tag, v: &u64| match *v {
            0 => 0,
            _ => encoding::uint64::encoded_len(tag, v),
        };
        string(NODE_NAME, &self.node_name)
            + string(INSTANCE_ID, &self.instance_id)
            + uint64(SEQ, &self.seq)
            + encoding::message::encoded_len_repeated(CONNECTIONS, self.connections())
            + encoding::message::encoded_len(INFO, &self.info)
            + uint64(LOW_WATER_SEQ, &self.low_water_seq)
    }
}

/// A buffer that can make room ahead of writes.
trait Reserve: BufMut {
    fn reserve(&mut self, additional: usize);
}

impl Reserve for EncodeBuf<'_> {
    fn reserve(&mut self, additional: usize) {
        EncodeBuf::reserve(self, additional);
    }
}

impl Reserve for Vec<u8> {
    fn reserve(&mut self, additional: usize) {
        Vec::reserve(self, additional);
    }
}

/// The stream's codec: batches go out as [`WireBatch`]es, acks come in as prost decodes them.
#[derive(Debug, Default, Clone, Copy)]
pub struct WireCodec;

impl Codec for WireCodec {
    type Encode = WireBatch;
    type Decode = v1::Ack;
    type Encoder = WireEncoder;
    type Decoder = ProstDecoder<v1::Ack>;

    fn encoder(&mut self) -> WireEncoder {
        WireEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<v1::Ack> {
        ProstDecoder::default()
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct WireEncoder;

impl Encoder for WireEncoder {
    type Item = WireBatch;
    type Error = Status;

    fn encode(&mut self, item: WireBatch, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode_into(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn exchange(id: u64) -> v1::Exchange {
        v1::Exchange {
            id,
            side: v1::Side::Server as i32,
            client: Some(v1::Endpoint {
                ip: vec![10, 0, 0, 1],
                port: 40_000 + id as u32,
            }),
            method: "GET".into(),
            path: format!("/item/{id}?<redacted>"),
            status: 200,
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            interface: "veth1".into(),
            request_seq: 4_000_000_000,
            start_unix_nanos: 1_700_000_000_000_000_000 + id,
            ..Default::default()
        }
    }

    fn connection(id: u64) -> v1::Connection {
        v1::Connection {
            event: 1,
            connection_id: id,
            unix_nanos: 5 + id,
            ..Default::default()
        }
    }

    /// A sealed batch of `exchanges` (encoded as the queue does) and `connections`.
    fn sealed(exchanges: &[v1::Exchange], connections: Vec<v1::Connection>) -> Arc<SealedEvents> {
        let mut encoded = EncodedExchanges::default();
        for x in exchanges {
            encoded.push(x);
        }
        Arc::new(SealedEvents {
            exchanges: encoded,
            connections,
        })
    }

    fn wire(events: &Arc<SealedEvents>, skips: (usize, usize), header: bool) -> WireBatch {
        WireBatch {
            node_name: if header {
                "node-a".into()
            } else {
                String::new()
            },
            instance_id: if header { "inst".into() } else { String::new() },
            seq: u64::from(header) * 7,
            events: events.clone(),
            skip_exchanges: skips.0,
            skip_connections: skips.1,
            info: v1::CollectorInfo {
                tc_backend: "tcx".into(),
                ..Default::default()
            },
            low_water_seq: u64::from(header) * 3,
        }
    }

    /// What the stream's encoder writes for `w`.
    fn by_codec(w: WireBatch) -> Vec<u8> {
        let mut buf = Vec::new();
        w.encode_into(&mut buf);
        buf
    }

    /// The `EventBatch` a send stood for before: the remaining events cloned.
    fn cloned(w: &WireBatch, exchanges: &[v1::Exchange]) -> v1::EventBatch {
        v1::EventBatch {
            node_name: w.node_name.clone(),
            instance_id: w.instance_id.clone(),
            seq: w.seq,
            exchanges: exchanges
                .get(w.skip_exchanges..)
                .unwrap_or_default()
                .to_vec(),
            connections: w.connections().to_vec(),
            info: Some(w.info.clone()),
            low_water_seq: w.low_water_seq,
        }
    }

    /// An exchange whose encoding exceeds 127 bytes: its length prefix takes two bytes.
    fn long_exchange(id: u64) -> v1::Exchange {
        v1::Exchange {
            host: "a-rather-long-host-name.demo.svc.cluster.local".into(),
            tracestate: "vendor=opaque-value-that-is-long-enough".into(),
            ..exchange(id)
        }
    }

    #[test]
    fn encodes_byte_for_byte_as_the_event_batch_it_stands_for() {
        assert!(long_exchange(1).encoded_len() > 127);
        let exchanges = [
            exchange(1),
            long_exchange(2),
            exchange(3),
            long_exchange(4),
            exchange(5),
        ];
        let events = sealed(&exchanges, (1..=3).map(connection).collect());
        assert_eq!(events.exchanges.len(), 5);
        assert_eq!(events.exchanges.ids(2), [3, 4, 5]);
        assert!(events.exchanges.ids(9).is_empty());
        // Header fields on, off, and mixed (each proto3 default left out on its own).
        let headers: [(&str, &str, u64, u64); 4] = [
            ("node-a", "inst", 7, 3),
            ("", "", 0, 0),
            ("", "inst", 0, 9),
            ("node-a", "", 12, 0),
        ];
        for skips in [(0, 0), (2, 0), (5, 1), (5, 3), (0, 3), (9, 9)] {
            for (node, instance, seq, low_water) in headers {
                let w = WireBatch {
                    node_name: node.into(),
                    instance_id: instance.into(),
                    seq,
                    low_water_seq: low_water,
                    ..wire(&events, skips, true)
                };
                let expected = cloned(&w, &exchanges);
                let bytes = by_codec(w);
                assert_eq!(bytes, expected.encode_to_vec(), "{skips:?} {node:?} {seq}");
                let back = v1::EventBatch::decode(bytes.as_slice()).unwrap();
                assert_eq!(back, expected);
                assert_eq!(back.exchanges.len(), 5usize.saturating_sub(skips.0));
                assert_eq!(back.connections.len(), 3usize.saturating_sub(skips.1));
            }
        }
    }

    #[test]
    fn an_empty_batch_still_says_who_sends_it() {
        let events = sealed(&[], Vec::new());
        let w = wire(&events, (0, 0), true);
        let expected = cloned(&w, &[]);
        let back = v1::EventBatch::decode(by_codec(w).as_slice()).unwrap();
        assert_eq!(back, expected);
        assert_eq!((back.seq, back.node_name.as_str()), (7, "node-a"));
    }
}
