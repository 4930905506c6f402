//! Acceptance (issue 4, test 3): malformed input gets the right gRPC status, is counted,
//! and a concurrent healthy collector stream is unaffected.
//!
//! Against a real `weft-stitcher` process on loopback:
//! - a gRPC message cut short by the end of the stream (raw bytes over h2) → INVALID_ARGUMENT
//! - a garbage protobuf (raw bytes over h2) → INVALID_ARGUMENT
//! - a well-formed but inconsistent batch (seq 0) → INVALID_ARGUMENT
//! - a batch above `--max-message-bytes` → RESOURCE_EXHAUSTED
//! - an HTTP/2 frame truncated by the connection closing (raw TCP) → that connection ends
//! - meanwhile a healthy stream keeps getting acks, and a resent batch is acked as duplicate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codegen::http;
use weft_proto::v1;

const MAX_MESSAGE: usize = 64 * 1024;

struct Stitcher {
    child: Child,
    port: u16,
    metrics_port: u16,
}

impl Stitcher {
    fn start() -> Stitcher {
        let (port, metrics_port) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_weft-stitcher"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--max-message-bytes", &MAX_MESSAGE.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn weft-stitcher");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || TcpStream::connect(("127.0.0.1", metrics_port)).is_err()
        {
            assert!(Instant::now() < deadline, "stitcher did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Stitcher {
            child,
            port,
            metrics_port,
        }
    }

    fn metric(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let prefix = format!("weft_stitcher_{} ", name.replace('.', "_"));
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }
}

impl Drop for Stitcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn batch(seq: u64, exchanges: usize, path_len: usize) -> v1::EventBatch {
    let x = |id| v1::Exchange {
        id,
        side: v1::Side::Server as i32,
        client: Some(v1::Endpoint {
            ip: vec![10, 244, 1, 9],
            port: 40000,
        }),
        server: Some(v1::Endpoint {
            ip: vec![10, 244, 2, 7],
            port: 8080,
        }),
        start_unix_nanos: 1_000,
        end_unix_nanos: 2_000,
        method: "GET".into(),
        path: format!("/{}", "p".repeat(path_len)),
        status: 200,
        ..Default::default()
    };
    v1::EventBatch {
        node_name: "node-a".into(),
        instance_id: "healthy-instance".into(),
        seq,
        exchanges: (0..exchanges as u64).map(|i| x(seq * 1000 + i)).collect(),
        ..Default::default()
    }
}

/// A tonic stream: send batches with `tx`, read acks/status from `acks`.
async fn open_stream(port: u16) -> (mpsc::Sender<v1::EventBatch>, tonic::Streaming<v1::Ack>) {
    let mut client = v1::ingest_client::IngestClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(4);
    let acks = client
        .stream(ReceiverStream::new(rx))
        .await
        .expect("open stream")
        .into_inner();
    (tx, acks)
}

async fn expect_ack(acks: &mut tonic::Streaming<v1::Ack>, seq: u64, duplicate: bool) {
    let ack = tokio::time::timeout(Duration::from_secs(5), acks.message())
        .await
        .expect("ack in time")
        .expect("no error")
        .expect("stream open");
    assert_eq!((ack.seq, ack.duplicate), (seq, duplicate), "{ack:?}");
}

async fn expect_status(acks: &mut tonic::Streaming<v1::Ack>, code: Code) {
    let got = tokio::time::timeout(Duration::from_secs(5), acks.message())
        .await
        .expect("status in time");
    match got {
        Err(status) => assert_eq!(status.code(), code, "{status:?}"),
        Ok(m) => panic!("expected {code:?}, got {m:?}"),
    }
}

/// Sends `body` as the whole request body of an Ingest/Stream call over raw h2 and returns
/// the grpc-status the stitcher answered with.
async fn raw_grpc_call(port: u16, body: Vec<u8>) -> (u32, String) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}/weft.v1.Ingest/Stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(req, false).unwrap();
    send.send_data(Bytes::from(body), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let (parts, mut body) = response.into_parts();
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|v| {
            let code = v.to_str().unwrap().parse::<u32>().unwrap();
            let msg = h
                .get("grpc-message")
                .map(|m| m.to_str().unwrap_or_default().to_string())
                .unwrap_or_default();
            (code, msg)
        })
    };
    if let Some(s) = status_of(&parts.headers) {
        conn.abort();
        return s;
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    conn.abort();
    status_of(&trailers).expect("grpc-status in trailers")
}

fn grpc_frame(declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&declared_len.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_the_right_status_and_healthy_streams_continue() {
    let s = Stitcher::start();
    let (healthy, mut healthy_acks) = open_stream(s.port).await;
    healthy.send(batch(1, 3, 8)).await.unwrap();
    expect_ack(&mut healthy_acks, 1, false).await;

    // A message that declares 100 bytes but the stream ends after 10.
    let (code, msg) = raw_grpc_call(s.port, grpc_frame(100, &[0x08; 10])).await;
    assert_eq!(code, Code::InvalidArgument as u32, "truncated: {msg}");

    // A complete message that is not protobuf (0xff: wire type 7 does not exist).
    let garbage = vec![0xffu8; 64];
    let (code, msg) = raw_grpc_call(s.port, grpc_frame(64, &garbage)).await;
    assert_eq!(code, Code::InvalidArgument as u32, "garbage: {msg}");

    // Well-formed protobuf, inconsistent content.
    let (bad, mut bad_acks) = open_stream(s.port).await;
    let mut b = batch(1, 1, 8);
    b.instance_id = "bad-instance".into();
    b.seq = 0;
    bad.send(b).await.unwrap();
    expect_status(&mut bad_acks, Code::InvalidArgument).await;

    // Above --max-message-bytes (decoded size ~ 100 exchanges × 1 KiB paths).
    let (big, mut big_acks) = open_stream(s.port).await;
    let mut b = batch(1, 100, 1024);
    b.instance_id = "big-instance".into();
    big.send(b).await.unwrap();
    expect_status(&mut big_acks, Code::ResourceExhausted).await;

    // An HTTP/2 DATA frame header announcing 1000 bytes, then only 10 and EOF.
    let mut raw = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    raw.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).unwrap(); // empty SETTINGS
    raw.write_all(&[0, 0x03, 0xe8, 0x0, 0x1, 0, 0, 0, 1])
        .unwrap();
    raw.write_all(&[0u8; 10]).unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let mut sink = Vec::new();
    // The server answers what it can (SETTINGS, GOAWAY) and closes: read reaches EOF.
    raw.read_to_end(&mut sink)
        .expect("server closes the broken connection");

    // The healthy stream is unaffected: new batches are acked, a resent one is a duplicate.
    healthy.send(batch(2, 3, 8)).await.unwrap();
    expect_ack(&mut healthy_acks, 2, false).await;
    healthy.send(batch(1, 3, 8)).await.unwrap();
    expect_ack(&mut healthy_acks, 1, true).await;

    assert_eq!(s.metric("ingest.rejected.invalid"), 3);
    assert_eq!(s.metric("ingest.rejected.too_large"), 1);
    assert_eq!(s.metric("ingest.batches"), 2);
    assert_eq!(s.metric("ingest.exchanges"), 6);
    assert_eq!(s.metric("ingest.duplicate_batches"), 1);
}
