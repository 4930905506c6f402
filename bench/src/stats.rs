//! Small statistics over measured samples: percentiles, medians, ratios.
//!
//! In: slices of samples. Out: single figures. Percentiles use the nearest rank on the
//! sorted samples (the same rule as `weft-demo-app load` and `weft-loadgen`).

/// The `q`-quantile (0..=1) of `samples` by nearest rank; `None` when empty.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let last = sorted.len() - 1;
    let idx = ((last as f64) * q).round() as usize;
    Some(sorted[idx.min(last)])
}

/// The median (nearest rank).
pub fn median(samples: &[f64]) -> Option<f64> {
    percentile(samples, 0.5)
}

/// `num / den`, `None` when the denominator is zero or either side is missing.
pub fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d != 0.0 => Some(n / d),
        _ => None,
    }
}

/// `part / whole` as a percentage; `None` when nothing was expected.
pub fn share_pct(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| 100.0 * part as f64 / whole as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_picks_nearest_rank_of_sorted_samples() {
        let xs: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), Some(51.0));
        assert_eq!(percentile(&xs, 0.99), Some(99.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&xs, 1.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
    }

    #[test]
    fn percentile_rejects_empty_nan_and_bad_quantiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[f64::NAN], 0.5), None);
        assert_eq!(percentile(&[1.0, f64::NAN, 3.0], 1.0), Some(3.0));
        assert_eq!(percentile(&[1.0], 1.5), None);
    }

    #[test]
    fn median_ratio_share() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(ratio(Some(97.0), Some(100.0)), Some(0.97));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(share_pct(99, 100), Some(99.0));
        assert_eq!(share_pct(0, 0), None);
    }
}
