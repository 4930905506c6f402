//! Events and counters shared by the kernel programs (collector-ebpf) and the
//! collector in user space. `#[repr(C)]`, fixed size, no pointers: what the kernel
//! writes into its maps is read back byte for byte.
#![no_std]

/// Bytes of TCP payload copied from a segment that begins an HTTP message.
/// A compile-time bound so the verifier can check every copy.
pub const HEAD_LEN: usize = 512;

/// The packet left the pod (TC ingress on the host-side veth).
pub const DIR_FROM_POD: u8 = 0;
/// The packet enters the pod (TC egress on the host-side veth).
pub const DIR_TO_POD: u8 = 1;

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// What the kernel knows of a TCP segment whose payload begins an HTTP/1 request line or
/// status line. A record is this header followed by `captured_len` payload bytes (only
/// those are written and read: a short head touches few cache lines on both sides).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// CLOCK_MONOTONIC ns: when the segment was sent (the skb's TCP departure time) or,
    /// without one, `bpf_ktime_get_ns()` when the classifier ran. User space converts it
    /// to wall clock.
    pub ts_ns: u64,
    pub ifindex: u32,
    /// TCP sequence number of the first payload byte (host order).
    pub seq: u32,
    /// TCP acknowledgement number (host order).
    pub ack: u32,
    /// TCP payload bytes in this segment (may exceed `captured_len`).
    pub payload_len: u32,
    /// Source and destination address; IPv4 uses the first 4 bytes (network order).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in host order.
    pub sport: u16,
    pub dport: u16,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    /// `DIR_FROM_POD` or `DIR_TO_POD`.
    pub direction: u8,
    /// TCP flags byte (FIN, SYN, RST, PSH, ACK, ...).
    pub tcp_flags: u8,
    /// `RECORD_REPEAT` or 0.
    pub record_flags: u8,
    /// Payload bytes captured (at most `HEAD_LEN`): they follow the header in the record,
    /// or, in a `RECORD_REPEAT` record, in the record it repeats.
    pub captured_len: u32,
    /// A second sighting of this record's segment, marked here by the classifier that saw
    /// it after the record was published (`Sighting::mark`); 0: none. The only field the
    /// kernel writes in a published slot: user space reads it atomically, after
    /// announcing the read (`RingControl::taken`), and not from a copy of the header.
    pub also: u32,
}

/// A segment seen on one more veth of the node: where, and in which direction. Written
/// into the segment's record (`PacketHeader::also`) instead of a record of its own, since
/// the second sighting comes right after the first, on the same CPU, while the record's
/// lines are still in its cache: a `RECORD_REPEAT` slot cost two cold lines more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sighting {
    pub ifindex: u32,
    pub direction: u8,
}

impl Sighting {
    /// As `PacketHeader::also` holds it: never 0 (ifindexes start at 1). `None` for an
    /// ifindex beyond 31 bits or a direction that is not one (then no mark is written).
    #[inline(always)]
    pub const fn mark(self) -> Option<u32> {
        if self.ifindex == 0 || self.ifindex > u32::MAX >> 1 || self.direction > DIR_TO_POD {
            return None;
        }
        Some((self.ifindex << 1) | self.direction as u32)
    }

    /// What `mark` wrote; `None` for 0 (no mark).
    #[inline(always)]
    pub const fn from_mark(also: u32) -> Option<Self> {
        if also == 0 {
            return None;
        }
        Some(Sighting {
            ifindex: also >> 1,
            direction: (also & 1) as u8,
        })
    }
}

/// `PacketHeader::record_flags`: the record carries no payload bytes. Its segment is the
/// one of the last record on the same ring without this flag (the same skb seen a second
/// time, on the next veth of a same-node path), whose payload user space takes instead:
/// writing and reading the same bytes twice cost both sides a few cold cache lines per
/// record. The classifier writes one only when `ts_ns`, `seq`, `ack` and `payload_len`
/// equal that record's (see `LastRecord`), and sets `captured_len` to that record's.
pub const RECORD_REPEAT: u8 = 1;

