//! Weft's kernel programs.
//!
//! In: packets on a pod's host-side veth (TC ingress = leaving the pod, TC egress = entering
//! it) and TCP state changes (`sock/inet_sock_set_state`).
//! Out: packet records (a `PacketHeader` followed by at most `HEAD_LEN` payload bytes, for
//! segments that begin an HTTP/1 message; only the header when the CPU's previous record
//! was the same segment, `RECORD_REPEAT`; nothing but a mark in that record's header when
//! it can take one, `PacketHeader::also`) in the writing CPU's own ring (`WEFT_PACKETS`
//! slots, `WEFT_RING_CTL` positions: see `RingControl`), a ring on the `DOORBELL` ring
//! buffer when a record fills a ring to half while the collector has backed off,
//! `ConnEvent`s on the `CONNS` ring buffer (which wakes the collector only once a quarter
//! full: `CONNS_WAKE_AT`), and per-CPU `COUNTERS` for every packet seen, emitted, lost or
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
// `locked_add`: the BPF target has no `AtomicU64::fetch_add` (no compare-and-swap in CPU
// v1), but LLVM emits its plain atomic add for the intrinsic.
#![cfg_attr(
    target_arch = "bpf",
    allow(internal_features),
    feature(core_intrinsics)
)]

use core::{
    mem::offset_of,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
    sync::atomic::{Ordering, compiler_fence},
};

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{
        BPF_F_MMAPABLE, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_get_smp_processor_id, bpf_skb_load_bytes},
    },
    macros::{classifier, map, tracepoint},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{TcContext, TracePointContext},
};
use weft_ebpf_common::{
    COUNTER_COUNT, ConnEvent, Counter, DIR_FROM_POD, DIR_TO_POD, FAMILY_IPV4, FAMILY_IPV6,
    HEAD_LEN, LAST_IN_FAST, LAST_IN_SPILL, LastRecord, PacketEvent, PacketHeader,
    RECORD_AFTER_MARK, RECORD_REPEAT, RingControl, Sighting, TCP_CLOSE, TCP_ESTABLISHED,
    TCP_SYN_RECV, TCP_SYN_SENT,
};

/// The slots of every CPU's packet ring (CPU `c` owns `c * slots .. (c + 1) * slots`).
/// Sized by the collector at load time (`max_entries` = possible CPUs × slots per CPU) and
/// mapped into its memory, where it reads the records in place.
#[map(name = "WEFT_PACKETS")]
static PACKETS: Array<PacketEvent> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// One `RingControl` per possible CPU (sized by the collector at load time, mapped into its
/// memory).
#[map(name = "WEFT_RING_CTL")]
static RING_CTL: Array<RingControl> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Wakes the collector when a packet ring is half full while it reads on its idle
/// schedule (see `ring_doorbell`). Each ring rings at most once between two reads of the
/// collector, which empties this on every read: 16 KiB (16-byte records) is room for the
/// rings of 512 CPUs.
#[map(name = "WEFT_DOORBELL")]
static DOORBELL: RingBuf = RingBuf::with_byte_size(16 * 1024, 0);

/// TCP connection opens and closes.
#[map(name = "WEFT_CONNS")]
static CONNS: RingBuf = RingBuf::with_byte_size(CONNS_BYTES, 0);

const CONNS_BYTES: u32 = 256 * 1024;

/// Unread bytes of `CONNS` from which a connection event wakes the collector. Below it
/// the event waits for the collector's next timed read of its rings (every 5 ms under
/// traffic, by default at most 100 ms when idle): the tracepoint sees every TCP socket of
/// the host, and a wake-up per event cost the collector about 7 µs of CPU each (16 % of a
/// CPU at 6,000 connections a second). A quarter of the ring leaves three quarters for the
/// events that come while the woken collector gets to it.
const CONNS_WAKE_AT: u64 = CONNS_BYTES as u64 / 4;

/// Indexed by `Counter`; user space sums the CPUs.
#[map(name = "WEFT_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// 1 when the kernel exposes `__sk_buff.tstamp_type` (5.18+): records then take their time
/// from the segment (see `send_time`). Set by the collector at load time. A read-only
/// global, so the verifier knows its value and never checks the branch not taken: an older
/// kernel, which refuses that field, loads the programs with 0.
#[unsafe(no_mangle)]
static SKB_SEND_TIME: Global<u8> = Global::new(0);

/// 0 when the collector runs with `--hooks-only`: the classifiers return at once, so that
/// a benchmark can tell what the attached hooks cost from what capturing costs. Set at
/// load time; a read-only global, so the verifier drops the dead branch.
#[unsafe(no_mangle)]
static CAPTURE: Global<u8> = Global::new(1);

