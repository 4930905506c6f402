//! The `parse` stage: raw kernel events in ([`Packet`] records, `ConnEvent`), the
//! collector's output records out (`Exchange`, `Connection`).
//!
//! - [`http`] reads the HTTP/1 messages that begin in a segment's captured head.
//! - [`repeat`] answers a segment that repeats the one just before (the same bytes
//!   captured on a second veth) from memory instead of parsing it again.
//! - [`table`] keeps, per TCP connection and interface, the requests that wait for
//!   their response, within fixed bounds.
//! - [`Parser`] ties them together: a request is queued on its connection; a
//!   response on the same connection completes the oldest queued request (FIFO, so
//!   pipelining pairs correctly) into an [`Exchange`]. A segment that comes with a
//!   second sighting (a mark, `Packet::also`: the same bytes seen on a second veth) is
//!   read once, and each of its messages goes to both veths' flows.
//!
//! Sides: a request seen leaving a pod (`DIR_FROM_POD`) is the pod calling out, a
//! `CLIENT` exchange; a request seen entering a pod (`DIR_TO_POD`) is a `SERVER`
//! exchange. The response travels the other way on the same connection.
//!
//! Pairing rules beyond plain FIFO, all from TCP sequence numbers:
//! - A segment whose seq is at or shortly before (within 16 MiB) the last request
//!   (response) seq seen on its flow is a retransmission and is ignored
//!   (`retransmitted_requests`/`_responses`). A request far before it starts a new
//!   connection on a reused 4-tuple whose close was not seen: what was pending on
//!   the old one is unanswered.
//! - A response whose ack does not cover the oldest pending request's first byte
//!   cannot answer it (the server had not received it): `unmatched_responses`.
//! - If the client had received server bytes between two pending requests (their
//!   acks differ) and the response starts at or after that point, the older
//!   request's response was missed: it is dropped (`unanswered_requests`) so one
//!   lost event does not shift every later pairing on a keep-alive connection.
//! - 1xx responses do not complete a request (101 does: nothing follows it).
//!
//! Privacy: query strings are redacted by default (`/a?x=1` → `/a?<redacted>`), and
//! no header value other than `traceparent`, `tracestate`, `host`, `x-request-id`
//! (and the number in `content-length`) is ever kept.
//!
//! Nothing is dropped silently: every path that loses a message is a counter in
//! [`ParseStats`].

pub mod http;
pub mod repeat;
pub mod spare;
pub mod table;

#[cfg(test)]
mod tests;

use std::time::Duration;

use weft_ebpf_common::{
    ConnEvent, DIR_FROM_POD, DIR_TO_POD, TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_RECV, TCP_SYN_SENT,
};
use weft_proto::v1::{Connection, Endpoint, Exchange, Side, connection};

use crate::capture::Packet;

use http::{Head, RequestHead, ResponseHead};
pub use http::{ParseError, REDACTED_QUERY};
use repeat::LastSegment;
use spare::{Spares, write_endpoint};
use table::{Addr, Evicted, Flow, Pending, SockPair, Table};

/// The TCP ACK flag in `PacketEvent::tcp_flags`.
const TCP_FLAG_ACK: u8 = 0x10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseConfig {
    /// Replace query strings by `?<redacted>` (default true).
    pub redact_query: bool,
    /// Requests waiting for a response on one connection; more are dropped and
    /// counted (`evicted_requests`). Default 64.
    pub max_pending_per_conn: usize,
    /// Requests waiting over all connections (bounds memory: a pending request
    /// holds at most a head's worth of strings). Default 16,384.
    pub max_pending_total: usize,
    /// Connections tracked; a new one beyond evicts the least recently used
    /// (`evicted_connections`, its pending requests `evicted_requests`). Default 32,768.
    pub max_connections: usize,
    /// A request without a response after this long is dropped by [`Parser::expire`]
    /// (`unanswered_requests`). Default 60 s.
    pub pending_timeout: Duration,
    /// After a close event, responses still in flight may complete requests for this
    /// long; then the connection is dropped and what still waits counts as
    /// unanswered. Default 2 s.
    pub close_grace: Duration,
    /// A connection with nothing pending is forgotten after this long without
    /// traffic (not a loss). Default 5 min.
    pub idle_timeout: Duration,
}

