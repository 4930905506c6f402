//! HTTP/1 heads: the captured first bytes of a TCP segment in, the HTTP messages
//! that begin in it out (`Message`), or the reason they could not be read.
//!
//! A segment usually carries one message head, but a pipelining client (or a server
//! answering one) may coalesce several messages into one segment. When a message's
//! body length is known (`Content-Length`, or no body at all), the next message is
//! parsed from where the body ends, as long as it lies within the captured bytes.
//!
//! What is kept of a message: method, path (query redacted by default), status and
//! the headers `traceparent`, `tracestate`, `host`, `content-length`, `x-request-id`.
//! Every other header value is looked at only by httparse and never copied
//! (`transfer-encoding` is only tested for presence, to know where the body ends).
//! The kept parts are borrowed from the captured bytes (nothing is allocated while
//! parsing): the caller copies what it keeps beyond the event, as text
//! ([`Target::to_text`], [`Value::to_text`]).
//!
//! What is cut (documented behaviour): only the first `HEAD_LEN` bytes of a segment
//! are captured, and a head may also span several segments. A head whose headers
//! are cut still yields its first line and the headers on lines that were captured
//! whole (`Message::truncated`); a header line cut in the middle is dropped, never
//! kept half. A request line cut in the middle yields the method and the captured
//! prefix of the path.

use std::fmt;
use std::mem::MaybeUninit;

use httparse::{Header, ParserConfig, Status};
use weft_ebpf_common::HEAD_LEN;

/// Replaces a non-empty query string: `/items?id=7` becomes `/items?<redacted>`.
pub const REDACTED_QUERY: &str = "<redacted>";

/// At most this many messages are read from one segment (bounded work per event).
pub const MAX_MESSAGES_PER_SEGMENT: usize = 16;

/// Enough header slots for any head that fits in the captured bytes (the shortest
/// header line, `a:\n`, is 3 bytes), so httparse never runs out of room.
const MAX_HEADERS: usize = (HEAD_LEN + 2).div_ceil(3) + 1;

/// Header slots for the common head: a first parse uses this many, and only a head
/// with more headers is parsed again with `MAX_HEADERS` (5.5 KB of stack, which the
/// common case then never touches).
const FEW_HEADERS: usize = 24;

/// Header slots that httparse fills (it initialises only those it uses: zeroing all
/// of them cost more than parsing a typical head).
type Slots<'b, const N: usize> = [MaybeUninit<Header<'b>>; N];

fn slots<'b, const N: usize>() -> Slots<'b, N> {
    [const { MaybeUninit::uninit() }; N]
}

/// Why a captured head did not yield a message. Names are stable metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseError {
    /// The bytes do not begin with a method token nor with `HTTP/`.
    NotHttp,
    /// A method was read but the rest of the request line is malformed
    /// (bad target, version other than HTTP/1.0 or 1.1, bad line end).
    BadRequestLine,
    /// A status line that is malformed (version, 3-digit code, line end).
    BadStatusLine,
    /// The first line is fine but the header block is malformed beyond what
    /// httparse can skip (NUL, lone CR).
    BadHeader,
    /// More headers than slots (cannot happen within `HEAD_LEN`; kept for safety).
    TooManyHeaders,
    /// The event itself is inconsistent: unknown address family or direction.
    BadEvent,
    /// The event carries no captured payload at all.
    Empty,
}

impl ParseError {
    pub const COUNT: usize = 7;
    pub const ALL: [ParseError; Self::COUNT] = [
        ParseError::NotHttp,
        ParseError::BadRequestLine,
        ParseError::BadStatusLine,
        ParseError::BadHeader,
        ParseError::TooManyHeaders,
        ParseError::BadEvent,
        ParseError::Empty,
    ];

