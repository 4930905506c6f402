//! join: stage placeholder (being written).
