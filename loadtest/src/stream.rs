//! One fake collector: an `Ingest/Stream` that sends numbered batches at a paced rate and
//! times each ack.
//!
//! In: a [`Pool`] of this collector's halves and a pace. Out: [`StreamReport`] (acks,
//! latencies, errors by status). Batches are encoded once per send straight from the pool
//! (a raw-bytes codec), so the generator's own cost stays small next to the stitcher's.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use weft_proto::v1;

use crate::chains::Pool;

/// Sends pre-encoded `EventBatch` bytes, decodes `Ack`s.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = v1::Ack;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = v1::Ack;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<v1::Ack>, Status> {
        v1::Ack::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[derive(Debug, Clone)]
pub struct StreamPlan {
    pub node: String,
    /// Exchanges per second for this stream (0: as fast as acks allow).
    pub rate: f64,
    pub max_in_flight: usize,
    /// Resend every n-th batch (same seq) to exercise deduplication; 0: never.
    pub resend_every: u64,
    pub compression: Option<CompressionEncoding>,
    pub deadline: Instant,
    pub max_exchanges: u64,
}

#[derive(Debug, Default)]
pub struct StreamReport {
    pub batches_acked: u64,
    pub exchanges_acked: u64,
    pub duplicate_acks: u64,
    /// Ack latency of every acked batch, in microseconds.
    pub latencies_us: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
}

pub async fn run(channel: Channel, mut pool: Pool, plan: StreamPlan) -> StreamReport {
    let mut report = StreamReport::default();
    if pool.is_empty() {
        return report;
    }
    let instance = uuid::Uuid::new_v4().to_string();
    let mut seq = 0u64;
    let mut sent_exchanges = 0u64;
    // Reconnect on failure until the deadline: a loadgen keeps loading.
    while Instant::now() < plan.deadline && sent_exchanges < plan.max_exchanges {
        let outcome = one_stream(
            channel.clone(),
            &mut pool,
            &plan,
            &instance,
            &mut seq,
            &mut sent_exchanges,
            &mut report,
        )
        .await;
        if let Err(status) = outcome {
            *report.errors.entry(code_name(status.code())).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    report
}

fn code_name(c: Code) -> String {
    format!("{c:?}")
}

async fn one_stream(
    channel: Channel,
    pool: &mut Pool,
    plan: &StreamPlan,
    instance: &str,
    seq: &mut u64,
    sent_exchanges: &mut u64,
    report: &mut StreamReport,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Some(c) = plan.compression {
        grpc = grpc.send_compressed(c);
    }
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel::<Bytes>(plan.max_in_flight.max(1));
    let path = PathAndQuery::from_static("/weft.v1.Ingest/Stream");
    let mut acks = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await?
        .into_inner();

    let start = Instant::now();
    let mut in_flight: VecDeque<(u64, Instant, u64)> = VecDeque::new();
    let mut next_batch = 0usize;
    let mut resend: Option<Bytes> = None;
    let mut paced_exchanges = 0u64;
    loop {
        let done = Instant::now() >= plan.deadline || *sent_exchanges >= plan.max_exchanges;
        if done && in_flight.is_empty() {
            return Ok(());
        }
        let can_send = !done && in_flight.len() < plan.max_in_flight;
        let due = if plan.rate > 0.0 {
            start + Duration::from_secs_f64(paced_exchanges as f64 / plan.rate)
        } else {
            start
        };
        tokio::select! {
            biased;
            ack = acks.message() => {
                let Some(ack) = ack? else {
                    return Err(Status::unavailable("stitcher closed the stream"));
                };
                let Some(pos) = in_flight.iter().position(|(s, _, _)| *s == ack.seq) else {
                    continue;
                };
                let (_, sent_at, n) = in_flight.remove(pos).unwrap_or((0, Instant::now(), 0));
                report.latencies_us.push(sent_at.elapsed().as_micros() as u64);
                report.batches_acked += 1;
                if ack.duplicate {
                    report.duplicate_acks += 1;
                } else {
                    report.exchanges_acked += n;
                }
            }
            () = tokio::time::sleep_until(due.into()), if can_send => {
                let (bytes, n, s) = if let Some(b) = resend.take() {
                    // A retransmission of the batch just sent: same seq.
                    (b, 0, *seq)
                } else {
                    *seq += 1;
                    let exchanges = &pool.batches[next_batch];
                    let n = exchanges.len() as u64;
                    let msg = v1::EventBatch {
                        node_name: plan.node.clone(),
                        instance_id: instance.to_string(),
                        seq: *seq,
                        exchanges: std::mem::take(&mut pool.batches[next_batch]),
                        low_water_seq: in_flight.front().map_or(*seq, |f| f.0),
                        ..Default::default()
                    };
                    let bytes = Bytes::from(msg.encode_to_vec());
                    pool.batches[next_batch] = msg.exchanges;
                    next_batch += 1;
                    if next_batch == pool.batches.len() {
                        next_batch = 0;
                        pool.advance();
                    }
                    if plan.resend_every > 0 && seq.is_multiple_of(plan.resend_every) {
                        resend = Some(bytes.clone());
                    }
                    *sent_exchanges += n;
                    paced_exchanges += n;
                    (bytes, n, *seq)
                };
                if tx.send(bytes).await.is_err() {
                    return Err(Status::unavailable("request stream closed"));
                }
                // A resend is acked (as duplicate) separately; key it by seq once more.
                in_flight.push_back((s, Instant::now(), n));
            }
        }
    }
}
