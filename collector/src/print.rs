//! The local printer (`--print text|json`): Exchanges in, one line per exchange out
//! (stdout by default), buffered: [`Printer::flush`] writes the lines added since the last
//! flush, in one system call when they fit the buffer. The pipeline flushes after each
//! read of the rings, so a reader of a pipe sees an exchange at most one read interval
//! later. A flush per line cost a `write` per exchange: at 100k exchanges/s (a saturated
//! 2-CPU node, both halves traced) that was more than the collector's share of a CPU,
//! and its rings overflowed.
//!
//! Text, in the DESIGN.md printer format without trace ids (names are not resolved
//! on the node, so endpoints are bare addresses):
//!
//! ```text
//! 2026-11-22 10:00:00.123456789 (5.04ms) HTTPClient 200 GET /api/items [10.244.1.9:37450]->[10.96.0.20:80] size:0B resp_size:1234B node=node-a iface=veth1 req_seq=1000 resp_seq=2000
//! ```
//!
//! The time is the request's start (UTC), the duration end − start, `HTTP` marks a
//! server exchange and `HTTPClient` a client one, `size` is the request body and
//! `resp_size` the response body.
//!
//! JSON: one object per line. These keys are stable (other tools parse them):
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `id` | number | exchange id, unique per collector instance |
//! | `side` | string | `"CLIENT"`, `"SERVER"` (`"UNSPECIFIED"` never produced by `parse`) |
//! | `method`, `path` | string | path with the query redacted unless `--keep-query` |
//! | `status` | number | response status |
//! | `client`, `server` | string | `"ip:port"`; IPv6 as `"[ip]:port"` |
//! | `request_seq`, `response_seq` | number | TCP seqs of the request's and response's first bytes |
//! | `start_unix_nanos`, `end_unix_nanos` | number | wall clock, Unix nanoseconds |
//! | `request_bytes`, `response_bytes` | number | body sizes |
//! | `traceparent`, `tracestate`, `host`, `request_id` | string | header values, `""` when absent |
//! | `interface` | string | interface name |
//! | `ifindex` | number | interface index |
//! | `connection_id` | number | identifies the TCP connection within this collector |
//! | `pid`, `tid` | number | thread attribution seam, 0 when unknown |
//! | `node` | string | the collector's node name |

use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::Serialize;
use weft_proto::v1::{Endpoint, Exchange, Side};

/// What `--print` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PrintMode {
    #[default]
    Off,
    Text,
    Json,
}

impl fmt::Display for PrintMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PrintMode::Off => "off",
            PrintMode::Text => "text",
            PrintMode::Json => "json",
        })
    }
}

impl FromStr for PrintMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(PrintMode::Off),
            "text" => Ok(PrintMode::Text),
            "json" => Ok(PrintMode::Json),
            other => Err(format!(
                "unknown print mode {other:?}: expected off, text or json"
            )),
        }
    }
}

/// Writes exchanges, one line each, in the chosen mode.
pub struct Printer {
    mode: PrintMode,
    node: String,
    out: io::BufWriter<Box<dyn Write + Send>>,
}

/// Bytes of lines the printer holds before it writes them without waiting for a flush
/// (about 300 text lines).
const PRINT_BUFFER: usize = 64 * 1024;

impl Printer {
    /// A printer to stdout.
    pub fn new(mode: PrintMode, node_name: impl Into<String>) -> Self {
        Self::with_writer(mode, node_name, Box::new(io::stdout()))
    }

    pub fn with_writer(
        mode: PrintMode,
        node_name: impl Into<String>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Printer {
            mode,
            node: node_name.into(),
            out: io::BufWriter::with_capacity(PRINT_BUFFER, out),
        }
    }

    pub fn mode(&self) -> PrintMode {
        self.mode
    }

    /// Adds one line for the exchange (nothing in `Off` mode) to the buffer; it is
    /// written by the next [`Printer::flush`], or before when the buffer is full.
    pub fn print(&mut self, ex: &Exchange) -> io::Result<()> {
        match self.mode {
            PrintMode::Off => Ok(()),
            PrintMode::Text => writeln!(self.out, "{}", TextLine(ex, &self.node)),
            PrintMode::Json => {
                serde_json::to_writer(&mut self.out, &json_exchange(ex, &self.node))?;
                self.out.write_all(b"\n")
            }
        }
    }

