//! export: stage placeholder (being written).
