//! Domain types that travel between the stitcher's stages.
//!
//! ingest → [`ObservedBatch`] → resolve → [`Half`] → join → link → assemble →
//! [`CompletedTrace`] → export / store.

use std::fmt;
use std::sync::Arc;

use weft_proto::v1;

use crate::resolve::Identity;

/// What ingest hands to the pipeline: one accepted, deduplicated batch.
#[derive(Debug, Clone)]
pub struct ObservedBatch {
    /// Node of the collector that observed it.
    pub node: Arc<str>,
    /// Collector instance (new on every collector start).
    pub instance: Arc<str>,
    pub seq: u64,
    pub exchanges: Vec<v1::Exchange>,
    pub connections: Vec<v1::Connection>,
}

/// One observed exchange with both ends resolved to names: a client or server half
/// of a request, waiting for its other half.
///
/// Compact on purpose (it is what the join, link and assemble stages hold while they
/// wait, ~216 bytes): only what a span needs, not the whole wire `Exchange`; the
/// collector's node and instance in one shared [`Source`], fields most exchanges lack
/// in one optional box ([`Rare`]), the status in 16 bits.
#[derive(Debug, Clone)]
pub struct Half {
    /// This half's span id: the application's own span id for a CLIENT half that carries
    /// a propagated `traceparent` (the header names the span that made the call), else random.
    pub span_id: SpanId,
    pub side: v1::Side,
    /// Collector (node and instance) that observed it, shared by its batch's halves.
    pub source: Arc<Source>,
    /// With the source's instance: the observation this half came from.
    pub exchange_id: u64,
    /// When this half reached the stitch path (stitcher clock, nanos). Every window
    /// counts from here (join window, link wait, trace idle), so they run at the same
    /// time instead of one after the other.
    pub arrived: u64,
    /// The caller, as resolved at the exchange's start time.
    pub client: Identity,
    /// The callee as addressed: a Service on the client side before DNAT, a pod on the
    /// server side.
    pub server: Identity,
    pub request_seq: u32,
    pub response_seq: u32,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub method: Arc<str>,
    pub path: Box<str>,
    /// HTTP status (ingest accepts at most 999).
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// A valid `traceparent`, a known thread: `None` when the exchange had neither.
    pub rare: Option<Box<Rare>>,
}

/// The collector that observed a batch: its node and its instance (new on every
/// collector start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub node: Arc<str>,
    pub instance: Arc<str>,
}

impl Source {
    pub fn new(node: impl Into<Arc<str>>, instance: impl Into<Arc<str>>) -> Arc<Source> {
        Arc::new(Source {
            node: node.into(),
            instance: instance.into(),
        })
    }
}

/// What few exchanges carry, kept out of line so that the others do not pay for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rare {
    /// The W3C `traceparent` the request carried, when valid.
    pub traceparent: Option<TraceParent>,
    /// Thread attribution seam (0 when unknown).
    pub pid: u32,
    pub tid: u32,
}

impl Rare {
    /// `None` when there is nothing to keep.
    pub fn boxed(traceparent: Option<TraceParent>, pid: u32, tid: u32) -> Option<Box<Rare>> {
        (traceparent.is_some() || tid != 0).then(|| {
            Box::new(Rare {
                traceparent,
                pid,
                tid,
            })
        })
    }
}

impl Half {
    pub fn side(&self) -> v1::Side {
        self.side
    }

    /// Heap this half owns beyond its own size: its path and its [`Rare`] box. (The
    /// source and the method are shared, the identities' metas are the resolver's.)
    pub fn heap_bytes(&self) -> usize {
        self.path.len() + self.rare.as_ref().map_or(0, |_| size_of::<Rare>())
    }

    /// Collector node that observed it.
    pub fn node(&self) -> &Arc<str> {
        &self.source.node
    }

    /// The W3C `traceparent` the request carried, when valid.
    pub fn traceparent(&self) -> Option<&TraceParent> {
        self.rare.as_deref().and_then(|r| r.traceparent.as_ref())
    }

    /// `(pid, tid)` of the thread that handled it, when known.
    pub fn thread(&self) -> Option<(u32, u32)> {
        self.rare
            .as_deref()
            .filter(|r| r.tid != 0)
            .map(|r| (r.pid, r.tid))
    }

    pub fn set_traceparent(&mut self, tp: Option<TraceParent>) {
        let (pid, tid) = self.thread().unwrap_or((0, 0));
        self.rare = Rare::boxed(tp, pid, tid);
    }

