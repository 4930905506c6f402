//! The same segment twice in a row: a segment's captured bytes in, its HTTP messages out
//! ([`http::for_each_message`]'s answer), read from memory when the bytes are those of
//! the segment just before.
//!
//! Why: traffic between two pods of one node is captured on both pods' veths, leaving
//! one and entering the other, one right after the other (the kernel forwards it in
//! the same softirq, on the same CPU). Every such request and response comes twice, and
//! the second parse would repeat the first exactly: parsing is a function of the bytes,
//! the payload length and the redaction setting only. Remembering a segment costs a
//! copy of its captured bytes (at most `HEAD_LEN`) and of its messages' offsets, about a
//! tenth of parsing it; comparing costs little (most segments differ in length).
//!
//! Traffic that never repeats (a client outside the node's pods, seen on one veth only)
//! should not pay for remembering: after `WARM_MISSES` segments in a row that were not
//! repeats, only one segment in `PROBE_EVERY` is remembered, until one is repeated again.
//! Traffic that starts repeating is thus noticed within `PROBE_EVERY` segments, and
//! repeats that come while cold are parsed again: never a wrong answer, only a slower one.
//!
//! The messages are remembered as ranges of the bytes, and rebuilt on the new segment's
//! equal bytes, so they borrow the segment they are handed out for.
//!
//! Privacy: the copy holds whole captured heads (an `Authorization` header included)
//! exactly as the event did; it stays in this struct, is never printed (no `Debug`) nor
//! handed on, and is overwritten by the next segment remembered.

use super::http::{
    self, Head, KeptHeaders, Message, RequestHead, ResponseHead, SegmentEnd, Target, Value,
};

/// Segments in a row without a repeat during which every segment is still remembered.
const WARM_MISSES: u32 = 8;

/// Once cold, one segment in this many is remembered (see the module doc). Odd, so that
/// the probe does not keep falling on the same position of a repeating pattern (each
/// segment followed by its repeat would otherwise always be probed on the repeat).
const PROBE_EVERY: u32 = 31;

/// The messages of the last segment read (see the module doc).
#[derive(Default)]
pub struct LastSegment {
    /// Whether `bytes` and `messages` describe a segment (false until one was read
    /// whose every part could be remembered).
    valid: bool,
    bytes: Vec<u8>,
    payload_len: u32,
    redact_query: bool,
    messages: Vec<Remembered>,
    end: SegmentEnd,
    /// Segments answered from memory.
    repeats: u64,
    /// Segments in a row that were not repeats.
    misses: u32,
    /// Segments remembered (for the tests of the warm/cold rule).
    #[cfg(test)]
    remembered: u64,
}

impl LastSegment {
    /// [`http::for_each_message`], answered from memory when `captured`, `payload_len`
    /// and `redact_query` are those of the previous call.
    pub fn for_each_message<'a>(
        &mut self,
        captured: &'a [u8],
        payload_len: u32,
        redact_query: bool,
        mut each: impl FnMut(&Message<'a>),
    ) -> SegmentEnd {
        if self.valid
            && self.payload_len == payload_len
            && self.redact_query == redact_query
            && self.bytes == captured
        {
            self.repeats += 1;
            self.misses = 0;
            for r in &self.messages {
                each(&r.rebuild(captured));
            }
            return self.end;
        }
        self.valid = false;
        // Past u32::MAX back to the first cold count, not stuck there: u32::MAX is no
        // multiple of PROBE_EVERY, so a stuck counter would never probe again.
        self.misses = self.misses.checked_add(1).unwrap_or(WARM_MISSES + 1);
        if self.misses > WARM_MISSES && !self.misses.is_multiple_of(PROBE_EVERY) {
            return http::for_each_message(captured, payload_len, redact_query, each);
        }
        #[cfg(test)]
        {
            self.remembered += 1;
        }
        self.messages.clear();
        let mut all_remembered = true;
        let end = http::for_each_message(captured, payload_len, redact_query, |m| {
            match Remembered::new(m, captured) {
                Some(r) => self.messages.push(r),
                None => all_remembered = false,
            }
            each(m);
        });
        self.bytes.clear();
        self.bytes.extend_from_slice(captured);
        self.payload_len = payload_len;
        self.redact_query = redact_query;
        self.end = end;
        self.valid = all_remembered;
        end
    }

