//! ingest: stage placeholder (being written).
