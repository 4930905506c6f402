//! Parser tests: packet records and ConnEvents built by hand, as the kernel writes them.

use std::net::SocketAddr;
use std::time::Duration;

use weft_ebpf_common::{
    ConnEvent, DIR_FROM_POD, DIR_TO_POD, FAMILY_IPV4, FAMILY_IPV6, HEAD_LEN, PacketHeader,
    RECORD_REPEAT, Sighting, TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_RECV, TCP_SYN_SENT,
};
use weft_proto::v1::{Exchange, Side, connection};

use super::table::SockPair;
use super::*;

/// `enum tcp_state` value not exported by the common crate.
const TCP_FIN_WAIT1: i32 = 4;
const POD: &str = "10.244.1.9:37450";
const SVC: &str = "10.96.0.20:80";
const IFINDEX: u32 = 12;
const MS: u64 = 1_000_000;
const T0: u64 = 1_795_341_600_000_000_000;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn addr_bytes(a: SocketAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match a {
        SocketAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.ip().octets());
            (FAMILY_IPV4, out)
        }
        SocketAddr::V6(v6) => (FAMILY_IPV6, v6.ip().octets()),
    }
}

/// A captured segment as a test builds it: the record's header (reachable through
/// `Deref`, so tests can corrupt its fields) and the payload head that follows it.
struct Seg {
    header: PacketHeader,
    head: Vec<u8>,
}

impl Seg {
    fn packet(&self) -> Packet<'_> {
        Packet {
            header: self.header,
            payload: &self.head,
            also: None,
        }
    }
}

impl std::ops::Deref for Seg {
    type Target = PacketHeader;
    fn deref(&self) -> &PacketHeader {
        &self.header
    }
}

impl std::ops::DerefMut for Seg {
    fn deref_mut(&mut self) -> &mut PacketHeader {
        &mut self.header
    }
}

/// The tests' view of [`Parser::on_packet_with`]: the exchanges one segment completed.
trait Feed {
    /// Every exchange the segment completed.
    fn on_packet_all(&mut self, seg: &Seg, wall: u64, ifname: &str) -> Vec<Exchange>;
    /// The exchange the segment completed, if any (the tests that expect several use
    /// `on_packet_all`).
    fn on_packet(&mut self, seg: &Seg, wall: u64, ifname: &str) -> Option<Exchange> {
        let mut all = self.on_packet_all(seg, wall, ifname);
        assert!(
            all.len() <= 1,
            "one segment completed {} exchanges",
            all.len()
        );
        all.pop()
    }
}

impl Feed for Parser {
    /// Gives every exchange back, as the local-only pipeline does: every later one in
    /// every test is written into a spare, so each test's assertions also check that
    /// nothing of an earlier exchange survives in a reused one.
    fn on_packet_all(&mut self, seg: &Seg, wall: u64, ifname: &str) -> Vec<Exchange> {
        let mut out = Vec::new();
        self.on_packet_with(&seg.packet(), wall, [ifname, ""], |ex| {
            out.push((*ex).clone());
            Some(ex)
        });
        out
    }
}

impl Parser {
    /// Every exchange a segment completed that was seen on a second veth too, handed on
    /// as one packet with a mark (`Packet::also`), as the ring reader does.
    fn on_marked_packet(
        &mut self,
        seg: &Seg,
        also: Sighting,
        wall: u64,
        ifnames: [&str; 2],
    ) -> Vec<Exchange> {
        let mut out = Vec::new();
        let packet = Packet {
            also: Some(also),
            ..seg.packet()
        };
        self.on_packet_with(&packet, wall, ifnames, |ex| {
            out.push((*ex).clone());
            Some(ex)
        });
        out
    }
}

/// A segment `src → dst` carrying `payload` (captured up to `HEAD_LEN`), ACK|PSH.
fn pkt(direction: u8, src: &str, dst: &str, seq: u32, ack: u32, payload: &[u8]) -> Seg {
    let (src, dst) = (sa(src), sa(dst));
    let (family, saddr) = addr_bytes(src);
    let (_, daddr) = addr_bytes(dst);
    let captured = payload.len().min(HEAD_LEN);
    Seg {
        header: PacketHeader {
            ts_ns: 0,
            ifindex: IFINDEX,
            seq,
            ack,
            payload_len: payload.len() as u32,
            saddr,
            daddr,
            sport: src.port(),
            dport: dst.port(),
            family,
            direction,
            tcp_flags: 0x18,
            record_flags: 0,
            captured_len: captured as u32,
            also: 0,
        },
        head: payload[..captured].to_vec(),
    }
}

fn conn_ev(oldstate: i32, newstate: i32, local: &str, remote: &str) -> ConnEvent {
    let (local, remote) = (sa(local), sa(remote));
    let (family, saddr) = addr_bytes(local);
    let (_, daddr) = addr_bytes(remote);
    ConnEvent {
        ts_ns: 0,
        skaddr: 0xffff_8880_0000_1000,
        oldstate,
        newstate,
        saddr,
        daddr,
        sport: local.port(),
        dport: remote.port(),
        family,
        _pad: [0; 3],
        netns: 0,
        _pad2: 0,
    }
}