/// `__sk_buff.tstamp_type` of a delivery time on the monotonic clock (uapi
/// `BPF_SKB_CLOCK_MONOTONIC`, `BPF_SKB_TSTAMP_DELIVERY_MONO` before 6.11).
const SKB_CLOCK_MONOTONIC: u8 = 1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
/// Bytes of payload needed to recognise every method token + space ("OPTIONS ", "CONNECT ")
/// and the status line prefix ("HTTP/1.").
const SNIFF_LEN: usize = 8;

/// Reads a `T` (an integer or an array of them) at `off` from the packet: directly from
/// the linear data when it is there (cheap: no helper call, and almost every header is),
/// else through `bpf_skb_load_bytes` into an aligned stack value.
///
/// The direct read is a typed load, not `read_unaligned`: LLVM's BPF backend splits an
/// unaligned read into single-byte loads and shifts (a dozen instructions per word, most
/// of a classifier run), while the verifier accepts packet loads at any alignment on the
/// architectures the collector builds for (x86-64 has efficient unaligned access).
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() <= end {
        // Bounds checked against data_end above, as the verifier requires.
        return Ok(unsafe { core::ptr::read((start + off) as *const T) });
    }
    ctx.load::<T>(off).map_err(|_| ())
}

/// The byte at `i` of a little-endian word array read from memory.
#[inline(always)]
const fn byte_of(w: u32, i: u32) -> u32 {
    (w >> (8 * i)) & 0xff
}