    /// A stable snake_case name for metrics and drop maps.
    pub const fn name(self) -> &'static str {
        match self {
            ParseError::NotHttp => "not_http",
            ParseError::BadRequestLine => "bad_request_line",
            ParseError::BadStatusLine => "bad_status_line",
            ParseError::BadHeader => "bad_header",
            ParseError::TooManyHeaders => "too_many_headers",
            ParseError::BadEvent => "bad_event",
            ParseError::Empty => "empty",
        }
    }

    /// The label of this loss among [`super::ParseStats::losses`].
    pub const fn loss_label(self) -> &'static str {
        match self {
            ParseError::NotHttp => "parse_error_not_http",
            ParseError::BadRequestLine => "parse_error_bad_request_line",
            ParseError::BadStatusLine => "parse_error_bad_status_line",
            ParseError::BadHeader => "parse_error_bad_header",
            ParseError::TooManyHeaders => "parse_error_too_many_headers",
            ParseError::BadEvent => "parse_error_bad_event",
            ParseError::Empty => "parse_error_empty",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

/// A kept header value: its captured bytes, trimmed; empty when the header is absent.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Value<'a>(pub &'a [u8]);

impl Value<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `out` = the value as text (bytes that are not UTF-8 become U+FFFD), in `out`'s
    /// buffer.
    pub fn write_to(&self, out: &mut String) {
        out.clear();
        push_text(out, self.0);
    }
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(self.0), f)
    }
}

/// Compares the bytes (tests and logs compare with literal text).
impl PartialEq<&str> for Value<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

/// The kept headers of a message, borrowed from the captured bytes; empty when absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeptHeaders<'a> {
    pub traceparent: Value<'a>,
    pub tracestate: Value<'a>,
    pub host: Value<'a>,
    pub request_id: Value<'a>,
    /// `Content-Length`, when present and a valid number.
    pub content_length: Option<u64>,
    /// Whether a `Transfer-Encoding` header is present (its value is not kept).
    pub transfer_encoding: bool,
}

/// A request target as it is kept: `/a?x=1` with the query redacted is `/a` followed
/// by `?<redacted>` (see [`redact`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// The whole target, or its part before the `?` when the query is redacted.
    pub kept: &'a str,
    pub query_redacted: bool,
}

impl Target<'_> {
    /// The target as it leaves the node (the tests' view of [`Target::write_to`]).
    #[cfg(test)]
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.write_to(&mut s);
        s
    }

    /// `out` = the target as it leaves the node, in `out`'s buffer (grown at most once).
    pub fn write_to(&self, out: &mut String) {
        out.clear();
        let redacted = if self.query_redacted {
            1 + REDACTED_QUERY.len()
        } else {
            0
        };
        out.reserve_exact(self.kept.len() + redacted);
        out.push_str(self.kept);
        if self.query_redacted {
            out.push('?');
            out.push_str(REDACTED_QUERY);
        }
    }
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kept)?;
        if self.query_redacted {
            write!(f, "?{REDACTED_QUERY}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: Target<'a>,
    pub headers: KeptHeaders<'a>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    pub status: u16,
    pub headers: KeptHeaders<'a>,
}

impl ResponseHead<'_> {
    /// 1xx responses are interim: the final response to the same request follows.
    /// 101 Switching Protocols is the last HTTP message of its connection, so it is
    /// treated as final (otherwise every upgrade would stay unanswered).
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head<'a> {
    Request(RequestHead<'a>),
    Response(ResponseHead<'a>),
}

/// One HTTP message that begins in a segment (borrowing the segment's bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub head: Head<'a>,
    /// Offset of the message's first byte in the segment's payload (its TCP seq is
    /// the segment's seq plus this offset).
    pub offset: u32,
    /// Body bytes: `Content-Length` when given, 0 when the message has no body by
    /// definition (request without length or transfer coding; 1xx, 204, 304
    /// responses), else the payload bytes after the head in this segment.
    pub body_bytes: u64,
    /// The head did not fit in the captured bytes (see the module doc).
    pub truncated: bool,
}

/// What one segment's captured bytes yielded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentParse<'a> {
    pub messages: Vec<Message<'a>>,
    /// Why reading stopped early, if it did (the messages before it are still valid).
    pub error: Option<ParseError>,
    /// A further message begins in the payload but was not read: it starts after
    /// the captured bytes, or after `MAX_MESSAGES_PER_SEGMENT` messages.
    pub beyond_capture: bool,
}