    /// Writes the buffered lines (nothing to do, not even a lock of stdout, when off).
    pub fn flush(&mut self) -> io::Result<()> {
        match self.mode {
            PrintMode::Off => Ok(()),
            PrintMode::Text | PrintMode::Json => self.out.flush(),
        }
    }
}

/// An exchange's text line, formatted where it is written (no allocation per line).
struct TextLine<'a>(&'a Exchange, &'a str);

impl fmt::Display for TextLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let TextLine(ex, node) = *self;
        let kind = match ex.side() {
            Side::Server => "HTTP",
            Side::Client => "HTTPClient",
            Side::Unspecified => "HTTP?",
        };
        write!(
            f,
            "{} ({}) {kind} {} {} {} [{}]->[{}] size:{}B resp_size:{}B node={node} iface={} req_seq={} resp_seq={}",
            Time(ex.start_unix_nanos),
            Elapsed(ex.end_unix_nanos.saturating_sub(ex.start_unix_nanos)),
            ex.status,
            ex.method,
            ex.path,
            Ep(ex.client.as_ref()),
            Ep(ex.server.as_ref()),
            ex.request_bytes,
            ex.response_bytes,
            ex.interface,
            ex.request_seq,
            ex.response_seq,
        )
    }
}

#[derive(Serialize)]
struct JsonExchange<'a> {
    id: u64,
    side: &'static str,
    method: &'a str,
    path: &'a str,
    status: u32,
    client: Ep<'a>,
    server: Ep<'a>,
    request_seq: u32,
    response_seq: u32,
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    request_bytes: u64,
    response_bytes: u64,
    traceparent: &'a str,
    tracestate: &'a str,
    host: &'a str,
    request_id: &'a str,
    interface: &'a str,
    ifindex: u32,
    connection_id: u64,
    pid: u32,
    tid: u32,
    node: &'a str,
}

fn json_exchange<'a>(ex: &'a Exchange, node: &'a str) -> JsonExchange<'a> {
    let side = match ex.side() {
        Side::Client => "CLIENT",
        Side::Server => "SERVER",
        Side::Unspecified => "UNSPECIFIED",
    };
    JsonExchange {
        id: ex.id,
        side,
        method: &ex.method,
        path: &ex.path,
        status: ex.status,
        client: Ep(ex.client.as_ref()),
        server: Ep(ex.server.as_ref()),
        request_seq: ex.request_seq,
        response_seq: ex.response_seq,
        start_unix_nanos: ex.start_unix_nanos,
        end_unix_nanos: ex.end_unix_nanos,
        request_bytes: ex.request_bytes,
        response_bytes: ex.response_bytes,
        traceparent: &ex.traceparent,
        tracestate: &ex.tracestate,
        host: &ex.host,
        request_id: &ex.request_id,
        interface: &ex.interface,
        ifindex: ex.ifindex,
        connection_id: ex.connection_id,
        pid: ex.pid,
        tid: ex.tid,
        node,
    }
}

/// `ip:port` (`[ip]:port` for IPv6); `?` for an address that is neither 4 nor 16 bytes.
struct Ep<'a>(Option<&'a Endpoint>);

impl fmt::Display for Ep<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(ep) = self.0 else {
            return f.write_str("?");
        };
        let port = u16::try_from(ep.port).unwrap_or(0);
        let ip = match ep.ip.len() {
            4 => IpAddr::V4(Ipv4Addr::new(ep.ip[0], ep.ip[1], ep.ip[2], ep.ip[3])),
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(&ep.ip);
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => return write!(f, "?:{port}"),
        };
        write!(f, "{}", SocketAddr::new(ip, port))
    }
}