/// The big-endian u16 at bytes 2..4 (`hi` = true) or 0..2 of a word read from memory.
#[inline(always)]
const fn be16_of(w: u32, hi: bool) -> u16 {
    let half = if hi { (w >> 16) as u16 } else { w as u16 };
    u16::from_be(half)
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

/// A packet's IP addresses.
struct Addrs {
    family: u8,
    /// Source and destination address as two words (IPv4: the first 4 bytes of the
    /// first word): built with word stores, where byte arrays took two `memset` calls.
    saddr: [u64; 2],
    daddr: [u64; 2],
}

/// A TCP segment's addresses, TCP header and where its payload is.
struct Segment {
    addrs: Addrs,
    /// From the TCP header (host order; options are skipped).
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    tcp_flags: u8,
    payload_off: usize,
    payload_len: usize,
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: u8) {
    if CAPTURE.load() == 0 {
        return;
    }
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
    if seg.payload_len < SNIFF_LEN {
        count(Counter::NotHttp);
        return;
    }
    // Where the payload's first bytes are in the linear data, look at them in place and
    // skip what is not HTTP before touching the ring. Usually they are not (TCP puts what
    // an application writes in page fragments): then the head is copied to the ring slot
    // first and looked at there, one helper call instead of two.
    if sniff_linear(ctx, seg.payload_off) == Some(false) {
        count(Counter::NotHttp);
        return;
    }
    emit(ctx, &seg, direction);
}

/// `Ok(None)`: not TCP over IPv4/IPv6 (nothing to do); `Err`: truncated or malformed headers.
/// Each header is read whole, once, as 16- or 32-bit words: few reads, each with a fixed
/// size the verifier can check.
#[inline(always)]
fn locate_tcp_payload(ctx: &TcContext) -> Result<Option<Segment>, ()> {
    let eth: [u16; ETH_HLEN / 2] = read(ctx, 0)?;
    let ip = match u16::from_be(eth[6]) {
        ETH_P_IP => ipv4(ctx)?,
        ETH_P_IPV6 => ipv6(ctx)?,
        _ => None,
    };
    let Some(ip) = ip else {
        return Ok(None);
    };
    // Words of the TCP header: ports, seq, ack, then data offset and flags.
    let tcp: [u32; TCP_MIN_HLEN / 4] = read(ctx, ip.tcp_off)?;
    let tcp_hlen = ((byte_of(tcp[3], 0) >> 4) as usize) * 4;
    if tcp_hlen < TCP_MIN_HLEN || ip.payload_len < tcp_hlen {
        return Err(());
    }
    Ok(Some(Segment {
        addrs: ip.addrs,
        sport: be16_of(tcp[0], false),
        dport: be16_of(tcp[0], true),
        seq: u32::from_be(tcp[1]),
        ack: u32::from_be(tcp[2]),
        tcp_flags: byte_of(tcp[3], 1) as u8,
        payload_off: ip.tcp_off + tcp_hlen,
        // From the IP length, not the skb length: link-layer padding is not payload.
        payload_len: ip.payload_len - tcp_hlen,
    }))
}

/// What the IP header says about the TCP segment it carries.
struct IpInfo {
    addrs: Addrs,
    tcp_off: usize,
    /// IP payload bytes: the TCP header and its payload.
    payload_len: usize,
}

/// `Ok(None)`: not TCP, or a later fragment.
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Result<Option<IpInfo>, ()> {
    // Words: version/IHL, TOS, total length | id, fragment | TTL, protocol, checksum |
    // source | destination.
    let ip: [u32; 5] = read(ctx, ETH_HLEN)?;
    let ihl = (byte_of(ip[0], 0) as usize & 0x0f) * 4;
    if ihl < 20 {
        return Err(());
    }
    if byte_of(ip[2], 1) as u8 != IPPROTO_TCP {
        return Ok(None);
    }
    if be16_of(ip[1], true) & 0x1fff != 0 {
        // A later fragment carries no TCP header.
        return Ok(None);
    }
    let total = be16_of(ip[0], true) as usize;
    if total < ihl {
        return Err(());
    }
    Ok(Some(IpInfo {
        addrs: Addrs {
            family: FAMILY_IPV4,
            // Memory order kept: the address's 4 bytes first.
            saddr: [ip[3] as u64, 0],
            daddr: [ip[4] as u64, 0],
        },
        tcp_off: ETH_HLEN + ihl,
        payload_len: total - ihl,
    }))
}

/// `Ok(None)`: not TCP right after the fixed header.
#[inline(always)]
fn ipv6(ctx: &TcContext) -> Result<Option<IpInfo>, ()> {
    // Words: version/class/flow | payload length, next header, hop limit | source (4) |
    // destination (4).
    let ip: [u32; IPV6_HLEN / 4] = read(ctx, ETH_HLEN)?;
    if byte_of(ip[1], 2) as u8 != IPPROTO_TCP {
        // Extension headers before TCP are not followed (rare on pod traffic).
        return Ok(None);
    }
    let pair = |lo: u32, hi: u32| (lo as u64) | ((hi as u64) << 32);
    Ok(Some(IpInfo {
        addrs: Addrs {
            family: FAMILY_IPV6,
            saddr: [pair(ip[2], ip[3]), pair(ip[4], ip[5])],
            daddr: [pair(ip[6], ip[7]), pair(ip[8], ip[9])],
        },
        tcp_off: ETH_HLEN + IPV6_HLEN,
        payload_len: be16_of(ip[1], false) as usize,
    }))
}

/// Whether the payload begins an HTTP message, if its first bytes are in the linear data.
#[inline(always)]
fn sniff_linear(ctx: &TcContext, off: usize) -> Option<bool> {
    let start = ctx.data();
    if start + off + SNIFF_LEN > ctx.data_end() {
        return None;
    }
    // Bounds checked against data_end above, as the verifier requires (a typed load, see
    // `read`).
    let first = unsafe { core::ptr::read((start + off) as *const u64) };
    Some(is_http_start(first))
}

/// Whether the payload (at least `SNIFF_LEN` bytes) begins an HTTP message, wherever it is.
#[inline(always)]
fn begins_http(ctx: &TcContext, off: usize) -> bool {
    read::<u64>(ctx, off).is_ok_and(is_http_start)
}

/// A method token and a space, or a status line's `HTTP/1.`, in the payload's first
/// `SNIFF_LEN` bytes read as one little-endian word (a few masked compares instead of a
/// byte-by-byte decision tree).
#[inline(always)]
fn is_http_start(first: u64) -> bool {
    const fn word(s: &[u8]) -> u64 {
        let mut w = 0u64;
        let mut i = 0;
        while i < s.len() {
            w |= (s[i] as u64) << (8 * i);
            i += 1;
        }
        w
    }
    const fn mask(n: usize) -> u64 {
        if n >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * n)) - 1
        }
    }
    let p4 = first & mask(4);
    let p5 = first & mask(5);
    let p6 = first & mask(6);
    let p7 = first & mask(7);
    p4 == word(b"GET ")
        || p7 == word(b"HTTP/1.")
        || p5 == word(b"POST ")
        || p4 == word(b"PUT ")
        || p5 == word(b"HEAD ")
        || p6 == word(b"PATCH ")
        || p7 == word(b"DELETE ")
        || first == word(b"OPTIONS ")
        || first == word(b"CONNECT ")
        || p6 == word(b"TRACE ")
}

