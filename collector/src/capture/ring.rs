//! The per-CPU packet rings, read in place.
//!
//! In: `WEFT_PACKETS` (every CPU's slots) and `WEFT_RING_CTL` (every CPU's `head` and
//! `tail`, see `RingControl`), both mapped into our memory. Out: [`Packet`]s borrowed from
//! the slots, in timestamp order across CPUs; `tail` advanced past what was read.
//!
//! Why per CPU: a shared `BPF_MAP_TYPE_RINGBUF` costs each record a spinlock and two cache
//! lines that every CPU writes; here a classifier only touches its own CPU's slot and
//! `head`, with no helper call.
//!
//! Order: a request written on one CPU and its response on another must reach the parser
//! in that order. A read therefore merges the CPUs by timestamp and stops at a watermark a
//! little before the time the read started. A record's time is when its segment was sent,
//! or when the classifier ran (see the classifiers' `send_time`): either way before it
//! was published, and a response is sent only after its request passed a classifier, so
//! a response never sorts before its request.
//!
//! A time later than the moment its record was known to be published is a pacing
//! sender's departure time. Such a record sorts as of that moment (the clock read right
//! after the read took the rings' heads, or the previous read's for a record that was
//! already there then), so it waits at most one read, not until its time. Only that
//! moment is safe: a record sent after the read began, while the reader was preempted
//! before taking the heads, is not paced, and treating it as such let a response
//! overtake its request that still waited for the watermark.
//!
//! Repeats: a segment between two pods of the node passes both pods' veths, one run right
//! after the other on one CPU; the second record is a `RECORD_REPEAT` with no payload of
//! its own. It is handed on with the payload of its ring's last record that had one, read
//! from that record's slot, or from a copy taken when the slot was freed (a read may end
//! between the two).
//!
//! Marks: more often the second sighting is no record at all but a mark in the first
//! record's header (`PacketHeader::also`), written after that record was published. A
//! read therefore first announces which records it may read (`RingControl::taken`), then
//! fences, then reads the marks: a classifier that marks a record this read may already
//! have passed writes the sighting as a record too (`RECORD_AFTER_MARK`), and the reader
//! hands such a sighting on once, whichever of the two it comes upon first. A mark is
//! handed on with its record, in the same [`Packet`] (`also`): parse reads the bytes once
//! for both sightings.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::{NonNull, addr_of_mut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use anyhow::{Context as _, bail};
use aya::maps::MapData;
use weft_ebpf_common::{
    PacketEvent, PacketHeader, RECORD_AFTER_MARK, RECORD_REPEAT, RingControl, Sighting,
};

use super::Packet;

pub const MAP_PACKETS: &str = "WEFT_PACKETS";
pub const MAP_RING_CTL: &str = "WEFT_RING_CTL";
/// The classifiers' switch for taking a record's time from its segment.
const GLOBAL_SKB_SEND_TIME: &str = "SKB_SEND_TIME";

/// All CPUs' slots together take at most this much (more only at the per-CPU minimum, on
/// nodes with over 40 CPUs). A 2-CPU node gets a spill ring of 8,192 slots per CPU: about
/// 55 ms of HTTP segments at 150k per second on one CPU (a saturated 2-CPU node tracing
/// both halves of pod-to-pod requests). The reader comes every 5 ms (after a quiet spell,
/// at once when a ring is half full: see `pace`), but on a
/// saturated node it can wait its turn for tens of milliseconds: 4,096 slots lost records
/// in 2 of 5 such runs of the overhead benchmark. The fast ring in front of it has a quarter of
/// that, at most `MAX_FAST_SLOTS` (see `RingControl`).
const BUDGET_BYTES: usize = 16 * 1024 * 1024;
const MIN_SLOTS: u64 = 512;
const MAX_SLOTS: u64 = 8192;
/// A spill ring has at least this many times its fast ring's slots.
const FAST_SHARE: u64 = 4;
/// A fast ring never has more slots: what a classifier writes must still be in its CPU's
/// cache when it comes round to the slot again, so the ring's written lines (about 3.5 of
/// a slot's 10) should fit beside the traffic's own data. 1,024 slots hold 9 ms of the
/// busiest CPU's records (110k per second on a saturated 2-vCPU node), against the
/// reader's 5 ms. Measured there against 2,048: classifier time per run lower in 13 of 15
/// alternating pairs (median -14 %, `--bpf-stats`), collector CPU per request lower in 10
/// (median -5 %), 0.05-0.5 % of the records spilled, throughput the same within the
/// rounds' spread.
const MAX_FAST_SLOTS: u64 = 1024;

/// Records stamped less than this before a read began wait for the next read (see the
/// module doc): covers a classifier between its timestamp and its publishing store.
pub const WATERMARK_MARGIN_NANOS: u64 = 1_000_000;

/// How many CPUs have rings, and the slots of each CPU's fast and spill ring (powers of
/// two). Rings are numbered every CPU's fast ring first (ring = CPU), then every CPU's
/// spill ring (ring = CPUs + CPU), as in `WEFT_RING_CTL`; their slots follow each other in
/// `WEFT_PACKETS` in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    pub cpus: u32,
    pub fast_slots: u64,
    pub spill_slots: u64,
}

impl RingLayout {
    /// Two rings per possible CPU (the kernel's CPU ids), sized to the memory budget.
    pub fn for_this_machine() -> anyhow::Result<Self> {
        let cpus =
            aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        Ok(Self::for_cpus(u32::try_from(cpus).context("CPU count")?))
    }

    pub fn for_cpus(cpus: u32) -> Self {
        let per_cpu = BUDGET_BYTES / size_of::<PacketEvent>() / (cpus.max(1) as usize);
        // The spill ring takes what leaves room for the fast ring in the share: the largest
        // power of two (a slot index is a mask) within FAST_SHARE / (FAST_SHARE + 1) of it.
        let room = (per_cpu as u64 * FAST_SHARE / (FAST_SHARE + 1)).max(1);
        let spill = (1u64 << room.ilog2()).clamp(MIN_SLOTS, MAX_SLOTS);
        RingLayout {
            cpus,
            fast_slots: (spill / FAST_SHARE).min(MAX_FAST_SLOTS),
            spill_slots: spill,
        }
    }

