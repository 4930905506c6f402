//! weft-collector: the per-node half of Weft.
//!
//! The data path, one module per stage:
//! `attach` (kernel programs onto pod veths) → `capture` (ring buffers → raw events)
//! → `parse` (raw events → `Exchange`/`Connection`) → `ship` (gRPC to the stitcher)
//! or `print` (local output). `metrics` serves what each stage counted; `alarm` is the
//! loop's timer.

pub mod alarm;
pub mod attach;
pub mod capture;
pub mod cli;
pub mod metrics;
pub mod parse;
pub mod pipeline;
pub mod print;
pub mod ship;
