//! link: stage placeholder (being written).