    /// Counts a segment whose messages the caller took from the segment it just read: the
    /// same bytes seen on a second veth, handed on with the first sighting.
    pub fn count_shared(&mut self) {
        self.repeats += 1;
    }

    /// Segments answered from memory so far (also those counted by `count_shared`).
    pub fn repeats(&self) -> u64 {
        self.repeats
    }
}

/// Where a borrowed part lies in the segment's bytes (which are at most `HEAD_LEN`
/// long, so 16 bits each keep a remembered message small: it is copied per message).
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    start: u16,
    len: u16,
}

impl Span {
    /// The span of `part` within `buf`; `None` if it is not inside it (never the case
    /// for what the parser returns, but then the segment is simply not remembered).
    fn of(part: &[u8], buf: &[u8]) -> Option<Span> {
        if part.is_empty() {
            return Some(Span::default());
        }
        let start = (part.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
        if start.checked_add(part.len())? > buf.len() {
            return None;
        }
        Some(Span {
            start: u16::try_from(start).ok()?,
            len: u16::try_from(part.len()).ok()?,
        })
    }

    fn bytes(self, buf: &[u8]) -> &[u8] {
        let start = usize::from(self.start);
        buf.get(start..start + usize::from(self.len))
            .unwrap_or_default()
    }

    /// Text that was text in equal bytes, so the check cannot fail.
    fn text(self, buf: &[u8]) -> &str {
        std::str::from_utf8(self.bytes(buf)).unwrap_or_default()
    }
}

/// A message as offsets into its segment's bytes, and what it does not borrow.
#[derive(Clone, Copy, Debug)]
struct Remembered {
    /// `None` for a request (whose query may be redacted), else the response status.
    status: Option<u16>,
    query_redacted: bool,
    method: Span,
    path: Span,
    /// traceparent, tracestate, host, x-request-id.
    values: [Span; 4],
    content_length: Option<u64>,
    transfer_encoding: bool,
    offset: u32,
    body_bytes: u64,
    truncated: bool,
}

impl Remembered {
    fn new(m: &Message<'_>, buf: &[u8]) -> Option<Remembered> {
        let (status, query_redacted, method, path, h) = match &m.head {
            Head::Request(r) => (
                None,
                r.path.query_redacted,
                Span::of(r.method.as_bytes(), buf)?,
                Span::of(r.path.kept.as_bytes(), buf)?,
                &r.headers,
            ),
            Head::Response(r) => (
                Some(r.status),
                false,
                Span::default(),
                Span::default(),
                &r.headers,
            ),
        };
        Some(Remembered {
            status,
            query_redacted,
            method,
            path,
            values: [
                Span::of(h.traceparent.0, buf)?,
                Span::of(h.tracestate.0, buf)?,
                Span::of(h.host.0, buf)?,
                Span::of(h.request_id.0, buf)?,
            ],
            content_length: h.content_length,
            transfer_encoding: h.transfer_encoding,
            offset: m.offset,
            body_bytes: m.body_bytes,
            truncated: m.truncated,
        })
    }

