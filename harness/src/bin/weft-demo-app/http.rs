//! Just enough HTTP/1.1 for the demo app: message heads parsed by httparse, bodies framed by
//! Content-Length, keep-alive connections that keep bytes read past one message.

use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
const MAX_HEADERS: usize = 64;

/// A TCP connection with the bytes read but not yet consumed.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A parsed request or response head.
#[derive(Debug, Default)]
pub struct Head {
    /// Request method, or empty for a response.
    pub method: String,
    /// Request target, or empty for a response.
    pub path: String,
    /// Response status, or 0 for a request.
    pub status: u16,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the connection stays open after this message (HTTP/1.1 default, 1.0 opt-in).
    pub fn keep_alive(&self) -> bool {
        match self.header("connection").map(str::to_ascii_lowercase) {
            Some(v) if v.contains("close") => false,
            Some(v) if v.contains("keep-alive") => true,
            _ => self.minor_version == 1,
        }
    }

    /// The body length; chunked bodies are refused (the demo never sends them).
    fn content_length(&self) -> Result<usize> {
        if self.header("transfer-encoding").is_some() {
            bail!("Transfer-Encoding is not supported");
        }
        match self.header("content-length") {
            None => Ok(0),
            Some(v) => {
                let n: usize = v.trim().parse().context("bad Content-Length")?;
                anyhow::ensure!(n <= MAX_BODY, "body of {n} bytes is too large");
                Ok(n)
            }
        }
    }
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects to `addr` with both a connect and an I/O timeout.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Conn::new(stream))
    }

    /// Reads one request head and its body; `None` on a clean close before any byte.
    pub fn read_request(&mut self) -> Result<Option<(Head, Vec<u8>)>> {
        self.read_message(true)
    }

    /// Reads one response head and its body.
    pub fn read_response(&mut self) -> Result<(Head, Vec<u8>)> {
        self.read_message(false)?
            .context("connection closed before a response")
    }

    fn read_message(&mut self, request: bool) -> Result<Option<(Head, Vec<u8>)>> {
        let (head, head_len) = loop {
            if let Some(parsed) = parse_head(&self.buf, request)? {
                break parsed;
            }
            anyhow::ensure!(
                self.buf.len() < MAX_HEAD,
                "message head over {MAX_HEAD} bytes"
            );
            if self.fill()? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("connection closed inside a message head");
            }
        };
        let body_len = head.content_length()?;
        while self.buf.len() < head_len + body_len {
            if self.fill()? == 0 {
                bail!("connection closed inside a message body");
            }
        }
        let body = self.buf[head_len..head_len + body_len].to_vec();
        self.buf.drain(..head_len + body_len);
        Ok(Some((head, body)))
    }

    fn fill(&mut self) -> Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }
}

/// Parses a complete head at the start of `buf`; `None` if more bytes are needed.
fn parse_head(buf: &[u8], request: bool) -> Result<Option<(Head, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let to_vec = |hs: &[httparse::Header]| -> Vec<(String, String)> {
        hs.iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect()
    };
    if request {
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf).context("malformed request")? {
            httparse::Status::Partial => Ok(None),
            httparse::Status::Complete(len) => Ok(Some((
                Head {
                    method: req.method.unwrap_or_default().to_string(),
                    path: req.path.unwrap_or_default().to_string(),
                    status: 0,
                    minor_version: req.version.unwrap_or(1),
                    headers: to_vec(req.headers),
                },
                len,
            ))),
        }
    } else {
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf).context("malformed response")? {
            httparse::Status::Partial => Ok(None),
            httparse::Status::Complete(len) => Ok(Some((
                Head {
                    status: resp.code.unwrap_or_default(),
                    minor_version: resp.version.unwrap_or(1),
                    headers: to_vec(resp.headers),
                    ..Head::default()
                },
                len,
            ))),
        }
    }
}

/// An `http://host:port/path` URL.
#[derive(Debug, Clone)]
pub struct Url {
    /// `host[:port]` as written, for the Host header.
    pub authority: String,
    pub addr: SocketAddr,
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        anyhow::ensure!(!authority.is_empty(), "{url}: no host");
        let with_port = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {authority}"))?
            .next()
            .with_context(|| format!("{url}: {authority} has no address"))?;
        Ok(Url {
            authority: authority.to_string(),
            addr,
            path: path.to_string(),
        })
    }
}

/// Writes a GET request for `path` with the given extra headers.
pub fn write_get(
    conn: &mut Conn,
    authority: &str,
    path: &str,
    keep_alive: bool,
    extra: &[(&str, String)],
) -> Result<()> {
    let mut req =
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: weft-demo-app\r\n");
    if !keep_alive {
        req.push_str("Connection: close\r\n");
    }
    for (name, value) in extra {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes())
}

/// What follows a response head.
pub enum Body<'a> {
    Full(&'a str),
    /// Content-Length of this many bytes, no body (answers to HEAD).
    LengthOnly(usize),
}

/// Writes a response with a JSON body.
pub fn write_response(conn: &mut Conn, status: u16, body: Body, keep_alive: bool) -> Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        _ => "Unknown",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let (len, text) = match body {
        Body::Full(text) => (text.len(), text),
        Body::LengthOnly(len) => (len, ""),
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: {connection}\r\n\r\n{text}"
    );
    conn.write_all(resp.as_bytes())
}

/// One GET on a fresh connection (closed afterwards); returns the status.
pub fn get_once(url: &Url, path: &str, extra: &[(&str, String)], timeout: Duration) -> Result<u16> {
    let mut conn = Conn::connect(url.addr, timeout)?;
    write_get(&mut conn, &url.authority, path, false, extra)?;
    let (head, _) = conn.read_response()?;
    Ok(head.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads_and_keep_alive_rules() {
        let req = b"GET /a?b HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi";
        let (head, len) = parse_head(req, true).unwrap().unwrap();
        assert_eq!((head.method.as_str(), head.path.as_str()), ("GET", "/a?b"));
        assert!(head.keep_alive());
        assert_eq!(head.content_length().unwrap(), 2);
        assert_eq!(&req[len..], b"hi");
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nHost:", true)
                .unwrap()
                .is_none()
        );
        let resp = b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\n";
        let (head, _) = parse_head(resp, false).unwrap().unwrap();
        assert_eq!(head.status, 500);
        assert!(!head.keep_alive());
    }

    #[test]
    fn parses_urls() {
        let url = Url::parse("http://10.96.0.30:80/items/{n}").unwrap();
        assert_eq!(url.addr.to_string(), "10.96.0.30:80");
        assert_eq!(url.path, "/items/{n}");
        let url = Url::parse("http://127.0.0.1").unwrap();
        assert_eq!((url.addr.port(), url.path.as_str()), (80, "/"));
        assert!(Url::parse("https://x/").is_err());
    }
}