/// In JSON, the same text as a string, formatted where it is written.
impl Serialize for Ep<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `YYYY-MM-DD HH:MM:SS.nnnnnnnnn` in UTC.
struct Time(u64);

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1_000_000_000;
        let frac = self.0 % 1_000_000_000;
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{frac:09}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm,
/// for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// `812ns`, `45.20µs`, `5.04ms`, `1.25s`.
struct Elapsed(u64);

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0;
        let n = nanos as f64;
        if nanos < 1_000 {
            write!(f, "{nanos}ns")
        } else if nanos < 1_000_000 {
            write!(f, "{:.2}µs", n / 1e3)
        } else if nanos < 1_000_000_000 {
            write!(f, "{:.2}ms", n / 1e6)
        } else {
            write!(f, "{:.2}s", n / 1e9)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The text form of one exchange, as the printer writes it (no trailing newline).
    fn text_line(ex: &Exchange, node: &str) -> String {
        TextLine(ex, node).to_string()
    }

    /// The JSON form of one exchange, as the printer writes it (no trailing newline).
    fn json_line(ex: &Exchange, node: &str) -> serde_json::Result<String> {
        serde_json::to_string(&json_exchange(ex, node))
    }

    fn exchange() -> Exchange {
        Exchange {
            id: 7,
            side: Side::Client as i32,
            client: Some(Endpoint {
                ip: vec![10, 244, 1, 9],
                port: 37450,
            }),
            server: Some(Endpoint {
                ip: vec![10, 96, 0, 20],
                port: 80,
            }),
            request_seq: 1000,
            response_seq: 4_000_000_000,
            // 2026-11-22 10:00:00.123456789 UTC
            start_unix_nanos: 1_795_341_600_123_456_789,
            end_unix_nanos: 1_795_341_600_123_456_789 + 5_040_000,
            method: "GET".into(),
            path: "/api/items?<redacted>".into(),
            status: 200,
            request_bytes: 0,
            response_bytes: 1234,
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: String::new(),
            host: "backend".into(),
            request_id: "r-1".into(),
            ifindex: 12,
            interface: "veth1".into(),
            connection_id: 99,
            pid: 0,
            tid: 0,
        }
    }

    #[test]
    fn text_line_follows_the_design_format() {
        let line = text_line(&exchange(), "node-a");
        assert_eq!(
            line,
            "2026-11-22 10:00:00.123456789 (5.04ms) HTTPClient 200 GET /api/items?<redacted> \
             [10.244.1.9:37450]->[10.96.0.20:80] size:0B resp_size:1234B node=node-a iface=veth1 \
             req_seq=1000 resp_seq=4000000000"
        );
        let mut server = exchange();
        server.side = Side::Server as i32;
        assert!(text_line(&server, "n").contains(") HTTP 200 GET"));
        // No trace ids in the collector's text form.
        assert!(!line.contains("traceparent"));
    }

    #[test]
    fn json_line_has_every_documented_key() {
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&exchange(), "node-a").expect("serialise"))
                .expect("valid json");
        assert_eq!(v["id"], 7);
        assert_eq!(v["side"], "CLIENT");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/api/items?<redacted>");
        assert_eq!(v["status"], 200);
        assert_eq!(v["client"], "10.244.1.9:37450");
        assert_eq!(v["server"], "10.96.0.20:80");
        assert_eq!(v["request_seq"], 1000);
        assert_eq!(v["response_seq"], 4_000_000_000u32);
        assert_eq!(v["start_unix_nanos"], 1_795_341_600_123_456_789u64);
        assert_eq!(v["end_unix_nanos"], 1_795_341_600_128_496_789u64);
        assert_eq!(v["request_bytes"], 0);
        assert_eq!(v["response_bytes"], 1234);
        assert_eq!(
            v["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(v["tracestate"], "");
        assert_eq!(v["host"], "backend");
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["interface"], "veth1");
        assert_eq!(v["ifindex"], 12);
        assert_eq!(v["connection_id"], 99);
        assert_eq!(v["node"], "node-a");
        assert_eq!(v.as_object().map(|o| o.len()), Some(23));
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let mut ex = exchange();
        ex.side = Side::Server as i32;
        let mut ip = vec![0u8; 16];
        ip[0] = 0xfd;
        ip[15] = 1;
        ex.client = Some(Endpoint { ip, port: 5000 });
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&ex, "n").expect("serialise")).expect("json");
        assert_eq!(v["client"], "[fd00::1]:5000");
        assert_eq!(v["side"], "SERVER");
        ex.client = Some(Endpoint {
            ip: vec![1, 2, 3],
            port: 1,
        });
        assert!(text_line(&ex, "n").contains("[?:1]->"));
    }

    /// Keeps what is written (the bytes, and how many writes brought them).
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("lock").0.clone()).expect("utf8")
        }
        fn writes(&self) -> usize {
            self.0.lock().expect("lock").1
        }
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut kept = self.0.lock().expect("sink lock");
            kept.0.extend_from_slice(buf);
            kept.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn printer_writes_one_line_per_exchange_and_nothing_when_off() {
        for (mode, lines) in [
            (PrintMode::Json, 2),
            (PrintMode::Text, 2),
            (PrintMode::Off, 0),
        ] {
            let sink = Sink::default();
            let mut p = Printer::with_writer(mode, "node-a", Box::new(sink.clone()));
            p.print(&exchange()).expect("print");
            p.print(&exchange()).expect("print");
            p.flush().expect("flush");
            let out = sink.text();
            assert_eq!(out.lines().count(), lines, "{mode}");
            assert!(out.is_empty() || out.ends_with('\n'));
            if mode == PrintMode::Json {
                for l in out.lines() {
                    serde_json::from_str::<serde_json::Value>(l).expect("each line is json");
                }
            }
        }
    }

    #[test]
    fn lines_are_written_together_at_the_flush() {
        let sink = Sink::default();
        let mut p = Printer::with_writer(PrintMode::Text, "node-a", Box::new(sink.clone()));
        for _ in 0..100 {
            p.print(&exchange()).expect("print");
        }
        assert_eq!(sink.text(), "", "nothing is written before the flush");
        p.flush().expect("flush");
        assert_eq!(sink.text().lines().count(), 100);
        assert_eq!(sink.writes(), 1, "100 lines in one write");
    }

    #[test]
    fn a_full_buffer_is_written_without_a_flush() {
        let sink = Sink::default();
        let mut p = Printer::with_writer(PrintMode::Json, "node-a", Box::new(sink.clone()));
        let line_len = json_line(&exchange(), "node-a").expect("serialise").len() + 1;
        let lines = 2 * PRINT_BUFFER / line_len;
        for _ in 0..lines {
            p.print(&exchange()).expect("print");
        }
        // Bounded memory: all but the last buffer's worth are out already.
        let written = sink.text().lines().count();
        assert!(
            written >= lines - PRINT_BUFFER / line_len,
            "{written} of {lines}"
        );
        p.flush().expect("flush");
        assert_eq!(sink.text().lines().count(), lines);
    }

    #[test]
    fn print_mode_parses_and_displays() {
        for m in [PrintMode::Off, PrintMode::Text, PrintMode::Json] {
            assert_eq!(m.to_string().parse::<PrintMode>(), Ok(m));
        }
        assert_eq!("JSON".parse::<PrintMode>(), Ok(PrintMode::Json));
        assert!("yaml".parse::<PrintMode>().is_err());
        assert_eq!(PrintMode::default(), PrintMode::Off);
    }

    #[test]
    fn durations_and_dates_format() {
        assert_eq!(Elapsed(812).to_string(), "812ns");
        assert_eq!(Elapsed(45_200).to_string(), "45.20µs");
        assert_eq!(Elapsed(5_040_000).to_string(), "5.04ms");
        assert_eq!(Elapsed(1_250_000_000).to_string(), "1.25s");
        assert_eq!(Time(0).to_string(), "1970-01-01 00:00:00.000000000");
        // A leap day, checked against `date -u -d @1709210096`.
        assert_eq!(
            Time(1_709_210_096_000_000_001).to_string(),
            "2024-02-29 12:34:56.000000001"
        );
    }
}
