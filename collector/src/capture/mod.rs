//! Capture: reads what the kernel programs wrote.
//!
//! In: the per-CPU packet rings ([`ring`]: read on the caller's timer, paced by [`pace`]), the
//! `WEFT_CONNS` ring buffer (read on the same timer), the `WEFT_DOORBELL` ring buffer (rung
//! by a classifier when a packet ring is half full while the reader has backed off) and the
//! per-CPU `WEFT_COUNTERS`. The kernel wakes the collector (tokio `AsyncFd`) only through
//! the doorbell and when the connection ring buffer is a quarter full; then the caller reads
//! everything at once.
//! Out: `Captured` events (a [`Packet`]: the kernel's header copied out of its slot and the
//! payload head borrowed in place; or a `ConnEvent`), with the monotonic kernel timestamp
//! converted to wall-clock Unix nanoseconds, and the summed kernel counters.

pub mod pace;
pub mod ring;

use std::mem::size_of;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use tokio::io::unix::AsyncFd;
use weft_ebpf_common::{
    COUNTER_COUNT, ConnEvent, Counter, HEAD_LEN, PACKET_HEADER_LEN, PacketEvent, PacketHeader,
    RECORD_REPEAT, Sighting,
};

use ring::{PacketRings, RingLayout};

pub use ring::{MAP_PACKETS, MAP_RING_CTL};
pub const MAP_CONNS: &str = "WEFT_CONNS";
pub const MAP_DOORBELL: &str = "WEFT_DOORBELL";
pub const MAP_COUNTERS: &str = "WEFT_COUNTERS";
/// The classifiers' capture switch (0 with `--hooks-only`: they return at once).
pub const GLOBAL_CAPTURE: &str = "CAPTURE";

/// One event from the kernel, with its wall-clock time.
pub enum Captured<'a> {
    Packet {
        event: Packet<'a>,
        wall_unix_nanos: u64,
    },
    Conn {
        event: &'a ConnEvent,
        wall_unix_nanos: u64,
    },
}

/// A packet record as the kernel wrote it: its header, and the payload head that follows
/// it in the record (`captured_len` bytes, borrowed from the ring).
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    pub header: PacketHeader,
    pub payload: &'a [u8],
    /// The same segment seen on one more veth of the node (a mark on the record, see
    /// [`ring`]), handed on together with this sighting: the two are the same bytes, so
    /// what reads them can read them once.
    pub also: Option<Sighting>,
}

impl<'a> Packet<'a> {
    /// Reads a ring slot. `None` when it announces more payload than a slot holds.
    pub fn from_slot(slot: &'a PacketEvent) -> Option<Self> {
        let payload = slot.head.get(..slot.header.captured_len as usize)?;
        Some(Packet {
            header: slot.header,
            payload,
            also: None,
        })
    }

    /// Splits a record laid out as in a slot (header, then payload) in a byte buffer.
    /// `None` when it is shorter than its header, or than the payload the header
    /// announces, or announces more than the kernel ever copies, or is a
    /// `RECORD_REPEAT` (whose payload is in another record: see [`ring`]).
    pub fn from_record(bytes: &'a [u8]) -> Option<Self> {
        let header: PacketHeader = read_event(bytes)?;
        let captured = header.captured_len as usize;
        if captured > HEAD_LEN || header.record_flags & RECORD_REPEAT != 0 {
            return None;
        }
        let payload = bytes.get(PACKET_HEADER_LEN..PACKET_HEADER_LEN + captured)?;
        Some(Packet {
            header,
            payload,
            also: None,
        })
    }

    /// The segment as seen at `also`: that interface and direction, flagged
    /// `RECORD_REPEAT` (a record without payload of its own would have said so).
    pub fn seen_at(&self, also: Sighting) -> Packet<'a> {
        Packet {
            header: PacketHeader {
                ifindex: also.ifindex,
                direction: also.direction,
                record_flags: RECORD_REPEAT,
                ..self.header
            },
            payload: self.payload,
            also: None,
        }
    }

    /// Every sighting the record stands for, one packet each: itself, then `also`'s (for
    /// the tests, which count sightings; parse takes `also` as it comes).
    #[cfg(test)]
    pub fn sightings(&self) -> impl Iterator<Item = Packet<'a>> + use<'a> {
        let own = Packet {
            also: None,
            ..*self
        };
        std::iter::once(own).chain(self.also.map(|s| self.seen_at(s)))
    }
}