/// Reads the messages that begin in a segment. `captured` is the copied head of
/// the payload, `payload_len` the segment's full payload length.
pub fn parse_segment(captured: &[u8], payload_len: u32, redact_query: bool) -> SegmentParse<'_> {
    let mut messages = Vec::new();
    let end = for_each_message(captured, payload_len, redact_query, |m| messages.push(*m));
    SegmentParse {
        messages,
        error: end.error,
        beyond_capture: end.beyond_capture,
    }
}

/// How reading a segment ended (see [`SegmentParse`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentEnd {
    pub error: Option<ParseError>,
    pub beyond_capture: bool,
}

/// [`parse_segment`] without collecting: hands each message to `each` as it is read
/// (the capture loop's path: no allocation per segment).
pub fn for_each_message<'a>(
    captured: &'a [u8],
    payload_len: u32,
    redact_query: bool,
    mut each: impl FnMut(&Message<'a>),
) -> SegmentEnd {
    let mut out = SegmentEnd::default();
    if captured.is_empty() {
        out.error = Some(ParseError::Empty);
        return out;
    }
    // Never trust the kernel's lengths beyond what is in the buffer.
    let payload_len = (payload_len as usize).max(captured.len());
    let mut offset = 0usize;
    let mut count = 0usize;
    while count < MAX_MESSAGES_PER_SEGMENT {
        // Some clients send a stray CRLF after a body; the next message (and its
        // sequence number) starts after it.
        while offset > 0 && matches!(captured.get(offset), Some(b'\r' | b'\n')) {
            offset += 1;
        }
        if offset >= captured.len() {
            break;
        }
        let parsed = match parse_one(&captured[offset..], redact_query) {
            Ok(p) => p,
            Err(e) => {
                out.error = Some(e);
                break;
            }
        };
        let after_head = offset + parsed.head_len.unwrap_or(0);
        let body_in_segment = payload_len.saturating_sub(after_head) as u64;
        let (body_bytes, next) = match (parsed.framing, parsed.head_len) {
            (Framing::Length(n), Some(_)) => (
                n,
                after_head.checked_add(usize::try_from(n).unwrap_or(usize::MAX)),
            ),
            (Framing::Length(n), None) => (n, None),
            (Framing::None, Some(_)) => (0, Some(after_head)),
            (Framing::None, None) => (0, None),
            (Framing::ToEndOfSegment, Some(_)) => (body_in_segment, None),
            // The head's end is unknown, so is the body in this segment.
            (Framing::ToEndOfSegment, None) => (0, None),
        };
        each(&Message {
            head: parsed.head,
            offset: offset as u32,
            body_bytes,
            truncated: parsed.head_len.is_none(),
        });
        count += 1;
        match next {
            Some(n) if n < captured.len() && count == MAX_MESSAGES_PER_SEGMENT => {
                out.beyond_capture = true;
                break;
            }
            Some(n) if n < captured.len() => offset = n,
            Some(n) if n < payload_len => {
                out.beyond_capture = true;
                break;
            }
            _ => break,
        }
    }
    out
}

/// Where a message's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes.
    Length(u64),
    /// No body.
    None,
    /// Unknown (chunked, or a response delimited by the connection's close):
    /// count what this segment carries and stop reading it.
    ToEndOfSegment,
}

struct Parsed<'a> {
    head: Head<'a>,
    /// Length of the complete head; `None` when it was cut.
    head_len: Option<usize>,
    framing: Framing,
}

fn parse_one(buf: &[u8], redact_query: bool) -> Result<Parsed<'_>, ParseError> {
    if buf.starts_with(b"HTTP/") {
        parse_response(buf)
    } else {
        parse_request(buf, redact_query)
    }
}

fn config() -> ParserConfig {
    let mut cfg = ParserConfig::default();
    // A malformed header we do not keep must not cost us the whole exchange.
    cfg.ignore_invalid_headers_in_requests(true)
        .ignore_invalid_headers_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true);
    cfg
}

fn parse_request(buf: &[u8], redact_query: bool) -> Result<Parsed<'_>, ParseError> {
    match parse_request_in(buf, redact_query, &mut slots::<FEW_HEADERS>()) {
        Err(ParseError::TooManyHeaders) => parse_request_many(buf, redact_query),
        parsed => parsed,
    }
}