    /// An object loader that sizes both ring maps for this layout.
    pub fn loader(&self) -> aya::EbpfLoader<'static> {
        let mut loader = aya::EbpfLoader::new();
        loader
            .map_max_entries(MAP_PACKETS, self.total_slots())
            .map_max_entries(MAP_RING_CTL, self.rings())
            .override_global(GLOBAL_SKB_SEND_TIME, skb_send_time(), true);
        loader
    }

    /// `max_entries` of `WEFT_PACKETS`.
    pub fn total_slots(&self) -> u32 {
        (u64::from(self.cpus) * (self.fast_slots + self.spill_slots)) as u32
    }

    /// How many rings there are: two per CPU.
    pub fn rings(&self) -> u32 {
        2 * self.cpus
    }

    /// The CPU whose fast or spill ring `ring` is.
    fn cpu_of(&self, ring: u32) -> u32 {
        match ring < self.cpus {
            true => ring,
            false => ring - self.cpus,
        }
    }

    /// Where `ring` is: its `base`, `slots` and `spill` as its control block holds them.
    fn place(&self, ring: u32) -> RingPlace {
        let cpus = u64::from(self.cpus);
        let ring = u64::from(ring);
        if ring < cpus {
            RingPlace {
                base: ring * self.fast_slots,
                slots: self.fast_slots,
                // 1 + the index of the CPU's spill ring.
                spill: cpus + ring + 1,
            }
        } else {
            RingPlace {
                base: cpus * self.fast_slots + (ring - cpus) * self.spill_slots,
                slots: self.spill_slots,
                spill: 0,
            }
        }
    }
}

/// One ring's fields of `RingControl` that the collector sets.
struct RingPlace {
    base: u64,
    slots: u64,
    spill: u64,
}

/// Whether the kernel lets the classifiers read a segment's send time
/// (`__sk_buff.tstamp_type`, Linux 5.18): where it does not, they would fail to load with
/// it, so they read the clock instead.
fn skb_send_time() -> &'static u8 {
    use aya::util::KernelVersion;
    match KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 18, 0)) {
        true => &1,
        false => &0,
    }
}

/// What one read saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingRead {
    pub records: u64,
    /// Slots whose header announced more payload than a slot holds (skipped).
    pub malformed: u64,
    /// `RECORD_REPEAT` records handed on with the payload of the record they repeat
    /// (included in `records`).
    pub repeats: u64,
    /// `RECORD_REPEAT` records whose record was not there to repeat (skipped): read before
    /// this reader started, or malformed, or not the same segment.
    pub unresolved_repeats: u64,
    /// Second sightings read from a mark on their first record (included in `records`
    /// and `repeats`).
    pub marked: u64,
    /// Sightings found both as a mark and as a `RECORD_AFTER_MARK` record, and handed on
    /// from the first of the two only: the second is skipped here.
    pub twins: u64,
    /// Records published but stamped after the watermark: left for the next read.
    pub waiting: u64,
}

impl RingRead {
    /// Every record the read came upon: handed on, skipped, or left waiting.
    pub fn found(&self) -> u64 {
        self.records + self.malformed + self.unresolved_repeats + self.waiting + self.twins
    }
}

/// The rings of every CPU, mapped.
pub struct PacketRings {
    ctl: Region,
    slots: Region,
    layout: RingLayout,
    /// Per ring: the next record to read (what we last stored into `tail`).
    tails: Vec<u64>,
    heads: Vec<u64>,
    /// Per ring: `head` as the previous read took it, and the monotonic time right after
    /// (`seen_at`): every record before it was published by then.
    seen: Vec<u64>,
    seen_at: u64,
    /// Per ring: `tail` as the kernel knows it. Slots from here on are not yet its to
    /// write again.
    freed: Vec<u64>,
    /// Per CPU: the last sighting handed on that may have a twin (see the module doc).
    twins: Vec<Cell<Option<Twin>>>,
    /// Per ring: the last record read that carried its payload.
    originals: Vec<Original>,
    /// Reused by every read: (timestamp of a CPU's next record, CPU).
    merge: BinaryHeap<Reverse<(u64, u32)>>,
    /// Whether the rings' doorbells were last armed (see [`PacketRings::set_doorbell`]).
    doorbell: bool,
    /// The maps themselves: their fds must stay open, the classifiers are loaded and
    /// attached with them later.
    maps: Option<(MapData, MapData)>,
}

/// A ring's last record with payload, for the `RECORD_REPEAT` records after it.
///
/// Privacy: the copy holds a captured head as the kernel wrote it (an `Authorization`
/// header included); it is handed on only as a repeat's payload, to the parser, and has
/// no `Debug`.
#[derive(Default)]
struct Original {
    /// Its number in the ring; `None`: none read yet.
    n: Option<u64>,
    /// Its copy, taken when its slot was freed (the kernel may then write the slot again
    /// while a repeat of it is still unread), for record `saved_n`.
    saved_n: Option<u64>,
    saved_header: PacketHeader,
    saved_payload: Vec<u8>,
}

/// A sighting that may come twice, as a mark and as a `RECORD_AFTER_MARK` record: its
/// record's time (as the kernel wrote it) and segment, and where it was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Twin {
    ts_ns: u64,
    seq: u32,
    ack: u32,
    sighting: Sighting,
}

impl Twin {
    fn of(header: &PacketHeader, sighting: Sighting) -> Self {
        Twin {
            ts_ns: header.ts_ns,
            seq: header.seq,
            ack: header.ack,
            sighting,
        }
    }
}

