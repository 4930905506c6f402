//! `serve`: a thread-per-connection HTTP/1.1 server that optionally calls downstream URLs
//! for each request, propagates `traceparent`, injects errors and delays, and logs one JSON
//! line per request (with the peer address) to stdout.

use crate::http::{self, Conn, Url};
use crate::traceparent::TraceParent;
use anyhow::{Context, Result};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Name reported in responses and logs.
    #[arg(long, default_value = "demo")]
    name: String,
    // The help spells the placeholder out: clap prints it as a line break.
    /// URL to GET for every request, in order (repeatable); `n` in braces in it becomes the
    /// request number.
    #[arg(long = "call")]
    calls: Vec<String>,
    /// Send a `traceparent` on downstream calls (same trace as the incoming one, or a new one).
    #[arg(long)]
    propagate: bool,
    /// Answer every Nth request with 500.
    #[arg(long)]
    error_every: Option<u64>,
    /// Wait this long before answering each request.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Timeout of each downstream call.
    #[arg(long, default_value_t = 5000)]
    call_timeout_ms: u64,
}

struct Server {
    args: ServeArgs,
    calls: Vec<Url>,
    served: AtomicU64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let calls = args
        .calls
        .iter()
        .map(|u| Url::parse(u))
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(
        args.error_every != Some(0),
        "--error-every must be at least 1"
    );
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    let server = Arc::new(Server {
        args,
        calls,
        served: AtomicU64::new(0),
    });
    log_line(serde_json::json!({
        "event": "listening",
        "name": server.args.name,
        "addr": listener.local_addr()?.to_string(),
    }));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if let Err(e) = server.serve_connection(Conn::new(stream), &peer) {
                eprintln!("connection from {peer}: {e:#}");
            }
        });
    }
    Ok(())
}

impl Server {
    /// Serves requests on one connection until the client closes or asks to close.
    fn serve_connection(&self, mut conn: Conn, peer: &str) -> Result<()> {
        conn.stream
            .set_read_timeout(Some(Duration::from_secs(120)))?;
        conn.stream.set_nodelay(true)?;
        loop {
            let (head, _body) = match conn.read_request() {
                Ok(Some(request)) => request,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let body = serde_json::json!({"error": format!("{e:#}")}).to_string();
                    let _ = http::write_response(&mut conn, 400, http::Body::Full(&body), false);
                    return Err(e);
                }
            };
            let keep_alive = head.keep_alive();
            let (status, body) = self.handle(&head, peer);
            // A HEAD response announces the body's length but carries none.
            let body = if head.method == "HEAD" {
                http::Body::LengthOnly(body.len())
            } else {
                http::Body::Full(&body)
            };
            http::write_response(&mut conn, status, body, keep_alive)?;
            if !keep_alive {
                return Ok(());
            }
        }
    }

    /// One request: delay, downstream calls, then the answer (maybe an injected error).
    fn handle(&self, head: &http::Head, peer: &str) -> (u16, String) {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if self.args.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.args.delay_ms));
        }
        let incoming = head.header("traceparent").and_then(TraceParent::parse);
        let trace = incoming.clone().unwrap_or_else(TraceParent::new_root);
        let mut call_statuses = Vec::new();
        let mut failed = false;
        for url in &self.calls {
            let mut extra = Vec::new();
            if self.args.propagate {
                extra.push(("traceparent", trace.child().header()));
            }
            let path = url.path.replace("{n}", &n.to_string());
            let timeout = Duration::from_millis(self.args.call_timeout_ms);
            match http::get_once(url, &path, &extra, timeout) {
                Ok(status) => {
                    failed |= status >= 500;
                    call_statuses.push(serde_json::json!(status));
                }
                Err(e) => {
                    failed = true;
                    call_statuses.push(serde_json::json!(format!("{e:#}")));
                }
            }
        }
        let injected = self
            .args
            .error_every
            .is_some_and(|every| n.is_multiple_of(every));
        let status = if injected {
            500
        } else if failed {
            502
        } else {
            200
        };
        log_line(serde_json::json!({
            "event": "request",
            "name": self.args.name,
            "n": n,
            "peer": peer,
            "method": head.method,
            "path": head.path,
            "status": status,
            "traceparent": incoming.map(|t| t.header()),
            "calls": call_statuses,
        }));
        let body = serde_json::json!({
            "name": self.args.name,
            "n": n,
            "status": status,
            "calls": call_statuses,
        });
        (status, body.to_string())
    }
}

/// One JSON object per line on stdout, written whole so concurrent threads never interleave.
fn log_line(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}