/// A head with more than `FEW_HEADERS` headers (rare): parsed again with room for all.
#[cold]
#[inline(never)]
fn parse_request_many(buf: &[u8], redact_query: bool) -> Result<Parsed<'_>, ParseError> {
    parse_request_in(buf, redact_query, &mut slots::<MAX_HEADERS>())
}

fn parse_request_in<'a>(
    buf: &'a [u8],
    redact_query: bool,
    slots: &mut [MaybeUninit<Header<'a>>],
) -> Result<Parsed<'a>, ParseError> {
    let mut req = httparse::Request::new(&mut []);
    let outcome = config().parse_request_with_uninit_headers(&mut req, buf, slots);
    let (method, path, version) = (req.method, req.path, req.version);
    match outcome {
        Ok(Status::Complete(len)) => {
            let headers = keep_headers(req.headers, |v| v);
            let head = RequestHead {
                method: method.unwrap_or_default(),
                path: redact(path.unwrap_or_default(), redact_query),
                headers,
            };
            let framing = request_framing(&head.headers);
            Ok(Parsed {
                head: Head::Request(head),
                head_len: Some(len),
                framing,
            })
        }
        Ok(Status::Partial) => {
            let Some(method) = method else {
                // Too short to hold even the method and its space.
                return Err(ParseError::BadRequestLine);
            };
            let (target, headers) = if version.is_some() {
                (path.unwrap_or_default(), cut_headers(buf, Kind::Request))
            } else {
                (cut_request_target(buf), KeptHeaders::default())
            };
            let framing = request_framing(&headers);
            let head = RequestHead {
                method,
                path: redact(target, redact_query),
                headers,
            };
            Ok(Parsed {
                head: Head::Request(head),
                head_len: None,
                framing,
            })
        }
        Err(e) => Err(request_error(e, method.is_some(), version.is_some())),
    }
}

fn parse_response(buf: &[u8]) -> Result<Parsed<'_>, ParseError> {
    match parse_response_in(buf, &mut slots::<FEW_HEADERS>()) {
        Err(ParseError::TooManyHeaders) => parse_response_many(buf),
        parsed => parsed,
    }
}

/// A head with more than `FEW_HEADERS` headers (rare): parsed again with room for all.
#[cold]
#[inline(never)]
fn parse_response_many(buf: &[u8]) -> Result<Parsed<'_>, ParseError> {
    parse_response_in(buf, &mut slots::<MAX_HEADERS>())
}

fn parse_response_in<'a>(
    buf: &'a [u8],
    slots: &mut [MaybeUninit<Header<'a>>],
) -> Result<Parsed<'a>, ParseError> {
    let mut resp = httparse::Response::new(&mut []);
    let outcome = config().parse_response_with_uninit_headers(&mut resp, buf, slots);
    let (code, reason) = (resp.code, resp.reason);
    match outcome {
        Ok(Status::Complete(len)) => {
            let head = ResponseHead {
                status: code.unwrap_or_default(),
                headers: keep_headers(resp.headers, |v| v),
            };
            let framing = response_framing(&head);
            Ok(Parsed {
                head: Head::Response(head),
                head_len: Some(len),
                framing,
            })
        }
        // The status line is complete once the reason phrase is: headers were cut.
        Ok(Status::Partial) => match (code, reason) {
            (Some(status), Some(_)) => {
                let head = ResponseHead {
                    status,
                    headers: cut_headers(buf, Kind::Response),
                };
                let framing = response_framing(&head);
                Ok(Parsed {
                    head: Head::Response(head),
                    head_len: None,
                    framing,
                })
            }
            // A status line cut before its end: nothing trustworthy to report.
            _ => Err(ParseError::BadStatusLine),
        },
        Err(httparse::Error::TooManyHeaders) => Err(ParseError::TooManyHeaders),
        Err(_) if reason.is_some() => Err(ParseError::BadHeader),
        Err(_) => Err(ParseError::BadStatusLine),
    }
}

fn request_error(e: httparse::Error, has_method: bool, has_version: bool) -> ParseError {
    match e {
        httparse::Error::TooManyHeaders => ParseError::TooManyHeaders,
        _ if has_version => ParseError::BadHeader,
        _ if has_method => ParseError::BadRequestLine,
        _ => ParseError::NotHttp,
    }
}

