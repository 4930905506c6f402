//! Ground truth from `weft-demo-app serve`'s request log.
//!
//! In: the app's stdout, one JSON object per line (`serve.rs` writes them). Out: the requests
//! it served ([`Served`]), in log order. Tests and benchmarks score the stitcher against these:
//! the request number `n` appears in the paths of the calls the request made (`{n}`), the peer
//! is the caller's address, the traceparent the one the caller sent.

use serde_json::Value;

/// One `"event":"request"` line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Served {
    /// The app's request number (1, 2, ...), `{n}` in its calls' paths.
    pub n: u64,
    /// The caller's address, `ip:port`.
    pub peer: String,
    pub path: String,
    pub status: u16,
    /// The incoming `traceparent` header, if the caller sent one.
    pub traceparent: Option<String>,
}

impl Served {
    /// The 32 hex digits of the incoming traceparent's trace id.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.as_deref()?.get(3..35)
    }
}

/// The requests in a `serve` log; other events and lines that are not JSON are skipped.
pub fn served(log: &str) -> Vec<Served> {
    log.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Served> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v.get("event")?.as_str()? == "request").then_some(())?;
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(Served {
        n: v.get("n")?.as_u64()?,
        peer: text("peer").unwrap_or_default(),
        path: text("path")?,
        status: v
            .get("status")
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or_default(),
        traceparent: text("traceparent"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_and_other_lines_are_skipped() {
        let log = "{\"event\":\"listening\",\"name\":\"f\"}\n\
            not json\n\
            {\"event\":\"request\",\"name\":\"f\",\"n\":3,\"peer\":\"10.0.0.1:4000\",\"method\":\"GET\",\
             \"path\":\"/f/7\",\"status\":502,\"traceparent\":\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\",\"calls\":[]}\n\
            {\"event\":\"request\",\"n\":4,\"path\":\"/f/8\",\"status\":200,\"traceparent\":null}\n";
        let got = served(log);
        assert_eq!(
            got,
            vec![
                Served {
                    n: 3,
                    peer: "10.0.0.1:4000".into(),
                    path: "/f/7".into(),
                    status: 502,
                    traceparent: Some(
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()
                    ),
                },
                Served {
                    n: 4,
                    path: "/f/8".into(),
                    status: 200,
                    ..Served::default()
                },
            ]
        );
        assert_eq!(got[0].trace_id(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(got[1].trace_id(), None);
    }
}
