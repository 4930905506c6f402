//! Reading Prometheus text exposition (the collector's and the stitcher's `/metrics`).
//!
//! In: the text. Out: the sum of the samples of one metric whose labels contain the given
//! pairs (all samples when no pairs are given).

/// Sum of `name{...}` samples whose label set contains every `(key, value)` of `labels`;
/// `None` when no sample matched.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text, name)
        .filter(|(pairs, _)| {
            labels
                .iter()
                .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v))
        })
        .map(|(_, v)| v)
        .reduce(|a, b| a + b)
}

/// Every `name{...}` sample: its labels and its value (lines whose value does not parse
/// are skipped).
pub fn samples<'a>(
    text: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 'a {
    text.lines().filter_map(move |line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.trim().rsplit_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let value = value.parse::<f64>().ok()?;
        Some((parse_labels(label_text), value))
    })
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let key = key.trim_start_matches(',').trim();
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(e);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.to_owned(), value));
        rest = &after[end.min(after.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP weft_collector_ring_drops Events lost\n\
        # TYPE weft_collector_ring_drops counter\n\
        weft_collector_ring_drops_total{ring=\"packets\"} 7\n\
        weft_collector_ring_drops_total{ring=\"conns\"} 2\n\
        weft_collector_kernel_events_total{kind=\"packets_seen\",cpu=\"all\"} 1.5e3\n\
        weft_stitcher_pipeline_pending_halves 42\n\
        weft_odd{path=\"a\\\"b,c=d\"} 1\n";

    #[test]
    fn sums_matching_series() {
        assert_eq!(sum(TEXT, "weft_collector_ring_drops_total", &[]), Some(9.0));
        assert_eq!(
            sum(
                TEXT,
                "weft_collector_ring_drops_total",
                &[("ring", "packets")]
            ),
            Some(7.0)
        );
        assert_eq!(
            sum(
                TEXT,
                "weft_collector_kernel_events_total",
                &[("kind", "packets_seen")]
            ),
            Some(1500.0)
        );
        assert_eq!(
            sum(TEXT, "weft_stitcher_pipeline_pending_halves", &[]),
            Some(42.0)
        );
    }

    #[test]
    fn absent_metric_or_label_is_none() {
        assert_eq!(sum(TEXT, "weft_collector_ring_drops", &[]), None);
        assert_eq!(
            sum(TEXT, "weft_collector_ring_drops_total", &[("ring", "x")]),
            None
        );
        assert_eq!(sum("", "x", &[]), None);
    }

    #[test]
    fn samples_carry_their_labels() {
        let got: Vec<_> = samples(TEXT, "weft_collector_ring_drops_total").collect();
        let ring = |v: &str| vec![("ring".to_owned(), v.to_owned())];
        assert_eq!(got, vec![(ring("packets"), 7.0), (ring("conns"), 2.0)]);
        assert_eq!(samples(TEXT, "weft_absent").count(), 0);
    }

    #[test]
    fn escaped_label_values_are_unescaped() {
        assert_eq!(sum(TEXT, "weft_odd", &[("path", "a\"b,c=d")]), Some(1.0));
    }
}