/// `PacketHeader::record_flags`: the classifier also marked this sighting on the record
/// before it (`PacketHeader::also`), but after the collector may have read that record
/// (`RingControl::taken`), so it wrote this record too. User space hands the sighting on
/// once: from the mark if it saw it, else from this record.
pub const RECORD_AFTER_MARK: u8 = 2;

/// Bytes of a record before the payload.
pub const PACKET_HEADER_LEN: usize = core::mem::size_of::<PacketHeader>();

/// One slot of a CPU's packet ring (`WEFT_PACKETS`): the header and room for the longest
/// head. Only the first `PACKET_HEADER_LEN + captured_len` bytes are meaningful.
///
/// Cache-line aligned (640 bytes, not 584): every slot starts a line, so a record touches
/// the fewest lines on both sides (about 6 % less collector CPU per request than unaligned
/// slots, same classifier time).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct PacketEvent {
    pub header: PacketHeader,
    pub head: [u8; HEAD_LEN],
}

/// The control block of one packet ring (`WEFT_RING_CTL` holds two per possible CPU: its
/// fast ring at the CPU's index, then every CPU's spill ring; both maps are mapped into
/// the collector's memory).
///
/// Each ring is single-producer, single-consumer, with `slots` slots in `WEFT_PACKETS`
/// from `base` on: a classifier writes its CPU's next slot and then publishes it by
/// advancing `head`; the collector reads the slots between `tail` and `head` and then
/// advances `tail`. No lock, no shared cache line between CPUs, and no helper call (a
/// shared `BPF_MAP_TYPE_RINGBUF` costs each record a spinlock and two cache lines written
/// by every CPU).
///
/// Why two rings per CPU: the slots a classifier writes should still be in cache. A
/// small fast ring that the collector empties on every read stays there; a ring big
/// enough for the collector's longest stall on a saturated node (tens of milliseconds)
/// does not, and writing its cold lines cost each classifier run 20–50 ns here. So the
/// fast ring is small, and only what it has no room for goes to the CPU's big spill ring.
///
/// `head` and `tail` are on separate cache lines: the kernel writes the first once per
/// record, the collector the second once per read.
///
/// The rings wake nobody per record (a wake-up would cost more than the record): the
/// collector reads them on a timer, and backs off when they stay empty. While it has
/// backed off it arms `doorbell`, and the first record that fills a ring to half rings
/// the `WEFT_DOORBELL` ring buffer once, which wakes it at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingControl {
    /// Records published on this CPU since the ring was created (written by the kernel).
    pub head: u64,
    /// Slots of this CPU's ring, a power of two, set by the collector before it attaches
    /// the classifiers. 0: not set up, nothing is written (counted as `NoRing`).
    pub slots: u64,
    /// Non-zero while a classifier writes this CPU's ring (kernel only): a run nested in
    /// another on the same CPU must not take the same slot.
    pub busy: u64,
    /// This ring's first slot in `WEFT_PACKETS` (set by the collector).
    pub base: u64,
    /// A CPU's fast ring: 1 + the `WEFT_RING_CTL` index of its spill ring, which takes
    /// the records the fast ring has no room for; 0: none (set by the collector).
    pub spill: u64,
    /// A CPU's fast ring: the last record with payload that the CPU published, on either
    /// of its rings (kernel only; see `RECORD_REPEAT`).
    pub last: LastRecord,
    /// Records the collector has read (written by user space).
    pub tail: u64,
    /// Non-zero while the collector reads on its idle schedule and wants to be woken when
    /// this ring is half full: set by the collector, cleared by the classifier that rings
    /// (so one record rings, not every record until the collector comes).
    pub doorbell: u64,
    /// `head` as the collector took it when it began its latest read (written by user
    /// space, then a full fence, before it reads any slot): the records before it may have
    /// been read already, so a classifier that marks one of them (`PacketHeader::also`,
    /// with a locked add, also a full fence) and then finds it here writes a record of its
    /// own as well (`RECORD_AFTER_MARK`). The two fences make sure that at least one side
    /// sees the other's store: a mark is never lost between them.
    pub taken: u64,
    pub _pad2: [u64; 5],
}