    pub fn set_thread(&mut self, pid: u32, tid: u32) {
        let tp = self.traceparent().copied();
        self.rare = Rare::boxed(tp, pid, tid);
    }
}

/// A parsed W3C `traceparent` header: `00-<trace id>-<parent id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    /// The span that sent the request (for the request's receiver: its parent).
    pub parent_id: SpanId,
    pub flags: u8,
}

impl TraceParent {
    /// Parses version 00 (and, per the spec, later versions' first four fields).
    /// `None` for anything malformed or with all-zero ids.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let v = value.trim();
        let mut parts = v.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || trace.len() != 32 || parent.len() != 16 {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if flags.len() != 2
            || [version, trace, parent, flags]
                .iter()
                .any(|s| s.bytes().any(|b| b.is_ascii_uppercase()))
        {
            return None;
        }
        u8::from_str_radix(version, 16).ok()?;
        Some(TraceParent {
            trace_id: TraceId::from_hex(trace)?,
            parent_id: SpanId::from_hex(parent)?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }
}

/// W3C trace id (16 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TraceId(pub [u8; 16]);

/// W3C span id (8 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SpanId(pub [u8; 8]);

/// Random ids for spans and traces: wyrand per thread, seeded from the OS generator.
/// W3C asks ids to be random (unique), not secret; a ChaCha draw per span cost more than
/// everything else the assemble stage does for it.
fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random());
    }
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

impl TraceId {
    pub fn random() -> Self {
        loop {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&random_u64().to_le_bytes());
            b[8..].copy_from_slice(&random_u64().to_le_bytes());
            if b != [0; 16] {
                return TraceId(b);
            }
        }
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b).ok()?;
        (b != [0; 16]).then_some(TraceId(b))
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let id = SpanId(random_u64().to_le_bytes());
            if id.0 != [0; 8] {
                return id;
            }
        }
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 8];
        hex::decode_to_slice(s, &mut b).ok()?;
        (b != [0; 8]).then_some(SpanId(b))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How a span's parent was chosen (exported as the `weft.link` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkKind {
    /// No parent: the trace's root.
    Root,
    /// A SERVER span under the CLIENT half it was joined with.
    Join,
    /// The application propagated a W3C traceparent (exact).
    Traceparent,
    /// Attributed to the thread that served the parent (exact where one request per thread).
    Thread,
    /// Inferred: the only server span of the same pod that contains the call in time.
    Timing,
    /// Several server spans could contain the call; the stated rule picked one.
    Ambiguous,
}

impl LinkKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            LinkKind::Root => "",
            LinkKind::Join => "join",
            LinkKind::Traceparent => "traceparent",
            LinkKind::Thread => "thread",
            LinkKind::Timing => "timing",
            LinkKind::Ambiguous => "ambiguous",
        }
    }
}

/// One span of an assembled trace.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// Always a span of the same trace, never this span itself.
    pub parent: Option<SpanId>,
    pub link: LinkKind,
    pub side: v1::Side,
    /// "METHOD route", ids in the path replaced by placeholders.
    pub name: String,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub method: String,
    pub path: String,
    pub status: u32,
    pub error: bool,
    pub client: Identity,
    pub server: Identity,
    /// Whether the other half of this request was found.
    pub joined: bool,
    /// Collector node that observed this half.
    pub node: Arc<str>,
    /// (collector instance, exchange id): the observation this span came from.
    pub source: (Arc<str>, u64),
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// A trace that is complete (idle for `--trace-idle`), ready for export and the store.
/// `late` marks spans that arrived after the trace was exported (same trace id).
#[derive(Debug, Clone)]
pub struct CompletedTrace {
    pub trace_id: TraceId,
    pub spans: Vec<SpanRecord>,
    pub late: bool,
}

/// Where completed traces go (exporters, printer, store). Must not block: a sink that
/// cannot keep up drops and counts.
pub trait TraceSink: Send + Sync {
    fn on_trace(&self, trace: &Arc<CompletedTrace>);

    /// The traces one pipeline turn completed, in order. A sink with a queue overrides
    /// this to hand the whole batch over at once (one channel send, one wake-up of its
    /// worker) instead of once per trace.
    fn on_traces(&self, traces: &[Arc<CompletedTrace>]) {
        for trace in traces {
            self.on_trace(trace);
        }
    }
}

