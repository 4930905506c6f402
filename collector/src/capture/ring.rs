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
//! or when the classifier ran (see the classifiers' `packet_time`): either way before it
//! was published, and a response is sent only after its request passed a classifier, so
//! a response never sorts before its request. A time later than the read itself is a
//! pacing sender's departure time: such a record is read at once, as if stamped at the
//! watermark, rather than holding up its CPU's ring until then.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use aya::maps::MapData;
use weft_ebpf_common::{PacketEvent, RingControl};

use super::Packet;

pub const MAP_PACKETS: &str = "WEFT_PACKETS";
pub const MAP_RING_CTL: &str = "WEFT_RING_CTL";
/// The classifiers' switch for taking a record's time from its segment.
const GLOBAL_SKB_SEND_TIME: &str = "SKB_SEND_TIME";

/// All CPUs' slots together take at most this much (more only at the per-CPU minimum, on
/// nodes with over 51 CPUs). A 2-CPU node gets 8,192 slots per CPU: about 55 ms of HTTP
/// segments at 150k per second on one CPU (a saturated 2-CPU node tracing both halves of
/// pod-to-pod requests). The reader comes every 5 ms, but on a saturated node it can wait
/// its turn for tens of milliseconds: 4,096 slots lost records in 2 of 5 such runs of the
/// overhead benchmark.
const BUDGET_BYTES: usize = 16 * 1024 * 1024;
const MIN_SLOTS: u64 = 512;
const MAX_SLOTS: u64 = 8192;

/// Records stamped less than this before a read began wait for the next read (see the
/// module doc): covers a classifier between its timestamp and its publishing store.
pub const WATERMARK_MARGIN_NANOS: u64 = 1_000_000;

/// How many CPUs have a ring and how many slots each has (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    pub cpus: u32,
    pub slots: u64,
}

impl RingLayout {
    /// One ring per possible CPU (the kernel's CPU ids), sized to the memory budget.
    pub fn for_this_machine() -> anyhow::Result<Self> {
        let cpus =
            aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        Ok(Self::for_cpus(u32::try_from(cpus).context("CPU count")?))
    }

    pub fn for_cpus(cpus: u32) -> Self {
        let per_cpu = BUDGET_BYTES / size_of::<PacketEvent>() / (cpus.max(1) as usize);
        // The largest power of two within the share, so that a slot index is a mask.
        let fit = 1u64 << (usize::BITS - 1 - per_cpu.max(1).leading_zeros());
        RingLayout {
            cpus,
            slots: fit.clamp(MIN_SLOTS, MAX_SLOTS),
        }
    }

    /// An object loader that sizes both ring maps for this layout.
    pub fn loader(&self) -> aya::EbpfLoader<'static> {
        let mut loader = aya::EbpfLoader::new();
        loader
            .map_max_entries(MAP_PACKETS, self.total_slots())
            .map_max_entries(MAP_RING_CTL, self.cpus)
            .override_global(GLOBAL_SKB_SEND_TIME, skb_send_time(), true);
        loader
    }

    /// `max_entries` of `WEFT_PACKETS`.
    pub fn total_slots(&self) -> u32 {
        (u64::from(self.cpus) * self.slots) as u32
    }
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

/// Where a record stamped `ts` sorts in a read up to `watermark`, and the time it is read
/// with: its own, unless that is later than the read itself (see the module doc).
fn merge_time(ts: u64, watermark: u64) -> u64 {
    if ts > watermark.saturating_add(WATERMARK_MARGIN_NANOS) {
        watermark
    } else {
        ts
    }
}

/// What one read saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingRead {
    pub records: u64,
    /// Slots whose header announced more payload than a slot holds (skipped).
    pub malformed: u64,
}

/// The rings of every CPU, mapped.
pub struct PacketRings {
    ctl: Region,
    slots: Region,
    layout: RingLayout,
    /// Per CPU: the next record to read (what we last stored into `tail`).
    tails: Vec<u64>,
    heads: Vec<u64>,
    /// Reused by every read: (timestamp of a CPU's next record, CPU).
    merge: BinaryHeap<Reverse<(u64, u32)>>,
    /// The maps themselves: their fds must stay open, the classifiers are loaded and
    /// attached with them later.
    maps: Option<(MapData, MapData)>,
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
        let ctl_len = layout.cpus as usize * size_of::<RingControl>();
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
    /// `ctl` must hold `layout.cpus` `RingControl`s and `slots` `layout.total_slots()`
    /// `PacketEvent`s, suitably aligned, for as long as the rings live.
    unsafe fn from_regions(ctl: Region, slots: Region, layout: RingLayout) -> anyhow::Result<Self> {
        if !layout.slots.is_power_of_two() {
            bail!(
                "ring slots per CPU must be a power of two, not {}",
                layout.slots
            );
        }
        let aligned = slots.ptr.cast::<PacketEvent>().is_aligned()
            && ctl.ptr.cast::<RingControl>().is_aligned();
        if !aligned {
            bail!("ring memory is not aligned for its slots and control blocks");
        }
        let mut rings = PacketRings {
            ctl,
            slots,
            layout,
            tails: vec![0; layout.cpus as usize],
            heads: vec![0; layout.cpus as usize],
            merge: BinaryHeap::with_capacity(layout.cpus as usize),
            maps: None,
        };
        for cpu in 0..layout.cpus {
            // Start where the kernel is (a fresh map: 0), then let it write.
            let head = rings.head(cpu).load(Ordering::Acquire);
            rings.tails[cpu as usize] = head;
            rings.tail(cpu).store(head, Ordering::Release);
            rings
                .slots_field(cpu)
                .store(layout.slots, Ordering::Release);
        }
        Ok(rings)
    }