/// Publishes the sighting of an HTTP segment on this CPU: as a mark on the CPU's last
/// record when that is the same segment seen on another veth just before (`mark_last`),
/// else as a record in its next ring slot: a `RECORD_REPEAT` when it is the segment this
/// CPU published last (see `LastRecord`), else with its payload head.
#[inline(always)]
fn emit(ctx: &TcContext, seg: &Segment, direction: u8) {
    // A classifier runs start to end on one CPU (migration is disabled), so the ring of
    // the CPU it started on stays its own.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(ctl) = RING_CTL.get_ptr_mut(cpu) else {
        count(Counter::NoRing);
        return;
    };
    // SAFETY (all accesses to `*ctl`): a map value the verifier sized; `head`, `busy` and
    // `last` are written only by this CPU's classifiers, `tail` and `taken` only by the
    // collector.
    let slots = unsafe { (*ctl).slots };
    if slots == 0 || unsafe { (*ctl).busy } != 0 {
        count(Counter::NoRing);
        return;
    }
    unsafe { (*ctl).busy = 1 };
    match publish_sighting(ctx, seg, direction, ctl, slots, cpu) {
        Ok(()) => count(Counter::Emitted),
        Err(lost) => count(lost),
    }
    unsafe { (*ctl).busy = 0 };
}

/// `emit`'s work under the CPU's `busy` flag.
#[inline(always)]
fn publish_sighting(
    ctx: &TcContext,
    seg: &Segment,
    direction: u8,
    ctl: *mut RingControl,
    slots: u64,
    cpu: u32,
) -> Result<(), Counter> {
    let sent = send_time(ctx);
    let flags = match mark_last(ctx, seg, direction, ctl, sent) {
        Mark::Written => {
            count(Counter::Marked);
            return Ok(());
        }
        Mark::Late => {
            count(Counter::MarkedLate);
            RECORD_AFTER_MARK
        }
        Mark::Unmarked => 0,
    };
    let Some(ring) = ring_with_room(ctl, slots) else {
        // Lost only if it was HTTP. (After a late mark the collector may still hand the
        // sighting on from the mark; counted lost all the same: a full ring and a read in
        // the microsecond between two sightings almost never meet.)
        return Err(match begins_http(ctx, seg.payload_off) {
            true => Counter::RingFull,
            false => Counter::NotHttp,
        });
    };
    write_record(ctx, seg, direction, ctl, &ring, sent, flags)?;
    ring_doorbell(&ring, cpu);
    Ok(())
}

/// What `mark_last` did.
enum Mark {
    /// The sighting is in the mark, which the collector will see.
    Written,
    /// The mark is written, but the collector may have read the record before it: the
    /// sighting must be written as a record too.
    Late,
    /// No mark: not the same segment as the CPU's last record, or that record cannot take
    /// one.
    Unmarked,
}

/// Marks this sighting on the CPU's last record (`PacketHeader::also`) when that record is
/// the same segment (the same skb, seen on the veth before this one: `LastRecord`) with
/// the same addresses and ports (no NAT between the two veths), has no mark yet and is not
/// itself a repeat. Its slot was written a moment ago on this CPU, so this touches only
/// lines in its cache, where a record of its own cost two cold lines and a `head` store.
///
/// The record is already published: the collector may be reading it. The mark is a locked
/// add (a full fence on x86-64), then `taken` says whether the collector had begun a read
/// that covers the record (see `RingControl::taken`).
#[inline(always)]
fn mark_last(
    ctx: &TcContext,
    seg: &Segment,
    direction: u8,
    ctl: *mut RingControl,
    sent: Option<u64>,
) -> Mark {
    let Some(ts) = sent else {
        return Mark::Unmarked;
    };
    // SAFETY: see `emit`.
    let last = unsafe { (*ctl).last };
    if !is_last(&last, seg, ts) {
        return Mark::Unmarked;
    }
    let ring = match last.ring {
        LAST_IN_FAST => ctl,
        LAST_IN_SPILL => match spill_of(ctl) {
            Some(spill) => spill,
            None => return Mark::Unmarked,
        },
        _ => return Mark::Unmarked,
    };
    let sighting = Sighting {
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        direction,
    };
    let (Some(mark), Some(ev)) = (sighting.mark(), last_slot(ring)) else {
        return Mark::Unmarked;
    };
    if !can_mark(ev, seg, ts) {
        return Mark::Unmarked;
    }
    // BPF's CPU v1 has 64-bit atomics only: `also` is the high half of the aligned word it
    // shares with `captured_len` (little-endian), so adding the mark shifted there stores
    // it (it was 0) and leaves `captured_len` as it was. The add's result is unused: it is
    // BPF's plain atomic add, which the x86-64 JIT emits as `lock add`.
    // SAFETY: an aligned u64 in a slot (a map value); only this CPU's classifiers write a
    // published slot's `also`, under `busy`, and `can_mark` found it 0.
    let word = unsafe { addr_of_mut!((*ev).header.captured_len) }.cast::<u64>();
    unsafe { locked_add(word, u64::from(mark) << 32) };
    // SAFETY: see `emit`. Volatile: the collector writes it behind the compiler's back.
    let taken = unsafe { read_volatile(addr_of!((*ring).taken)) };
    let head = unsafe { (*ring).head };
    match taken >= head {
        true => Mark::Late,
        false => Mark::Written,
    }
}

