//! assemble: stage placeholder (being written).
