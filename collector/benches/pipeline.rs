//! User-space cost per packet event (issue 3 overhead): the events of a saturating keep-alive
//! load, built as the kernel writes them, through `Pipeline::on_captured` (parse, pairing,
//! Exchange, printer off, local-only shipper) exactly as the capture loop calls it. Prints
//! CPU nanoseconds per event (thread CPU time, so a busy machine changes it little).
//!
//! Traffic shape: the overhead benchmark's (h2load `GET /` and `weft-demo-app serve`'s JSON
//! answer, client and server pods on one node): each request crosses the client's veth
//! (leaving it, a CLIENT half) and the server's veth (entering it, a SERVER half), and so
//! does its response: 4 sightings per request, 2 exchanges. The second sighting of a
//! segment is a mark on the first one's record, handed on in the same packet
//! (`Packet::also`), as the ring reader does: 2 packets per request. With
//! `WEFT_BENCH_MARKS=0` it is a packet of its own with the same bytes (a repeat record,
//! which the parser answers from memory: `parse::repeat`), as where the kernel cannot
//! mark. With `WEFT_BENCH_VETHS=1` only the server's veth is traced (a client outside the
//! node's pods, as in the lead's node → pod measurement): 2 sightings per request, 1
//! exchange, no repeats.
//!
//! Run: `cargo bench -p weft-collector --bench pipeline`
//! Knobs: `WEFT_BENCH_EVENTS` sightings (default 4,000,000), `WEFT_BENCH_CONNS`
//! connections (16), `WEFT_BENCH_VETHS` traced veths per request (2, or 1),
//! `WEFT_BENCH_MARKS` (1, or 0).
//! Under callgrind: `valgrind --tool=callgrind target/release/deps/pipeline-<hash>` with
//! `WEFT_BENCH_EVENTS=200000`.

use std::sync::Arc;
use std::time::Instant;

use weft_collector::{
    capture::{Captured, Packet},
    metrics::Metrics,
    parse::ParseConfig,
    pipeline::Pipeline,
    print::PrintMode,
    ship::{ShipConfig, Shipper},
};
use weft_ebpf_common::{
    DIR_FROM_POD, DIR_TO_POD, FAMILY_IPV4, PACKET_HEADER_LEN, PacketHeader, Sighting,
};

const REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: 10.200.1.3:8080\r\nuser-agent: h2load nghttp2/1.52.0\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 47\r\nConnection: keep-alive\r\n\r\n{\"calls\":[],\"n\":1,\"name\":\"server\",\"status\":200}";
const CLIENT_IF: u32 = 7;
const SERVER_IF: u32 = 9;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Thread CPU time in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("thread CPU clock");
    (t.tv_sec() * 1_000_000_000 + t.tv_nsec()) as u64
}