/// `*p += v` as one locked instruction: a full fence on x86-64. Its result is not read, so
/// LLVM emits BPF's `lock *(u64 *)(p) += v` (CPU v1), with no compare-and-swap.
///
/// # Safety
/// `p` must be an aligned u64 in a map value.
#[cfg(target_arch = "bpf")]
#[inline(always)]
unsafe fn locked_add(p: *mut u64, v: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) };
}

/// The host build only type-checks the programs (see the crate doc).
#[cfg(not(target_arch = "bpf"))]
unsafe fn locked_add(p: *mut u64, v: u64) {
    // SAFETY: as the caller promises.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }.fetch_add(v, Ordering::SeqCst);
}

const _: () = assert!(
    offset_of!(PacketHeader, captured_len) % 8 == 0
        && offset_of!(PacketHeader, also) == offset_of!(PacketHeader, captured_len) + 4,
    "`mark_last` stores `also` as the high half of the word at `captured_len`"
);

/// The slot of the last record published on `ring`.
#[inline(always)]
fn last_slot(ring: *mut RingControl) -> Option<*mut PacketEvent> {
    // SAFETY: see `emit`.
    let (head, slots, base) = unsafe { ((*ring).head, (*ring).slots, (*ring).base) };
    if head == 0 || slots == 0 {
        return None;
    }
    PACKETS.get_ptr_mut((base + ((head - 1) & (slots - 1))) as u32)
}

/// Whether the record in `ev` can take a mark for `seg`, sent at `ts`: a record with its
/// own payload and no mark, of this segment between the same addresses and ports.
#[inline(always)]
fn can_mark(ev: *mut PacketEvent, seg: &Segment, ts: u64) -> bool {
    // SAFETY: a slot this CPU wrote (`last_slot`); the header's fields are read whole, the
    // addresses as the aligned words `Addrs` holds.
    let h = unsafe { addr_of!((*ev).header) };
    let (flags, also, ts_ns) = unsafe { ((*h).record_flags, (*h).also, (*h).ts_ns) };
    let (saddr, daddr) = unsafe {
        (
            core::ptr::read(addr_of!((*h).saddr).cast::<[u64; 2]>()),
            core::ptr::read(addr_of!((*h).daddr).cast::<[u64; 2]>()),
        )
    };
    let (sport, dport, family) = unsafe { ((*h).sport, (*h).dport, (*h).family) };
    flags == 0
        && also == 0
        && ts_ns == ts
        && saddr == seg.addrs.saddr
        && daddr == seg.addrs.daddr
        && sport == seg.sport
        && dport == seg.dport
        && family == seg.addrs.family
}

/// A ring with room for a record: its control block and its slots.
struct Ring {
    ctl: *mut RingControl,
    slots: u64,
}

impl Ring {
    /// Which of the CPU's two rings this is: `LAST_IN_FAST` or `LAST_IN_SPILL`, from the
    /// ring's own `spill` (set only on fast rings).
    #[inline(always)]
    fn which(&self) -> u16 {
        // SAFETY: see `emit`.
        match unsafe { (*self.ctl).spill } {
            0 => LAST_IN_SPILL,
            _ => LAST_IN_FAST,
        }
    }
}

