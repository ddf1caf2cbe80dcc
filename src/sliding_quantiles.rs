//! Quantiles of the decision latency over a sliding window, for a statsd_exporter mapping
//! that exports the response time as a summary (its default observer type). statsd_exporter
//! keeps the samples of the last `max_age` (10 minutes) in `age_buckets` (5) rotating parts
//! and computes each quantile from them; dashboards read `{quantile="0.99"}`.
//!
//! Samples are not kept here: each part counts them in log-linear buckets, 32 to a power of
//! two of microseconds, so a quantile is known to within 1.6 % of its value — the same order
//! as the rank error statsd_exporter's own summaries allow (`error`: 5 %, 1 %, 0.1 %) — in
//! a fixed 8 KB a part, whatever the traffic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Buckets per power of two; also the values below it, counted one microsecond each.
const SUB: u64 = 32;
const SUB_BITS: u32 = SUB.trailing_zeros();
/// The largest value told apart: about 19 hours in microseconds. Longer ones count there.
const MAX_OCTAVE: u32 = 36;
const BUCKETS: usize = (SUB + (MAX_OCTAVE - SUB_BITS + 1) as u64 * SUB) as usize;

/// How a summary is kept: its quantiles, over how long, in how many parts.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryShape {
    pub quantiles: Vec<f64>,
    pub max_age: Duration,
    pub age_buckets: u32,
}

impl Default for SummaryShape {
    /// statsd_exporter's defaults.
    fn default() -> Self {
        Self {
            quantiles: vec![0.5, 0.9, 0.99],
            max_age: Duration::from_secs(600),
            age_buckets: 5,
        }
    }
}

/// One part of the window: which stretch of time it counts, and its counts.
struct Age {
    /// The number of the `age_millis` stretch counted, from `started`; 0: none yet.
    epoch: AtomicU64,
    counts: Box<[AtomicU64]>,
}

pub struct SlidingQuantiles {
    shape: SummaryShape,
    ages: Box<[Age]>,
    age_millis: u64,
    started: Instant,
}

impl SlidingQuantiles {
    pub fn new(shape: SummaryShape) -> Self {
        let parts = shape.age_buckets.max(1);
        let age_millis = (shape.max_age.as_millis() as u64 / u64::from(parts)).max(1);
        Self {
            ages: (0..parts)
                .map(|_| Age {
                    epoch: AtomicU64::new(0),
                    counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
                })
                .collect(),
            shape,
            age_millis,
            started: Instant::now(),
        }
    }

    pub fn quantiles(&self) -> &[f64] {
        &self.shape.quantiles
    }

    pub fn observe(&self, elapsed: Duration) {
        self.observe_at(elapsed, self.started.elapsed().as_millis() as u64);
    }

    /// Each quantile's value in microseconds over the window ending now; `None` for all of
    /// them when nothing was observed in it.
    pub fn values_micros(&self) -> Option<Vec<f64>> {
        self.values_at(self.started.elapsed().as_millis() as u64)
    }

