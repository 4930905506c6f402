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
#[derive(Debug, Clone)]
pub struct Half {
    pub node: Arc<str>,
    pub instance: Arc<str>,
    pub exchange: v1::Exchange,
    /// The caller, as resolved at the exchange's start time.
    pub client: Identity,
    /// The callee as addressed: a Service on the client side before DNAT, a pod on the
    /// server side.
    pub server: Identity,
}

impl Half {
    pub fn side(&self) -> v1::Side {
        v1::Side::try_from(self.exchange.side).unwrap_or(v1::Side::Unspecified)
    }
}

/// W3C trace id (16 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TraceId(pub [u8; 16]);

/// W3C span id (8 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        loop {
            let id = TraceId(rand::random());
            if id.0 != [0; 16] {
                return id;
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
            let id = SpanId(rand::random());
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
}
