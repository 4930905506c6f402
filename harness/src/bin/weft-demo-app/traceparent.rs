//! W3C `traceparent` values: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.

use rand::Rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: String,
}

impl TraceParent {
    /// Parses a version-00 header; `None` for anything malformed (then a new trace starts).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let valid = version == "00"
            && parts.next().is_none()
            && hex(trace, 32)
            && hex(parent, 16)
            && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0')
            && parent.bytes().any(|b| b != b'0');
        valid.then(|| TraceParent {
            trace_id: trace.to_string(),
            parent_id: parent.to_string(),
            flags: flags.to_string(),
        })
    }

    /// A new sampled trace with a random root span id.
    pub fn new_root() -> TraceParent {
        TraceParent {
            trace_id: random_hex(16),
            parent_id: random_hex(8),
            flags: "01".to_string(),
        }
    }

    /// The same trace, with a fresh random span id as the parent of the next hop.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            parent_id: random_hex(8),
            ..self.clone()
        }
    }

    pub fn header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.parent_id, self.flags)
    }
}

/// `bytes` random bytes as lowercase hex, never all zeros (invalid in W3C trace context).
fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    loop {
        let raw: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
        if raw.iter().any(|&b| b != 0) {
            return raw.iter().map(|b| format!("{b:02x}")).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives_children() {
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let child = tp.child();
        assert_eq!(child.trace_id, tp.trace_id);
        assert_ne!(child.parent_id, tp.parent_id);
        assert!(TraceParent::parse(&child.header()).is_some());
        assert!(TraceParent::parse(&TraceParent::new_root().header()).is_some());
        assert!(
            TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7").is_none()
        );
        assert!(
            TraceParent::parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_none()
        );
    }
}