/// A request without `Content-Length` or `Transfer-Encoding` has no body (RFC 9112 6.3).
fn request_framing(h: &KeptHeaders<'_>) -> Framing {
    match (h.content_length, h.transfer_encoding) {
        (_, true) => Framing::ToEndOfSegment,
        (Some(n), false) => Framing::Length(n),
        (None, false) => Framing::None,
    }
}

/// 1xx, 204 and 304 responses never have a body; otherwise the length is given, or
/// the body is chunked or runs to the connection's close.
fn response_framing(r: &ResponseHead<'_>) -> Framing {
    if (100..200).contains(&r.status) || r.status == 204 || r.status == 304 {
        return Framing::None;
    }
    match (r.headers.content_length, r.headers.transfer_encoding) {
        (Some(n), false) => Framing::Length(n),
        _ => Framing::ToEndOfSegment,
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Request,
    Response,
}

/// The headers of a head whose end was not captured: re-parse a copy of it up to its
/// last complete line, closed by an empty line, so a header cut in the middle is
/// dropped rather than kept half. The kept values are borrowed from `buf` at the
/// offsets where they were found in the copy (the two agree up to that line).
#[cold]
fn cut_headers(buf: &[u8], kind: Kind) -> KeptHeaders<'_> {
    let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else {
        return KeptHeaders::default();
    };
    let mut closed = [0u8; HEAD_LEN + 2];
    let Some(dst) = closed.get_mut(..last_nl + 3) else {
        return KeptHeaders::default();
    };
    dst[..=last_nl].copy_from_slice(&buf[..=last_nl]);
    dst[last_nl + 1..].copy_from_slice(b"\r\n");
    let copy_start = dst.as_ptr() as usize;
    let in_buf = |v: &[u8]| {
        let at = (v.as_ptr() as usize).wrapping_sub(copy_start);
        buf.get(at..at.saturating_add(v.len())).unwrap_or_default()
    };
    let mut slots = slots::<MAX_HEADERS>();
    match kind {
        Kind::Request => {
            let mut req = httparse::Request::new(&mut []);
            match config().parse_request_with_uninit_headers(&mut req, dst, &mut slots) {
                Ok(Status::Complete(_)) => keep_headers(req.headers, in_buf),
                _ => KeptHeaders::default(),
            }
        }
        Kind::Response => {
            let mut resp = httparse::Response::new(&mut []);
            match config().parse_response_with_uninit_headers(&mut resp, dst, &mut slots) {
                Ok(Status::Complete(_)) => keep_headers(resp.headers, in_buf),
                _ => KeptHeaders::default(),
            }
        }
    }
}

/// The captured prefix of a request target whose request line was cut: the bytes
/// after the method's space, up to the first byte that cannot be in a target.
fn cut_request_target(buf: &[u8]) -> &str {
    let Some(space) = buf.iter().position(|&b| b == b' ') else {
        return "";
    };
    let rest = &buf[space + 1..];
    let end = rest
        .iter()
        .position(|&b| !(0x21..0x7f).contains(&b))
        .unwrap_or(rest.len());
    // Visible ASCII only, so this is valid UTF-8.
    std::str::from_utf8(&rest[..end]).unwrap_or("")
}

/// The headers that are looked at; every other one is skipped after a length check
/// and at most one comparison.
#[derive(Clone, Copy)]
enum Kept {
    Traceparent,
    Tracestate,
    Host,
    RequestId,
    ContentLength,
    TransferEncoding,
}

/// Which kept header `name` is, case-insensitively. The length picks the one candidate
/// (the kept names all differ in length), so most other headers cost one comparison.
fn kept_name(name: &str) -> Option<Kept> {
    let (want, kept) = match name.len() {
        4 => ("host", Kept::Host),
        10 => ("tracestate", Kept::Tracestate),
        11 => ("traceparent", Kept::Traceparent),
        12 => ("x-request-id", Kept::RequestId),
        14 => ("content-length", Kept::ContentLength),
        17 => ("transfer-encoding", Kept::TransferEncoding),
        _ => return None,
    };
    eq_lowercase(name.as_bytes(), want.as_bytes()).then_some(kept)
}

