//! pipeline: stage placeholder (being written).
