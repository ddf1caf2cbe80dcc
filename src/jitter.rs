//! Spreading timers that would otherwise fire together: reconnects after a shared server is
//! lost, client connections that were opened in the same second reaching their age.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `value` give or take `per_mille` thousandths of it, drawn afresh on each call.
pub fn give_or_take(value: Duration, per_mille: u32) -> Duration {
    // Draws made in the same nanosecond (connections accepted in one burst) still differ.
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    let draw = DRAWS.fetch_add(1, Ordering::Relaxed);
    let seed = u64::from(nanos) ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let spread = xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) % (2 * u64::from(per_mille) + 1);
    // (1000 - per_mille) ..= (1000 + per_mille) thousandths of the value.
    let thousandths = 1000 - per_mille + spread as u32;
    value * thousandths / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_within_the_spread_and_cover_it() {
        let draws: Vec<Duration> = (0..2_000)
            .map(|_| give_or_take(Duration::from_secs(100), 100))
            .collect();
        for draw in &draws {
            assert!(
                *draw >= Duration::from_secs(90) && *draw <= Duration::from_secs(110),
                "{draw:?}"
            );
        }
        // Spread over the range, not bunched: each tenth of it gets some draws.
        for tenth in 0..10 {
            let low = Duration::from_secs(90 + 2 * tenth);
            let high = low + Duration::from_secs(2);
            let inside = draws.iter().filter(|d| **d >= low && **d < high).count();
            assert!(inside > 50, "{inside} draws in [{low:?}, {high:?})");
        }
    }
}