    /// The message, borrowing `buf` (bytes equal to those it was read from).
    fn rebuild<'a>(&self, buf: &'a [u8]) -> Message<'a> {
        let [traceparent, tracestate, host, request_id] = self.values;
        let headers = KeptHeaders {
            traceparent: Value(traceparent.bytes(buf)),
            tracestate: Value(tracestate.bytes(buf)),
            host: Value(host.bytes(buf)),
            request_id: Value(request_id.bytes(buf)),
            content_length: self.content_length,
            transfer_encoding: self.transfer_encoding,
        };
        let head = match self.status {
            None => Head::Request(RequestHead {
                method: self.method.text(buf),
                path: Target {
                    kept: self.path.text(buf),
                    query_redacted: self.query_redacted,
                },
                headers,
            }),
            Some(status) => Head::Response(ResponseHead { status, headers }),
        };
        Message {
            head,
            offset: self.offset,
            body_bytes: self.body_bytes,
            truncated: self.truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answer as a fresh parse: messages (every borrowed part equal, and
    /// borrowed from the bytes handed in) and end.
    fn assert_same_as_fresh(last: &mut LastSegment, bytes: &[u8], payload_len: u32, redact: bool) {
        let mut fresh = Vec::new();
        let fresh_end = http::for_each_message(bytes, payload_len, redact, |m| fresh.push(*m));
        let mut got = Vec::new();
        let end = last.for_each_message(bytes, payload_len, redact, |m| got.push(*m));
        assert_eq!(got, fresh, "{:?}", String::from_utf8_lossy(bytes));
        assert_eq!(end, fresh_end);
        let range = bytes.as_ptr_range();
        for m in &got {
            if let Head::Request(r) = &m.head
                && !r.method.is_empty()
            {
                assert!(
                    range.contains(&r.method.as_ptr()),
                    "borrowed from the new bytes"
                );
            }
        }
    }

    #[test]
    fn a_repeated_segment_gets_the_messages_of_a_fresh_parse() {
        let req = b"POST /a?token=s HTTP/1.1\r\nHost: h:80\r\ntraceparent: 00-ab-cd-01\r\n\
tracestate: x=1\r\nx-request-id: r1\r\ncontent-length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nX-Request-Id: r2\r\nContent-Length: 0\r\n\r\n";
        let mut last = LastSegment::default();
        for round in 0..3 {
            // A copy at another address each time, as the next ring record would be.
            for bytes in [req.to_vec(), req.to_vec(), resp.to_vec(), resp.to_vec()] {
                assert_same_as_fresh(&mut last, &bytes, bytes.len() as u32, true);
            }
            assert_eq!(last.repeats(), 2 * (round + 1), "the second of each pair");
        }
        // The same bytes under another payload length or redaction are parsed again.
        assert_same_as_fresh(&mut last, resp, resp.len() as u32 + 100, true);
        assert_same_as_fresh(&mut last, req, req.len() as u32, true);
        assert_same_as_fresh(&mut last, req, req.len() as u32, false);
        assert_same_as_fresh(&mut last, req, req.len() as u32 + 7, false);
        assert_eq!(last.repeats(), 6);
    }

    #[test]
    fn errors_cut_heads_and_the_empty_segment_repeat_exactly() {
        let cases: [(&[u8], u32); 6] = [
            (b"GET /x HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc", 600),
            (b"GET /very/long?secret=1", 9000),
            (b"HTTP/1.1 503 Busy\r\nRetry-After: 1", 600),
            (b"GET /a HTTP/1.1\r\n\r\n\x00\x01garbage", 30),
            (b"\x00\x01", 2),
            (b"", 0),
        ];
        let mut last = LastSegment::default();
        for (i, (bytes, len)) in cases.into_iter().enumerate() {
            assert_same_as_fresh(&mut last, bytes, len, true);
            // Equal bytes at another address, as the next ring record would be.
            let copy = bytes.to_vec();
            assert_same_as_fresh(&mut last, &copy, len, true);
            assert_eq!(last.repeats(), i as u64 + 1);
        }
    }

    #[test]
    fn random_sequences_match_fresh_parses() {
        // Segments drawn from a few variants (so that repeats happen), some mutated.
        let variants: [&[u8]; 4] = [
            b"GET /p?q=1 HTTP/1.1\r\nHost: a\r\ntraceparent: 00-1-2-01\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 204 No\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"PUT /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut last = LastSegment::default();
        let mut previous: Option<(Vec<u8>, u32, bool)> = None;
        let mut expected_repeats = 0;
        for _ in 0..2_000 {
            // Half the time the segment before again (as a second veth sees it).
            let key = match previous.clone() {
                Some(key) if next(2) == 0 => key,
                _ => {
                    let mut bytes = variants[next(4) as usize].to_vec();
                    if next(4) == 0 {
                        let i = next(bytes.len() as u64) as usize;
                        bytes[i] = next(256) as u8;
                    }
                    bytes.truncate(bytes.len() - next(3) as usize);
                    let payload_len = bytes.len() as u32 + next(2) as u32 * 50;
                    (bytes, payload_len, next(2) == 0)
                }
            };
            expected_repeats += u64::from(previous.as_ref() == Some(&key));
            // A copy at another address, as the next ring record would be.
            let (bytes, payload_len, redact) = key.clone();
            assert_same_as_fresh(&mut last, &bytes, payload_len, redact);
            previous = Some(key);
        }
        // Runs of 8 and more segments that are not repeats happen here, and cool the
        // memory down: a few repeats right after them are parsed again.
        assert!(
            expected_repeats > 500,
            "{expected_repeats}: too few repeats to test"
        );
        assert!(last.repeats() <= expected_repeats);
        assert!(
            last.repeats() >= expected_repeats * 8 / 10,
            "{} of {expected_repeats}",
            last.repeats()
        );
    }

    fn unique(i: u32) -> Vec<u8> {
        format!("GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes()
    }

    #[test]
    fn traffic_without_repeats_is_mostly_not_remembered_and_repeats_warm_it_up() {
        let mut last = LastSegment::default();
        // Never repeating: the first WARM_MISSES, then one in PROBE_EVERY.
        for i in 0..(WARM_MISSES + 10 * PROBE_EVERY) {
            let bytes = unique(i);
            assert_same_as_fresh(&mut last, &bytes, bytes.len() as u32, true);
        }
        assert_eq!(last.repeats(), 0);
        assert!(
            last.remembered <= u64::from(WARM_MISSES + 10),
            "{} remembered",
            last.remembered
        );
        // Pairs: a probe catches one within PROBE_EVERY pairs, then every pair hits.
        for i in 0..PROBE_EVERY * 2 {
            let bytes = unique(1_000 + i);
            assert_same_as_fresh(&mut last, &bytes, bytes.len() as u32, true);
            let copy = bytes.clone();
            assert_same_as_fresh(&mut last, &copy, copy.len() as u32, true);
        }
        assert!(
            last.repeats() >= u64::from(PROBE_EVERY),
            "{} repeats",
            last.repeats()
        );
        let before = last.repeats();
        for i in 0..10 {
            let bytes = unique(2_000 + i);
            assert_same_as_fresh(&mut last, &bytes, bytes.len() as u32, true);
            let copy = bytes.clone();
            assert_same_as_fresh(&mut last, &copy, copy.len() as u32, true);
        }
        assert_eq!(last.repeats(), before + 10, "warm: every repeat is caught");
    }

    #[test]
    fn probing_goes_on_after_the_miss_counter_wraps() {
        let mut last = LastSegment {
            misses: u32::MAX - 2,
            ..LastSegment::default()
        };
        // Billions of misses later, repeating traffic is still noticed by a probe.
        for i in 0..PROBE_EVERY * 2 {
            let bytes = unique(i);
            assert_same_as_fresh(&mut last, &bytes, bytes.len() as u32, true);
            let copy = bytes.clone();
            assert_same_as_fresh(&mut last, &copy, copy.len() as u32, true);
        }
        assert!(last.repeats() > 0, "no probe after the counter's end");
    }
}
