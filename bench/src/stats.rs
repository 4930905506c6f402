//! Small statistics over measured samples: percentiles, medians and their confidence
//! intervals, ratios.
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

/// A distribution-free confidence interval for the median of the population the samples
/// came from: `[low, high]` holds it with probability `coverage`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MedianInterval {
    pub low: f64,
    pub high: f64,
    pub coverage: f64,
}

/// The narrowest interval between order statistics, `[x(k), x(n+1-k)]`, whose coverage is
/// at least `min_coverage`, else the widest one, `[min, max]`, with its (lower) coverage.
/// Each sample falls below the median with probability ½, so the interval misses it only
/// when fewer than `k` samples fall on one side: coverage = 1 − 2·P(Binomial(n, ½) < k).
/// Needs no assumption about the samples' distribution (the rounds' ratios are not
/// normal: a disturbed round is an outlier). `None` without samples.
pub fn median_interval(samples: &[f64], min_coverage: f64) -> Option<MedianInterval> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    // Widen from the middle until the coverage is reached or the interval is [min, max].
    let mut k = n.div_ceil(2);
    while k > 1 && coverage(n, k) < min_coverage {
        k -= 1;
    }
    Some(MedianInterval {
        low: sorted[k - 1],
        high: sorted[n - k],
        coverage: coverage(n, k),
    })
}

/// 1 − 2·P(Binomial(n, ½) < k), never below 0.
fn coverage(n: usize, k: usize) -> f64 {
    // P(Binomial(n, ½) = i) built up term by term: C(n, i+1) = C(n, i)·(n−i)/(i+1).
    let mut term = 0.5f64.powi(n as i32);
    let mut below = 0.0;
    for i in 0..k {
        below += term;
        term = term * (n - i) as f64 / (i + 1) as f64;
    }
    (1.0 - 2.0 * below).max(0.0)
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
    fn median_interval_uses_order_statistics_with_binomial_coverage() {
        // Five samples: only [min, max] exists, covering 1 − 2/32.
        let five = [0.95, 0.90, 1.00, 0.97, 0.93];
        let i = median_interval(&five, 0.90).unwrap();
        assert_eq!((i.low, i.high), (0.90, 1.00));
        assert!((i.coverage - 0.9375).abs() < 1e-12, "{i:?}");
        // Ten samples: [x(2), x(9)] covers 1 − 2·11/1024 ≈ 0.979; [x(3), x(8)] only ≈ 0.891.
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        let i = median_interval(&ten, 0.95).unwrap();
        assert_eq!((i.low, i.high), (2.0, 9.0));
        assert!((i.coverage - (1.0 - 22.0 / 1024.0)).abs() < 1e-12, "{i:?}");
        // Eleven (the overhead benchmark's default rounds): [x(3), x(9)] covers
        // 1 − 2·67/2048 ≈ 0.935, the narrowest at ≥ 90 % ([x(4), x(8)] only ≈ 0.773).
        let eleven: Vec<f64> = (1..=11).map(f64::from).collect();
        let i = median_interval(&eleven, 0.90).unwrap();
        assert_eq!((i.low, i.high), (3.0, 9.0));
        assert!(
            (i.coverage - (1.0 - 2.0 * 67.0 / 2048.0)).abs() < 1e-12,
            "{i:?}"
        );
        let i = median_interval(&ten, 0.85).unwrap();
        assert_eq!((i.low, i.high), (3.0, 8.0));
        assert!(
            (i.coverage - (1.0 - 2.0 * 56.0 / 1024.0)).abs() < 1e-12,
            "{i:?}"
        );
    }

    #[test]
    fn median_interval_reports_low_coverage_instead_of_failing() {
        let one = median_interval(&[0.97], 0.9).unwrap();
        assert_eq!((one.low, one.high, one.coverage), (0.97, 0.97, 0.0));
        let two = median_interval(&[2.0, f64::NAN, 1.0], 0.9).unwrap();
        assert_eq!((two.low, two.high, two.coverage), (1.0, 2.0, 0.5));
        assert_eq!(median_interval(&[], 0.9), None);
        assert_eq!(median_interval(&[f64::NAN], 0.9), None);
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