/// Writes the ring record the kernel writes for a segment into `out`: the header, then
/// the payload.
#[allow(clippy::too_many_arguments)]
fn record(
    out: &mut Vec<u8>,
    ifindex: u32,
    direction: u8,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    seq: u32,
    ack: u32,
    payload: &[u8],
    ts_ns: u64,
) {
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr[..4].copy_from_slice(&src.0);
    daddr[..4].copy_from_slice(&dst.0);
    let header = PacketHeader {
        ts_ns,
        ifindex,
        seq,
        ack,
        payload_len: payload.len() as u32,
        saddr,
        daddr,
        sport: src.1,
        dport: dst.1,
        family: FAMILY_IPV4,
        direction,
        tcp_flags: 0x18,
        record_flags: 0,
        captured_len: payload.len() as u32,
        also: 0,
    };
    out.clear();
    out.resize(PACKET_HEADER_LEN, 0);
    // SAFETY: PacketHeader is plain data and `out` holds exactly its size.
    unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<PacketHeader>(), header) };
    out.extend_from_slice(payload);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / nextest discovery: nothing to list.
    }
    let events = env_or("WEFT_BENCH_EVENTS", 4_000_000);
    let conns = env_or("WEFT_BENCH_CONNS", 16) as u16;
    // Which of the 4 records of a request are handed in, and with which marked sighting:
    // both veths' (the second sighting of each segment as a mark, or as a record of its
    // own), or the server veth's.
    let mark = |ifindex| {
        Some(Sighting {
            ifindex,
            direction: DIR_TO_POD,
        })
    };
    let traced: Vec<(usize, Option<Sighting>)> =
        match (env_or("WEFT_BENCH_VETHS", 2), env_or("WEFT_BENCH_MARKS", 1)) {
            (1, _) => vec![(1, None), (2, None)],
            (_, 0) => vec![(0, None), (1, None), (2, None), (3, None)],
            _ => vec![(0, mark(SERVER_IF)), (2, mark(CLIENT_IF))],
        };
    let sightings_per_request = traced
        .iter()
        .map(|(_, m)| 1 + m.is_some() as u64)
        .sum::<u64>();
    let metrics = Arc::new(Metrics::new());
    let shipper = Shipper::spawn(ShipConfig::new(None, "bench"));
    let mut pipeline = Pipeline::new(
        ParseConfig::default(),
        PrintMode::Off,
        "bench",
        shipper.sender(),
        metrics,
    );
    pipeline.set_interfaces(
        [
            (CLIENT_IF, "vethclient".to_owned()),
            (SERVER_IF, "vethserver".to_owned()),
        ]
        .into(),
    );

    let client_ip = [10, 200, 1, 2];
    let server = ([10, 200, 1, 3], 8080);
    // Per connection: the client's and the server's next sequence numbers.
    let mut seqs: Vec<(u32, u32)> = (0..conns)
        .map(|c| (1000 + u32::from(c) * 7919, 5000 + u32::from(c) * 104_729))
        .collect();
    let wall0 = 1_795_341_600_000_000_000u64;
    let mut ts = 0u64;
    let requests = events / sightings_per_request;
    let mut buf: Vec<Vec<u8>> = (0..4).map(|_| Vec::with_capacity(512)).collect();
    let (cpu0, t0) = (thread_cpu_ns(), Instant::now());
    for i in 0..requests {
        let c = (i % u64::from(conns)) as usize;
        let client = (client_ip, 40_000 + c as u16);
        let (cseq, sseq) = seqs[c];
        ts += 3_000;
        // Request: leaves the client pod, enters the server pod; then the response back.
        record(
            &mut buf[0],
            CLIENT_IF,
            DIR_FROM_POD,
            client,
            server,
            cseq,
            sseq,
            REQUEST,
            ts,
        );
        record(
            &mut buf[1],
            SERVER_IF,
            DIR_TO_POD,
            client,
            server,
            cseq,
            sseq,
            REQUEST,
            ts + 5,
        );
        let cseq2 = cseq.wrapping_add(REQUEST.len() as u32);
        record(
            &mut buf[2],
            SERVER_IF,
            DIR_FROM_POD,
            server,
            client,
            sseq,
            cseq2,
            RESPONSE,
            ts + 20,
        );
        record(
            &mut buf[3],
            CLIENT_IF,
            DIR_TO_POD,
            server,
            client,
            sseq,
            cseq2,
            RESPONSE,
            ts + 25,
        );
        seqs[c] = (cseq2, sseq.wrapping_add(RESPONSE.len() as u32));
        for &(i, also) in &traced {
            let Some(event) = Packet::from_record(&buf[i]) else {
                panic!("the bench wrote a malformed record");
            };
            pipeline.on_captured(Captured::Packet {
                event: Packet { also, ..event },
                wall_unix_nanos: wall0 + event.header.ts_ns,
            });
        }
    }
    let cpu = thread_cpu_ns() - cpu0;
    let wall = t0.elapsed();
    let n = requests * sightings_per_request;
    // Building the events is part of the loop: measure it alone and subtract it.
    let cpu1 = thread_cpu_ns();
    let mut sink = 0u64;
    for i in 0..requests {
        let c = (i % u64::from(conns)) as usize;
        let client = (client_ip, 40_000 + c as u16);
        for rec in buf.iter_mut() {
            record(
                rec,
                CLIENT_IF,
                DIR_FROM_POD,
                client,
                server,
                i as u32,
                0,
                REQUEST,
                i,
            );
        }
        sink = sink.wrapping_add(std::hint::black_box(&buf)[3].len() as u64);
    }
    let build = thread_cpu_ns() - cpu1;
    std::hint::black_box(sink);
    let stats = pipeline.parse_stats().exchanges;
    println!(
        "sightings {n} in {} packets, exchanges {}, CPU {:.1} ns/sighting, {:.1} ns/request (building the records: {:.1} ns/sighting, excluded), wall {:.2} s",
        requests * traced.len() as u64,
        stats,
        (cpu.saturating_sub(build)) as f64 / n as f64,
        (cpu.saturating_sub(build)) as f64 / requests as f64,
        build as f64 / n as f64,
        wall.as_secs_f64()
    );
}
