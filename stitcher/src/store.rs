//! store: stage placeholder (being written).