/// The record of `seg` (sent at `sent`, with `flags`) into `ring`: a repeat of the CPU's
/// last record (`ctl.last`) if it is the same segment in the same ring, else a copy of its
/// head. Both end in one
/// `publish_header` (each inlined call site is a copy of the header's stores).
#[inline(always)]
fn write_record(
    ctx: &TcContext,
    seg: &Segment,
    direction: u8,
    ctl: *mut RingControl,
    ring: &Ring,
    sent: Option<u64>,
    flags: u8,
) -> Result<(), Counter> {
    // SAFETY: see `emit`.
    let last = unsafe { (*ctl).last };
    let which = ring.which();
    let ev = slot_at_head(ring)?;
    let repeat = sent.is_some_and(|ts| last.ring == which && is_last(&last, seg, ts));
    let (captured, flags) = match repeat {
        true => (last.captured_len as usize, RECORD_REPEAT | flags),
        false => (copy_http_head(ctx, seg, ev)?, flags),
    };
    // A repeat's `sent` is its record's time. Without one, the clock is read only now that
    // the record is known to be HTTP (a helper call).
    let ts_ns = sent.unwrap_or_else(clock_time);
    let header = Header {
        ts_ns,
        captured,
        flags,
    };
    publish_header(ctx, seg, direction, ring, ev, header);
    if !repeat {
        unsafe { (*ctl).last = remember(seg, sent, captured, which) };
    }
    Ok(())
}

/// Whether `last` is the record of `seg` sent at `sent`: the same skb, seen again (see
/// `LastRecord`).
#[inline(always)]
fn is_last(last: &LastRecord, seg: &Segment, sent: u64) -> bool {
    last.ts_ns == sent
        && last.seq == seg.seq
        && last.ack == seg.ack
        && last.payload_len == seg.payload_len as u32
}

/// What `ctl.last` holds after a record with payload: the segment, unless its time came
/// from the clock (a second run would read another time, so nothing would match it).
#[inline(always)]
fn remember(seg: &Segment, sent: Option<u64>, captured: usize, which: u16) -> LastRecord {
    match sent {
        Some(ts_ns) => LastRecord {
            ts_ns,
            seq: seg.seq,
            ack: seg.ack,
            payload_len: seg.payload_len as u32,
            captured_len: captured as u16,
            ring: which,
        },
        None => LastRecord::default(),
    }
}

/// The ring to write, with its slots: the CPU's fast ring `ctl` if it has room, else its
/// spill ring if that has (see `RingControl`; the spill ring is written only from here,
/// under the fast ring's `busy` flag).
#[inline(always)]
fn ring_with_room(ctl: *mut RingControl, slots: u64) -> Option<Ring> {
    if has_room(ctl, slots) {
        return Some(Ring { ctl, slots });
    }
    let spill_ctl = spill_of(ctl)?;
    let spill_slots = unsafe { (*spill_ctl).slots };
    if spill_slots == 0 || !has_room(spill_ctl, spill_slots) {
        return None;
    }
    count(Counter::Spilled);
    Some(Ring {
        ctl: spill_ctl,
        slots: spill_slots,
    })
}

/// The control block of the spill ring of the CPU whose fast ring is `ctl`.
#[inline(always)]
fn spill_of(ctl: *mut RingControl) -> Option<*mut RingControl> {
    // SAFETY: see `emit`.
    let spill = unsafe { (*ctl).spill };
    if spill == 0 {
        return None;
    }
    RING_CTL.get_ptr_mut((spill - 1) as u32)
}

/// Whether the collector has read the slot at `head`.
#[inline(always)]
fn has_room(ctl: *mut RingControl, slots: u64) -> bool {
    unread(ctl) < slots
}

/// Records published and not yet read.
#[inline(always)]
fn unread(ctl: *mut RingControl) -> u64 {
    let head = unsafe { (*ctl).head };
    // Volatile: the collector moves `tail` behind the compiler's back.
    let tail = unsafe { read_volatile(addr_of_mut!((*ctl).tail)) };
    head.wrapping_sub(tail)
}

/// Wakes the collector when it has backed off (it armed `doorbell`) and the record just
/// published filled `ring` to half: its next timed read might otherwise come after the
/// rings are full (a busy CPU fills them in about 60 ms). One record rings: the one that
/// rings disarms the ring, and the collector arms it again after its next read if it is
/// still idle. While the collector reads every 5 ms it leaves the doorbell disarmed, and
/// this costs a load from the line `has_room` just read.
#[inline(always)]
fn ring_doorbell(ring: &Ring, cpu: u32) {
    // SAFETY: see `emit`. Volatile: the collector arms it behind the compiler's back.
    let doorbell = unsafe { addr_of_mut!((*ring.ctl).doorbell) };
    if unsafe { read_volatile(doorbell) } == 0 || unread(ring.ctl) < ring.slots / 2 {
        return;
    }
    unsafe { write_volatile(doorbell, 0) };
    match DOORBELL.output::<u32>(&cpu, BPF_RB_FORCE_WAKEUP as u64) {
        Ok(()) => count(Counter::Doorbell),
        Err(_) => count(Counter::DoorbellFull),
    }
}

