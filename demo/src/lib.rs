//! `weft-demo`: Weft's whole job on one machine.
//!
//! A three-node cluster made of network namespaces (the harness), a three-tier app behind
//! Service ClusterIPs where every hop crosses nodes, a collector per node, the stitcher with a
//! static inventory, a real OTLP receiver (rotel) when one is installed, and traffic; stitched
//! traces stream to stdout as they complete, the Query API stays open to grpcurl, and the end
//! prints the service map and counts. The stages, in the order the run goes through them:
//!
//! ```text
//! cli ─→ tools (binaries) ─→ topology (ClusterSpec) ─→ stack (app, receiver, stitcher,
//!        collectors) ─→ traffic + live (trace lines) ─→ query + receiver ─→ summary
//! ```

pub mod cli;
pub mod live;
pub mod query;
pub mod receiver;
pub mod run;
pub mod signals;
pub mod stack;
pub mod summary;
pub mod tools;
pub mod topology;
pub mod traffic;