/// `name` equals `lower`, a lowercase name of letters and `-`, ignoring ASCII case.
/// Setting bit 5 lowercases a letter and keeps `-`; of the bytes allowed in a header
/// name (a token, which httparse checks) only the letters map onto a letter and only
/// `-` onto `-`, so the test is exact. Eight bytes at a time: the kept names are 4 or
/// 10 to 17 bytes long, compared as their first and last 8 bytes.
fn eq_lowercase(name: &[u8], lower: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    if name.len() != lower.len() {
        return false;
    }
    match (
        name.first_chunk::<8>(),
        name.last_chunk::<8>(),
        lower.first_chunk::<8>(),
        lower.last_chunk::<8>(),
    ) {
        (Some(n0), Some(n1), Some(l0), Some(l1)) => {
            u64::from_ne_bytes(*n0) | CASE == u64::from_ne_bytes(*l0)
                && u64::from_ne_bytes(*n1) | CASE == u64::from_ne_bytes(*l1)
        }
        _ => name.iter().zip(lower).all(|(&n, &l)| n | 0x20 == l),
    }
}

/// Picks the kept headers; every other value is ignored. The first occurrence wins.
/// `value` maps a value found by httparse to the bytes the result borrows.
fn keep_headers<'h, 'a>(
    headers: &[Header<'h>],
    value: impl Fn(&'h [u8]) -> &'a [u8],
) -> KeptHeaders<'a> {
    let mut kept = KeptHeaders::default();
    for h in headers {
        let Some(which) = kept_name(h.name) else {
            continue;
        };
        match which {
            Kept::Traceparent => set_once(&mut kept.traceparent, value(h.value)),
            Kept::Tracestate => set_once(&mut kept.tracestate, value(h.value)),
            Kept::Host => set_once(&mut kept.host, value(h.value)),
            Kept::RequestId => set_once(&mut kept.request_id, value(h.value)),
            Kept::ContentLength => {
                if kept.content_length.is_none() {
                    kept.content_length = parse_length(h.value);
                }
            }
            Kept::TransferEncoding => kept.transfer_encoding = true,
        }
    }
    kept
}

fn set_once<'a>(slot: &mut Value<'a>, value: &'a [u8]) {
    if slot.is_empty() {
        *slot = Value(value.trim_ascii());
    }
}

/// Appends the bytes as text, invalid UTF-8 replaced (U+FFFD). Header values are nearly
/// always ASCII: that is checked a word at a time, cheaper than the UTF-8 validator on a
/// value of a few dozen bytes.
fn push_text(out: &mut String, bytes: &[u8]) {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        out.push_str(unsafe { std::str::from_utf8_unchecked(bytes) });
    } else {
        out.push_str(&String::from_utf8_lossy(bytes));
    }
}