/// Makes the slots before `head` readable by the collector: the slot's bytes must be
/// visible before the new head. The compiler keeps the stores in program order (fence,
/// volatile store) and x86-64 keeps them in that order for other CPUs (TSO), so a plain
/// store is the release store here. Weakly ordered CPUs would need a store-release
/// instruction (BPF ISA v4, kernel 6.15), which the `generic` CPU these programs are built
/// for lacks: the build refuses other architectures rather than race.
#[inline(always)]
fn publish(ctl: *mut RingControl, head: u64) {
    compiler_fence(Ordering::Release);
    // SAFETY: `head` is an aligned u64 inside the map value.
    unsafe { write_volatile(addr_of_mut!((*ctl).head), head) };
}

#[cfg(all(target_arch = "bpf", not(bpf_target_arch = "x86_64")))]
compile_error!(
    "the per-CPU packet ring publishes with plain stores, which are ordered only on x86-64 (see `publish`)"
);

/// Copies the head of `seg` into the slot `ev` and returns its length, if it begins an
/// HTTP message.
///
/// Most of a run's time is here, writing the slot's lines (about 3.5 per record), which
/// are cold: on a 2-vCPU EPYC VM a run took ~300 ns, but ~190 ns when it always wrote the
/// same slot. Measured there and not kept: sniffing into the stack instead of reading the
/// head back (the stall moved to the stores, same time); storing to the next free slot's
/// lines at the end of each run (~100 ns less per run by bpf-stats, but lower throughput:
/// the stall moved past the program into the network stack). What was kept: a segment's
/// second sighting on the node writes only a mark in the first record's header, which is
/// still in cache (`mark_last`), or where it cannot, only a header (`RECORD_REPEAT`, 2
/// cold lines).
#[inline(always)]
fn copy_http_head(ctx: &TcContext, seg: &Segment, ev: *mut PacketEvent) -> Result<usize, Counter> {
    let captured = copy_head(ctx, seg, ev).map_err(|()| Counter::CopyFailed)?;
    // SAFETY: within the slot's head, which is 8-byte aligned (`PacketHeader` is 72
    // bytes); holds payload, as `captured` ≥ SNIFF_LEN (checked below; always true as
    // `observe` skips shorter payloads).
    let first = unsafe { core::ptr::read(addr_of!((*ev).head).cast::<u64>()) };
    if captured < SNIFF_LEN || !is_http_start(first) {
        // Not published: the slot is simply written again by the next record.
        return Err(Counter::NotHttp);
    }
    Ok(captured)
}

/// What a record's header says beyond the segment's own fields.
struct Header {
    ts_ns: u64,
    captured: usize,
    flags: u8,
}

/// The slot at `ring`'s head (which `has_room` found read).
#[inline(always)]
fn slot_at_head(ring: &Ring) -> Result<*mut PacketEvent, Counter> {
    let head = unsafe { (*ring.ctl).head };
    // `slots` is a power of two (the collector sets it so).
    let index = unsafe { (*ring.ctl).base } + (head & (ring.slots - 1));
    PACKETS.get_ptr_mut(index as u32).ok_or(Counter::NoRing)
}

/// Fills the header of `ev`, the slot at `ring`'s head, and publishes the slot.
#[inline(always)]
fn publish_header(
    ctx: &TcContext,
    seg: &Segment,
    direction: u8,
    ring: &Ring,
    ev: *mut PacketEvent,
    header: Header,
) {
    fill_header(ctx, seg, direction, header, ev);
    if seg.payload_len > HEAD_LEN {
        count(Counter::HeadCut);
    }
    let head = unsafe { (*ring.ctl).head };
    publish(ring.ctl, head + 1);
}

/// An address as `PacketHeader` holds it: its bytes in memory order.
#[inline(always)]
fn addr_bytes(words: [u64; 2]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}

#[inline(always)]
fn fill_header(
    ctx: &TcContext,
    seg: &Segment,
    direction: u8,
    header: Header,
    ev: *mut PacketEvent,
) {
    let header = PacketHeader {
        ts_ns: header.ts_ns,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        seq: seg.seq,
        ack: seg.ack,
        payload_len: seg.payload_len as u32,
        saddr: addr_bytes(seg.addrs.saddr),
        daddr: addr_bytes(seg.addrs.daddr),
        sport: seg.sport,
        dport: seg.dport,
        family: seg.addrs.family,
        direction,
        tcp_flags: seg.tcp_flags,
        record_flags: header.flags,
        captured_len: header.captured as u32,
        also: 0,
    };
    // SAFETY: `ev` is a ring slot (a map value the verifier sized) that only this CPU
    // writes until it is published.
    unsafe { (*ev).header = header };
}

