//! Helpers shared by the stitcher's integration tests.

pub mod fake_apiserver;
