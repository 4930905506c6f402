//! Scoring the stitcher's output against what the demo apps served.
//!
//! In: the spans printed by `weft-stitcher --print json` (one JSON object per line, each
//! with the time the benchmark read it) and the request logs of the demo apps of the
//! chain (read by `weft_harness::app_log`). Out: join recall and precision, share of correct parent links (overall and by
//! link kind), share marked ambiguous, and freshness (last response → export) per trace.
//!
//! Every downstream call of the chain has a unique path (`/<hop><mode>/<n>`, `n` being the
//! caller's request number), so the truth is exact: a call's CLIENT and SERVER spans carry
//! the same path, and its correct parent is the caller's SERVER span for request `n`.

use std::collections::HashMap;

use serde_json::Value;
pub use weft_harness::app_log::Served;

/// One printed span, with the time (unix nanos) the benchmark read its line.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent: String,
    pub client: bool,
    pub path: String,
    pub link: String,
    pub end_unix_nanos: u64,
    pub read_unix_nanos: u64,
    pub late: bool,
}

impl Span {
    /// A printer line; `None` for lines that are not span objects.
    pub fn parse(line: &str, read_unix_nanos: u64) -> Option<Span> {
        let v: Value = serde_json::from_str(line).ok()?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(Span {
            trace_id: s("trace_id")?,
            span_id: s("span_id")?,
            parent: s("parent_span_id").unwrap_or_default(),
            client: s("kind")? == "CLIENT",
            path: s("path").unwrap_or_default(),
            link: s("link").unwrap_or_default(),
            end_unix_nanos: v.get("end_unix_nanos").and_then(Value::as_u64)?,
            read_unix_nanos,
            late: v.get("late").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// One hop of the chain: the caller's log, the path template of its call (`{n}` replaced by
/// the caller's request number), and the callee's log.
pub struct Hop<'a> {
    pub caller: &'a [Served],
    pub call_template: &'a str,
    pub callee: &'a [Served],
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Score {
    /// Calls served (expected joins).
    pub expected: u64,
    /// Expected calls whose SERVER span was joined to a CLIENT span of the same call.
    pub joined_right: u64,
    /// SERVER spans of these hops marked `join`.
    pub joins: u64,
    /// ...whose CLIENT parent is the same call.
    pub joins_right: u64,
    /// CLIENT spans of the hops' callers with a known correct parent.
    pub links: u64,
    pub links_right: u64,
    /// By link kind: (count, right).
    pub by_kind: HashMap<String, (u64, u64)>,
}

impl Score {
    pub fn recall_pct(&self) -> Option<f64> {
        crate::stats::share_pct(self.joined_right, self.expected)
    }
    pub fn precision_pct(&self) -> Option<f64> {
        crate::stats::share_pct(self.joins_right, self.joins)
    }
    pub fn links_right_pct(&self) -> Option<f64> {
        crate::stats::share_pct(self.links_right, self.links)
    }
    pub fn kind_right_pct(&self, kind: &str) -> Option<f64> {
        let (n, right) = self.by_kind.get(kind).copied().unwrap_or_default();
        crate::stats::share_pct(right, n)
    }
    pub fn kind_share_pct(&self, kind: &str) -> Option<f64> {
        let (n, _) = self.by_kind.get(kind).copied().unwrap_or_default();
        crate::stats::share_pct(n, self.links)
    }
}

/// Scores the hops whose call paths `select` accepts (e.g. those of one phase).
pub fn score(spans: &[Span], hops: &[Hop<'_>], select: &dyn Fn(&str) -> bool) -> Score {
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let servers_by_path: HashMap<&str, Vec<&Span>> =
        spans
            .iter()
            .filter(|s| !s.client)
            .fold(HashMap::new(), |mut m, s| {
                m.entry(s.path.as_str()).or_default().push(s);
                m
            });
    let clients_by_path: HashMap<&str, Vec<&Span>> =
        spans
            .iter()
            .filter(|s| s.client)
            .fold(HashMap::new(), |mut m, s| {
                m.entry(s.path.as_str()).or_default().push(s);
                m
            });
    let mut sc = Score::default();
    for hop in hops {
        let served: std::collections::HashSet<&str> =
            hop.callee.iter().map(|s| s.path.as_str()).collect();
        for req in hop.caller {
            let call = hop.call_template.replace("{n}", &req.n.to_string());
            if !select(&call) {
                continue;
            }
            // Joins: the callee's SERVER span for this call, under a CLIENT span of it.
            if served.contains(call.as_str()) {
                sc.expected += 1;
                let joined = servers_by_path.get(call.as_str()).is_some_and(|v| {
                    v.iter().any(|s| {
                        s.link == "join"
                            && by_id
                                .get(s.parent.as_str())
                                .is_some_and(|p| p.client && p.path == call)
                    })
                });
                sc.joined_right += u64::from(joined);
            }
            for s in servers_by_path.get(call.as_str()).into_iter().flatten() {
                if s.link == "join" {
                    sc.joins += 1;
                    let right = by_id
                        .get(s.parent.as_str())
                        .is_some_and(|p| p.client && p.path == call);
                    sc.joins_right += u64::from(right);
                }
            }
            // Links: the caller's CLIENT span for this call, under the caller's SERVER
            // span of the request that made it (every request the caller served has a path
            // of its own).
            for c in clients_by_path.get(call.as_str()).into_iter().flatten() {
                sc.links += 1;
                let right = by_id
                    .get(c.parent.as_str())
                    .is_some_and(|p| !p.client && p.path == req.path);
                sc.links_right += u64::from(right);
                let kind = if c.link.is_empty() {
                    "none"
                } else {
                    c.link.as_str()
                };
                let e = sc.by_kind.entry(kind.to_owned()).or_default();
                e.0 += 1;
                e.1 += u64::from(right);
            }
        }
    }
    sc
}

/// Freshness of the printed traces (the issue's "last response → export").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Freshness {
    /// Per trace: from the end of its last span (its last response) to the moment its last
    /// line was read (the whole trace exported), minus the idle window, in milliseconds.
    pub net_ms: Vec<f64>,
    /// Traces with spans exported after the trace (`late`): their freshness runs to that
    /// late export, since only then is the whole trace out.
    pub with_late_spans: usize,
}

/// Freshness per trace id, over every printed span, late re-exports included.
pub fn freshness(spans: &[Span], idle_nanos: u64) -> Freshness {
    let mut traces: HashMap<&str, (u64, u64, bool)> = HashMap::new();
    for s in spans {
        let e = traces.entry(s.trace_id.as_str()).or_default();
        e.0 = e.0.max(s.end_unix_nanos);
        e.1 = e.1.max(s.read_unix_nanos);
        e.2 |= s.late;
    }
    Freshness {
        net_ms: traces
            .values()
            .map(|&(end, read, _)| (read as f64 - end as f64 - idle_nanos as f64) / 1e6)
            .collect(),
        with_late_spans: traces.values().filter(|t| t.2).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str, client: bool, path: &str, link: &str) -> Span {
        Span {
            trace_id: "t".into(),
            span_id: id.into(),
            parent: parent.into(),
            client,
            path: path.into(),
            link: link.into(),
            end_unix_nanos: 0,
            read_unix_nanos: 0,
            late: false,
        }
    }

    fn served(n: u64, path: &str) -> Served {
        Served {
            n,
            path: path.into(),
            ..Served::default()
        }
    }

    #[test]
    fn printer_lines_parse() {
        let line = r#"{"trace_id":"ab","span_id":"01","parent_span_id":"","kind":"SERVER","path":"/x","link":"","end_unix_nanos":5,"late":false}"#;
        let s = Span::parse(line, 9).unwrap();
        assert!(
            !s.client && s.parent.is_empty() && s.end_unix_nanos == 5 && s.read_unix_nanos == 9
        );
        assert_eq!(Span::parse("not json", 0), None);
        assert_eq!(Span::parse(r#"{"trace_id":"ab"}"#, 0), None);
    }

    /// Caller F served /in/1 (n=1) and /in/2 (n=2), calling /b/1 and /b/2 on B.
    fn hop_fixture() -> (Vec<Served>, Vec<Served>) {
        (
            vec![served(1, "/in/1"), served(2, "/in/2")],
            vec![served(1, "/b/1"), served(2, "/b/2")],
        )
    }

    #[test]
    fn right_joins_and_links_score_full_marks() {
        let (caller, callee) = hop_fixture();
        let spans = vec![
            span("s1", "", false, "/in/1", ""),
            span("s2", "", false, "/in/2", ""),
            span("c1", "s1", true, "/b/1", "timing"),
            span("c2", "s2", true, "/b/2", "traceparent"),
            span("b1", "c1", false, "/b/1", "join"),
            span("b2", "c2", false, "/b/2", "join"),
        ];
        let hops = [Hop {
            caller: &caller,
            call_template: "/b/{n}",
            callee: &callee,
        }];
        let sc = score(&spans, &hops, &|_| true);
        assert_eq!(
            (sc.expected, sc.joined_right, sc.joins, sc.joins_right),
            (2, 2, 2, 2)
        );
        assert_eq!((sc.links, sc.links_right), (2, 2));
        assert_eq!(sc.recall_pct(), Some(100.0));
        assert_eq!(sc.kind_right_pct("timing"), Some(100.0));
        assert_eq!(sc.kind_share_pct("traceparent"), Some(50.0));
    }

    #[test]
    fn crossed_joins_wrong_parents_and_missing_spans_count_against() {
        let (caller, callee) = hop_fixture();
        let spans = vec![
            span("s1", "", false, "/in/1", ""),
            span("s2", "", false, "/in/2", ""),
            // Both calls linked to request 1: one is wrong.
            span("c1", "s1", true, "/b/1", "ambiguous"),
            span("c2", "s1", true, "/b/2", "ambiguous"),
            // The server half of /b/2 joined to the client half of /b/1: wrong.
            span("b2", "c1", false, "/b/2", "join"),
        ];
        let hops = [Hop {
            caller: &caller,
            call_template: "/b/{n}",
            callee: &callee,
        }];
        let sc = score(&spans, &hops, &|_| true);
        assert_eq!(sc.expected, 2);
        assert_eq!(sc.joined_right, 0);
        assert_eq!((sc.joins, sc.joins_right), (1, 0));
        assert_eq!(sc.precision_pct(), Some(0.0));
        assert_eq!((sc.links, sc.links_right), (2, 1));
        assert_eq!(sc.kind_share_pct("ambiguous"), Some(100.0));
        // Selecting nothing scores nothing.
        let none = score(&spans, &hops, &|_| false);
        assert_eq!(none.expected + none.links + none.joins, 0);
        assert_eq!(none.recall_pct(), None);
    }

    #[test]
    fn freshness_takes_the_last_span_and_the_last_read_per_trace_late_ones_included() {
        let mut a = span("a", "", false, "/", "");
        a.end_unix_nanos = 1_000_000_000;
        a.read_unix_nanos = 2_100_000_000;
        let mut b = a.clone();
        b.span_id = "b".into();
        b.end_unix_nanos = 1_050_000_000;
        b.read_unix_nanos = 2_150_000_000;
        // Trace "other": its last span came after the trace was exported.
        let mut first = a.clone();
        first.trace_id = "other".into();
        let mut late = first.clone();
        late.span_id = "l".into();
        late.end_unix_nanos = 1_100_000_000;
        late.read_unix_nanos = 2_600_000_000;
        late.late = true;
        let f = freshness(&[a, b, first, late], 1_000_000_000);
        let mut ms = f.net_ms.clone();
        ms.sort_by(f64::total_cmp);
        assert_eq!(ms.len(), 2);
        assert!((ms[0] - 100.0).abs() < 1e-6, "{ms:?}");
        assert!((ms[1] - 500.0).abs() < 1e-6, "{ms:?}");
        assert_eq!(f.with_late_spans, 1);
    }
}
