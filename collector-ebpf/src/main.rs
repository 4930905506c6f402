//! Weft's kernel programs.
//!
//! In: packets on a pod's host-side veth (TC ingress = leaving the pod, TC egress = entering
//! it) and TCP state changes (`sock/inet_sock_set_state`).
//! Out: packet records (a `PacketHeader` followed by at most `HEAD_LEN` payload bytes, for
//! segments that begin an HTTP/1 message) on the `PACKETS` ring buffer, `ConnEvent`s on the
//! `CONNS` ring buffer, and per-CPU `COUNTERS` for every packet seen, emitted, lost or
//! skipped.
//!
//! Only a segment that *begins* an HTTP message is captured, and only its first `HEAD_LEN`
//! bytes: headers beyond them, or continued in later segments, are not followed. The cut is
//! counted here (`HeadCut`: payload longer than the head) and by the parser (`truncated_heads`),
//! which still reads the request/status line and the header lines captured whole.
//!
//! The classifiers only read: they always return `TC_ACT_UNSPEC` so the next program in the
//! chain (for example Cilium's) sees every packet unchanged.
//!
//! Built for `bpfel-unknown-none` by `collector/build.rs`; on the host the crate compiles to
//! an empty binary so that workspace-wide `cargo clippy`/`cargo fmt` cover this code too.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

use core::{mem::offset_of, ptr::addr_of_mut};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, generated::bpf_skb_load_bytes},
    macros::{classifier, map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{TcContext, TracePointContext},
};
use weft_ebpf_common::{
    COUNTER_COUNT, ConnEvent, Counter, DIR_FROM_POD, DIR_TO_POD, FAMILY_IPV4, FAMILY_IPV6,
    HEAD_LEN, PACKET_HEADER_LEN, PacketEvent, PacketHeader, TCP_CLOSE, TCP_ESTABLISHED,
    TCP_SYN_RECV, TCP_SYN_SENT,
};

/// Segments that begin HTTP messages. 4 MiB: records are as long as their payload (about
/// 200 bytes for a request or response without a body), so about 20,000 events, a fifth of
/// a second at 100k packets/s: a reader starved of CPU on a busy node catches up instead of
/// losing events. Smaller than the 8 MiB that fixed-size 336-byte events needed, because
/// every record is written to memory last touched one ring length ago: a shorter cycle
/// keeps more of it in cache and the TLB (1 MiB cut the classifiers' time by 15 %).
/// User space counts the pages it read in its RSS.
#[map(name = "WEFT_PACKETS")]
static PACKETS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Where a record is assembled before it is copied to the ring at its exact length: the
/// ring's reservations must have a constant size, `bpf_ringbuf_output` takes any. Per CPU,
/// so it stays in that CPU's cache and needs no lock (a classifier does not migrate).
#[map(name = "WEFT_SCRATCH")]
static SCRATCH: PerCpuArray<PacketEvent> = PerCpuArray::with_max_entries(1, 0);

/// TCP connection opens and closes.
#[map(name = "WEFT_CONNS")]
static CONNS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Indexed by `Counter`; user space sums the CPUs.
#[map(name = "WEFT_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
/// Bytes of payload needed to recognise every method token + space ("OPTIONS ", "CONNECT ")
/// and the status line prefix ("HTTP/1.").
const SNIFF_LEN: usize = 8;

/// Reads a `T` at `off` from the packet: directly from the linear data when it is there
/// (cheap: no helper call, and almost every header is), else through `bpf_skb_load_bytes`.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() <= end {
        // Bounds checked against data_end above, as the verifier requires.
        return Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load::<T>(off).map_err(|_| ())
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other program writes it concurrently.
        unsafe { *slot += 1 };
    }
}

/// TC ingress of the host-side veth: packets leaving the pod.
#[classifier]
pub fn weft_tc_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, DIR_FROM_POD);
    TC_ACT_UNSPEC
}

