//! Back-pressure: the ingest service acknowledges a batch only once the pipeline channel
//! took it. With a pipeline that does not read, acks stop at the channel's capacity; each
//! batch the pipeline takes releases exactly one more ack. Real gRPC over loopback, the
//! service served in-process so the test plays the pipeline.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use weft_proto::v1;
use weft_stitcher::ingest::{Ingest, IngestConfig};
use weft_stitcher::metrics::Registry;

fn batch(seq: u64) -> v1::EventBatch {
    v1::EventBatch {
        node_name: "node-a".into(),
        instance_id: "bp-instance".into(),
        seq,
        exchanges: vec![v1::Exchange {
            id: seq,
            side: v1::Side::Client as i32,
            client: Some(v1::Endpoint {
                ip: vec![10, 0, 0, 1],
                port: 40000,
            }),
            server: Some(v1::Endpoint {
                ip: vec![10, 0, 0, 2],
                port: 80,
            }),
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn next_ack(acks: &mut tonic::Streaming<v1::Ack>, within: Duration) -> Option<v1::Ack> {
    match tokio::time::timeout(within, acks.message()).await {
        Ok(Ok(Some(a))) => Some(a),
        Ok(other) => panic!("stream ended: {other:?}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_wait_for_the_pipeline_to_take_each_batch() {
    const CAPACITY: usize = 2;
    const BATCHES: u64 = 10;
    let registry = Registry::new();
    let (pipeline_tx, mut pipeline_rx) = mpsc::channel(CAPACITY);
    let ingest = Ingest::new(IngestConfig::default(), pipeline_tx, &registry);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ingest.server())
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    let mut client = v1::ingest_client::IngestClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(BATCHES as usize);
    for seq in 1..=BATCHES {
        tx.send(batch(seq)).await.unwrap();
    }
    let mut acks = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    // The pipeline reads nothing: exactly CAPACITY batches fit, so exactly CAPACITY acks.
    for seq in 1..=CAPACITY as u64 {
        let ack = next_ack(&mut acks, Duration::from_secs(5)).await;
        assert_eq!(ack.map(|a| a.seq), Some(seq));
    }
    assert!(
        next_ack(&mut acks, Duration::from_millis(500))
            .await
            .is_none(),
        "an ack arrived although the pipeline took nothing"
    );
    assert_eq!(registry.snapshot()["ingest.batches"], CAPACITY as u64);

    // Each batch the pipeline takes lets exactly one more batch in, and one more ack out.
    for seq in CAPACITY as u64 + 1..=BATCHES {
        let taken = pipeline_rx.recv().await.unwrap();
        assert_eq!(taken.seq, seq - CAPACITY as u64);
        let ack = next_ack(&mut acks, Duration::from_secs(5)).await;
        assert_eq!(ack.map(|a| a.seq), Some(seq));
    }
    assert!(
        next_ack(&mut acks, Duration::from_millis(200))
            .await
            .is_none()
    );
    server.abort();
}