    /// As `observe`, `now_millis` after the start.
    fn observe_at(&self, elapsed: Duration, now_millis: u64) {
        let epoch = now_millis / self.age_millis + 1;
        let Some(age) = self.ages.get((epoch % self.ages.len() as u64) as usize) else {
            return;
        };
        let seen = age.epoch.load(Ordering::Acquire);
        if seen != epoch
            && seen < epoch
            && age
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This part counted a stretch that has left the window: it starts again. A
            // sample another thread adds meanwhile may be lost, at most once a stretch.
            for count in age.counts.iter() {
                count.store(0, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(count) = age.counts.get(bucket_of(micros)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// As `values_micros`, `now_millis` after the start.
    fn values_at(&self, now_millis: u64) -> Option<Vec<f64>> {
        let epoch = now_millis / self.age_millis + 1;
        let oldest = epoch.saturating_sub(self.ages.len() as u64 - 1);
        let mut counts = vec![0u64; BUCKETS];
        for age in self.ages.iter() {
            let counted = age.epoch.load(Ordering::Acquire);
            if counted < oldest || counted > epoch {
                continue;
            }
            for (sum, count) in counts.iter_mut().zip(age.counts.iter()) {
                *sum += count.load(Ordering::Relaxed);
            }
        }
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let values = self.shape.quantiles.iter().map(|&quantile| {
            // The smallest value with at least this share of the samples at or below it.
            let rank = ((quantile * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            let bucket = counts
                .iter()
                .position(|count| {
                    seen += count;
                    seen >= rank
                })
                .unwrap_or(BUCKETS - 1);
            middle_micros(bucket)
        });
        Some(values.collect())
    }
}

/// The bucket of a value in microseconds: exact below `SUB`, then `SUB` a power of two.
fn bucket_of(micros: u64) -> usize {
    if micros < SUB {
        return micros as usize;
    }
    let octave = (63 - micros.leading_zeros()).min(MAX_OCTAVE);
    let micros = micros.min((1 << (MAX_OCTAVE + 1)) - 1);
    let shift = octave - SUB_BITS;
    let within = (micros >> shift) - SUB;
    (SUB + u64::from(shift) * SUB + within) as usize
}

/// The middle of a bucket's values, in microseconds.
fn middle_micros(bucket: usize) -> f64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket as f64;
    }
    let shift = (bucket - SUB) / SUB;
    let within = (bucket - SUB) % SUB;
    let low = (SUB + within) << shift;
    let width = 1u64 << shift;
    // A bucket one microsecond wide holds one value.
    low as f64 + (width - 1) as f64 / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(quantiles: &[f64]) -> SummaryShape {
        SummaryShape {
            quantiles: quantiles.to_vec(),
            max_age: Duration::from_secs(600),
            age_buckets: 5,
        }
    }

    #[test]
    fn buckets_cover_every_value_in_order_within_a_sixty_fourth() {
        let mut last = 0;
        for micros in (0..100_000).chain([1 << 30, u64::MAX / 3, u64::MAX]) {
            let bucket = bucket_of(micros);
            assert!(bucket >= last && bucket < BUCKETS, "{micros} -> {bucket}");
            last = bucket;
            if micros < 1 << MAX_OCTAVE {
                let middle = middle_micros(bucket);
                let error = (middle - micros as f64).abs() / (micros.max(1) as f64);
                assert!(error <= 1.0 / 64.0, "{micros}: {middle} is {error} off");
            }
        }
    }

    #[test]
    fn quantiles_of_the_window_are_within_their_bucket() {
        let summary = SlidingQuantiles::new(shape(&[0.5, 0.9, 0.99, 1.0]));
        assert_eq!(summary.values_at(0), None);
        // 1 000 samples: 1 µs to 1 000 µs … as 1..=1000 × 100 µs.
        for i in 1..=1_000u64 {
            summary.observe_at(Duration::from_micros(i * 100), 1_000);
        }
        let values = summary.values_at(2_000).unwrap();
        for (value, expected) in values.iter().zip([50_000.0, 90_000.0, 99_000.0, 100_000.0]) {
            assert!(
                (value - expected).abs() / expected <= 1.0 / 64.0,
                "{values:?}"
            );
        }
    }

    #[test]
    fn samples_leave_the_window_after_max_age() {
        // Two-minute parts of a ten-minute window.
        let summary = SlidingQuantiles::new(shape(&[0.25, 0.4]));
        let minute = 60_000;
        let (fast, slow) = (Duration::from_micros(10), Duration::from_micros(5_000));
        summary.observe_at(fast, minute);
        for _ in 0..3 {
            summary.observe_at(slow, 5 * minute);
        }
        let lowest = |now| summary.values_at(now).map(|v| v[0].round());
        // Both in the window: the lowest quarter is the fast one.
        assert_eq!(lowest(9 * minute), Some(10.0));
        // Its part has left the window at eleven minutes: only slow ones.
        assert_eq!(lowest(11 * minute), Some(5_056.0));
        // A new sample in the part that comes round again counts alone there: one fast of
        // four samples is below the 0.4 quantile (two of five would not be).
        summary.observe_at(fast, 11 * minute);
        let values = summary.values_at(11 * minute).unwrap();
        assert_eq!(values[0].round(), 10.0);
        assert_eq!(values[1].round(), 5_056.0);
        // Nothing for longer than the window: no value.
        assert_eq!(lowest(40 * minute), None);
    }
}