/// TC egress of the host-side veth: packets entering the pod.
#[classifier]
pub fn weft_tc_egress(ctx: TcContext) -> i32 {
    observe(&ctx, DIR_TO_POD);
    TC_ACT_UNSPEC
}

/// A TCP segment's addresses, TCP header and where its payload is.
struct Segment {
    family: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// The fixed 20 bytes of the TCP header (options are skipped).
    tcp: [u8; TCP_MIN_HLEN],
    payload_off: usize,
    payload_len: usize,
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: u8) {
    count(Counter::Packets);
    let seg = match locate_tcp_payload(ctx) {
        Ok(Some(seg)) => seg,
        Ok(None) => return,
        Err(()) => {
            count(Counter::BadHeader);
            return;
        }
    };
    if seg.payload_len == 0 {
        return;
    }
    if !begins_http(ctx, seg.payload_off, seg.payload_len) {
        count(Counter::NotHttp);
        return;
    }
    emit(ctx, &seg, direction);
}

/// `Ok(None)`: not TCP over IPv4/IPv6 (nothing to do); `Err`: truncated or malformed headers.
/// Each header is read whole, once: few reads, each with a fixed size the verifier can check.
#[inline(always)]
fn locate_tcp_payload(ctx: &TcContext) -> Result<Option<Segment>, ()> {
    let eth: [u8; ETH_HLEN] = read(ctx, 0)?;
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    let (family, tcp_off, ip_payload_len) = match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let ip: [u8; 20] = read(ctx, ETH_HLEN)?;
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Err(());
            }
            if ip[9] != IPPROTO_TCP {
                return Ok(None);
            }
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                // A later fragment carries no TCP header.
                return Ok(None);
            }
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            if total < ihl {
                return Err(());
            }
            saddr[..4].copy_from_slice(&ip[12..16]);
            daddr[..4].copy_from_slice(&ip[16..20]);
            (FAMILY_IPV4, ETH_HLEN + ihl, total - ihl)
        }
        ETH_P_IPV6 => {
            let ip: [u8; IPV6_HLEN] = read(ctx, ETH_HLEN)?;
            if ip[6] != IPPROTO_TCP {
                // Extension headers before TCP are not followed (rare on pod traffic).
                return Ok(None);
            }
            saddr.copy_from_slice(&ip[8..24]);
            daddr.copy_from_slice(&ip[24..40]);
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            (FAMILY_IPV6, ETH_HLEN + IPV6_HLEN, plen)
        }
        _ => return Ok(None),
    };
    let tcp: [u8; TCP_MIN_HLEN] = read(ctx, tcp_off)?;
    let tcp_hlen = ((tcp[12] >> 4) as usize) * 4;
    if tcp_hlen < TCP_MIN_HLEN || ip_payload_len < tcp_hlen {
        return Err(());
    }
    Ok(Some(Segment {
        family,
        saddr,
        daddr,
        tcp,
        payload_off: tcp_off + tcp_hlen,
        // From the IP length, not the skb length: link-layer padding is not payload.
        payload_len: ip_payload_len - tcp_hlen,
    }))
}

#[inline(always)]
fn begins_http(ctx: &TcContext, off: usize, len: usize) -> bool {
    if len < SNIFF_LEN {
        return false;
    }
    let Ok(b) = read::<[u8; SNIFF_LEN]>(ctx, off) else {
        return false;
    };
    matches!(
        b,
        [b'G', b'E', b'T', b' ', ..]
            | [b'P', b'U', b'T', b' ', ..]
            | [b'P', b'O', b'S', b'T', b' ', ..]
            | [b'H', b'E', b'A', b'D', b' ', ..]
            | [b'P', b'A', b'T', b'C', b'H', b' ', ..]
            | [b'T', b'R', b'A', b'C', b'E', b' ', ..]
            | [b'D', b'E', b'L', b'E', b'T', b'E', b' ', ..]
            | [b'O', b'P', b'T', b'I', b'O', b'N', b'S', b' ']
            | [b'C', b'O', b'N', b'N', b'E', b'C', b'T', b' ']
            | [b'H', b'T', b'T', b'P', b'/', b'1', b'.', _]
    )
}