/// When the sender's TCP transmitted the segment (monotonic ns), if the skb carries that
/// time: the record's time, else `clock_time` is.
///
/// TCP stamps every segment it sends with its departure time on the monotonic clock (the
/// skb's delivery time), and the kernel keeps it across veths and bridges: every segment a
/// pod or the node sends arrives here with it, microseconds before this classifier runs.
/// Reading it instead of the clock saves a helper call on every record: 35 of the ~200 ns
/// a classifier run took here; and, being the same on every veth the skb passes, it tells a
/// segment seen twice (`mark_last`, `RECORD_REPEAT`). Segments without it (forwarded from
/// another node, say, or with a receive timestamp on the real-time clock) read the clock,
/// counted as `ClockTime`.
///
/// A departure time lies in the future only where the sender paces with an fq qdisc that
/// comes after this hook (not a pod's: its qdisc holds segments until their time). It is
/// not checked here (a clock read to check it costs half of what is saved); the reader
/// does not wait for such a time (`capture::ring`).
#[inline(always)]
fn send_time(ctx: &TcContext) -> Option<u64> {
    if SKB_SEND_TIME.load() != 0 {
        // SAFETY: the context's own fields, read as the verifier allows (whole fields).
        let (kind, sent) = unsafe { ((*ctx.skb.skb).tstamp_type, (*ctx.skb.skb).tstamp) };
        if kind == SKB_CLOCK_MONOTONIC && sent != 0 {
            return Some(sent);
        }
    }
    None
}

/// A record's time when its segment carries none (see `send_time`).
#[inline(always)]
fn clock_time() -> u64 {
    count(Counter::ClockTime);
    unsafe { bpf_ktime_get_ns() }
}

/// Copies up to `HEAD_LEN` payload bytes into the slot's head and returns how
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
    let wake = CONNS.query(BPF_RB_AVAIL_DATA as u64) >= CONNS_WAKE_AT;
    let flags = match wake {
        true => BPF_RB_FORCE_WAKEUP,
        false => BPF_RB_NO_WAKEUP,
    };
    match CONNS.output::<ConnEvent>(&ev, flags as u64) {
        Ok(()) if wake => count(Counter::ConnWakeup),
        Ok(()) => {}
        Err(_) => count(Counter::ConnRingFull),
    }
    Ok(())
}

// Keep the layout assumptions the user side relies on next to the code that writes them:
// the payload follows the header directly in a slot, and a CPU's head and tail never share
// a cache line.
const _: () = assert!(offset_of!(PacketEvent, head) == weft_ebpf_common::PACKET_HEADER_LEN);
const _: () = assert!(offset_of!(RingControl, tail) == 64);
const _: () =
    assert!(offset_of!(PacketEvent, head) % 8 == 0 && core::mem::align_of::<PacketEvent>() >= 8);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn first(bytes: &[u8; SNIFF_LEN]) -> u64 {
        u64::from_le_bytes(*bytes)
    }

    #[test]
    fn every_method_and_status_line_begins_http() {
        for start in [
            b"GET /a b",
            b"PUT /x y",
            b"POST /ab",
            b"HEAD / H",
            b"PATCH /a",
            b"TRACE / ",
            b"DELETE /",
            b"OPTIONS ",
            b"CONNECT ",
            b"HTTP/1.1",
            b"HTTP/1.0",
        ] {
            assert!(is_http_start(first(start)), "{}", start.escape_ascii());
        }
    }

    #[test]
    fn near_misses_do_not() {
        for start in [
            b"GETX /ab",
            b"get / HT",
            b"HTTP/2.0",
            b"POSTX /a",
            b"OPTIONSX",
            b"\x16\x03\x01\x02\x00\x01\x00\x01",
            b"PRI * HT",
            b"DELETE/a",
            b" GET / H",
            b"\0\0\0\0\0\0\0\0",
        ] {
            assert!(!is_http_start(first(start)), "{}", start.escape_ascii());
        }
    }

    #[test]
    fn header_words_read_in_network_order() {
        // IPv4 word 0 as read from memory: 0x45, TOS 0, total length 0x0123.
        let w = u32::from_le_bytes([0x45, 0x00, 0x01, 0x23]);
        assert_eq!(byte_of(w, 0), 0x45);
        assert_eq!(be16_of(w, true), 0x0123);
        assert_eq!(be16_of(u32::from_le_bytes([0x1f, 0x90, 0, 0]), false), 8080);
    }
}