/// What identifies a published record's segment, for `RECORD_REPEAT`: a segment sent
/// with a TCP departure time (unique to the nanosecond per socket) at this seq and ack,
/// of this length, is the same skb seen again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastRecord {
    /// The record's `ts_ns`, which was a send time (records timed by the clock are not
    /// remembered: a second run would read another time).
    pub ts_ns: u64,
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
    pub captured_len: u16,
    /// `LAST_IN_FAST` or `LAST_IN_SPILL`: the ring the record is in; 0: none remembered.
    pub ring: u16,
}

pub const LAST_IN_FAST: u16 = 1;
pub const LAST_IN_SPILL: u16 = 2;

/// TCP states as in the kernel's `enum tcp_state` (TCP_ESTABLISHED = 1, ...).
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_CLOSE: i32 = 7;

/// A TCP state change from the `sock/inet_sock_set_state` tracepoint.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnEvent {
    pub ts_ns: u64,
    /// Kernel socket address: identifies the connection while it lives.
    pub skaddr: u64,
    pub oldstate: i32,
    pub newstate: i32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network namespace cookie or inode where available, else 0.
    pub netns: u32,
    pub _pad2: u32,
}

/// Indices of the per-CPU loss and bail-out counters (a `PerCpuArray<u64>`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets the classifiers looked at.
    Packets = 0,
    /// Segments published to the CPU's packet ring.
    Emitted = 1,
    /// Both packet rings of the CPU were full (the collector reads too slowly): an HTTP
    /// segment was lost.
    RingFull = 2,
    /// Headers could not be read (truncated or malformed IP/TCP).
    BadHeader = 3,
    /// TCP segments with payload that do not begin an HTTP/1 message.
    NotHttp = 4,
    /// Connection events lost to a full ring buffer.
    ConnRingFull = 5,
    /// Payload copy failed.
    CopyFailed = 6,
    /// An HTTP segment's payload was longer than `HEAD_LEN`: only the head was copied
    /// (informational: bodies and long headers beyond the head are not needed).
    HeadCut = 7,
    /// No ring to write for this CPU: not set up by the collector yet, or a classifier
    /// run nested in another on the same CPU. An HTTP segment was lost.
    NoRing = 8,
    /// Records timed by reading the clock because their segment carried no send time
    /// (informational: see the classifiers' `send_time`).
    ClockTime = 9,
    /// Segments written to the CPU's spill ring because its fast ring was full
    /// (informational: nothing is lost; see `RingControl`). Includes the rare one that
    /// turns out not to be HTTP only once copied, and is then not published.
    Spilled = 10,
    /// Connection events that woke the collector because the connection ring buffer was a
    /// quarter full (informational: the others wait for its next timed read).
    ConnWakeup = 11,
    /// Records that woke the collector, which had backed off, because their ring was half
    /// full (informational: see `RingControl::doorbell`).
    Doorbell = 12,
    /// Doorbell rings lost to a full `WEFT_DOORBELL` ring buffer: the collector then reads
    /// at its next timed read, and records beyond what its rings hold are counted in
    /// `RingFull`.
    DoorbellFull = 13,
    /// Second sightings written as a mark on the record of their first
    /// (`PacketHeader::also`), not as a record of their own (informational: included in
    /// `Emitted`).
    Marked = 14,
    /// Marks written after the collector may have read their record, and so also written
    /// as a record (`RECORD_AFTER_MARK`; informational: counted once in `Emitted`).
    MarkedLate = 15,
}

