//! query: stage placeholder (being written).