/// Assembles the record in the per-CPU scratch and copies its used prefix to the ring.
#[inline(always)]
fn emit(ctx: &TcContext, seg: &Segment, direction: u8) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        count(Counter::CopyFailed);
        return;
    };
    let Ok(captured) = copy_head(ctx, seg, ev) else {
        count(Counter::CopyFailed);
        return;
    };
    fill_header(ctx, seg, direction, captured, ev);
    if seg.payload_len > HEAD_LEN {
        count(Counter::HeadCut);
    }
    let len = PACKET_HEADER_LEN + captured;
    // SAFETY: `ev` points at the CPU's scratch value, `len` ≤ its size (captured ≤ HEAD_LEN).
    let record = unsafe { core::slice::from_raw_parts(ev.cast::<u8>(), len) };
    match PACKETS.output::<[u8]>(record, wakeup_flags(record_bytes(len))) {
        Ok(()) => count(Counter::Emitted),
        Err(_) => count(Counter::RingFull),
    }
}

/// Wake the reader only when the ring fills up (each time the unread data crosses a multiple
/// of `WAKEUP_BYTES`); otherwise the reader drains on its own short timer (see the
/// collector's capture loop). A wakeup is an `irq_work` self-IPI (a VM exit on virtual
/// machines) plus a context switch of the reader: at saturation, waking once per 64 KiB
/// still cost about a quarter of the classifiers' in-kernel time (profiled: `native_write_msr`
/// under `bpf_ringbuf_submit`). At 1 MiB the timer does nearly all the reading at ordinary
/// rates, and a wakeup still comes with 3 MiB of headroom left.
const WAKEUP_BYTES: u64 = 1024 * 1024;

/// Ring space a record of `len` bytes takes: its 8-byte ring header plus the record,
/// 8-byte aligned.
#[inline(always)]
fn record_bytes(len: usize) -> u64 {
    (len as u64 + 8 + 7) & !7
}

#[inline(always)]
fn wakeup_flags(record: u64) -> u64 {
    // Asked before the record is written: wake when this record makes the unread data
    // cross a multiple of WAKEUP_BYTES.
    let avail = PACKETS.query(BPF_RB_AVAIL_DATA as u64);
    if avail / WAKEUP_BYTES != (avail + record) / WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn fill_header(
    ctx: &TcContext,
    seg: &Segment,
    direction: u8,
    captured: usize,
    ev: *mut PacketEvent,
) {
    let t = &seg.tcp;
    let header = PacketHeader {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        payload_len: seg.payload_len as u32,
        saddr: seg.saddr,
        daddr: seg.daddr,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        family: seg.family,
        direction,
        tcp_flags: t[13],
        _pad: 0,
        captured_len: captured as u32,
    };
    // SAFETY: `ev` is the CPU's scratch value (a map value the verifier sized).
    unsafe { (*ev).header = header };
}

/// Copies up to `HEAD_LEN` payload bytes into the scratch record's head and returns how
/// many (only the payload's length: user space reads no further than `captured_len`).
#[inline(always)]
fn copy_head(ctx: &TcContext, seg: &Segment, ev: *mut PacketEvent) -> Result<usize, ()> {
    let mut n = seg.payload_len;
    if n > HEAD_LEN {
        n = HEAD_LEN;
    }
    let n = n as i64;
    // The verifier needs a provably non-zero, bounded length (NOTES.md).
    if !aya_ebpf::check_bounds_signed(n, 1, HEAD_LEN as i64) {
        return Err(());
    }
    let dst = unsafe { addr_of_mut!((*ev).head) }.cast::<core::ffi::c_void>();
    let ret = unsafe { bpf_skb_load_bytes(ctx.as_ptr(), seg.payload_off as u32, dst, n as u32) };
    if ret != 0 {
        return Err(());
    }
    Ok(n as usize)
}

// Offsets of `sock/inet_sock_set_state` fields (tracefs `format`, stable ABI of the event).
const TP_SKADDR: usize = 8;
const TP_OLDSTATE: usize = 16;
const TP_NEWSTATE: usize = 20;
const TP_SPORT: usize = 24;
const TP_DPORT: usize = 26;
const TP_FAMILY: usize = 28;
const TP_PROTOCOL: usize = 30;
const TP_SADDR: usize = 32;
const TP_DADDR: usize = 36;
const TP_SADDR_V6: usize = 40;
const TP_DADDR_V6: usize = 56;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Reads a field of the tracepoint record. Tracepoint programs may read their context
/// directly (cheaper than `bpf_probe_read_kernel`); every offset here is a constant
/// inside the record and naturally aligned.
#[inline(always)]
fn tp_read<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(off).cast::<T>()) }
}