/// Counts of what the reader itself saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadStats {
    pub packets: u64,
    pub conns: u64,
    /// Ring entries of the wrong size or announcing too much payload (kernel and user
    /// space built from different sources?).
    pub malformed: u64,
    /// Packet records that repeat the one before them (the same segment on a second
    /// veth), handed on with its payload (included in `packets`).
    pub repeats: u64,
    /// Repeats skipped because the record they repeat was not there (see `ring`).
    pub unresolved_repeats: u64,
    /// Repeats read from a mark on the record they repeat (included in `repeats`).
    pub marked: u64,
    /// Sightings written both as a mark and as a record, skipped the second time (see
    /// `ring`).
    pub twins: u64,
}

pub struct Capture {
    packets: PacketRings,
    conns: AsyncFd<RingBuf<MapData>>,
    doorbell: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    stats: ReadStats,
    clock: WallClock,
}

impl Capture {
    /// Takes the maps out of `ebpf` (the programs stay there for `attach`), loaded with
    /// the packet rings sized as `layout` (see [`RingLayout::loader`]). Must be called
    /// inside a tokio runtime, and before the classifiers are attached.
    pub fn new(ebpf: &mut Ebpf, layout: RingLayout) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let packets = PacketRings::open(take(MAP_PACKETS)?, take(MAP_RING_CTL)?, layout)
            .context("setting up the per-CPU packet rings")?;
        let conns = RingBuf::try_from(take(MAP_CONNS)?)?;
        let doorbell = RingBuf::try_from(take(MAP_DOORBELL)?)?;
        let counters = PerCpuArray::try_from(take(MAP_COUNTERS)?)?;
        Ok(Self {
            packets,
            conns: poll(conns).context("polling the connection ring buffer")?,
            doorbell: poll(doorbell).context("polling the doorbell ring buffer")?,
            counters,
            stats: ReadStats::default(),
            clock: WallClock::new(),
        })
    }

    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    /// Waits until the kernel wakes the collector: a packet ring half full while the
    /// doorbell was armed ([`Capture::arm_doorbell`]), or the connection ring buffer a
    /// quarter full. The caller then reads with [`Capture::drain_now`]. Cancel-safe:
    /// nothing is consumed.
    ///
    /// The kernel wakes nobody per record or event (a connection churn of thousands a
    /// second, or a packet rate of a hundred thousand, would otherwise cost a wake-up
    /// each): the caller must also call [`Capture::drain_now`] on a timer
    /// ([`pace::ReadPace`]).
    pub async fn woken(&mut self) -> anyhow::Result<()> {
        // Readiness is cleared before the read that follows, so a wake-up during that read
        // is not lost.
        tokio::select! {
            guard = self.conns.readable_mut() => guard?.clear_ready(),
            guard = self.doorbell.readable_mut() => guard?.clear_ready(),
        }
        Ok(())
    }

    /// Arms every packet ring's doorbell while the reader reads less often than every
    /// [`pace::BASE_INTERVAL`], disarms them when it reads at that pace again (see
    /// `RingControl::doorbell`). Call after every read.
    pub fn arm_doorbell(&mut self, armed: bool) {
        self.packets.set_doorbell(armed);
    }

    /// Hands every event available now to `sink`, without waiting: the packet records
    /// stamped until shortly before now (see [`ring`]), in time order, then the
    /// connection events. Returns how many packet records it found: handed on, skipped,
    /// or published too recently and left for the next read (what [`pace::ReadPace`]
    /// goes by).
    pub fn drain_now(&mut self, sink: impl FnMut(Captured<'_>)) -> u64 {
        let watermark = monotonic_nanos().saturating_sub(ring::WATERMARK_MARGIN_NANOS);
        self.read(watermark, sink)
    }

    /// Hands every event the kernel has published to `sink` (at shutdown, after the
    /// classifiers are detached).
    pub fn drain_all(&mut self, sink: impl FnMut(Captured<'_>)) {
        self.read(u64::MAX, sink);
    }

    fn read(&mut self, watermark: u64, mut sink: impl FnMut(Captured<'_>)) -> u64 {
        let offset = self.clock.refresh();
        let read = self.packets.read(watermark, monotonic_nanos, |event| {
            let wall_unix_nanos = event.header.ts_ns.saturating_add_signed(offset);
            sink(Captured::Packet {
                event,
                wall_unix_nanos,
            });
        });
        self.stats.packets += read.records;
        self.stats.malformed += read.malformed;
        self.stats.repeats += read.repeats;
        self.stats.unresolved_repeats += read.unresolved_repeats;
        self.stats.marked += read.marked;
        self.stats.twins += read.twins;
        read_conns(self.conns.get_mut(), &mut self.stats, offset, &mut sink);
        // Its rings have done their job: this read is the one they asked for.
        let doorbell = self.doorbell.get_mut();
        while doorbell.next().is_some() {}
        read.found()
    }

    /// The kernel counters summed over all CPUs, indexed by `Counter`.
    pub fn kernel_counters(&self) -> [u64; COUNTER_COUNT as usize] {
        let mut out = [0u64; COUNTER_COUNT as usize];
        for c in Counter::ALL {
            if let Ok(per_cpu) = self.counters.get(&(c as u32), 0) {
                out[c as usize] = per_cpu.iter().sum();
            }
        }
        out
    }
}

fn read_conns(
    ring: &mut RingBuf<MapData>,
    stats: &mut ReadStats,
    offset: i64,
    sink: &mut impl FnMut(Captured<'_>),
) {
    while let Some(item) = ring.next() {
        match read_event::<ConnEvent>(&item) {
            Some(ev) => {
                stats.conns += 1;
                let wall_unix_nanos = ev.ts_ns.saturating_add_signed(offset);
                sink(Captured::Conn {
                    event: &ev,
                    wall_unix_nanos,
                });
            }
            None => stats.malformed += 1,
        }
    }
}

fn poll(ring: RingBuf<MapData>) -> std::io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as
    // the `AsyncFd` owns the ring buffer.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Copies a kernel struct out of a ring buffer entry; `None` if the size does not match.
fn read_event<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `T` is a `#[repr(C)]` plain-data struct from weft-ebpf-common (every bit
    // pattern valid), the length was checked, and `read_unaligned` needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// `clock` now, in nanoseconds (0 if it cannot be read).
fn clock_nanos(clock: nix::time::ClockId) -> i64 {
    nix::time::clock_gettime(clock).map_or(0, |t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
}

/// `CLOCK_MONOTONIC` now: the clock of `bpf_ktime_get_ns()`.
fn monotonic_nanos() -> u64 {
    clock_nanos(nix::time::ClockId::CLOCK_MONOTONIC) as u64
}

/// Converts `bpf_ktime_get_ns()` (monotonic) timestamps to wall-clock Unix nanoseconds.
///
/// The offset is re-sampled per drain so clock steps are followed, but a new sample is
/// adopted only when it moved by more than [`WallClock::STEP_NANOS`]: a sample is two clock
/// reads, and a reader preempted between them gets an offset off by the preemption. Events
/// of one exchange read in different drains then got different offsets, and a response
/// microseconds after its request could end before it started.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    offset: i64,
}

impl WallClock {
    /// Smaller changes are sampling noise (NTP slews both clocks alike; only steps move
    /// the offset).
    pub const STEP_NANOS: i64 = 1_000_000;

    pub fn new() -> Self {
        WallClock {
            offset: mono_to_wall_offset(),
        }
    }

    /// The offset to use for the events read now.
    pub fn refresh(&mut self) -> i64 {
        let sample = mono_to_wall_offset();
        if sample.abs_diff(self.offset) > Self::STEP_NANOS.unsigned_abs() {
            self.offset = sample;
        }
        self.offset
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC` now, in nanoseconds, from the tightest of a few
/// bracketed samples (monotonic, realtime, monotonic), so preemption inside one sample
/// does not skew it.
pub fn mono_to_wall_offset() -> i64 {
    let mut best: Option<(i64, i64)> = None; // (bracket width, offset)
    for _ in 0..3 {
        let before = clock_nanos(nix::time::ClockId::CLOCK_MONOTONIC);
        let real = clock_nanos(nix::time::ClockId::CLOCK_REALTIME);
        let after = clock_nanos(nix::time::ClockId::CLOCK_MONOTONIC);
        let width = after - before;
        let offset = real - (before + width / 2);
        if best.is_none_or(|(w, _)| width < w) {
            best = Some((width, offset));
        }
    }
    best.map_or(0, |(_, offset)| offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ring_entries_are_rejected_not_read() {
        let bytes = [0u8; size_of::<ConnEvent>() - 1];
        assert!(read_event::<ConnEvent>(&bytes).is_none());
        let bytes = [0u8; size_of::<ConnEvent>()];
        assert!(read_event::<ConnEvent>(&bytes).is_some());
    }

    fn record(header: PacketHeader, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; PACKET_HEADER_LEN];
        // SAFETY: PacketHeader is plain data; the buffer is exactly its size.
        unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast::<PacketHeader>(), header) };
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn records_split_into_header_and_announced_payload() {
        let header = PacketHeader {
            ts_ns: 42,
            captured_len: 3,
            ..Default::default()
        };
        let bytes = record(header, b"GETxx");
        let p = Packet::from_record(&bytes).expect("record");
        assert_eq!(p.header, header);
        // Only the announced bytes: the ring pads records to 8 bytes.
        assert_eq!(p.payload, b"GET");
        // Unaligned records are read too (the header is copied out).
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(
            Packet::from_record(&shifted[1..]).expect("record").payload,
            b"GET"
        );
    }

    #[test]
    fn records_that_lie_about_their_length_are_rejected() {
        let short = PacketHeader {
            captured_len: 10,
            ..Default::default()
        };
        assert!(Packet::from_record(&record(short, b"GET")).is_none());
        // A repeat's payload is another record's: alone it has none to give.
        let repeat = PacketHeader {
            captured_len: 3,
            record_flags: RECORD_REPEAT,
            ..Default::default()
        };
        assert!(Packet::from_record(&record(repeat, b"GET")).is_none());
        let huge = PacketHeader {
            captured_len: (HEAD_LEN + 1) as u32,
            ..Default::default()
        };
        assert!(Packet::from_record(&record(huge, &[b'x'; HEAD_LEN + 1])).is_none());
        assert!(Packet::from_record(&[0u8; PACKET_HEADER_LEN - 1]).is_none());
    }

    #[test]
    fn the_offset_moves_only_on_a_clock_step() {
        let mut clock = WallClock::new();
        let start = clock.offset;
        // Noise below a step is ignored: the same offset for every event of a run.
        clock.offset = start + WallClock::STEP_NANOS / 2;
        assert_eq!(clock.refresh(), start + WallClock::STEP_NANOS / 2);
        // A step (here: the stored offset 10 ms off) is followed.
        clock.offset = start + 10 * WallClock::STEP_NANOS;
        let now = clock.refresh();
        assert!(
            now.abs_diff(start) < WallClock::STEP_NANOS.unsigned_abs(),
            "{now} vs {start}"
        );
    }

    #[test]
    fn monotonic_converts_to_now() {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let mono_ns = (mono.tv_sec() * 1_000_000_000 + mono.tv_nsec()) as u64;
        let wall = mono_ns.saturating_add_signed(mono_to_wall_offset());
        let sys = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(
            wall.abs_diff(sys) < 50_000_000,
            "wall {wall} vs system {sys}"
        );
    }
}