    /// Hands every record stamped up to `watermark` (monotonic ns) to `sink`, oldest first
    /// over all CPUs, then frees their slots for the kernel. `u64::MAX`: everything.
    pub fn read(&mut self, watermark: u64, mut sink: impl FnMut(Packet<'_>)) -> RingRead {
        let mut out = RingRead::default();
        self.merge.clear();
        for cpu in 0..self.layout.cpus {
            let head = self.head(cpu).load(Ordering::Acquire);
            self.heads[cpu as usize] = head;
            if head != self.tails[cpu as usize] {
                let ts = self.slot(cpu, self.tails[cpu as usize]).header.ts_ns;
                self.merge.push(Reverse((merge_time(ts, watermark), cpu)));
            }
        }
        while let Some(Reverse((ts, cpu))) = self.merge.pop() {
            if ts > watermark {
                break;
            }
            let c = cpu as usize;
            match Packet::from_slot(self.slot(cpu, self.tails[c])) {
                Some(mut p) => {
                    out.records += 1;
                    p.header.ts_ns = ts;
                    sink(p);
                }
                None => out.malformed += 1,
            }
            self.tails[c] += 1;
            if self.tails[c] + 1 < self.heads[c] {
                self.prefetch(cpu, self.tails[c] + 1);
            }
            if self.tails[c] != self.heads[c] {
                let next = self.slot(cpu, self.tails[c]).header.ts_ns;
                self.merge.push(Reverse((merge_time(next, watermark), cpu)));
            }
        }
        for cpu in 0..self.layout.cpus {
            // The kernel may reuse the slots only once we are done with them.
            self.tail(cpu)
                .store(self.tails[cpu as usize], Ordering::Release);
        }
        out
    }

    /// Starts loading the first lines of `cpu`'s record `n` (its header and the start of
    /// its head) while the records before it are handled. Another CPU wrote them, so each
    /// line is a cache miss: reading them was most of the reader's own time. The collector
    /// used less CPU per request in 4 of 4 alternating pairs (a few percent, about the
    /// run-to-run spread).
    fn prefetch(&self, cpu: u32, n: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            const LINES: usize = 4;
            const _: () = assert!(LINES * 64 <= size_of::<PacketEvent>());
            let p = self.slot_ptr(cpu, n).cast::<i8>();
            for line in 0..LINES {
                // SAFETY: a hint only (it neither faults nor accesses), and within the slot.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * 64)) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (cpu, n);
    }

    fn control(&self, cpu: u32) -> *mut RingControl {
        debug_assert!(cpu < self.layout.cpus);
        // In bounds: `cpu` < cpus, and the region holds `cpus` controls.
        unsafe { self.ctl.at(cpu as usize) }
    }

    fn head(&self, cpu: u32) -> &AtomicU64 {
        // SAFETY: an aligned u64 in the mapped control block, written by the kernel only
        // through aligned 8-byte stores.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.control(cpu)).head)) }
    }

    fn tail(&self, cpu: u32) -> &AtomicU64 {
        // SAFETY: as `head`; only we write it.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.control(cpu)).tail)) }
    }

    fn slots_field(&self, cpu: u32) -> &AtomicU64 {
        // SAFETY: as `head`; only we write it.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.control(cpu)).slots)) }
    }

    /// The slot of `cpu`'s record number `n`. Only called for published, unread records,
    /// which the kernel does not write until `tail` moves past them.
    fn slot(&self, cpu: u32, n: u64) -> &PacketEvent {
        // SAFETY: in the region (see `slot_ptr`), and not written while unread.
        unsafe { &*self.slot_ptr(cpu, n) }
    }

    fn slot_ptr(&self, cpu: u32, n: u64) -> *mut PacketEvent {
        let index = u64::from(cpu) * self.layout.slots + (n & (self.layout.slots - 1));
        // SAFETY: index < cpus × slots, the region's length in slots.
        unsafe { self.slots.at(index as usize) }
    }
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
    use weft_ebpf_common::{HEAD_LEN, PacketHeader};

    /// The rings over heap memory, with a stand-in for the kernel's side.
    fn rings(cpus: u32, slots: u64) -> PacketRings {
        let layout = RingLayout { cpus, slots };
        let ctl = Region::heap(cpus as usize * size_of::<RingControl>());
        let data = Region::heap(layout.total_slots() as usize * size_of::<PacketEvent>());
        // SAFETY: regions sized from the layout; cache-line-aligned heap memory.
        unsafe { PacketRings::from_regions(ctl, data, layout) }.expect("rings")
    }

    /// What a classifier does: fill the next slot, then advance `head`.
    fn write(r: &PacketRings, cpu: u32, ts_ns: u64, payload: &[u8]) -> bool {
        let ctl = r.control(cpu);
        let (head, tail, slots) = unsafe { ((*ctl).head, (*ctl).tail, (*ctl).slots) };
        if head - tail >= slots {
            return false;
        }
        let slot = r.slot_ptr(cpu, head);
        let mut ev = PacketEvent {
            header: PacketHeader {
                ts_ns,
                captured_len: payload.len() as u32,
                ..Default::default()
            },
            head: [0; HEAD_LEN],
        };
        ev.head[..payload.len()].copy_from_slice(payload);
        unsafe { slot.write(ev) };
        r.head(cpu).store(head + 1, Ordering::Release);
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

    fn read_all(r: &mut PacketRings, watermark: u64) -> (Vec<(u64, Vec<u8>)>, RingRead) {
        let mut got = Vec::new();
        let read = r.read(watermark, |p| {
            got.push((p.header.ts_ns, p.payload.to_vec()))
        });
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
        let (got, _) = read_all(&mut r, 40);
        assert_eq!(timestamps(&got), [10]);
        // A record published late but stamped before the waiting ones still sorts first.
        write(&r, 1, 55, b"GET /late");
        let (got, _) = read_all(&mut r, u64::MAX);
        assert_eq!(timestamps(&got), [50, 55, 60]);
    }

    #[test]
    fn a_record_stamped_after_the_read_is_read_at_once_as_of_the_watermark() {
        let mut r = rings(2, 8);
        let watermark = 1_000_000_000;
        let future = watermark + WATERMARK_MARGIN_NANOS + 1;
        let recent = watermark + 1;
        write_each(
            &r,
            &[
                (0, 10, b"GET /1"),
                (0, future + 5_000_000_000, b"GET /paced"),
                (0, 20, b"GET /2"),
                (1, 15, b"HTTP/1.1 200"),
                (1, recent, b"HTTP/1.1 204"),
            ],
        );
        let (got, _) = read_all(&mut r, watermark);
        // The paced record does not hold up CPU 0's ring; a recent one still waits.
        assert_eq!(timestamps(&got), [10, 15, watermark, 20]);
        assert_eq!(got[2].1, b"GET /paced");
        let (got, _) = read_all(&mut r, u64::MAX);
        assert_eq!(timestamps(&got), [recent]);
    }

    #[test]
    fn a_full_ring_refuses_until_read_and_wraps_around() {
        let mut r = rings(1, 4);
        for ts in 1..=4 {
            assert!(write(&r, 0, ts, b"GET /"));
        }
        assert!(!write(&r, 0, 5, b"GET /"), "the fifth record has no slot");
        assert_eq!(read_all(&mut r, u64::MAX).1.records, 4);
        for ts in 5..=8 {
            assert!(write(&r, 0, ts, b"GET /"));
        }
        let (got, _) = read_all(&mut r, u64::MAX);
        assert_eq!(
            got.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [5, 6, 7, 8]
        );
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
                malformed: 1
            }
        );
    }

    #[test]
    fn misaligned_memory_is_refused() {
        let layout = RingLayout { cpus: 1, slots: 4 };
        let ctl = Region::heap(size_of::<RingControl>());
        let mut data = Region::heap(5 * size_of::<PacketEvent>());
        // One word into a cache line: aligned for a u64, not for a slot.
        data.ptr = NonNull::new(unsafe { data.ptr.as_ptr().add(8) }).expect("pointer");
        let refused = unsafe { PacketRings::from_regions(ctl, data, layout) };
        assert!(refused.is_err());
    }

    #[test]
    fn the_layout_fits_the_budget_in_powers_of_two() {
        let two = RingLayout::for_cpus(2);
        assert_eq!(two.slots, 8192);
        let many = RingLayout::for_cpus(8);
        assert_eq!(many.slots, 2048);
        assert!(many.total_slots() as usize * size_of::<PacketEvent>() <= BUDGET_BYTES);
        // Never below the minimum, whatever the CPU count.
        assert_eq!(RingLayout::for_cpus(4096).slots, MIN_SLOTS);
    }
}