/// A 16-byte address field of the record, read as two scalar loads (memory byte order).
#[inline(always)]
fn addr6(ctx: &TracePointContext, off: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&tp_read::<u64>(ctx, off).to_ne_bytes());
    a[8..].copy_from_slice(&tp_read::<u64>(ctx, off + 8).to_ne_bytes());
    a
}

/// TCP state changes: emits active opens (SYN_SENT → ESTABLISHED), passive opens
/// (SYN_RECV → ESTABLISHED) and closes (→ CLOSE).
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn weft_sock_state(ctx: TracePointContext) -> u32 {
    let _ = conn_state(&ctx);
    0
}

#[inline(always)]
fn conn_state(ctx: &TracePointContext) -> Result<(), i32> {
    let protocol: u16 = tp_read(ctx, TP_PROTOCOL);
    if protocol != IPPROTO_TCP as u16 {
        return Ok(());
    }
    let oldstate: i32 = tp_read(ctx, TP_OLDSTATE);
    let newstate: i32 = tp_read(ctx, TP_NEWSTATE);
    let interesting = (newstate == TCP_ESTABLISHED
        && (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV))
        || newstate == TCP_CLOSE;
    if !interesting {
        return Ok(());
    }
    let family: u16 = tp_read(ctx, TP_FAMILY);
    let mut ev = ConnEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr: tp_read::<u64>(ctx, TP_SKADDR),
        oldstate,
        newstate,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: tp_read(ctx, TP_SPORT),
        dport: tp_read(ctx, TP_DPORT),
        family: 0,
        _pad: [0; 3],
        netns: 0,
        _pad2: 0,
    };
    match family {
        AF_INET => {
            ev.family = FAMILY_IPV4;
            // Scalar loads only: the verifier refuses loads through a moved ctx pointer,
            // which is what byte-array copies compile to.
            let s = tp_read::<u32>(ctx, TP_SADDR).to_ne_bytes();
            let d = tp_read::<u32>(ctx, TP_DADDR).to_ne_bytes();
            ev.saddr[..4].copy_from_slice(&s);
            ev.daddr[..4].copy_from_slice(&d);
        }
        AF_INET6 => {
            ev.family = FAMILY_IPV6;
            ev.saddr = addr6(ctx, TP_SADDR_V6);
            ev.daddr = addr6(ctx, TP_DADDR_V6);
        }
        _ => return Ok(()),
    }
    if CONNS.output::<ConnEvent>(&ev, 0).is_err() {
        count(Counter::ConnRingFull);
    }
    Ok(())
}

// Keep the layout assumptions the user side relies on next to the code that writes them:
// the payload follows the header directly, so a record is one prefix of the scratch value.
const _: () = assert!(offset_of!(PacketEvent, head) == PACKET_HEADER_LEN);

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

/// `bpf_probe_read_kernel` and `bpf_ktime_get_ns` are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