impl Default for ParseConfig {
    fn default() -> Self {
        ParseConfig {
            redact_query: true,
            max_pending_per_conn: 64,
            max_pending_total: 16_384,
            max_connections: 32_768,
            pending_timeout: Duration::from_secs(60),
            close_grace: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Parse failures by reason ([`ParseError::name`] gives the metric label).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParseErrors([u64; ParseError::COUNT]);

impl ParseErrors {
    pub fn get(&self, reason: ParseError) -> u64 {
        self.0[reason.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Every reason with its count, zeros included (stable label set).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ParseError::ALL.iter().map(|r| (r.name(), self.get(*r)))
    }

    fn add(&mut self, reason: ParseError) {
        self.0[reason.index()] += 1;
    }
}

impl ParseStats {
    /// Every counter that stands for something lost, with a stable label (for the
    /// batch's drop map and metrics): `parse_error_<reason>` per [`ParseError`],
    /// then `head_beyond_capture`, `unmatched_response`, `unanswered_request`,
    /// `evicted_connection`, `evicted_request`.
    pub fn losses(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<_> = ParseError::ALL
            .iter()
            .map(|r| (r.loss_label(), self.parse_errors.get(*r)))
            .collect();
        out.extend([
            ("head_beyond_capture", self.heads_beyond_capture),
            ("unmatched_response", self.unmatched_responses),
            ("unanswered_request", self.unanswered_requests),
            ("evicted_connection", self.evicted_connections),
            ("evicted_request", self.evicted_requests),
        ]);
        out
    }

    fn loss_total(&self) -> u64 {
        self.parse_errors.total()
            + self.heads_beyond_capture
            + self.unmatched_responses
            + self.unanswered_requests
            + self.evicted_connections
            + self.evicted_requests
    }
}

/// Counters of the parse stage: cumulative unless marked as a gauge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParseStats {
    /// `PacketEvent`s handed in.
    pub packets: u64,
    /// Request heads read (including cut ones).
    pub requests: u64,
    /// Response heads read (including 1xx and cut ones).
    pub responses: u64,
    /// 1xx responses (they do not complete a request).
    pub interim_responses: u64,
    /// Exchanges produced.
    pub exchanges: u64,
    /// Heads that yielded nothing, by reason.
    pub parse_errors: ParseErrors,
    /// Heads cut by the capture bound or spanning segments; they still yield their
    /// first line and the header lines captured whole.
    pub truncated_heads: u64,
    /// A further pipelined message in a segment was not read (it began after the
    /// captured bytes, or past the per-segment message limit).
    pub heads_beyond_capture: u64,
    /// Segments equal to the one just before (the same bytes seen on a second veth),
    /// whose messages were taken from memory instead of parsed again.
    pub repeated_segments: u64,
    /// Retransmitted request heads (seq not after the last one seen), ignored.
    pub retransmitted_requests: u64,
    /// Retransmitted response heads, ignored.
    pub retransmitted_responses: u64,
    /// Responses that matched no pending request.
    pub unmatched_responses: u64,
    /// Pending requests that never got a response: timed out, their connection
    /// closed, or their response was missed (see the module doc).
    pub unanswered_requests: u64,
    /// Connections evicted by the `max_connections` bound (or the per-connection
    /// flow bound).
    pub evicted_connections: u64,
    /// Requests dropped by a bound: pending on an evicted connection, or refused
    /// because a pending queue was full.
    pub evicted_requests: u64,
    /// `Connection` records produced.
    pub connections: u64,
    /// Gauge: connections tracked now.
    pub tracked_connections: u64,
    /// Gauge: requests waiting for a response now.
    pub pending_requests: u64,
}

/// Turns kernel events into Exchanges and Connections. Single-threaded: the capture
/// loop owns it.
pub struct Parser {
    cfg: ParseConfig,
    table: Table,
    /// The last segment's messages, for the same segment seen on a second veth.
    last_segment: LastSegment,
    stats: ParseStats,
    /// Always equal to the sum of the pending queues (kept to avoid a scan per request).
    pending_total: usize,
    next_id: u64,
    /// Exchanges handed back after use, written again by the next requests.
    spares: Spares,
    /// Losses are logged once per kind (bit i = `ParseStats::losses()[i]`).
    logged_losses: u32,
    /// `loss_total` when losses were last looked at (a cheap "anything new?").
    seen_loss_total: u64,
}

impl Parser {
    pub fn new(cfg: ParseConfig) -> Self {
        Parser {
            cfg,
            table: Table::default(),
            last_segment: LastSegment::default(),
            stats: ParseStats::default(),
            pending_total: 0,
            next_id: 1,
            spares: Spares::default(),
            logged_losses: 0,
            seen_loss_total: 0,
        }
    }

    /// Reads the HTTP messages that begin in a captured segment and hands every Exchange
    /// it completes to `sink` (one segment can complete several: a server that coalesces
    /// pipelined responses). Handed on at once, not queued: an Exchange is a few hundred
    /// bytes, and a queue cost two more copies of each. `sink` gives the Exchange back
    /// when it is done with it, for the next ones to reuse (see [`spare`]).
    ///
    /// `ifnames`: the names of the interfaces the segment was seen on, the record's own
    /// and `Packet::also`'s (`""` when it has none). A segment seen on two veths is read
    /// once, and each message updates both veths' flows.
    pub fn on_packet_with(
        &mut self,
        pkt: &Packet<'_>,
        wall_unix_nanos: u64,
        ifnames: [&str; 2],
        mut sink: impl FnMut(Box<Exchange>) -> Option<Box<Exchange>>,
    ) {
        self.stats.packets += 1 + u64::from(pkt.also.is_some());
        self.read_packet(pkt, wall_unix_nanos, ifnames, &mut sink);
        self.log_new_losses();
    }

    /// Maps a TCP state change to a Connection record: SYN_SENT→ESTABLISHED is
    /// `CONNECTED` (this host is the client), SYN_RECV→ESTABLISHED is `ACCEPTED`,
    /// any→CLOSE is `CLOSED`; other changes yield nothing. A close also ends the
    /// connection's pending requests after [`ParseConfig::close_grace`].
    pub fn on_conn(&mut self, ev: &ConnEvent, wall_unix_nanos: u64) -> Option<Connection> {
        let event = match (ev.oldstate, ev.newstate) {
            (TCP_SYN_SENT, TCP_ESTABLISHED) => connection::Event::Connected,
            (TCP_SYN_RECV, TCP_ESTABLISHED) => connection::Event::Accepted,
            (old, TCP_CLOSE) if old != TCP_CLOSE => connection::Event::Closed,
            _ => return None,
        };
        let (Some(local), Some(remote)) = (
            Addr::from_kernel(ev.family, &ev.saddr, ev.sport),
            Addr::from_kernel(ev.family, &ev.daddr, ev.dport),
        ) else {
            self.stats.parse_errors.add(ParseError::BadEvent);
            self.log_new_losses();
            return None;
        };
        let pair = SockPair::new(local, remote);
        if event == connection::Event::Closed {
            self.mark_closed(&pair, wall_unix_nanos);
            self.log_new_losses();
        }
        self.stats.connections += 1;
        Some(Connection {
            event: event as i32,
            local: Some(endpoint(local)),
            remote: Some(endpoint(remote)),
            unix_nanos: wall_unix_nanos,
            connection_id: pair.connection_id(),
        })
    }

    /// Drops what waited too long: pending requests older than `pending_timeout`
    /// and closed connections past their grace (both `unanswered_requests`), and
    /// forgets idle connections with nothing pending. Call it periodically (every
    /// second or so); it visits every tracked connection.
    pub fn expire(&mut self, now_unix_nanos: u64) {
        let timeout = nanos(self.cfg.pending_timeout);
        let grace = nanos(self.cfg.close_grace);
        let idle = nanos(self.cfg.idle_timeout);
        let mut dropped = 0usize;
        self.table.retain(|entry| {
            if let Some(closed) = entry.closed_at
                && now_unix_nanos >= closed.saturating_add(grace)
            {
                dropped += entry.pending_count();
                return false;
            }
            for flow in &mut entry.flows {
                while flow
                    .pending
                    .front()
                    .is_some_and(|p| now_unix_nanos >= p.start_unix_nanos.saturating_add(timeout))
                {
                    flow.pending.pop_front();
                    dropped += 1;
                }
            }
            entry.pending_count() > 0 || now_unix_nanos < entry.last_seen.saturating_add(idle)
        });
        self.stats.unanswered_requests += dropped as u64;
        self.pending_total -= dropped;
        debug_assert_eq!(self.pending_total, self.table.pending_total());
        self.log_new_losses();
    }

    /// Logs the first loss of each kind, with its reason; later ones are only
    /// counted (the metrics carry them).
    fn log_new_losses(&mut self) {
        let total = self.stats.loss_total();
        if total == self.seen_loss_total {
            return;
        }
        self.seen_loss_total = total;
        for (i, (reason, count)) in self.stats.losses().into_iter().enumerate() {
            let bit = 1u32 << i;
            if count > 0 && self.logged_losses & bit == 0 {
                self.logged_losses |= bit;
                tracing::warn!(
                    reason,
                    "parse: first loss of this kind; further ones are counted, not logged"
                );
            }
        }
    }

    pub fn stats(&self) -> ParseStats {
        let mut s = self.stats.clone();
        s.tracked_connections = self.table.len() as u64;
        s.pending_requests = self.pending_total as u64;
        s.repeated_segments = self.last_segment.repeats();
        s
    }

    fn read_packet(
        &mut self,
        pkt: &Packet<'_>,
        wall: u64,
        ifnames: [&str; 2],
        sink: &mut dyn FnMut(Box<Exchange>) -> Option<Box<Exchange>>,
    ) {
        let ev = &pkt.header;
        let (Some(src), Some(dst), Some(first)) = (
            Addr::from_kernel(ev.family, &ev.saddr, ev.sport),
            Addr::from_kernel(ev.family, &ev.daddr, ev.dport),
            Seen::of(ev.ifindex, ev.direction, ifnames[0]),
        ) else {
            self.stats.parse_errors.add(ParseError::BadEvent);
            return;
        };
        // A mark's direction is always one (`Sighting::from_mark`).
        let second = pkt
            .also
            .and_then(|s| Seen::of(s.ifindex, s.direction, ifnames[1]));
        let seen = [Some(first), second];
        let n = 1 + u64::from(second.is_some());
        let captured = pkt.payload;
        let ack = (ev.tcp_flags & TCP_FLAG_ACK != 0).then_some(ev.ack);
        let redact = self.cfg.redact_query;
        // Taken out for the call: the closure below needs the rest of `self`.
        let mut last = std::mem::take(&mut self.last_segment);
        let end = last.for_each_message(captured, ev.payload_len, redact, |msg| {
            if msg.truncated {
                self.stats.truncated_heads += n;
            }
            let seg_ref = SegmentRef {
                src,
                dst,
                seq: ev.seq.wrapping_add(msg.offset),
                ack,
                wall,
                body_bytes: msg.body_bytes,
            };
            match &msg.head {
                Head::Request(req) => {
                    self.stats.requests += n;
                    self.on_request(seg_ref, &seen, req);
                }
                Head::Response(resp) => {
                    self.stats.responses += n;
                    self.on_response(seg_ref, resp, &seen, sink);
                }
            }
        });
        if second.is_some() {
            last.count_shared();
        }
        self.last_segment = last;
        if let Some(e) = end.error {
            for _ in 0..n {
                self.stats.parse_errors.add(e);
            }
        }
        if end.beyond_capture {
            self.stats.heads_beyond_capture += n;
        }
    }

    /// Queues the request on the flow of every veth it was seen on (one connection
    /// lookup for both).
    fn on_request(&mut self, seg: SegmentRef, seen: &Sightings<'_>, req: &RequestHead<'_>) {
        let pair = SockPair::new(seg.src, seg.dst);
        let (entry, mut evicted) =
            self.table
                .entry_or_insert(pair, seg.wall, self.cfg.max_connections);
        for s in seen.iter().flatten() {
            let flow = entry.flow(seg.src, s.ifindex, &mut evicted);
            // What making room pushed out, and what was pending on a closed connection
            // whose 4-tuple came back (never answered).
            count_evicted(
                &mut self.stats,
                &mut self.pending_total,
                std::mem::take(&mut evicted),
            );
            if !admit_request(flow, seg.seq, &mut self.stats, &mut self.pending_total) {
                continue;
            }
            flow.last_request_seq = Some(seg.seq);
            if flow.pending.len() >= self.cfg.max_pending_per_conn
                || self.pending_total >= self.cfg.max_pending_total
            {
                // Refuse the newest rather than drop the oldest: the oldest is the one
                // the next response answers.
                self.stats.evicted_requests += 1;
                continue;
            }
            flow.pending.push_back(Pending {
                seq: seg.seq,
                ack: seg.ack,
                start_unix_nanos: seg.wall,
                side: s.side,
                request_bytes: seg.body_bytes,
                // Copied out of the segment only now: a request that is not queued
                // takes no spare.
                request: self.spares.with_request(req),
                interim_seen: false,
            });
            self.pending_total += 1;
        }
    }

    /// Completes the oldest request on the flow of every veth the response was seen on
    /// (one connection lookup for both), and hands each Exchange to `sink`.
    fn on_response(
        &mut self,
        seg: SegmentRef,
        resp: &ResponseHead<'_>,
        seen: &Sightings<'_>,
        sink: &mut dyn FnMut(Box<Exchange>) -> Option<Box<Exchange>>,
    ) {
        let pair = SockPair::new(seg.src, seg.dst);
        let Some(entry) = self.table.get_touched(&pair, seg.wall) else {
            self.stats.unmatched_responses += seen.iter().flatten().count() as u64;
            return;
        };
        let connection_id = entry.connection_id;
        for s in seen.iter().flatten() {
            // The response travels server → client.
            let Some(flow) = entry.flow_of(seg.dst, s.ifindex) else {
                self.stats.unmatched_responses += 1;
                continue;
            };
            let Some(req) =
                answered_request(flow, &seg, resp, &mut self.stats, &mut self.pending_total)
            else {
                continue;
            };
            self.stats.exchanges += 1;
            let id = self.next_id;
            self.next_id += 1;
            let ex = exchange(id, req, connection_id, &seg, s, resp);
            if let Some(done) = sink(ex) {
                self.spares.give(done);
            }
        }
    }

    fn mark_closed(&mut self, pair: &SockPair, wall: u64) {
        if self.cfg.close_grace.is_zero() {
            if let Some(old) = self.table.remove(pair) {
                let n = old.pending_count();
                self.stats.unanswered_requests += n as u64;
                self.pending_total -= n;
            }
        } else if let Some(entry) = self.table.get_mut(pair) {
            entry.closed_at.get_or_insert(wall);
        }
    }
}

/// When one message was sent, and on which connection.
#[derive(Clone, Copy)]
struct SegmentRef {
    src: Addr,
    dst: Addr,
    /// TCP seq of the message's first byte.
    seq: u32,
    ack: Option<u32>,
    wall: u64,
    body_bytes: u64,
}

/// Where a segment was seen: the interface, and the half of the exchange it shows (a
/// request leaving a pod, `DIR_FROM_POD`, is the pod's `CLIENT` half; entering one, the
/// `SERVER` half).
#[derive(Clone, Copy)]
struct Seen<'n> {
    ifindex: u32,
    ifname: &'n str,
    side: Side,
}

/// Every place one segment was seen: the record's own, and a mark's (`Packet::also`).
type Sightings<'n> = [Option<Seen<'n>>; 2];

impl<'n> Seen<'n> {
    /// `None` for a direction that is neither.
    #[inline]
    fn of(ifindex: u32, direction: u8, ifname: &'n str) -> Option<Self> {
        let side = match direction {
            DIR_FROM_POD => Side::Client,
            DIR_TO_POD => Side::Server,
            _ => return None,
        };
        Some(Seen {
            ifindex,
            ifname,
            side,
        })
    }
}

/// Counts what an insertion into the table pushed out.
#[inline]
fn count_evicted(stats: &mut ParseStats, pending_total: &mut usize, evicted: Evicted) {
    stats.unanswered_requests += evicted.unanswered;
    stats.evicted_connections += evicted.connections;
    stats.evicted_requests += evicted.requests;
    *pending_total -= (evicted.unanswered + evicted.requests) as usize;
}

/// Whether a request at `seq` is new on `flow`: not if it is a retransmission. A request
/// far behind the flow's last one starts a new connection on the same 4-tuple whose
/// close was not seen: what was pending is never answered.
#[inline]
fn admit_request(
    flow: &mut Flow,
    seq: u32,
    stats: &mut ParseStats,
    pending_total: &mut usize,
) -> bool {
    match flow.last_request_seq.map(|last| position(seq, last)) {
        Some(SeqPosition::Retransmission) => {
            stats.retransmitted_requests += 1;
            false
        }
        Some(SeqPosition::Reused) => {
            let n = flow.pending.len();
            stats.unanswered_requests += n as u64;
            *pending_total -= n;
            flow.pending.clear();
            flow.last_response_seq = None;
            true
        }
        None | Some(SeqPosition::Ahead) => true,
    }
}

/// The request on `flow` that the response `seg` answers, taken off the flow; `None`
/// (counted) when it answers none: a retransmission, an interim (1xx) response, or no
/// request the server could have received. Requests whose response came before this one
/// but was not seen are dropped on the way (see the module doc).
#[inline]
fn answered_request(
    flow: &mut Flow,
    seg: &SegmentRef,
    resp: &ResponseHead<'_>,
    stats: &mut ParseStats,
    pending_total: &mut usize,
) -> Option<Pending> {
    if let Some(last) = flow.last_response_seq
        && position(seg.seq, last) == SeqPosition::Retransmission
    {
        stats.retransmitted_responses += 1;
        return None;
    }
    flow.last_response_seq = Some(seg.seq);
    while let (Some(first), Some(second)) = (flow.pending.front(), flow.pending.get(1))
        && response_was_missed(first, second, seg.seq)
    {
        flow.pending.pop_front();
        *pending_total -= 1;
        stats.unanswered_requests += 1;
    }
    let Some(front) = flow.pending.front_mut() else {
        stats.unmatched_responses += 1;
        return None;
    };
    if let Some(ack) = seg.ack
        && !seq_after(ack, front.seq)
    {
        // The server had not yet received the oldest pending request.
        stats.unmatched_responses += 1;
        return None;
    }
    if resp.is_interim() {
        front.interim_seen = true;
        stats.interim_responses += 1;
        return None;
    }
    let req = flow.pending.pop_front()?;
    *pending_total -= 1;
    Some(req)
}

/// The Exchange `id` of `req` and the response `seg`, as seen at `seen`: the request's
/// spare, with every field the request did not write written now.
#[inline]
fn exchange(
    id: u64,
    req: Pending,
    connection_id: u64,
    seg: &SegmentRef,
    seen: &Seen<'_>,
    resp: &ResponseHead<'_>,
) -> Box<Exchange> {
    let mut ex = req.request;
    // Every field is named (no `..`): the request's fields (`_` here) were written by
    // `spare::write_request`, every other one is written here, so nothing of the
    // spare's earlier Exchange survives (and a field added to the proto does not
    // compile until it is handled).
    let Exchange {
        id: ex_id,
        side,
        client,
        server,
        request_seq,
        response_seq,
        start_unix_nanos,
        end_unix_nanos,
        method: _,
        path: _,
        status,
        request_bytes,
        response_bytes,
        traceparent: _,
        tracestate: _,
        host: _,
        request_id,
        ifindex,
        interface,
        connection_id: ex_connection_id,
        pid,
        tid,
    } = &mut *ex;
    *ex_id = id;
    *side = req.side as i32;
    // The response travels server → client.
    write_endpoint(client, seg.dst.ip_bytes(), seg.dst.port());
    write_endpoint(server, seg.src.ip_bytes(), seg.src.port());
    (*request_seq, *response_seq) = (req.seq, seg.seq);
    *start_unix_nanos = req.start_unix_nanos;
    // The ack check made the response follow its request; only a wall-clock step
    // between the two could order them the other way (the stitcher rejects that).
    *end_unix_nanos = seg.wall.max(req.start_unix_nanos);
    *status = u32::from(resp.status);
    (*request_bytes, *response_bytes) = (req.request_bytes, seg.body_bytes);
    // Proxies often set x-request-id on the response only.
    if request_id.is_empty() {
        resp.headers.request_id.write_to(request_id);
    }
    *ifindex = seen.ifindex;
    interface.clear();
    interface.push_str(seen.ifname);
    *ex_connection_id = connection_id;
    (*pid, *tid) = (0, 0);
    ex
}

/// The client had received server bytes between sending `first` and `second`
/// (their acks differ): that was `first`'s response (or part of it). A response
/// starting at or after `second`'s ack is therefore not `first`'s.
fn response_was_missed(first: &Pending, second: &Pending, response_seq: u32) -> bool {
    match (first.ack, second.ack) {
        (Some(a1), Some(a2)) => !first.interim_seen && a1 != a2 && !seq_after(a2, response_seq),
        _ => false,
    }
}

/// How far behind the last seq seen on its flow a message starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SeqPosition {
    /// After the last one: a new message.
    Ahead,
    /// At or shortly before it: the segment was sent again.
    Retransmission,
    /// Far before it: not this connection's stream any more (the 4-tuple was
    /// reused by a connection with another initial sequence number).
    Reused,
}

/// A retransmission starts at most this far before the newest message seen (it
/// lies within the data in flight, bounded by the send window).
const RETRANSMIT_WINDOW: u32 = 1 << 24;

fn position(seq: u32, last: u32) -> SeqPosition {
    if seq_after(seq, last) {
        SeqPosition::Ahead
    } else if last.wrapping_sub(seq) < RETRANSMIT_WINDOW {
        SeqPosition::Retransmission
    } else {
        SeqPosition::Reused
    }
}

/// `a` comes strictly after `b` in TCP sequence space (RFC 1982 serial arithmetic).
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn endpoint(addr: Addr) -> Endpoint {
    Endpoint {
        ip: addr.ip_bytes().to_vec(),
        port: u32::from(addr.port()),
    }
}
