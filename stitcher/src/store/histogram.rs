//! A small fixed-precision latency histogram for the service map.
//!
//! Log-linear buckets (as in HdrHistogram with 3 significant bits): values below 16 ns
//! are exact, above that every power of two is split into 8 equal buckets, so a bucket's
//! midpoint is within 1/16 (6.25 %) of any value in it. Buckets are stored sparsely
//! (an edge's latencies usually span a few powers of two), so one histogram is a few
//! hundred bytes at most. Exact minimum and maximum are kept to clamp the estimate, so
//! a single-valued distribution reports its value exactly.

/// Values below this are their own bucket.
const EXACT_BELOW: u64 = 16;
/// Sub-buckets per power of two: 2^SUB_BITS.
const SUB_BITS: u32 = 3;

/// Counts of latencies (nanoseconds) in log-linear buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// (bucket index, count), sorted by index.
    buckets: Vec<(u16, u64)>,
    count: u64,
    min: u64,
    max: u64,
}

impl Histogram {
    pub fn record(&mut self, nanos: u64) {
        self.add_to_bucket(bucket_of(nanos), 1);
        self.min = if self.count == 0 {
            nanos
        } else {
            self.min.min(nanos)
        };
        self.max = self.max.max(nanos);
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        for &(b, n) in &other.buckets {
            self.add_to_bucket(b, n);
        }
        self.min = if self.count == 0 {
            other.min
        } else {
            self.min.min(other.min)
        };
        self.max = self.max.max(other.max);
        self.count += other.count;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q`-quantile (0 < q <= 1) by nearest rank: the bucket that holds the
    /// `ceil(q * count)`-th smallest value, reported as its midpoint clamped to the
    /// observed minimum and maximum (the first and last rank are the exact minimum and
    /// maximum). 0 for an empty histogram.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        // The extremes are known exactly.
        if rank == self.count {
            return self.max;
        }
        if rank == 1 {
            return self.min;
        }
        let mut seen = 0;
        for &(b, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                let (low, width) = bucket_range(b);
                return (low + width / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Approximate heap and inline size, for memory accounting.
    pub fn approx_bytes(&self) -> usize {
        size_of::<Self>() + self.buckets.capacity() * size_of::<(u16, u64)>()
    }

    fn add_to_bucket(&mut self, bucket: u16, n: u64) {
        match self.buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
            Ok(i) => self.buckets[i].1 += n,
            Err(i) => self.buckets.insert(i, (bucket, n)),
        }
    }
}

/// Bucket index of a value.
fn bucket_of(v: u64) -> u16 {
    if v < EXACT_BELOW {
        return v as u16;
    }
    let exp = 63 - v.leading_zeros(); // >= 4
    let mantissa = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (EXACT_BELOW + u64::from(exp - 4) * (1 << SUB_BITS) + mantissa) as u16
}

/// Lowest value and width of a bucket.
fn bucket_range(b: u16) -> (u64, u64) {
    let b = u64::from(b);
    if b < EXACT_BELOW {
        return (b, 1);
    }
    let i = b - EXACT_BELOW;
    let exp = 4 + i / (1 << SUB_BITS);
    let mantissa = i % (1 << SUB_BITS);
    let width = 1u64 << (exp - u64::from(SUB_BITS));
    (((1 << SUB_BITS) + mantissa) * width, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_its_bucket() {
        for v in (0..5000u64).chain([u64::MAX, u64::MAX / 3, 1 << 40, (1 << 40) - 1]) {
            let (low, width) = bucket_range(bucket_of(v));
            assert!(
                low <= v && v - low < width,
                "{v} not in [{low}, {low}+{width})"
            );
        }
    }

    #[test]
    fn midpoint_is_within_a_sixteenth() {
        for v in [17u64, 100, 999, 12_345, 5_000_000, 987_654_321] {
            let (low, width) = bucket_range(bucket_of(v));
            let mid = low + width / 2;
            assert!(mid.abs_diff(v) * 16 <= v, "{v}: midpoint {mid}");
        }
    }

    #[test]
    fn quantiles_of_a_uniform_distribution() {
        let mut h = Histogram::default();
        // 1 ms .. 100 ms in 1 ms steps: p50 = 50 ms, p90 = 90 ms, p99 = 99 ms.
        for ms in 1..=100u64 {
            h.record(ms * 1_000_000);
        }
        assert_eq!(h.count(), 100);
        for (q, want) in [(0.5, 50_000_000u64), (0.9, 90_000_000), (0.99, 99_000_000)] {
            let got = h.quantile(q);
            assert!(got.abs_diff(want) * 16 <= want, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 100_000_000, "the maximum is exact");
    }

    #[test]
    fn single_value_is_exact_and_merge_adds() {
        let mut a = Histogram::default();
        a.record(4_800_000);
        assert_eq!(a.quantile(0.5), 4_800_000);
        assert_eq!(a.quantile(0.99), 4_800_000);
        let mut b = Histogram::default();
        for _ in 0..9 {
            b.record(100);
        }
        a.merge(&b);
        assert_eq!(a.count(), 10);
        assert_eq!(a.quantile(0.5), 100);
        assert_eq!(a.quantile(0.9), 100);
        assert_eq!(a.quantile(0.99), 4_800_000);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