/// The route of a path, for span names: the query string dropped and ids replaced by
/// placeholders (`{id}` for numbers, `{uuid}` for UUIDs, `{hex}` for hex strings of 8 or
/// more characters with a digit), so names stay few while paths are many.
pub fn route(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    route_into(path, &mut out);
    out
}

/// A span's name, `METHOD route`, in one allocation.
pub fn span_name(method: &str, path: &str) -> String {
    let mut out = String::with_capacity(method.len() + 1 + path.len() + 8);
    out.push_str(method);
    out.push(' ');
    route_into(path, &mut out);
    out
}

fn route_into(path: &str, out: &mut String) {
    // Byte scans: '?', '#' and '/' are ASCII, so every cut is a char boundary.
    let end = path
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    let path = &path[..end];
    if path.is_empty() {
        out.push('/');
        return;
    }
    let mut rest = path;
    loop {
        let (seg, next) = match rest.bytes().position(|b| b == b'/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        out.push_str(placeholder(seg).unwrap_or(seg));
        match next {
            Some(n) => {
                out.push('/');
                rest = n;
            }
            None => break,
        }
    }
}

fn placeholder(seg: &str) -> Option<&'static str> {
    let b = seg.as_bytes();
    // Most segments are words: the first byte usually settles it.
    match b.first() {
        None => return None,
        Some(c) if !c.is_ascii_hexdigit() => return None,
        Some(_) => {}
    }
    if b.iter().all(u8::is_ascii_digit) {
        return Some("{id}");
    }
    let is_uuid = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if is_uuid {
        return Some("{uuid}");
    }
    if b.len() >= 8 && b.iter().all(u8::is_ascii_hexdigit) && b.iter().any(u8::is_ascii_digit) {
        return Some("{hex}");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_replace_ids_and_drop_the_query() {
        assert_eq!(route("/api/items"), "/api/items");
        assert_eq!(route("/api/items/42?x=1"), "/api/items/{id}");
        assert_eq!(
            route("/u/123e4567-e89b-12d3-a456-426614174000/cart"),
            "/u/{uuid}/cart"
        );
        assert_eq!(route("/blob/deadbeef01"), "/blob/{hex}");
        // Words that happen to be hex letters only, and short hex, stay.
        assert_eq!(route("/cafe/decade/ab12"), "/cafe/decade/ab12");
        assert_eq!(route("/v1/orders/"), "/v1/orders/");
        assert_eq!(route(""), "/");
        assert_eq!(route("?a=b"), "/");
        assert_eq!(span_name("GET", "/a/7?q"), "GET /a/{id}");
    }

    #[test]
    fn rare_fields_live_in_one_box_only_when_present() {
        assert!(Rare::boxed(None, 0, 0).is_none());
        // A pid without a thread id is no thread: nothing to keep.
        assert!(Rare::boxed(None, 7, 0).is_none());
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut h = crate::join::tests::half(
            v1::Side::Client,
            crate::join::tests::ext("10.0.0.1:40000"),
            crate::join::tests::ext("10.0.0.2:80"),
            (1, 1),
            10,
            20,
            None,
        );
        assert!(h.rare.is_none());
        assert_eq!((h.traceparent(), h.thread()), (None, None));
        h.set_thread(7, 70);
        assert_eq!(h.thread(), Some((7, 70)));
        h.set_traceparent(Some(tp));
        assert_eq!((h.traceparent(), h.thread()), (Some(&tp), Some((7, 70))));
        assert_eq!(h.heap_bytes(), h.path.len() + size_of::<Rare>());
        h.set_thread(0, 0);
        h.set_traceparent(None);
        assert!(h.rare.is_none(), "emptied: the box is gone");
        // What pending state holds per half (issue #10: ≤ 512 B per pending exchange).
        assert!(
            size_of::<Half>() <= 216,
            "Half is {} bytes",
            size_of::<Half>()
        );
    }

    #[test]
    fn traceparent_parsing_follows_w3c() {
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(tp.trace_id.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.to_hex(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
    }
}

/// A fast hasher for the stages' maps (FxHash's multiply-rotate). Their keys are span
/// ids, TCP sequence numbers and addresses: random or few, so a keyed SipHash buys
/// little and costs a large share of the hot path.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl std::hash::Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;
/// A `HashSet` with [`FastHasher`].
pub type FastSet<K> = std::collections::HashSet<K, std::hash::BuildHasherDefault<FastHasher>>;
