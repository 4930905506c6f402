//! weft-stitcher: weaves what every node's collector saw into traces.
//!
//! The data path, one module per stage:
//!
//! ```text
//! ingest → resolve → join → link → assemble → export
//!                                          ↘ store → query
//! ```
//!
//! - [`ingest`]: gRPC `weft.v1.Ingest/Stream` → deduplicated [`model::ObservedBatch`]es.
//! - [`resolve`]: addresses → [`resolve::Identity`] (static inventory or Kubernetes).
//! - [`join`]: client half + server half of one request → one call.
//! - [`link`]: each call → its parent (the server span that caused it).
//! - [`assemble`]: linked spans → [`model::CompletedTrace`] after the idle window.
//! - [`export`]: completed traces → OTLP and the trace printer.
//! - [`store`]: completed traces, service map, collectors → bounded memory.
//! - [`query`]: `weft.v1.Query` over the store.

pub mod assemble;
pub mod export;
pub mod ingest;
pub mod join;
pub mod link;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod query;
pub mod resolve;
pub mod sink_queue;
pub mod store;