/// A slot as read.
enum Slot<'a> {
    /// A record with its own payload, and the second sighting marked on it.
    Original(Packet<'a>, Option<Sighting>),
    /// A `RECORD_REPEAT` record, with the payload of the one it repeats.
    Repeat(Packet<'a>),
    Malformed,
    Unresolved,
}

/// Whether `repeat` announces the segment of `original` (what the classifier compared).
fn same_segment(repeat: &PacketHeader, original: &PacketHeader) -> bool {
    repeat.ts_ns == original.ts_ns
        && repeat.seq == original.seq
        && repeat.ack == original.ack
        && repeat.payload_len == original.payload_len
        && repeat.captured_len == original.captured_len
}

impl PacketRings {
    /// Maps both maps of a loaded object (sized with `layout`) and sets every CPU's ring
    /// up. Must run before the classifiers are attached: until then they write nothing.
    pub fn open(
        packets: aya::maps::Map,
        ctl: aya::maps::Map,
        layout: RingLayout,
    ) -> anyhow::Result<Self> {
        let (packets, ctl) = (
            array_data(packets, MAP_PACKETS)?,
            array_data(ctl, MAP_RING_CTL)?,
        );
        let ctl_len = layout.rings() as usize * size_of::<RingControl>();
        let slots_len = layout.total_slots() as usize * size_of::<PacketEvent>();
        let ctl_region = Region::map(ctl.fd().as_fd().as_raw_fd(), ctl_len, true)
            .with_context(|| format!("mapping {MAP_RING_CTL} ({ctl_len} bytes)"))?;
        let slots_region = Region::map(packets.fd().as_fd().as_raw_fd(), slots_len, false)
            .with_context(|| format!("mapping {MAP_PACKETS} ({slots_len} bytes)"))?;
        // SAFETY: both regions are the maps' whole data, sized from `layout` as loaded.
        let mut rings = unsafe { Self::from_regions(ctl_region, slots_region, layout) }?;
        rings.maps = Some((packets, ctl));
        Ok(rings)
    }

    /// # Safety
    /// `ctl` must hold `layout.rings()` `RingControl`s and `slots` `layout.total_slots()`
    /// `PacketEvent`s, suitably aligned, for as long as the rings live.
    unsafe fn from_regions(ctl: Region, slots: Region, layout: RingLayout) -> anyhow::Result<Self> {
        if !(layout.fast_slots.is_power_of_two() && layout.spill_slots.is_power_of_two()) {
            bail!("ring slots must be powers of two, not {layout:?}");
        }
        let aligned = slots.ptr.cast::<PacketEvent>().is_aligned()
            && ctl.ptr.cast::<RingControl>().is_aligned();
        if !aligned {
            bail!("ring memory is not aligned for its slots and control blocks");
        }
        let rings_n = layout.rings() as usize;
        let mut rings = PacketRings {
            ctl,
            slots,
            layout,
            tails: vec![0; rings_n],
            heads: vec![0; rings_n],
            twins: vec![Cell::new(None); layout.cpus as usize],
            seen: vec![0; rings_n],
            seen_at: 0,
            freed: vec![0; rings_n],
            originals: (0..rings_n).map(|_| Original::default()).collect(),
            merge: BinaryHeap::with_capacity(rings_n),
            doorbell: false,
            maps: None,
        };
        for ring in 0..layout.rings() {
            // Start where the kernel is (a fresh map: 0), then let it write: `slots` last,
            // as the kernel writes nothing before it is set.
            let head = rings.head(ring).load(Ordering::Acquire);
            rings.tails[ring as usize] = head;
            rings.seen[ring as usize] = head;
            rings.freed[ring as usize] = head;
            rings.tail(ring).store(head, Ordering::Release);
            rings.taken_field(ring).store(head, Ordering::Release);
            let place = layout.place(ring);
            let field = |f| rings.field(ring, f);
            field(|c| unsafe { addr_of_mut!((*c).base) }).store(place.base, Ordering::Release);
            field(|c| unsafe { addr_of_mut!((*c).spill) }).store(place.spill, Ordering::Release);
            field(|c| unsafe { addr_of_mut!((*c).slots) }).store(place.slots, Ordering::Release);
        }
        Ok(rings)
    }

    /// Hands every record stamped up to `watermark` (monotonic ns) to `sink`, oldest first
    /// over all rings, then frees their slots for the kernel. `u64::MAX`: everything.
    ///
    /// `clock` gives the monotonic time; it is read once, right after the heads.
    pub fn read(
        &mut self,
        watermark: u64,
        clock: impl FnOnce() -> u64,
        mut sink: impl FnMut(Packet<'_>),
    ) -> RingRead {
        let mut out = RingRead::default();
        self.merge.clear();
        for ring in 0..self.layout.rings() {
            self.heads[ring as usize] = self.head(ring).load(Ordering::Acquire);
        }
        self.announce_taken();
        // After the heads: every record before them was published, so sent, by now.
        let now = clock();
        for ring in 0..self.layout.rings() {
            let c = ring as usize;
            if self.heads[c] != self.tails[c] {
                let ts = self.sort_time(ring, self.tails[c], now);
                self.merge.push(Reverse((ts, ring)));
            }
        }
        while let Some(Reverse((ts, ring))) = self.merge.pop() {
            if ts > watermark {
                break;
            }
            let c = ring as usize;
            let n = self.tails[c];
            self.hand_on(ring, n, ts, &mut out, &mut sink);
            self.tails[c] += 1;
            if self.tails[c] + 1 < self.heads[c] {
                self.prefetch(ring, self.tails[c] + 1);
            }
            if self.tails[c] != self.heads[c] {
                let next = self.sort_time(ring, self.tails[c], now);
                self.merge.push(Reverse((next, ring)));
            }
        }
        self.seen.copy_from_slice(&self.heads);
        self.seen_at = now;
        for ring in 0..self.layout.rings() {
            self.save_original(ring);
            // The kernel may reuse the slots only once we are done with them.
            let c = ring as usize;
            self.freed[c] = self.tails[c];
            self.tail(ring).store(self.tails[c], Ordering::Release);
            out.waiting += self.heads[c] - self.tails[c];
        }
        out
    }

    /// Stores every ring's head as this read took it into `taken`, where it changed since
    /// the previous read (`seen`, what that one stored), then fences: no mark is read
    /// before the kernel can see which records this read may have passed (see
    /// `RingControl::taken`).
    fn announce_taken(&self) {
        let mut stored = false;
        for ring in 0..self.layout.rings() {
            let c = ring as usize;
            if self.seen[c] != self.heads[c] {
                self.taken_field(ring)
                    .store(self.heads[c], Ordering::Relaxed);
                stored = true;
            }
        }
        if stored {
            fence(Ordering::SeqCst);
        }
    }

    /// Hands record `n` of `ring` to `sink` as of time `ts`, with the second sighting
    /// marked on it in the same packet (`Packet::also`), and counts what it was.
    fn hand_on(
        &mut self,
        ring: u32,
        n: u64,
        ts: u64,
        out: &mut RingRead,
        sink: &mut impl FnMut(Packet<'_>),
    ) {
        let twins = &self.twins[self.layout.cpu_of(ring) as usize];
        let (packet, also, original) = match self.read_slot(ring, n) {
            Slot::Original(p, also) => (p, also, true),
            Slot::Repeat(p) => (p, None, false),
            Slot::Malformed => {
                out.malformed += 1;
                return;
            }
            Slot::Unresolved => {
                out.unresolved_repeats += 1;
                return;
            }
        };
        let (header, payload) = (packet.header, packet.payload);
        let own = || Sighting {
            ifindex: header.ifindex,
            direction: header.direction,
        };
        // Its own sighting is skipped when the mark it repeats was handed on. (Such a
        // record carries no mark: `can_mark` refuses records with flags.)
        let own_sighting =
            header.record_flags & RECORD_AFTER_MARK == 0 || first_of_twins(twins, &header, own());
        let also = match also {
            Some(marked) if first_of_twins(twins, &header, marked) => {
                out.records += 1;
                out.repeats += 1;
                out.marked += 1;
                Some(marked)
            }
            Some(_) => {
                out.twins += 1;
                None
            }
            None => None,
        };
        let packet = Packet {
            header: PacketHeader {
                ts_ns: ts,
                ..header
            },
            payload,
            also,
        };
        match (own_sighting, also) {
            (true, _) => {
                out.records += 1;
                out.repeats += u64::from(!original);
                sink(packet);
            }
            (false, Some(marked)) => {
                out.twins += 1;
                sink(packet.seen_at(marked));
            }
            (false, None) => out.twins += 1,
        }
        if original {
            self.originals[ring as usize].n = Some(n);
        }
    }

    /// Arms or disarms every ring's doorbell (`RingControl::doorbell`). Armed again on
    /// every call while armed, since the classifier that rang disarmed its own ring; not
    /// written at all while disarmed, which is the reader's state under load.
    pub fn set_doorbell(&mut self, armed: bool) {
        if !armed && !self.doorbell {
            return;
        }
        for ring in 0..self.layout.rings() {
            self.field(ring, |c| unsafe { addr_of_mut!((*c).doorbell) })
                .store(u64::from(armed), Ordering::Release);
        }
        self.doorbell = armed;
    }

    /// Where record `n` of `ring` sorts in a read whose clock said `now` after taking the
    /// heads, and the time it is read with: its own, unless that is later than a time by
    /// which it was known to be published (see the module doc).
    fn sort_time(&self, ring: u32, n: u64, now: u64) -> u64 {
        let published_by = match n < self.seen[ring as usize] {
            true => self.seen_at,
            false => now,
        };
        self.slot(ring, n).header.ts_ns.min(published_by)
    }

    /// The record in `ring`'s slot `n` (published, unread). A record with payload comes
    /// with the sighting marked on it, read after `announce_taken`.
    fn read_slot(&self, ring: u32, n: u64) -> Slot<'_> {
        let slot = self.slot(ring, n);
        if slot.header.record_flags & RECORD_REPEAT == 0 {
            let Some(mut packet) = Packet::from_slot(slot) else {
                return Slot::Malformed;
            };
            let also = self.also(ring, n);
            packet.header.also = 0;
            return Slot::Original(packet, Sighting::from_mark(also));
        }
        match self.original(ring) {
            Some(original) if same_segment(&slot.header, &original.header) => {
                Slot::Repeat(Packet {
                    header: slot.header,
                    payload: original.payload,
                    also: None,
                })
            }
            _ => Slot::Unresolved,
        }
    }

    /// `ring`'s last record with payload, from its slot while that is not freed, else
    /// from the copy taken when it was.
    fn original(&self, ring: u32) -> Option<Packet<'_>> {
        let c = ring as usize;
        let o = &self.originals[c];
        let n = o.n?;
        if n >= self.freed[c] {
            return Packet::from_slot(self.slot(ring, n));
        }
        (o.saved_n == Some(n)).then_some(Packet {
            header: o.saved_header,
            payload: &o.saved_payload,
            also: None,
        })
    }

    /// Copies `ring`'s last record with payload before its slot is freed (one copy per
    /// ring and read at most, of the bytes just read).
    fn save_original(&mut self, ring: u32) {
        let c = ring as usize;
        let Some(n) = self.originals[c].n else {
            return;
        };
        if n < self.freed[c] || self.originals[c].saved_n == Some(n) {
            return;
        }
        // SAFETY: read this time, not yet freed: the kernel does not write it.
        let slot = unsafe { &*self.slot_ptr(ring, n) };
        let o = &mut self.originals[c];
        o.saved_header = slot.header;
        o.saved_payload.clear();
        o.saved_payload
            .extend_from_slice(&slot.head[..slot.header.captured_len as usize]);
        o.saved_n = Some(n);
    }

    /// Starts loading the first lines of `cpu`'s record `n` (its header and the start of
    /// its head) while the records before it are handled. Another CPU wrote them, so each
    /// line is a cache miss: reading them was most of the reader's own time. The collector
    /// used less CPU per request in 4 of 4 alternating pairs (a few percent, about the
    /// run-to-run spread).
    fn prefetch(&self, ring: u32, n: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            const LINES: usize = 4;
            const _: () = assert!(LINES * 64 <= size_of::<PacketEvent>());
            let p = self.slot_ptr(ring, n).cast::<i8>();
            for line in 0..LINES {
                // SAFETY: a hint only (it neither faults nor accesses), and within the slot.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * 64)) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (ring, n);
    }

    fn control(&self, ring: u32) -> *mut RingControl {
        debug_assert!(ring < self.layout.rings());
        // In bounds: `ring` < rings, and the region holds `rings` controls.
        unsafe { self.ctl.at(ring as usize) }
    }

    /// A u64 field of `ring`'s control block (`f` picks it). Only `head` and `doorbell`
    /// are written by the kernel (through aligned 8-byte stores); we write the others, and
    /// only `tail` and `doorbell` after the kernel may have started.
    fn field(&self, ring: u32, f: fn(*mut RingControl) -> *mut u64) -> &AtomicU64 {
        // SAFETY: an aligned u64 in the mapped control block, which outlives `self`.
        unsafe { AtomicU64::from_ptr(f(self.control(ring))) }
    }

    fn head(&self, ring: u32) -> &AtomicU64 {
        self.field(ring, |c| unsafe { addr_of_mut!((*c).head) })
    }

    fn tail(&self, ring: u32) -> &AtomicU64 {
        self.field(ring, |c| unsafe { addr_of_mut!((*c).tail) })
    }

    fn taken_field(&self, ring: u32) -> &AtomicU64 {
        self.field(ring, |c| unsafe { addr_of_mut!((*c).taken) })
    }

    /// The mark on record `n` of `ring` (`PacketHeader::also`): the one field the kernel
    /// may write in a published slot, so read atomically, not from a copy of the header.
    fn also(&self, ring: u32, n: u64) -> u32 {
        let p = self.slot_ptr(ring, n);
        // SAFETY: an aligned u32 in the mapped slot, which outlives `self`; the kernel
        // writes it with a locked add on the word it shares with `captured_len`.
        unsafe { AtomicU32::from_ptr(addr_of_mut!((*p).header.also)) }.load(Ordering::Relaxed)
    }

    /// The slot of `ring`'s record number `n`. Only called for published, unread records,
    /// which the kernel does not write until `tail` moves past them.
    fn slot(&self, ring: u32, n: u64) -> &PacketEvent {
        // SAFETY: in the region (see `slot_ptr`), and not written while unread.
        unsafe { &*self.slot_ptr(ring, n) }
    }

    fn slot_ptr(&self, ring: u32, n: u64) -> *mut PacketEvent {
        let place = self.layout.place(ring);
        let index = place.base + (n & (place.slots - 1));
        // SAFETY: index < total slots, the region's length in slots.
        unsafe { self.slots.at(index as usize) }
    }
}

/// Whether a sighting of the segment of `header` that may have a twin (a mark, or a
/// `RECORD_AFTER_MARK` record) is handed on: not if its twin was just handed on on this
/// CPU (`last`; then that twin is forgotten), else yes (and it is remembered). A CPU's
/// twins come one right after the other: a classifier writes the `RECORD_AFTER_MARK`
/// record right after the mark, with the record's time.
fn first_of_twins(last: &Cell<Option<Twin>>, header: &PacketHeader, sighting: Sighting) -> bool {
    let twin = Twin::of(header, sighting);
    if last.get() == Some(twin) {
        last.set(None);
        return false;
    }
    last.set(Some(twin));
    true
}

fn array_data(map: aya::maps::Map, name: &str) -> anyhow::Result<MapData> {
    match map {
        aya::maps::Map::Array(data) => Ok(data),
        other => bail!("map {name} is not an array: {other:?}"),
    }
}

// SAFETY: the regions are owned by the rings; nothing else in this process aliases them.
unsafe impl Send for PacketRings {}

/// A mapped map (or, in tests, heap memory standing in for one).
struct Region {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

enum Backing {
    Mmap,
    #[cfg(test)]
    Heap(#[allow(dead_code)] Vec<CacheLine>),
}

impl Region {
    /// The `index`th `T` of the region.
    ///
    /// # Safety
    /// The region must hold more than `index` `T`s.
    unsafe fn at<T>(&self, index: usize) -> *mut T {
        unsafe { self.ptr.cast::<T>().as_ptr().add(index) }
    }

    /// Maps the data of a `BPF_F_MMAPABLE` array map (page aligned, at offset 0).
    fn map(fd: i32, len: usize, writable: bool) -> std::io::Result<Self> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of `len` bytes of the map; released in `Drop`.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Region {
            ptr,
            len,
            backing: Backing::Mmap,
        })
    }

    /// Zeroed heap memory aligned like a map's data (to a cache line, which slots need).
    #[cfg(test)]
    fn heap(len: usize) -> Self {
        let mut lines = vec![CacheLine([0; 64]); len.div_ceil(64)];
        let ptr = NonNull::new(lines.as_mut_ptr().cast::<u8>()).expect("vec pointer");
        Region {
            ptr,
            len,
            backing: Backing::Heap(lines),
        }
    }
}

#[cfg(test)]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

impl Drop for Region {
    fn drop(&mut self) {
        if matches!(self.backing, Backing::Mmap) {
            // SAFETY: unmaps exactly what `map` mapped; no borrow of it outlives the rings.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_ebpf_common::HEAD_LEN;

    /// The rings over heap memory (fast rings of `slots`, spill rings of twice that), with
    /// a stand-in for the kernel's side.
    fn rings(cpus: u32, slots: u64) -> PacketRings {
        let layout = RingLayout {
            cpus,
            fast_slots: slots,
            spill_slots: 2 * slots,
        };
        let ctl = Region::heap(layout.rings() as usize * size_of::<RingControl>());
        let data = Region::heap(layout.total_slots() as usize * size_of::<PacketEvent>());
        // SAFETY: regions sized from the layout; cache-line-aligned heap memory.
        unsafe { PacketRings::from_regions(ctl, data, layout) }.expect("rings")
    }

    /// What a classifier does, from what the collector set in the control blocks: fill
    /// the next slot of the CPU's fast ring, or of its spill ring when the fast one is
    /// full, then advance that ring's `head`. False: both were full.
    fn write(r: &PacketRings, cpu: u32, ts_ns: u64, payload: &[u8]) -> bool {
        write_record(r, cpu, header(ts_ns, 0, payload), payload)
    }

    fn header(ts_ns: u64, seq: u32, payload: &[u8]) -> PacketHeader {
        PacketHeader {
            ts_ns,
            seq,
            payload_len: payload.len() as u32,
            captured_len: payload.len() as u32,
            ..Default::default()
        }
    }

    /// A `RECORD_REPEAT` of the record `of`, seen on interface `ifindex`.
    fn write_repeat(r: &PacketRings, cpu: u32, of: PacketHeader, ifindex: u32) -> bool {
        let repeat = PacketHeader {
            ifindex,
            record_flags: RECORD_REPEAT,
            ..of
        };
        write_record(r, cpu, repeat, b"")
    }

    fn write_record(r: &PacketRings, cpu: u32, header: PacketHeader, payload: &[u8]) -> bool {
        let fast = r.control(cpu);
        if put(r, fast, header, payload) {
            return true;
        }
        let spill = unsafe { (*fast).spill };
        spill != 0 && put(r, r.control((spill - 1) as u32), header, payload)
    }

    fn put(r: &PacketRings, ctl: *mut RingControl, header: PacketHeader, payload: &[u8]) -> bool {
        let (head, tail, slots, base) =
            unsafe { ((*ctl).head, (*ctl).tail, (*ctl).slots, (*ctl).base) };
        if head - tail >= slots {
            return false;
        }
        let slot = unsafe {
            r.slots
                .at::<PacketEvent>((base + (head & (slots - 1))) as usize)
        };
        let mut ev = PacketEvent {
            header,
            head: [0; HEAD_LEN],
        };
        ev.head[..payload.len()].copy_from_slice(payload);
        unsafe { slot.write(ev) };
        unsafe { AtomicU64::from_ptr(addr_of_mut!((*ctl).head)) }
            .store(head + 1, Ordering::Release);
        true
    }

    /// Writes (CPU, timestamp, payload) records in the order given.
    fn write_each(r: &PacketRings, records: &[(u32, u64, &[u8])]) {
        for &(cpu, ts, payload) in records {
            assert!(write(r, cpu, ts, payload), "ring of CPU {cpu} full");
        }
    }

    fn timestamps(got: &[(u64, Vec<u8>)]) -> Vec<u64> {
        got.iter().map(|(t, _)| *t).collect()
    }

    /// A read up to `watermark` that took the heads right when it began (`watermark` +
    /// the margin).
    fn read_all(r: &mut PacketRings, watermark: u64) -> (Vec<(u64, Vec<u8>)>, RingRead) {
        read_at(
            r,
            watermark,
            watermark.saturating_add(WATERMARK_MARGIN_NANOS),
        )
    }

    /// A read up to `watermark` whose clock said `now` after it took the heads.
    fn read_at(r: &mut PacketRings, watermark: u64, now: u64) -> (Vec<(u64, Vec<u8>)>, RingRead) {
        let mut got = Vec::new();
        let read = r.read(
            watermark,
            || now,
            |p| got.push((p.header.ts_ns, p.payload.to_vec())),
        );
        (got, read)
    }

    #[test]
    fn records_of_all_cpus_come_out_in_timestamp_order() {
        let mut r = rings(3, 8);
        write_each(
            &r,
            &[
                (1, 10, b"GET /a"),
                (0, 20, b"HTTP/1.1 200"),
                (1, 30, b"GET /b"),
                (2, 25, b"GET /c"),
                (0, 40, b"HTTP/1.1 404"),
            ],
        );
        let (got, read) = read_all(&mut r, u64::MAX);
        assert_eq!(timestamps(&got), [10, 20, 25, 30, 40]);
        assert_eq!(got[0].1, b"GET /a");
        assert_eq!(got[4].1, b"HTTP/1.1 404");
        assert_eq!(read.records, 5);
        // Read slots are the kernel's again.
        for cpu in 0..3 {
            assert_eq!(
                r.tail(cpu).load(Ordering::Relaxed),
                r.head(cpu).load(Ordering::Relaxed)
            );
        }
    }

    #[test]
    fn records_after_the_watermark_wait_for_the_next_read() {
        let mut r = rings(2, 8);
        write_each(
            &r,
            &[
                (0, 10, b"GET /1"),
                (1, 50, b"HTTP/1.1 200"),
                (0, 60, b"GET /2"),
            ],
        );
        let (got, read) = read_all(&mut r, 40);
        assert_eq!(timestamps(&got), [10]);
        // The two left for later are what the read found besides (see `pace`).
        assert_eq!((read.records, read.waiting, read.found()), (1, 2, 3));
        // A record published late but stamped before the waiting ones still sorts first.
        write(&r, 1, 55, b"GET /late");
        let (got, read) = read_all(&mut r, u64::MAX);
        assert_eq!(timestamps(&got), [50, 55, 60]);
        assert_eq!(read.waiting, 0);
        assert_eq!(read_all(&mut r, u64::MAX).1.found(), 0, "nothing new");
    }

    #[test]
    fn a_paced_record_waits_one_read_not_until_its_time() {
        let mut r = rings(2, 8);
        let watermark = 1_000_000_000;
        let now = watermark + WATERMARK_MARGIN_NANOS;
        let recent = watermark + 1;
        write_each(
            &r,
            &[
                (0, 10, b"GET /1"),
                (0, now + 5_000_000_000, b"GET /paced"),
                (0, 20, b"GET /2"),
                (1, 15, b"HTTP/1.1 200"),
                (1, recent, b"HTTP/1.1 204"),
            ],
        );
        let (got, _) = read_at(&mut r, watermark, now);
        // Seen now, the paced record sorts as of now: after the watermark, like a recent one.
        assert_eq!(timestamps(&got), [10, 15]);
        // The next read, 5 ms on, takes it as of the first read's clock, in order with the
        // recent one, and CPU 0's ring goes on behind it.
        let next = now + 5_000_000;
        let (got, _) = read_at(&mut r, next - WATERMARK_MARGIN_NANOS, next);
        assert_eq!(timestamps(&got), [recent, now, 20]);
        assert_eq!(got[1].1, b"GET /paced");
    }

    #[test]
    fn a_record_sent_after_the_read_began_does_not_overtake_one_sent_before() {
        // The reader took its clock for the watermark, then was preempted before it took
        // the heads: meanwhile a request went out (CPU 0) and its response came back
        // (CPU 1), both stamped after the watermark, the response after the clock read.
        let mut r = rings(2, 8);
        let watermark = 1_000_000_000;
        let began = watermark + WATERMARK_MARGIN_NANOS;
        let (request, response) = (watermark + 100_000, began + 200_000);
        write(&r, 0, request, b"GET /1");
        write(&r, 1, response, b"HTTP/1.1 200");
        let (got, _) = read_at(&mut r, watermark, began + 500_000);
        assert_eq!(
            timestamps(&got),
            [] as [u64; 0],
            "both wait for the watermark"
        );
        let next = began + 5_000_000;
        let (got, _) = read_at(&mut r, next - WATERMARK_MARGIN_NANOS, next);
        assert_eq!(timestamps(&got), [request, response]);
    }

    #[test]
    fn full_rings_refuse_until_read_and_wrap_around() {
        // 4 fast slots and 8 spill slots.
        let mut r = rings(1, 4);
        for ts in 1..=12 {
            assert!(write(&r, 0, ts, b"GET /"));
        }
        assert!(!write(&r, 0, 13, b"GET /"), "the 13th record has no slot");
        assert_eq!(read_all(&mut r, u64::MAX).1.records, 12);
        for ts in 13..=18 {
            assert!(write(&r, 0, ts, b"GET /"));
        }
        let (got, _) = read_all(&mut r, u64::MAX);
        assert_eq!(timestamps(&got), [13, 14, 15, 16, 17, 18]);
    }

    #[test]
    fn a_slot_announcing_too_much_payload_is_skipped_and_counted() {
        let mut r = rings(1, 4);
        write(&r, 0, 1, b"GET /ok");
        write(&r, 0, 2, b"GET /bad");
        let bad = r.slot_ptr(0, 1);
        unsafe { (*bad).header.captured_len = HEAD_LEN as u32 + 1 };
        write(&r, 0, 3, b"GET /ok2");
        let (got, read) = read_all(&mut r, u64::MAX);
        assert_eq!(got.len(), 2);
        assert_eq!(
            read,
            RingRead {
                records: 2,
                malformed: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn misaligned_memory_is_refused() {
        let layout = RingLayout {
            cpus: 1,
            fast_slots: 4,
            spill_slots: 4,
        };
        let ctl = Region::heap(2 * size_of::<RingControl>());
        let mut data = Region::heap(9 * size_of::<PacketEvent>());
        // One word into a cache line: aligned for a u64, not for a slot.
        data.ptr = NonNull::new(unsafe { data.ptr.as_ptr().add(8) }).expect("pointer");
        let refused = unsafe { PacketRings::from_regions(ctl, data, layout) };
        assert!(refused.is_err());
    }

    #[test]
    fn the_layout_fits_the_budget_in_powers_of_two() {
        let two = RingLayout::for_cpus(2);
        assert_eq!((two.fast_slots, two.spill_slots), (MAX_FAST_SLOTS, 8192));
        let many = RingLayout::for_cpus(8);
        assert_eq!((many.fast_slots, many.spill_slots), (512, 2048));
        for layout in [two, many, RingLayout::for_cpus(3), RingLayout::for_cpus(40)] {
            assert!(layout.total_slots() as usize * size_of::<PacketEvent>() <= BUDGET_BYTES);
        }
        // Never below the minimum, whatever the CPU count.
        let huge = RingLayout::for_cpus(4096);
        assert_eq!(
            (huge.fast_slots, huge.spill_slots),
            (MIN_SLOTS / FAST_SHARE, MIN_SLOTS)
        );
    }

    #[test]
    fn every_ring_has_its_own_slots_and_fast_rings_point_at_their_spill_ring() {
        let r = rings(2, 4);
        let field = |ring, f: fn(&RingControl) -> u64| f(unsafe { &*r.control(ring) });
        // Fast rings of CPU 0 and 1 (4 slots each), then their spill rings (8 each).
        let bases: Vec<u64> = (0..4).map(|ring| field(ring, |c| c.base)).collect();
        let slots: Vec<u64> = (0..4).map(|ring| field(ring, |c| c.slots)).collect();
        let spills: Vec<u64> = (0..4).map(|ring| field(ring, |c| c.spill)).collect();
        assert_eq!(bases, [0, 4, 8, 16]);
        assert_eq!(slots, [4, 4, 8, 8]);
        assert_eq!(spills, [3, 4, 0, 0]);
        assert_eq!(r.layout.total_slots(), 24);
    }

    #[test]
    fn what_the_fast_ring_has_no_room_for_spills_and_is_read_in_order() {
        let mut r = rings(2, 2);
        // CPU 0: two in its fast ring, three spilled; CPU 1: one.
        for ts in [10, 20, 30, 50, 60] {
            assert!(write(&r, 0, ts, b"GET /"));
        }
        write_each(&r, &[(1, 40, b"GET /one")]);
        assert_eq!(r.head(2).load(Ordering::Relaxed), 3, "spilled");
        let (got, read) = read_all(&mut r, u64::MAX);
        assert_eq!(timestamps(&got), [10, 20, 30, 40, 50, 60]);
        assert_eq!(read.records, 6);
        // Read: the fast ring takes records again.
        assert!(write(&r, 0, 70, b"GET /"));
        assert_eq!(r.head(0).load(Ordering::Relaxed), 3);
    }

    /// (interface, timestamp, payload) of every record read.
    fn read_with_interfaces(r: &mut PacketRings) -> (Vec<(u32, u64, Vec<u8>)>, RingRead) {
        let mut got = Vec::new();
        let read = r.read(
            u64::MAX,
            || u64::MAX,
            |p| got.push((p.header.ifindex, p.header.ts_ns, p.payload.to_vec())),
        );
        (got, read)
    }

    #[test]
    fn a_repeat_is_read_with_its_own_header_and_the_payload_of_the_record_it_repeats() {
        let mut r = rings(2, 8);
        let first = header(10, 7, b"GET /a HTTP/1.1");
        assert!(write_record(&r, 0, first, b"GET /a HTTP/1.1"));
        assert!(write(&r, 1, 12, b"HTTP/1.1 200 OK"));
        assert!(write_repeat(&r, 0, first, 5));
        let (got, read) = read_with_interfaces(&mut r);
        assert_eq!(
            got,
            [
                (0, 10, b"GET /a HTTP/1.1".to_vec()),
                (5, 10, b"GET /a HTTP/1.1".to_vec()),
                (0, 12, b"HTTP/1.1 200 OK".to_vec()),
            ]
        );
        assert_eq!(
            (read.records, read.repeats, read.unresolved_repeats),
            (3, 1, 0)
        );
    }

    #[test]
    fn a_repeat_read_after_its_record_was_freed_and_overwritten_still_gets_its_payload() {
        // 2 fast slots: the third record takes the first one's slot.
        let mut r = rings(1, 2);
        let first = header(10, 7, b"GET /kept");
        assert!(write_record(&r, 0, first, b"GET /kept"));
        assert!(write_repeat(&r, 0, first, 5));
        let (got, _) = read_with_interfaces(&mut r);
        assert_eq!(got.len(), 2);
        // Read and freed: the kernel writes a third sighting over the original's slot.
        assert!(write_repeat(&r, 0, first, 9));
        assert_eq!(r.slot(0, 0).header.record_flags, RECORD_REPEAT);
        let (got, read) = read_with_interfaces(&mut r);
        assert_eq!(got, [(9, 10, b"GET /kept".to_vec())]);
        assert_eq!((read.repeats, read.unresolved_repeats), (1, 0));
    }

    #[test]
    fn repeats_without_their_record_are_skipped_and_counted() {
        let mut r = rings(2, 8);
        // Nothing read on CPU 0 before it: its record came before the reader started.
        assert!(write_repeat(&r, 0, header(5, 1, b"GET /gone"), 3));
        // Another CPU's record is not CPU 0's to repeat.
        let other = header(6, 2, b"GET /cpu1");
        assert!(write_record(&r, 1, other, b"GET /cpu1"));
        assert!(write_repeat(&r, 0, other, 3));
        // Not the same segment as the record before it (another seq).
        let first = header(7, 3, b"GET /a");
        assert!(write_record(&r, 0, first, b"GET /a"));
        assert!(write_repeat(&r, 0, header(7, 4, b"GET /a"), 3));
        let (got, read) = read_with_interfaces(&mut r);
        assert_eq!(
            got,
            [(0, 6, b"GET /cpu1".to_vec()), (0, 7, b"GET /a".to_vec())]
        );
        assert_eq!(
            (read.records, read.repeats, read.unresolved_repeats),
            (2, 0, 3)
        );
    }

    /// What a classifier does with a second sighting (`mark_last`): marks the last record
    /// of `ring` with it (a locked add on the word `also` shares with `captured_len`),
    /// then tells whether the reader may have passed that record (`taken`), in which case
    /// the classifier writes the sighting as a `RECORD_AFTER_MARK` record too.
    fn mark(r: &PacketRings, ring: u32, sighting: Sighting) -> bool {
        let head = r.head(ring).load(Ordering::Relaxed);
        let word = unsafe { addr_of_mut!((*r.slot_ptr(ring, head - 1)).header.captured_len) };
        let mark = u64::from(sighting.mark().expect("a markable sighting")) << 32;
        unsafe { AtomicU64::from_ptr(word.cast::<u64>()) }.fetch_add(mark, Ordering::SeqCst);
        r.taken_field(ring).load(Ordering::SeqCst) >= head
    }

    const SECOND: Sighting = Sighting {
        ifindex: 5,
        direction: weft_ebpf_common::DIR_TO_POD,
    };

    /// The record of a first sighting: leaving the pod on interface 3.
    fn first_sighting(ts_ns: u64, payload: &[u8]) -> PacketHeader {
        PacketHeader {
            ifindex: 3,
            ..header(ts_ns, 7, payload)
        }
    }

    /// The `RECORD_AFTER_MARK` repeat a classifier writes after a late mark of `first`.
    fn late_repeat(first: PacketHeader) -> PacketHeader {
        PacketHeader {
            ifindex: SECOND.ifindex,
            direction: SECOND.direction,
            record_flags: RECORD_REPEAT | RECORD_AFTER_MARK,
            ..first
        }
    }

    /// (interface, direction, record flags, timestamp, payload) of every record handed on
    /// by a read up to `watermark`.
    type Sightings = Vec<(u32, u8, u8, u64, Vec<u8>)>;
    fn read_sightings(r: &mut PacketRings, watermark: u64) -> (Sightings, RingRead) {
        let mut got = Vec::new();
        let now = watermark.saturating_add(WATERMARK_MARGIN_NANOS);
        let read = r.read(
            watermark,
            || now,
            |p| {
                for p in p.sightings() {
                    let h = p.header;
                    got.push((
                        h.ifindex,
                        h.direction,
                        h.record_flags,
                        h.ts_ns,
                        p.payload.to_vec(),
                    ))
                }
            },
        );
        (got, read)
    }

    /// (records, repeats, marked, twins) of a read.
    fn sighting_counts(read: &RingRead) -> (u64, u64, u64, u64) {
        (read.records, read.repeats, read.marked, read.twins)
    }

    #[test]
    fn a_marked_record_is_handed_on_with_the_marked_sighting() {
        let mut r = rings(2, 8);
        let req = b"GET /m HTTP/1.1";
        assert!(write_record(&r, 0, first_sighting(10, req), req));
        assert!(!mark(&r, 0, SECOND), "no read began: the mark is not late");
        let mut packets = Vec::new();
        let read = r.read(
            u64::MAX,
            || u64::MAX,
            |p| {
                packets.push((p.header.ifindex, p.header.also, p.also, p.payload.to_vec()));
                let sightings: Vec<_> = p
                    .sightings()
                    .map(|s| (s.header.ifindex, s.header.direction, s.header.record_flags))
                    .collect();
                assert_eq!(sightings, [(3, 0, 0), (5, 1, RECORD_REPEAT)]);
            },
        );
        assert_eq!(
            packets,
            [(3, 0, Some(SECOND), req.to_vec())],
            "one packet, the mark in `also` (not in the header's raw field)"
        );
        assert_eq!(sighting_counts(&read), (2, 1, 1, 0));
    }

    #[test]
    fn a_mark_on_a_record_already_read_is_late_and_its_record_is_handed_on() {
        let mut r = rings(1, 8);
        let req = b"GET /late HTTP/1.1";
        let first = first_sighting(10, req);
        assert!(write_record(&r, 0, first, req));
        let (got, _) = read_sightings(&mut r, u64::MAX);
        assert_eq!(got.len(), 1);
        // The read took the record before the mark: the classifier finds it in `taken`.
        assert!(mark(&r, 0, SECOND));
        assert!(write_record(&r, 0, late_repeat(first), b""));
        let (got, read) = read_sightings(&mut r, u64::MAX);
        let flags = RECORD_REPEAT | RECORD_AFTER_MARK;
        assert_eq!(got, [(5, 1, flags, 10, req.to_vec())]);
        assert_eq!(sighting_counts(&read), (1, 1, 0, 0));
    }

    #[test]
    fn a_late_mark_the_reader_sees_as_well_hands_the_sighting_on_once() {
        let mut r = rings(1, 8);
        let req = b"GET /both HTTP/1.1";
        let first = first_sighting(100, req);
        assert!(write_record(&r, 0, first, req));
        // A read takes the head but leaves the record, stamped after its watermark.
        let (got, read) = read_sightings(&mut r, 50);
        assert_eq!((got.len(), read.waiting), (0, 1));
        assert!(mark(&r, 0, SECOND), "the read took the record: late");
        assert!(write_record(&r, 0, late_repeat(first), b""));
        let (got, read) = read_sightings(&mut r, u64::MAX);
        assert_eq!(
            got,
            [
                (3, 0, 0, 100, req.to_vec()),
                (5, 1, RECORD_REPEAT, 100, req.to_vec()),
            ]
        );
        assert_eq!(sighting_counts(&read), (2, 1, 1, 1));
        assert_eq!(read.found(), 3);
    }

    #[test]
    fn a_late_record_read_before_its_mark_hands_the_sighting_on_once() {
        // 2 fast slots, 4 spill slots.
        let mut r = rings(1, 2);
        assert!(write(&r, 0, 10, b"GET /1"));
        assert!(write(&r, 0, 20, b"GET /2"));
        let req = b"GET /spilled HTTP/1.1";
        let first = first_sighting(100, req);
        assert!(write_record(&r, 0, first, req));
        assert_eq!(r.head(1).load(Ordering::Relaxed), 1, "spilled");
        // A read frees the fast ring but leaves the spilled record (after its watermark).
        let (got, read) = read_sightings(&mut r, 50);
        assert_eq!((got.len(), read.waiting), (2, 1));
        assert!(mark(&r, 1, SECOND), "the read took the record: late");
        // The fast ring has room again: the late sighting is a record with its own payload
        // there, which the next read comes upon first (same time, lower ring).
        let late = PacketHeader {
            ifindex: SECOND.ifindex,
            direction: SECOND.direction,
            record_flags: RECORD_AFTER_MARK,
            ..first
        };
        assert!(write_record(&r, 0, late, req));
        assert_eq!(r.head(0).load(Ordering::Relaxed), 3);
        let (got, read) = read_sightings(&mut r, u64::MAX);
        assert_eq!(
            got,
            [
                (5, 1, RECORD_AFTER_MARK, 100, req.to_vec()),
                (3, 0, 0, 100, req.to_vec()),
            ]
        );
        assert_eq!(sighting_counts(&read), (2, 0, 0, 1));
    }

    #[test]
    fn a_read_announces_the_heads_it_took_before_it_reads_a_mark() {
        let mut r = rings(2, 8);
        assert!(write(&r, 1, 10, b"GET /"));
        assert!(write(&r, 1, 20, b"GET /"));
        read_sightings(&mut r, u64::MAX);
        let taken: Vec<u64> = (0..4)
            .map(|ring| r.taken_field(ring).load(Ordering::Relaxed))
            .collect();
        assert_eq!(taken, [0, 2, 0, 0]);
        // A record published after the read began is not covered: marking it is not late.
        assert!(write(&r, 1, 30, b"GET /"));
        assert!(!mark(&r, 1, SECOND));
    }

    fn doorbells(r: &PacketRings) -> Vec<u64> {
        (0..r.layout.rings())
            .map(|ring| {
                r.field(ring, |c| unsafe { addr_of_mut!((*c).doorbell) })
                    .load(Ordering::Relaxed)
            })
            .collect()
    }

    #[test]
    fn doorbells_are_armed_on_every_idle_read_and_disarmed_once() {
        let mut r = rings(2, 8);
        assert_eq!(doorbells(&r), [0; 4], "a new reader reads every 5 ms");
        r.set_doorbell(true);
        assert_eq!(doorbells(&r), [1; 4]);
        // CPU 1's classifier rang: it disarmed its fast ring. The next idle read arms it
        // again.
        r.field(1, |c| unsafe { addr_of_mut!((*c).doorbell) })
            .store(0, Ordering::Relaxed);
        r.set_doorbell(true);
        assert_eq!(doorbells(&r), [1; 4]);
        r.set_doorbell(false);
        assert_eq!(doorbells(&r), [0; 4]);
        // Disarmed, the reader leaves the control blocks alone (under load it reads every
        // 5 ms and writes no more than `tail`).
        r.field(2, |c| unsafe { addr_of_mut!((*c).doorbell) })
            .store(7, Ordering::Relaxed);
        r.set_doorbell(false);
        assert_eq!(doorbells(&r), [0, 0, 7, 0]);
    }
}