/// A `Content-Length` value: decimal digits only, and no more than fit in a u64.
fn parse_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Keeps the path and replaces a non-empty query by [`REDACTED_QUERY`]:
/// `/a?x=1` → `/a?<redacted>`; `/a?` and `/a` stay as they are.
pub fn redact(target: &str, redact_query: bool) -> Target<'_> {
    match target.split_once('?') {
        Some((path, query)) if redact_query && !query.is_empty() => Target {
            kept: path,
            query_redacted: true,
        },
        _ => Target {
            kept: target,
            query_redacted: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Message<'_> {
        let seg = parse_segment(bytes, bytes.len() as u32, true);
        assert_eq!(seg.error, None, "{seg:?}");
        assert_eq!(seg.messages.len(), 1, "{seg:?}");
        seg.messages.into_iter().next().expect("one message")
    }

    fn request<'m, 'a>(m: &'m Message<'a>) -> &'m RequestHead<'a> {
        match &m.head {
            Head::Request(r) => r,
            Head::Response(_) => panic!("expected a request: {m:?}"),
        }
    }

    fn response<'m, 'a>(m: &'m Message<'a>) -> &'m ResponseHead<'a> {
        match &m.head {
            Head::Response(r) => r,
            Head::Request(_) => panic!("expected a response: {m:?}"),
        }
    }

    #[test]
    fn request_keeps_only_the_listed_headers() {
        let m = one(
            b"PUT /v1/x HTTP/1.1\r\nHOST: svc:80\r\nTraceParent: 00-1-2-01\r\n\
tracestate: a=b\r\nx-request-id:  abc \r\nContent-Length: 12\r\nAuthorization: Basic Zm9v\r\n\
Cookie: id=1\r\nUser-Agent: curl\r\n\r\n",
        );
        let r = request(&m);
        assert_eq!((r.method, r.path.to_text().as_str()), ("PUT", "/v1/x"));
        let h = &r.headers;
        assert_eq!(h.host, "svc:80");
        assert_eq!(h.traceparent, "00-1-2-01");
        assert_eq!(h.tracestate, "a=b");
        assert_eq!(h.request_id, "abc");
        assert_eq!(h.content_length, Some(12));
        assert_eq!(m.body_bytes, 12);
        assert!(!m.truncated);
        assert!(!format!("{m:?}").contains("Zm9v"));
        assert!(!format!("{m:?}").contains("curl"));
    }

    #[test]
    fn redaction_replaces_only_a_non_empty_query() {
        let text = |t: &str, on: bool| {
            let kept = redact(t, on);
            assert_eq!(kept.to_text(), kept.to_string(), "{t}");
            kept.to_text()
        };
        assert_eq!(text("/a?x=1&y=2", true), "/a?<redacted>");
        assert_eq!(text("/a?x=1", false), "/a?x=1");
        assert_eq!(text("/a?", true), "/a?");
        assert_eq!(text("/a", true), "/a");
        assert_eq!(text("*", true), "*");
        assert_eq!(text("http://h/p?q=1", true), "http://h/p?<redacted>");
    }

    #[test]
    fn response_body_sizes_follow_the_framing() {
        let m = one(b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\nabc");
        assert_eq!((response(&m).status, m.body_bytes), (200, 4000));
        // Chunked: what this segment carries after the head.
        let m = one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n");
        assert_eq!(m.body_bytes, 8);
        // Delimited by close, the segment continuing past the capture bound.
        let seg = parse_segment(b"HTTP/1.0 200 OK\r\n\r\nxy", 1000, true);
        assert_eq!(seg.messages[0].body_bytes, 1000 - 19);
        let m = one(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n");
        assert_eq!(m.body_bytes, 0);
        let m = one(b"HTTP/1.1 404 \r\n\r\n");
        assert_eq!(response(&m).status, 404);
    }

    #[test]
    fn invalid_content_length_is_ignored() {
        for v in ["abc", "-1", "", "1 2", "99999999999999999999999"] {
            let raw = format!("POST / HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
            let m = one(raw.as_bytes());
            assert_eq!(request(&m).headers.content_length, None, "{v}");
            assert_eq!(m.body_bytes, 0, "{v}");
        }
    }

    #[test]
    fn pipelined_messages_get_their_offsets() {
        let a = b"GET /a HTTP/1.1\r\n\r\n";
        let b = b"POST /b HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi";
        let c = b"\r\nGET /c HTTP/1.1\r\n\r\n";
        let all = [&a[..], &b[..], &c[..]].concat();
        let seg = parse_segment(&all, all.len() as u32, true);
        let got: Vec<_> = seg
            .messages
            .iter()
            .map(|m| (request(m).path.to_text(), m.offset))
            .collect();
        let (la, lb) = (a.len() as u32, b.len() as u32);
        assert_eq!(
            got,
            vec![
                ("/a".into(), 0),
                ("/b".into(), la),
                ("/c".into(), la + lb + 2)
            ]
        );
        assert_eq!(seg.error, None);
        assert!(!seg.beyond_capture);
    }

    #[test]
    fn a_message_after_the_capture_bound_is_reported() {
        let a = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n";
        let seg = parse_segment(a, a.len() as u32 + 10 + 20, true);
        assert_eq!(seg.messages.len(), 1);
        assert!(seg.beyond_capture);
    }

    #[test]
    fn messages_per_segment_are_bounded_and_the_rest_reported() {
        let all = b"GET / HTTP/1.1\r\n\r\n".repeat(MAX_MESSAGES_PER_SEGMENT + 2);
        let seg = parse_segment(&all, all.len() as u32, true);
        assert_eq!(seg.messages.len(), MAX_MESSAGES_PER_SEGMENT);
        assert!(seg.beyond_capture);
        let all = b"GET / HTTP/1.1\r\n\r\n".repeat(MAX_MESSAGES_PER_SEGMENT);
        let seg = parse_segment(&all, all.len() as u32, true);
        assert_eq!(seg.messages.len(), MAX_MESSAGES_PER_SEGMENT);
        assert!(!seg.beyond_capture);
    }

    #[test]
    fn garbage_after_a_message_is_an_error_but_keeps_the_message() {
        let raw = b"GET /a HTTP/1.1\r\n\r\n\x00\x01\x02garbage";
        let seg = parse_segment(raw, raw.len() as u32, true);
        assert_eq!(seg.messages.len(), 1);
        assert_eq!(seg.error, Some(ParseError::NotHttp));
    }

    #[test]
    fn cut_heads() {
        // Headers cut: first line and whole lines kept, the cut line dropped.
        let raw = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc";
        let seg = parse_segment(raw, 600, true);
        let m = &seg.messages[0];
        assert!(m.truncated);
        assert_eq!(request(m).headers.host, "h");
        assert_eq!(request(m).headers.request_id, "");
        // Cut right after the first line's CR.
        let seg = parse_segment(b"HTTP/1.1 503 Busy\r", 600, true);
        assert_eq!(
            (seg.messages.len(), seg.error),
            (0, Some(ParseError::BadStatusLine))
        );
        let m = &parse_segment(b"HTTP/1.1 503 Busy\r\nRetry-After: 1", 600, true).messages[0];
        assert_eq!((response(m).status, m.truncated), (503, true));
        // A status line cut before its end yields nothing.
        let seg = parse_segment(b"HTTP/1.1 50", 600, true);
        assert_eq!(
            (seg.messages.len(), seg.error),
            (0, Some(ParseError::BadStatusLine))
        );
        // A request line cut in the target.
        let m = &parse_segment(b"GET /very/long?secret=1", 9000, true).messages[0];
        assert_eq!(request(m).path.to_text(), "/very/long?<redacted>");
        assert!(m.truncated);
    }

    #[test]
    fn error_reasons() {
        let cases: [(&[u8], ParseError); 7] = [
            (b"\x00\x01", ParseError::NotHttp),
            (b"SSH-2.0-OpenSSH_9.2\r\n", ParseError::NotHttp),
            (b"GET\t/ HTTP/1.1\r\n\r\n", ParseError::NotHttp),
            (b"GET / HTTP/3\r\n\r\n", ParseError::BadRequestLine),
            (b"HTTP/1.1 OK\r\n\r\n", ParseError::BadStatusLine),
            (
                b"GET / HTTP/1.1\r\nA: b\r\x00\r\n\r\n",
                ParseError::BadHeader,
            ),
            (b"", ParseError::Empty),
        ];
        for (raw, want) in cases {
            let seg = parse_segment(raw, raw.len() as u32, true);
            assert_eq!(seg.error, Some(want), "{:?}", String::from_utf8_lossy(raw));
            assert!(seg.messages.is_empty());
        }
    }

    #[test]
    fn every_prefix_of_a_valid_head_is_handled() {
        let raw = b"POST /p?q=1 HTTP/1.1\r\nHost: h\r\ntraceparent: 00-a-b-01\r\nContent-Length: 3\r\n\r\nabc";
        for n in 0..=raw.len() {
            let seg = parse_segment(&raw[..n], raw.len() as u32, true);
            for m in &seg.messages {
                let r = request(m);
                assert_eq!(r.method, "POST");
                let path = r.path.to_text();
                assert!(
                    "/p?<redacted>".starts_with(&path) || path == "/p?<redacted>",
                    "{n}: {r:?}"
                );
                // A header value is complete or absent, never half.
                assert!(r.headers.traceparent.is_empty() || r.headers.traceparent == "00-a-b-01");
            }
            assert!(seg.messages.len() <= 1);
        }
    }
}
