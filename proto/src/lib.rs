//! `weft.v1`: the only contract between collector and stitcher (`Ingest`), and the
//! stitcher's public `Query` API. Generated from `proto/weft/v1/*.proto` at build time
//! with a pure-Rust protobuf compiler (protox), so no `protoc` is needed.

pub mod weft {
    pub mod v1 {
        tonic::include_proto!("weft.v1");
    }
}

pub use weft::v1;

/// Encoded `FileDescriptorSet` of `weft.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("weft_descriptor");