impl Counter {
    /// Every counter, in index order (for user space to read and name them).
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Packets,
        Counter::Emitted,
        Counter::RingFull,
        Counter::BadHeader,
        Counter::NotHttp,
        Counter::ConnRingFull,
        Counter::CopyFailed,
        Counter::HeadCut,
        Counter::NoRing,
        Counter::ClockTime,
        Counter::Spilled,
        Counter::ConnWakeup,
        Counter::Doorbell,
        Counter::DoorbellFull,
        Counter::Marked,
        Counter::MarkedLate,
    ];

    /// A stable snake_case name for metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::Emitted => "emitted",
            Counter::RingFull => "ring_full",
            Counter::BadHeader => "bad_header",
            Counter::NotHttp => "not_http",
            Counter::ConnRingFull => "conn_ring_full",
            Counter::CopyFailed => "copy_failed",
            Counter::HeadCut => "head_cut",
            Counter::NoRing => "no_ring",
            Counter::ClockTime => "clock_time",
            Counter::Spilled => "spilled",
            Counter::ConnWakeup => "conn_wakeup",
            Counter::Doorbell => "doorbell",
            Counter::DoorbellFull => "doorbell_full",
            Counter::Marked => "marked",
            Counter::MarkedLate => "marked_late",
        }
    }
}

/// Number of counters (size of the counter array).
pub const COUNTER_COUNT: u32 = 16;

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn packet_layout_is_stable() {
        assert_eq!(offset_of!(PacketHeader, ts_ns), 0);
        assert_eq!(offset_of!(PacketHeader, saddr), 24);
        assert_eq!(offset_of!(PacketHeader, sport), 56);
        assert_eq!(offset_of!(PacketHeader, family), 60);
        assert_eq!(offset_of!(PacketHeader, captured_len), 64);
        // In the record's second line, which the classifier has just written when it marks.
        assert_eq!(offset_of!(PacketHeader, also), 68);
        assert_eq!(PACKET_HEADER_LEN, 72);
        assert_eq!(align_of::<PacketHeader>(), 8);
        // The payload follows the header directly: the kernel copies one prefix.
        assert_eq!(offset_of!(PacketEvent, head), PACKET_HEADER_LEN);
        assert_eq!(align_of::<PacketEvent>(), 64);
        assert_eq!(
            size_of::<PacketEvent>(),
            (PACKET_HEADER_LEN + HEAD_LEN).next_multiple_of(64)
        );
    }

    #[test]
    fn ring_control_keeps_head_and_tail_apart() {
        assert_eq!(offset_of!(RingControl, head), 0);
        assert_eq!(offset_of!(RingControl, slots), 8);
        // The tail starts its own cache line, which the doorbell shares: the classifier
        // reads both together.
        assert_eq!(offset_of!(RingControl, tail), 64);
        assert_eq!(offset_of!(RingControl, doorbell), 72);
        assert_eq!(offset_of!(RingControl, taken), 80);
        // One entry per CPU, each two whole cache lines: no CPU's head shares a line with
        // another CPU's or with a tail.
        assert_eq!(size_of::<RingControl>(), 128);
    }

    #[test]
    fn a_sighting_survives_its_mark_and_no_mark_is_zero() {
        for (ifindex, direction) in [(1, DIR_FROM_POD), (7, DIR_TO_POD), (u32::MAX >> 1, 1)] {
            let s = Sighting { ifindex, direction };
            let mark = s.mark().unwrap();
            assert_ne!(mark, 0);
            assert_eq!(Sighting::from_mark(mark), Some(s));
        }
        assert_eq!(Sighting::from_mark(0), None);
        let unmarkable = [(0, 0), ((u32::MAX >> 1) + 1, 0), (3, 2)];
        for (ifindex, direction) in unmarkable {
            assert_eq!(Sighting { ifindex, direction }.mark(), None);
        }
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn conn_event_layout_is_stable() {
        assert_eq!(offset_of!(ConnEvent, saddr), 24);
        assert_eq!(offset_of!(ConnEvent, sport), 56);
        assert_eq!(offset_of!(ConnEvent, netns), 64);
        assert_eq!(size_of::<ConnEvent>(), 72);
    }
}