const GET_ITEMS: &[u8] = b"GET /api/items?id=7&token=s3cr3t HTTP/1.1\r\nHost: backend.demo\r\n\
traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
tracestate: vendor=1\r\nX-Request-Id: req-42\r\nAuthorization: Bearer top-secret-token\r\n\
Cookie: session=top-secret-cookie\r\nAccept: */*\r\n\r\n";

const OK_5: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=top-secret-set\r\n\r\nhello";

fn parser() -> Parser {
    Parser::new(ParseConfig::default())
}

/// The client (pod) asks, the server answers: returns the exchange.
fn roundtrip(p: &mut Parser, req_dir: u8, client: &str, server: &str) -> Option<Exchange> {
    let resp_dir = if req_dir == DIR_FROM_POD {
        DIR_TO_POD
    } else {
        DIR_FROM_POD
    };
    let req = pkt(req_dir, client, server, 1000, 5000, GET_ITEMS);
    assert!(p.on_packet(&req, T0, "veth1").is_none());
    let resp = pkt(
        resp_dir,
        server,
        client,
        5000,
        1000 + GET_ITEMS.len() as u32,
        OK_5,
    );
    p.on_packet(&resp, T0 + 5 * MS, "veth1")
}

#[test]
fn client_side_exchange_has_every_field() {
    let mut p = parser();
    let ex = roundtrip(&mut p, DIR_FROM_POD, POD, SVC).expect("exchange");
    assert_eq!(ex.id, 1);
    assert_eq!(ex.side(), Side::Client);
    assert_eq!(
        ex.client.as_ref().map(|e| (e.ip.clone(), e.port)),
        Some((vec![10, 244, 1, 9], 37450))
    );
    assert_eq!(
        ex.server.as_ref().map(|e| (e.ip.clone(), e.port)),
        Some((vec![10, 96, 0, 20], 80))
    );
    assert_eq!((ex.request_seq, ex.response_seq), (1000, 5000));
    assert_eq!((ex.start_unix_nanos, ex.end_unix_nanos), (T0, T0 + 5 * MS));
    assert_eq!(ex.method, "GET");
    assert_eq!(ex.path, "/api/items?<redacted>");
    assert_eq!(ex.status, 200);
    assert_eq!((ex.request_bytes, ex.response_bytes), (0, 5));
    assert_eq!(
        ex.traceparent,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(ex.tracestate, "vendor=1");
    assert_eq!(ex.host, "backend.demo");
    assert_eq!(ex.request_id, "req-42");
    assert_eq!(ex.ifindex, IFINDEX);
    assert_eq!(ex.interface, "veth1");
    assert_eq!(
        ex.connection_id,
        SockPair::new(sa(POD).into(), sa(SVC).into()).connection_id()
    );
    assert_eq!((ex.pid, ex.tid), (0, 0));
    let s = p.stats();
    assert_eq!((s.requests, s.responses, s.exchanges), (1, 1, 1));
    assert_eq!((s.pending_requests, s.tracked_connections), (0, 1));
    assert_eq!(s.parse_errors.total(), 0);
}

#[test]
fn server_side_exchange_is_a_request_entering_the_pod() {
    let mut p = parser();
    let caller = "10.244.2.7:51000";
    let pod = "10.244.1.9:8080";
    let ex = roundtrip(&mut p, DIR_TO_POD, caller, pod).expect("exchange");
    assert_eq!(ex.side(), Side::Server);
    assert_eq!(ex.client.map(|e| e.port), Some(51000));
    assert_eq!(ex.server.map(|e| e.port), Some(8080));
    assert_eq!((ex.request_seq, ex.response_seq), (1000, 5000));
}

#[test]
fn a_reused_exchange_keeps_nothing_of_the_one_before() {
    let mut p = parser();
    let first = roundtrip(&mut p, DIR_FROM_POD, POD, SVC).expect("exchange");
    assert_eq!(first.request_id, "req-42");
    assert_eq!(p.spares.available(), 1, "the exchange was given back");
    // IPv6, another interface, no kept header, no body, a status without reason.
    let (client, server) = ("[fd00::9]:40000", "[fd00::20]:8080");
    let req = b"POST /b HTTP/1.1\r\n\r\n";
    let resp = b"HTTP/1.1 204 \r\n\r\n";
    assert!(
        p.on_packet(&pkt(DIR_TO_POD, client, server, 7, 70, req), T0, "lxc2")
            .is_none()
    );
    assert_eq!(p.spares.available(), 0, "the request took the spare");
    let next_seq = 7 + req.len() as u32;
    let ex = p
        .on_packet(
            &pkt(DIR_FROM_POD, server, client, 70, next_seq, resp),
            T0 + MS,
            "lxc2",
        )
        .expect("exchange");
    let want = Exchange {
        id: 2,
        side: Side::Server as i32,
        client: Some(Endpoint {
            ip: v6_bytes(client),
            port: 40000,
        }),
        server: Some(Endpoint {
            ip: v6_bytes(server),
            port: 8080,
        }),
        request_seq: 7,
        response_seq: 70,
        start_unix_nanos: T0,
        end_unix_nanos: T0 + MS,
        method: "POST".into(),
        path: "/b".into(),
        status: 204,
        ifindex: IFINDEX,
        interface: "lxc2".into(),
        connection_id: ex.connection_id,
        ..Default::default()
    };
    assert_eq!(ex, want);
}

fn v6_bytes(addr: &str) -> Vec<u8> {
    match sa(addr).ip() {
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
        other => panic!("not IPv6: {other}"),
    }
}

#[test]
fn spares_are_bounded() {
    let mut spares = Spares::default();
    for _ in 0..spare::MAX_SPARES + 10 {
        spares.give(Box::default());
    }
    assert_eq!(spares.available(), spare::MAX_SPARES);
    let long = Exchange {
        path: "/x".repeat(600),
        ..Default::default()
    };
    let mut few = Spares::default();
    few.give(Box::new(long));
    assert_eq!(
        few.available(),
        0,
        "a spare with a large buffer is freed, not kept"
    );
}

#[test]
fn authorization_and_cookies_are_never_kept() {
    let mut p = parser();
    let ex = roundtrip(&mut p, DIR_FROM_POD, POD, SVC).expect("exchange");
    let all = format!("{ex:?}");
    assert!(!all.contains("top-secret"), "{all}");
    assert!(!all.contains("s3cr3t"), "query value leaked: {all}");
    assert!(!all.contains("Bearer"));
}

#[test]
fn query_is_kept_only_when_configured() {
    let mut p = Parser::new(ParseConfig {
        redact_query: false,
        ..ParseConfig::default()
    });
    let ex = roundtrip(&mut p, DIR_FROM_POD, POD, SVC).expect("exchange");
    assert_eq!(ex.path, "/api/items?id=7&token=s3cr3t");
}

/// Request/response pairs on one keep-alive connection, with realistic seq/acks:
/// each request acks the previous response in full.
fn keep_alive(p: &mut Parser, n: u32, drop_response: Option<u32>) -> Vec<Exchange> {
    let req = b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut out = Vec::new();
    let (mut cseq, mut sseq) = (100u32, 9000u32);
    for i in 0..n {
        let t = T0 + u64::from(i) * 10 * MS;
        assert!(
            p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, cseq, sseq, req), t, "v")
                .is_none()
        );
        cseq += req.len() as u32;
        if drop_response != Some(i) {
            let r = pkt(DIR_TO_POD, SVC, POD, sseq, cseq, OK_5);
            out.extend(p.on_packet(&r, t + MS, "v"));
        }
        sseq += OK_5.len() as u32;
    }
    out
}

#[test]
fn keep_alive_pairs_each_request_with_its_response() {
    let mut p = parser();
    let got = keep_alive(&mut p, 3, None);
    let seqs: Vec<_> = got
        .iter()
        .map(|e| (e.id, e.request_seq, e.response_seq))
        .collect();
    let (q, r) = (28u32, OK_5.len() as u32);
    assert_eq!(
        seqs,
        vec![
            (1, 100, 9000),
            (2, 100 + q, 9000 + r),
            (3, 100 + 2 * q, 9000 + 2 * r)
        ]
    );
    assert_eq!(p.stats().pending_requests, 0);
}

#[test]
fn a_lost_response_does_not_shift_later_pairings() {
    let mut p = parser();
    let got = keep_alive(&mut p, 4, Some(1));
    let seqs: Vec<_> = got
        .iter()
        .map(|e| (e.request_seq, e.response_seq))
        .collect();
    let (q, r) = (28u32, OK_5.len() as u32);
    assert_eq!(
        seqs,
        vec![
            (100, 9000),
            (100 + 2 * q, 9000 + 2 * r),
            (100 + 3 * q, 9000 + 3 * r)
        ]
    );
    let s = p.stats();
    assert_eq!(s.unanswered_requests, 1);
    assert_eq!(s.pending_requests, 0);
}

#[test]
fn pipelined_requests_pair_in_order() {
    let mut p = parser();
    let paths = ["/a", "/b", "/c"];
    let mut cseq = 1u32;
    for path in paths {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        // Sent back to back: all ack the same server seq.
        assert!(
            p.on_packet(
                &pkt(DIR_FROM_POD, POD, SVC, cseq, 7000, req.as_bytes()),
                T0,
                "v"
            )
            .is_none()
        );
        cseq += req.len() as u32;
    }
    let mut sseq = 7000u32;
    let mut got = Vec::new();
    for status in [200, 404, 500] {
        let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
        got.extend(p.on_packet(
            &pkt(DIR_TO_POD, SVC, POD, sseq, cseq, resp.as_bytes()),
            T0 + MS,
            "v",
        ));
        sseq += resp.len() as u32;
    }
    let pairs: Vec<_> = got.iter().map(|e| (e.path.as_str(), e.status)).collect();
    assert_eq!(pairs, vec![("/a", 200), ("/b", 404), ("/c", 500)]);
}

#[test]
fn coalesced_pipelined_messages_in_one_segment_are_all_read() {
    let mut p = parser();
    let q1 = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n";
    let q2 = b"POST /two HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
    let q3 = b"GET /three HTTP/1.1\r\n\r\n";
    let reqs = [&q1[..], &q2[..], &q3[..]].concat();
    assert!(
        p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 50, 800, &reqs), T0, "v")
            .is_none()
    );
    assert_eq!(p.stats().requests, 3);
    let r1 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let r2 = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
    let r3 = b"HTTP/1.1 204 No Content\r\n\r\n";
    let resps = [&r1[..], &r2[..], &r3[..]].concat();
    let ack = 50 + reqs.len() as u32;
    let got = p.on_packet_all(&pkt(DIR_TO_POD, SVC, POD, 800, ack, &resps), T0 + MS, "v");
    let seen: Vec<_> = got
        .iter()
        .map(|e| {
            (
                e.path.as_str(),
                e.status,
                e.request_seq,
                e.response_seq,
                e.request_bytes,
                e.response_bytes,
            )
        })
        .collect();
    let (l1, l2) = (q1.len() as u32, q2.len() as u32);
    let (m1, m2) = (r1.len() as u32, r2.len() as u32);
    assert_eq!(
        seen,
        vec![
            ("/one", 200, 50, 800, 0, 2),
            ("/two", 201, 50 + l1, 800 + m1, 3, 0),
            ("/three", 204, 50 + l1 + l2, 800 + m1 + m2, 0, 0),
        ]
    );
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2, 3]);
}

#[test]
fn retransmissions_do_not_create_or_complete_twice() {
    let mut p = parser();
    let req = pkt(DIR_FROM_POD, POD, SVC, 1000, 5000, GET_ITEMS);
    assert!(p.on_packet(&req, T0, "v").is_none());
    assert!(p.on_packet(&req, T0 + MS, "v").is_none());
    assert_eq!(p.stats().pending_requests, 1);
    let resp = pkt(
        DIR_TO_POD,
        SVC,
        POD,
        5000,
        1000 + GET_ITEMS.len() as u32,
        OK_5,
    );
    assert!(p.on_packet(&resp, T0 + 2 * MS, "v").is_some());
    // The response retransmitted, then the request once more (spurious).
    assert!(p.on_packet(&resp, T0 + 3 * MS, "v").is_none());
    assert!(p.on_packet(&req, T0 + 4 * MS, "v").is_none());
    let s = p.stats();
    assert_eq!(
        (s.retransmitted_requests, s.retransmitted_responses),
        (2, 1)
    );
    assert_eq!(
        (s.exchanges, s.unmatched_responses, s.pending_requests),
        (1, 0, 0)
    );
}

#[test]
fn sequence_numbers_wrap_around() {
    let mut p = parser();
    let req = b"GET /w HTTP/1.1\r\n\r\n";
    let mut cseq = u32::MAX - 10;
    let mut sseq = u32::MAX - 3;
    for _ in 0..3 {
        assert!(
            p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, cseq, sseq, req), T0, "v")
                .is_none()
        );
        cseq = cseq.wrapping_add(req.len() as u32);
        let ex = p.on_packet(&pkt(DIR_TO_POD, SVC, POD, sseq, cseq, OK_5), T0, "v");
        assert_eq!(ex.map(|e| e.response_seq), Some(sseq));
        sseq = sseq.wrapping_add(OK_5.len() as u32);
    }
    assert_eq!(
        p.stats().retransmitted_requests + p.stats().retransmitted_responses,
        0
    );
}

#[test]
fn continue_100_does_not_complete_the_request() {
    let mut p = parser();
    let req = b"POST /upload HTTP/1.1\r\nContent-Length: 10000\r\nExpect: 100-continue\r\n\r\n";
    assert!(
        p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 10, 90, req), T0, "v")
            .is_none()
    );
    let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
    let ack = 10 + req.len() as u32;
    assert!(
        p.on_packet(&pkt(DIR_TO_POD, SVC, POD, 90, ack, cont), T0 + MS, "v")
            .is_none()
    );
    let done = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
    let ack = ack + 10_000;
    let ex = p
        .on_packet(
            &pkt(DIR_TO_POD, SVC, POD, 90 + cont.len() as u32, ack, done),
            T0 + 9 * MS,
            "v",
        )
        .expect("final response completes");
    assert_eq!((ex.status, ex.request_bytes), (201, 10_000));
    assert_eq!(ex.response_seq, 90 + cont.len() as u32);
    assert_eq!(p.stats().interim_responses, 1);
}

#[test]
fn switching_protocols_completes_the_upgrade() {
    let mut p = parser();
    let req = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 10, 90, req), T0, "v");
    let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
    let ex = p.on_packet(
        &pkt(DIR_TO_POD, SVC, POD, 90, 10 + req.len() as u32, resp),
        T0,
        "v",
    );
    assert_eq!(ex.map(|e| e.status), Some(101));
}

#[test]
fn cut_headers_keep_the_first_line_and_whole_header_lines() {
    let mut p = parser();
    let mut req = b"GET /big?q=1 HTTP/1.1\r\ntraceparent: 00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01\r\nX-Pad: "
        .to_vec();
    req.resize(HEAD_LEN - 30, b'p');
    req.extend_from_slice(b"\r\nX-Request-Id: cut-in-the-mid");
    req.extend_from_slice(b"dle\r\n\r\n");
    assert!(req.len() > HEAD_LEN);
    let ev = pkt(DIR_FROM_POD, POD, SVC, 1, 1, &req);
    assert_eq!(ev.captured_len as usize, HEAD_LEN);
    assert!(p.on_packet(&ev, T0, "v").is_none());
    let ex = p
        .on_packet(
            &pkt(DIR_TO_POD, SVC, POD, 1, 1 + req.len() as u32, OK_5),
            T0,
            "v",
        )
        .expect("exchange from a cut head");
    assert_eq!(
        (ex.method.as_str(), ex.path.as_str()),
        ("GET", "/big?<redacted>")
    );
    assert_eq!(
        ex.traceparent,
        "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01"
    );
    // The header line cut by the capture bound is dropped, not kept half.
    assert_eq!(ex.request_id, "");
    assert_eq!(p.stats().truncated_heads, 1);
}

#[test]
fn a_cut_request_line_keeps_method_and_path_prefix() {
    let mut p = parser();
    let mut req = b"GET /".to_vec();
    req.resize(HEAD_LEN + 100, b'a');
    req.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 1, 1, &req), T0, "v");
    let ex = p
        .on_packet(
            &pkt(DIR_TO_POD, SVC, POD, 1, 1 + req.len() as u32, OK_5),
            T0,
            "v",
        )
        .expect("exchange");
    assert_eq!(ex.method, "GET");
    assert_eq!(ex.path.len(), HEAD_LEN - 4);
    assert!(ex.path.starts_with("/aaa"));
    assert_eq!(p.stats().truncated_heads, 1);
}

#[test]
fn non_http_first_lines_are_counted_by_reason() {
    let mut p = parser();
    let cases: [(&[u8], ParseError); 5] = [
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            ParseError::NotHttp,
        ),
        (b"GET /x SPDY/3\r\n\r\n", ParseError::BadRequestLine),
        (b"HTTP/1.1 2OO OK\r\n\r\n", ParseError::BadStatusLine),
        (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            ParseError::BadRequestLine,
        ),
        (b"", ParseError::Empty),
    ];
    for (i, (bytes, _)) in cases.iter().enumerate() {
        let ev = pkt(DIR_FROM_POD, POD, SVC, i as u32 * 100, 1, bytes);
        assert!(p.on_packet(&ev, T0, "v").is_none());
    }
    let s = p.stats();
    for reason in ParseError::ALL {
        let want = cases.iter().filter(|(_, r)| *r == reason).count() as u64;
        assert_eq!(s.parse_errors.get(reason), want, "{}", reason.name());
    }
    assert_eq!((s.requests, s.responses, s.pending_requests), (0, 0, 0));
    assert_eq!(s.parse_errors.iter().count(), ParseError::COUNT);
}

#[test]
fn bad_events_are_counted_not_trusted() {
    let mut p = parser();
    let mut ev = pkt(DIR_FROM_POD, POD, SVC, 1, 1, GET_ITEMS);
    ev.family = 9;
    assert!(p.on_packet(&ev, T0, "v").is_none());
    let mut ev = pkt(DIR_FROM_POD, POD, SVC, 1, 1, GET_ITEMS);
    ev.direction = 7;
    assert!(p.on_packet(&ev, T0, "v").is_none());
    // A payload length shorter than the captured head is not trusted either.
    let mut ev = pkt(DIR_FROM_POD, POD, SVC, 1, 1, GET_ITEMS);
    ev.payload_len = 3;
    p.on_packet(&ev, T0, "v");
    let s = p.stats();
    assert_eq!(s.parse_errors.get(ParseError::BadEvent), 2);
    assert_eq!(s.packets, 3);
}

#[test]
fn ipv6_exchange() {
    let mut p = parser();
    let client = "[fd00:10:244::9]:40000";
    let server = "[fd00:10:96::20]:80";
    let ex = roundtrip(&mut p, DIR_FROM_POD, client, server).expect("exchange");
    let ip = ex.client.as_ref().map(|e| e.ip.clone()).unwrap_or_default();
    assert_eq!(ip.len(), 16);
    assert_eq!(ip[..4], [0xfd, 0x00, 0x00, 0x10]);
    assert_eq!(ex.server.as_ref().map(|e| e.port), Some(80));
    assert_eq!(
        ex.connection_id,
        SockPair::new(sa(client).into(), sa(server).into()).connection_id()
    );
}

#[test]
fn responses_without_a_request_are_unmatched() {
    let mut p = parser();
    assert!(
        p.on_packet(&pkt(DIR_TO_POD, SVC, POD, 5000, 1, OK_5), T0, "v")
            .is_none()
    );
    assert_eq!(p.stats().unmatched_responses, 1);
    assert_eq!(p.stats().tracked_connections, 0);
}

#[test]
fn a_response_sent_before_the_request_arrived_does_not_pair() {
    let mut p = parser();
    p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 1000, 5000, GET_ITEMS), T0, "v");
    // Its ack (1000) does not cover the request's first byte: it answers an
    // earlier request that was not captured.
    assert!(
        p.on_packet(&pkt(DIR_TO_POD, SVC, POD, 4990, 1000, OK_5), T0, "v")
            .is_none()
    );
    assert_eq!(p.stats().unmatched_responses, 1);
    let ex = p.on_packet(
        &pkt(
            DIR_TO_POD,
            SVC,
            POD,
            5000,
            1000 + GET_ITEMS.len() as u32,
            OK_5,
        ),
        T0,
        "v",
    );
    assert_eq!(ex.map(|e| e.request_seq), Some(1000));
}

#[test]
fn the_same_connection_on_two_interfaces_pairs_separately() {
    let mut p = parser();
    let req = pkt(DIR_FROM_POD, POD, SVC, 1000, 5000, GET_ITEMS);
    let mut req_b = pkt(DIR_TO_POD, POD, SVC, 1000, 5000, GET_ITEMS);
    req_b.ifindex = IFINDEX + 1;
    p.on_packet(&req, T0, "a");
    p.on_packet(&req_b, T0, "b");
    let resp = pkt(
        DIR_TO_POD,
        SVC,
        POD,
        5000,
        1000 + GET_ITEMS.len() as u32,
        OK_5,
    );
    let mut resp_b = pkt(
        DIR_FROM_POD,
        SVC,
        POD,
        5000,
        1000 + GET_ITEMS.len() as u32,
        OK_5,
    );
    resp_b.ifindex = IFINDEX + 1;
    let b = p.on_packet(&resp_b, T0 + MS, "b").expect("server half");
    let a = p.on_packet(&resp, T0 + 2 * MS, "a").expect("client half");
    assert_eq!((a.side(), b.side()), (Side::Client, Side::Server));
    assert_eq!((a.interface.as_str(), b.interface.as_str()), ("a", "b"));
    assert_eq!(a.connection_id, b.connection_id);
    assert_eq!(
        (a.request_seq, a.response_seq),
        (b.request_seq, b.response_seq)
    );
    // The second sight of each segment was answered from memory, with the same result.
    assert_eq!(p.stats().repeated_segments, 2);
    assert_eq!(
        (&a.method, &a.path, &a.host, a.status, a.response_bytes),
        (&b.method, &b.path, &b.host, b.status, b.response_bytes)
    );
    assert_eq!(a.path, "/api/items?<redacted>");
}

/// A segment between two pods of one node, seen leaving one pod's veth (`a`) and
/// entering the other's (`b`): the same segment as its second sighting on `b`.
fn seen_on_b(seg: &Seg) -> Seg {
    let mut twin = Seg {
        header: seg.header,
        head: seg.head.clone(),
    };
    twin.ifindex = IFINDEX + 1;
    twin.direction = DIR_FROM_POD + DIR_TO_POD - seg.direction;
    twin.record_flags = RECORD_REPEAT;
    twin
}

#[test]
fn a_segment_marked_with_its_second_sighting_gives_what_the_two_sightings_give() {
    // Pod-to-pod on one node: requests leave POD on veth a and enter SVC on veth b; the
    // responses the other way. Pipelined and coalesced, retransmitted, an interim
    // response, and a segment that is not HTTP.
    let q1 = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n";
    let q2 = b"POST /two HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc";
    let reqs = [&q1[..], &q2[..]].concat();
    let ack = 50 + reqs.len() as u32;
    let r0 = b"HTTP/1.1 100 Continue\r\n\r\n";
    let r1 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let r2 = b"HTTP/1.1 201 Created\r\nx-request-id: r-2\r\nContent-Length: 0\r\n\r\n";
    let resps = [&r1[..], &r2[..]].concat();
    let m0 = r0.len() as u32;
    let traffic = [
        pkt(DIR_FROM_POD, POD, SVC, 50, 800, &reqs),
        pkt(DIR_FROM_POD, POD, SVC, 50, 800, &reqs),
        pkt(DIR_TO_POD, SVC, POD, 800, ack, r0),
        pkt(DIR_TO_POD, SVC, POD, 800 + m0, ack, &resps),
        pkt(DIR_TO_POD, SVC, POD, 800 + m0, ack, &resps),
        pkt(
            DIR_FROM_POD,
            POD,
            SVC,
            ack,
            900,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",
        ),
        pkt(
            DIR_FROM_POD,
            POD,
            SVC,
            ack + 9,
            900,
            b"GET /three HTTP/1.1\r\n\r\n",
        ),
    ];
    let names = |seg: &Seg| match seg.direction {
        DIR_FROM_POD => ["a", "b"],
        _ => ["b", "a"],
    };
    let key = |e: &Exchange| (e.ifindex, e.request_seq, e.response_seq);
    let (mut apart, mut marked) = (parser(), parser());
    let (mut got_apart, mut got_marked) = (Vec::new(), Vec::new());
    for (i, seg) in traffic.iter().enumerate() {
        let wall = T0 + i as u64 * MS;
        // Which veth the segment leaves by, which it enters by.
        let (from, to) = match seg.direction {
            DIR_FROM_POD => (seg, &seen_on_b(seg)),
            _ => (&seen_on_b(seg), seg),
        };
        let [from_name, to_name] = names(seg);
        got_apart.extend(apart.on_packet_all(from, wall, from_name));
        got_apart.extend(apart.on_packet_all(to, wall, to_name));
        let also = Sighting {
            ifindex: to.ifindex,
            direction: to.direction,
        };
        got_marked.extend(marked.on_marked_packet(from, also, wall, [from_name, to_name]));
    }
    got_apart.sort_by_key(key);
    got_marked.sort_by_key(key);
    let without_ids = |v: Vec<Exchange>| {
        v.into_iter()
            .map(|e| Exchange { id: 0, ..e })
            .collect::<Vec<_>>()
    };
    let (got_apart, got_marked) = (without_ids(got_apart), without_ids(got_marked));
    assert_eq!(got_marked, got_apart);
    let halves: Vec<_> = got_marked
        .iter()
        .map(|e| (e.interface.as_str(), e.side(), e.path.as_str(), e.status))
        .collect();
    assert_eq!(
        halves,
        [
            ("a", Side::Client, "/one", 200),
            ("a", Side::Client, "/two", 201),
            ("b", Side::Server, "/one", 200),
            ("b", Side::Server, "/two", 201),
        ]
    );
    assert_eq!(got_marked[3].request_id, "r-2");
    let (s_apart, s_marked) = (apart.stats(), marked.stats());
    assert_eq!(s_marked, s_apart);
    assert_eq!(s_marked.packets, 2 * traffic.len() as u64);
    assert_eq!(s_marked.pending_requests, 2, "/three, on both veths");
    assert_eq!(
        (
            s_marked.retransmitted_requests,
            s_marked.retransmitted_responses,
            s_marked.interim_responses,
            s_marked.parse_errors.total(),
        ),
        (4, 4, 2, 2)
    );
    assert_balanced(&s_marked);
}

#[test]
fn connection_bound_evicts_the_least_recently_used_and_counts() {
    let mut p = Parser::new(ParseConfig {
        max_connections: 2,
        ..ParseConfig::default()
    });
    for port in [1001, 1002, 1003] {
        let client = format!("10.244.1.9:{port}");
        p.on_packet(&pkt(DIR_FROM_POD, &client, SVC, 1, 1, GET_ITEMS), T0, "v");
    }
    let s = p.stats();
    assert_eq!((s.evicted_connections, s.evicted_requests), (1, 1));
    assert_eq!((s.tracked_connections, s.pending_requests), (2, 2));
    // The first connection was evicted: its response is unmatched.
    let r = pkt(
        DIR_TO_POD,
        SVC,
        "10.244.1.9:1001",
        1,
        1 + GET_ITEMS.len() as u32,
        OK_5,
    );
    assert!(p.on_packet(&r, T0, "v").is_none());
    assert_eq!(p.stats().unmatched_responses, 1);
}

#[test]
fn pending_bounds_refuse_new_requests_and_count() {
    let mut p = Parser::new(ParseConfig {
        max_pending_per_conn: 2,
        ..ParseConfig::default()
    });
    let req = b"GET /p HTTP/1.1\r\n\r\n";
    for i in 0..3u32 {
        p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 1 + i * 100, 1, req), T0, "v");
    }
    let s = p.stats();
    assert_eq!((s.evicted_requests, s.pending_requests), (1, 2));

    let mut p = Parser::new(ParseConfig {
        max_pending_total: 2,
        ..ParseConfig::default()
    });
    for port in [1001, 1002, 1003] {
        let client = format!("10.244.1.9:{port}");
        p.on_packet(&pkt(DIR_FROM_POD, &client, SVC, 1, 1, req), T0, "v");
    }
    let s = p.stats();
    assert_eq!((s.evicted_requests, s.pending_requests), (1, 2));
}

#[test]
fn expire_drops_old_requests_as_unanswered_and_forgets_idle_connections() {
    let cfg = ParseConfig::default();
    let timeout = cfg.pending_timeout.as_nanos() as u64;
    let idle = cfg.idle_timeout.as_nanos() as u64;
    let mut p = Parser::new(cfg);
    p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 1, 1, GET_ITEMS), T0, "v");
    p.expire(T0 + timeout - 1);
    assert_eq!(p.stats().pending_requests, 1);
    p.expire(T0 + timeout);
    let s = p.stats();
    assert_eq!((s.pending_requests, s.unanswered_requests), (0, 1));
    assert_eq!(s.tracked_connections, 1);
    p.expire(T0 + idle);
    assert_eq!(p.stats().tracked_connections, 0);
    assert_eq!(p.stats().unanswered_requests, 1);
}

#[test]
fn close_ends_pending_requests_after_the_grace() {
    let cfg = ParseConfig {
        close_grace: Duration::from_millis(500),
        ..ParseConfig::default()
    };
    let mut p = Parser::new(cfg);
    // Two connections; both close with a request pending, one answered in the grace.
    let other = "10.244.1.9:40001";
    p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 1000, 5000, GET_ITEMS), T0, "v");
    p.on_packet(
        &pkt(DIR_FROM_POD, other, SVC, 1000, 5000, GET_ITEMS),
        T0,
        "v",
    );
    let c = p.on_conn(&conn_ev(TCP_FIN_WAIT1, TCP_CLOSE, POD, SVC), T0 + MS);
    assert_eq!(c.map(|c| c.event()), Some(connection::Event::Closed));
    p.on_conn(&conn_ev(TCP_ESTABLISHED, TCP_CLOSE, other, SVC), T0 + MS);
    let late = pkt(
        DIR_TO_POD,
        SVC,
        POD,
        5000,
        1000 + GET_ITEMS.len() as u32,
        OK_5,
    );
    assert!(
        p.on_packet(&late, T0 + 2 * MS, "v").is_some(),
        "a late response still pairs"
    );
    p.expire(T0 + 400 * MS);
    assert_eq!(p.stats().pending_requests, 1);
    p.expire(T0 + 501 * MS);
    let s = p.stats();
    assert_eq!(
        (
            s.pending_requests,
            s.unanswered_requests,
            s.tracked_connections
        ),
        (0, 1, 0)
    );
}

/// Connection events are handed on as soon as they are read, packet records only after
/// the watermark: the close of a keep-alive connection often arrives before its last
/// exchange. That exchange still pairs, with the connection's id.
#[test]
fn a_close_read_before_the_last_exchange_of_its_connection_loses_nothing() {
    let req = b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n";
    let (q, r) = (req.len() as u32, OK_5.len() as u32);
    for close_after_request in [false, true] {
        let mut p = parser();
        let earlier = keep_alive(&mut p, 2, None);
        let (cseq, sseq) = (100 + 2 * q, 9000 + 2 * r);
        let t = T0 + 30 * MS;
        let close = conn_ev(TCP_ESTABLISHED, TCP_CLOSE, POD, SVC);
        if !close_after_request {
            p.on_conn(&close, t + 5 * MS);
        }
        assert!(
            p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, cseq, sseq, req), t, "v")
                .is_none()
        );
        if close_after_request {
            p.on_conn(&close, t + 5 * MS);
        }
        let last = p.on_packet(
            &pkt(DIR_TO_POD, SVC, POD, sseq, cseq + q, OK_5),
            t + MS,
            "v",
        );
        let last = last
            .unwrap_or_else(|| panic!("close after request {close_after_request}: no exchange"));
        assert_eq!((last.request_seq, last.response_seq), (cseq, sseq));
        assert_eq!(last.connection_id, earlier[0].connection_id);
        let s = p.stats();
        assert_eq!(
            (
                s.unanswered_requests,
                s.unmatched_responses,
                s.retransmitted_requests,
                s.pending_requests
            ),
            (0, 0, 0, 0),
            "close after request {close_after_request}"
        );
        p.expire(t + 10_000 * MS);
        assert_eq!(p.stats().unanswered_requests, 0);
    }
}

#[test]
fn close_without_grace_drops_at_once_and_a_reused_tuple_starts_afresh() {
    let mut p = Parser::new(ParseConfig {
        close_grace: Duration::ZERO,
        ..ParseConfig::default()
    });
    p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 1000, 5000, GET_ITEMS), T0, "v");
    p.on_conn(&conn_ev(TCP_ESTABLISHED, TCP_CLOSE, SVC, POD), T0);
    assert_eq!(p.stats().unanswered_requests, 1);
    assert_eq!(p.stats().tracked_connections, 0);

    // With a grace: a new connection on the same tuple, with a lower ISN, is not
    // mistaken for a retransmission.
    let mut p = parser();
    p.on_packet(
        &pkt(DIR_FROM_POD, POD, SVC, 90_000, 5000, GET_ITEMS),
        T0,
        "v",
    );
    p.on_conn(&conn_ev(TCP_ESTABLISHED, TCP_CLOSE, POD, SVC), T0);
    p.on_packet(
        &pkt(DIR_FROM_POD, POD, SVC, 10, 77, GET_ITEMS),
        T0 + MS,
        "v",
    );
    let s = p.stats();
    assert_eq!(
        (
            s.retransmitted_requests,
            s.unanswered_requests,
            s.pending_requests
        ),
        (0, 1, 1)
    );
    let ex = p.on_packet(
        &pkt(DIR_TO_POD, SVC, POD, 77, 10 + GET_ITEMS.len() as u32, OK_5),
        T0,
        "v",
    );
    assert_eq!(ex.map(|e| e.request_seq), Some(10));
}

#[test]
fn a_reused_tuple_without_a_close_event_is_not_a_retransmission() {
    let mut p = parser();
    p.on_packet(
        &pkt(DIR_FROM_POD, POD, SVC, 1_000_000_000, 5000, GET_ITEMS),
        T0,
        "v",
    );
    // Shortly before the last request: a retransmission.
    p.on_packet(
        &pkt(DIR_FROM_POD, POD, SVC, 999_999_000, 5000, GET_ITEMS),
        T0,
        "v",
    );
    assert_eq!(p.stats().retransmitted_requests, 1);
    // Far before it: a new connection with a lower initial sequence number.
    p.on_packet(
        &pkt(DIR_FROM_POD, POD, SVC, 10, 77, GET_ITEMS),
        T0 + MS,
        "v",
    );
    let s = p.stats();
    assert_eq!(
        (
            s.retransmitted_requests,
            s.unanswered_requests,
            s.pending_requests
        ),
        (1, 1, 1)
    );
    let ex = p.on_packet(
        &pkt(DIR_TO_POD, SVC, POD, 77, 10 + GET_ITEMS.len() as u32, OK_5),
        T0,
        "v",
    );
    assert_eq!(ex.map(|e| e.request_seq), Some(10));
    assert_balanced(&p.stats());
}

#[test]
fn connection_events_map_state_changes() {
    let mut p = parser();
    let c = p
        .on_conn(&conn_ev(TCP_SYN_SENT, TCP_ESTABLISHED, POD, SVC), T0)
        .expect("connected");
    assert_eq!(c.event(), connection::Event::Connected);
    assert_eq!(c.local.as_ref().map(|e| e.port), Some(37450));
    assert_eq!(
        c.remote.as_ref().map(|e| (e.ip.clone(), e.port)),
        Some((vec![10, 96, 0, 20], 80))
    );
    assert_eq!(c.unix_nanos, T0);
    assert_eq!(
        c.connection_id,
        SockPair::new(sa(POD).into(), sa(SVC).into()).connection_id()
    );

    let a = p
        .on_conn(
            &conn_ev(
                TCP_SYN_RECV,
                TCP_ESTABLISHED,
                "10.244.1.9:8080",
                "10.244.2.7:5000",
            ),
            T0,
        )
        .expect("accepted");
    assert_eq!(a.event(), connection::Event::Accepted);

    let closed = p.on_conn(&conn_ev(TCP_SYN_SENT, TCP_CLOSE, POD, SVC), T0);
    assert_eq!(closed.map(|c| c.event()), Some(connection::Event::Closed));

    for (old, new) in [
        (TCP_ESTABLISHED, TCP_FIN_WAIT1),
        (TCP_CLOSE, TCP_SYN_SENT),
        (TCP_CLOSE, TCP_CLOSE),
    ] {
        assert!(
            p.on_conn(&conn_ev(old, new, POD, SVC), T0).is_none(),
            "{old}->{new}"
        );
    }
    let mut bad = conn_ev(TCP_SYN_SENT, TCP_ESTABLISHED, POD, SVC);
    bad.family = 0;
    assert!(p.on_conn(&bad, T0).is_none());
    let s = p.stats();
    assert_eq!(s.connections, 3);
    assert_eq!(s.parse_errors.get(ParseError::BadEvent), 1);

    let v6 = p
        .on_conn(
            &conn_ev(TCP_SYN_SENT, TCP_ESTABLISHED, "[fd00::1]:1", "[fd00::2]:2"),
            T0,
        )
        .expect("v6");
    assert_eq!(v6.local.map(|e| e.ip.len()), Some(16));
}

/// xorshift64*: deterministic pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn garbage_never_panics_and_is_accounted() {
    let seeds: [&[u8]; 6] = [GET_ITEMS, OK_5, b"HTTP/1.1 100 Continue\r\n\r\n", b"POST / HTTP/1.0\r\nContent-Length: 99999999999999999999\r\n\r\n", b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", b"HTTP/1.1 204 X\r\n\r\nHTTP/1.1 200 Y\r\nContent-Length: 1\r\n\r\nZ"];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut p = Parser::new(ParseConfig {
        max_connections: 64,
        max_pending_per_conn: 4,
        ..ParseConfig::default()
    });
    let endpoints = [POD, SVC, "[fd00::1]:80", "[fd00::2]:5555", "10.0.0.1:1"];
    let iterations = 20_000u64;
    for i in 0..iterations {
        let mut bytes: Vec<u8> = match rng.below(4) {
            // Pure noise.
            0 => (0..rng.below(HEAD_LEN as u64 + 64))
                .map(|_| rng.next() as u8)
                .collect(),
            // A valid message cut anywhere.
            1 => {
                let s = seeds[rng.below(seeds.len() as u64) as usize];
                s[..rng.below(s.len() as u64 + 1) as usize].to_vec()
            }
            // A valid message with bytes flipped.
            _ => {
                let mut s = seeds[rng.below(seeds.len() as u64) as usize].to_vec();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(s.len() as u64) as usize;
                    s[at] = rng.next() as u8;
                }
                s
            }
        };
        bytes.truncate(HEAD_LEN + 64);
        let src = endpoints[rng.below(endpoints.len() as u64) as usize];
        let dst = endpoints[rng.below(endpoints.len() as u64) as usize];
        let (src, dst) = if sa(src).is_ipv4() == sa(dst).is_ipv4() {
            (src, dst)
        } else {
            (POD, SVC)
        };
        let mut ev = pkt(
            rng.below(3) as u8,
            src,
            dst,
            rng.next() as u32,
            rng.next() as u32,
            &bytes,
        );
        if rng.below(8) == 0 {
            let keep = rng.below(ev.head.len() as u64 + 1) as usize;
            ev.head.truncate(keep);
            ev.payload_len = rng.next() as u32;
        }
        if rng.below(16) == 0 {
            ev.family = rng.next() as u8;
        }
        ev.tcp_flags = rng.next() as u8;
        p.on_packet_all(&ev, T0 + i * MS, "fuzz");
        if i % 1000 == 0 {
            p.expire(T0 + i * MS);
            let c = conn_ev(rng.below(12) as i32, rng.below(12) as i32, src, dst);
            p.on_conn(&c, T0 + i * MS);
        }
    }
    let s = p.stats();
    assert_eq!(s.packets, iterations);
    // Every packet was either read as messages or counted as a failure.
    assert!(s.requests + s.responses + s.parse_errors.total() >= iterations);
    assert!(s.parse_errors.get(ParseError::NotHttp) > 0);
    assert!(s.tracked_connections <= 64);
    assert!(s.pending_requests <= 64 * 4);
    assert_balanced(&s);
    assert!(s.exchanges > 0 && s.unmatched_responses > 0 && s.truncated_heads > 0);
}

#[test]
fn losses_list_every_loss_counter_with_stable_labels() {
    let mut p = Parser::new(ParseConfig {
        max_connections: 1,
        ..ParseConfig::default()
    });
    p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 1, 1, b"\x00garbage"), T0, "v");
    p.on_packet(&pkt(DIR_TO_POD, SVC, POD, 1, 1, OK_5), T0, "v");
    p.on_packet(&pkt(DIR_FROM_POD, POD, SVC, 1, 1, GET_ITEMS), T0, "v");
    p.on_packet(
        &pkt(DIR_FROM_POD, "10.0.0.1:1", SVC, 1, 1, GET_ITEMS),
        T0,
        "v",
    );
    let losses = p.stats().losses();
    let get = |label: &str| {
        losses
            .iter()
            .find(|(l, _)| *l == label)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| panic!("no {label} in {losses:?}"))
    };
    assert_eq!(get("parse_error_not_http"), 1);
    assert_eq!(get("unmatched_response"), 1);
    assert_eq!(get("evicted_connection"), 1);
    assert_eq!(get("evicted_request"), 1);
    assert_eq!(get("unanswered_request"), 0);
    assert_eq!(losses.len(), ParseError::COUNT + 5);
    let total: u64 = losses.iter().map(|(_, n)| n).sum();
    assert_eq!(total, p.stats().loss_total());
}

/// Every request and response read is accounted for exactly once.
fn assert_balanced(s: &ParseStats) {
    assert_eq!(
        s.requests,
        s.retransmitted_requests
            + s.exchanges
            + s.unanswered_requests
            + s.evicted_requests
            + s.pending_requests,
        "{s:?}"
    );
    assert_eq!(
        s.responses,
        s.retransmitted_responses + s.unmatched_responses + s.interim_responses + s.exchanges,
        "{s:?}"
    );
}

/// Benchmark, not a timed test: prints the parse stage's throughput.
/// `cargo test -p weft-collector --release --lib parse::tests::bench_parse_throughput -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: prints figures"]
fn bench_parse_throughput() {
    let mut p = parser();
    let (conns, rounds) = (1_000u32, 200u32);
    let start = std::time::Instant::now();
    let mut exchanges = 0u64;
    for round in 0..rounds {
        for c in 0..conns {
            let client = format!("10.244.{}.{}:{}", c / 250, c % 250 + 1, 30_000 + c);
            let (q, r) = (GET_ITEMS.len() as u32, OK_5.len() as u32);
            let (cseq, sseq) = (1 + round * q, 1 + round * r);
            let t = T0 + u64::from(round) * MS;
            p.on_packet(
                &pkt(DIR_FROM_POD, &client, SVC, cseq, sseq, GET_ITEMS),
                t,
                "v",
            );
            let resp = pkt(DIR_TO_POD, SVC, &client, sseq, cseq + q, OK_5);
            exchanges += u64::from(p.on_packet(&resp, t + 1, "v").is_some());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let events = f64::from(2 * conns * rounds);
    assert_eq!(exchanges, u64::from(conns * rounds));
    println!(
        "parse: {events} events ({exchanges} exchanges, {conns} connections) in {secs:.3}s: \
         {:.0} events/s, {:.0} ns/event (includes building the events)",
        events / secs,
        secs * 1e9 / events
    );
}
