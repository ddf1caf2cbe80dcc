//! `meshlimit simulate`: replays a traffic pattern through every algorithm on a virtual
//! clock and measures how far each strays from the exact answer (a sliding log).
//!
//! Everything is deterministic: arrivals come from a seeded generator, time is simulated,
//! and the algorithms are the same functions the stores run.

use std::fmt::Write;

use crate::algorithm::{self, CounterState};
use crate::limit::{Algorithm, Limit, format_duration};

/// The shape of the offered traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Poisson arrivals at `load` × the limit's rate.
    Steady,
    /// A full limit's worth just before and just after every window boundary: the case that
    /// lets a fixed window admit twice its limit within one window's length.
    BoundaryBurst,
    /// Alternating quiet and busy stretches (busy at `load` × 4 the rate).
    Bursty,
}

/// What the simulation is asked.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub pattern: Pattern,
    pub requests_per_unit: u32,
    pub window_millis: u64,
    /// Offered load as a multiple of the limit's rate.
    pub load: f64,
    pub duration_millis: u64,
    pub seed: u64,
}

/// One algorithm's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub algorithm: Algorithm,
    pub offered: u64,
    pub admitted: u64,
    /// The most admitted within any window of the limit's length, as a multiple of the limit.
    pub worst_overshoot: f64,
    /// Mean over arrivals of |admitted in the window ending there − what the exact sliding
    /// log admitted in it|, as a share of the limit.
    pub mean_error: f64,
    /// Admitted per bucket of `duration / BUCKETS`, for the plot.
    pub admitted_over_time: Vec<u64>,
}

pub const BUCKETS: usize = 120;

/// A small, seeded generator (xorshift64*): reproducible runs need no extra crate.
struct Random(u64);

impl Random {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        bits as f64 / (1u64 << 53) as f64
    }
}

/// Arrival times in milliseconds, ascending.
pub fn arrivals(scenario: &Scenario) -> Vec<u64> {
    let mut random = Random(scenario.seed.max(1));
    let rate_per_ms = f64::from(scenario.requests_per_unit) / scenario.window_millis as f64;
    let mut times = Vec::new();
    match scenario.pattern {
        Pattern::Steady | Pattern::Bursty => {
            let mut t = 0.0;
            loop {
                let busy = scenario.pattern == Pattern::Steady
                    || (t as u64 / scenario.window_millis) % 4 == 1;
                let rate = match (scenario.pattern, busy) {
                    (Pattern::Bursty, true) => rate_per_ms * scenario.load * 4.0,
                    (Pattern::Bursty, false) => rate_per_ms * 0.1,
                    _ => rate_per_ms * scenario.load,
                };
                // Exponential gaps: a Poisson process.
                t += -(1.0 - random.next_f64()).ln() / rate.max(1e-9);
                if t >= scenario.duration_millis as f64 {
                    break;
                }
                times.push(t as u64);
            }
        }
        Pattern::BoundaryBurst => {
            let burst = u64::from(scenario.requests_per_unit);
            let spread = (scenario.window_millis / 20).max(1);
            let mut boundary = scenario.window_millis;
            while boundary < scenario.duration_millis {
                for i in 0..burst {
                    times.push(boundary - spread + i * spread / burst.max(1));
                }
                for i in 0..burst {
                    times.push(boundary + i * spread / burst.max(1));
                }
                boundary += 2 * scenario.window_millis;
            }
        }
    }
    times
}

/// Runs the scenario through each algorithm.
pub fn run(scenario: &Scenario, algorithms: &[Algorithm]) -> Vec<Report> {
    let times = arrivals(scenario);
    let decide = |algorithm: Algorithm| -> Vec<bool> {
        let limit = Limit {
            requests_per_unit: scenario.requests_per_unit,
            window_millis: scenario.window_millis,
            algorithm,
            burst: None,
            hybrid: false,
            calendar: None,
        };
        let mut state = CounterState::Empty;
        // Start one window after the epoch so windows are aligned as in production.
        times
            .iter()
            .map(|&t| {
                !algorithm::apply(&mut state, &limit, 1, scenario.window_millis + t, false)
                    .over_limit
            })
            .collect()
    };
    let exact = decide(Algorithm::SlidingLog);
    let exact_times: Vec<u64> = times
        .iter()
        .zip(&exact)
        .filter_map(|(&t, &ok)| ok.then_some(t))
        .collect();
    let exact_counts = window_counts(&exact_times, &times, scenario.window_millis);
    algorithms
        .iter()
        .map(|&algorithm| {
            let admitted = decide(algorithm);
            let admitted_times: Vec<u64> = times
                .iter()
                .zip(&admitted)
                .filter_map(|(&t, &ok)| ok.then_some(t))
                .collect();
            let counts = window_counts(&admitted_times, &times, scenario.window_millis);
            let total_error: u64 = counts
                .iter()
                .zip(&exact_counts)
                .map(|(a, b)| a.abs_diff(*b))
                .sum();
            let mut over_time = vec![0u64; BUCKETS];
            let bucket = (scenario.duration_millis / BUCKETS as u64).max(1);
            for &t in &admitted_times {
                if let Some(slot) = over_time.get_mut(((t / bucket) as usize).min(BUCKETS - 1)) {
                    *slot += 1;
                }
            }
            Report {
                algorithm,
                offered: times.len() as u64,
                admitted: admitted_times.len() as u64,
                worst_overshoot: most_in_any_window(&admitted_times, scenario.window_millis) as f64
                    / f64::from(scenario.requests_per_unit.max(1)),
                mean_error: total_error as f64
                    / times.len().max(1) as f64
                    / f64::from(scenario.requests_per_unit.max(1)),
                admitted_over_time: over_time,
            }
        })
        .collect()
}

/// For each query time t (ascending), how many of `times` fall in `(t − W, t]`.
fn window_counts(times: &[u64], queries: &[u64], window: u64) -> Vec<u64> {
    let (mut start, mut end) = (0, 0);
    queries
        .iter()
        .map(|&t| {
            while times.get(end).is_some_and(|&x| x <= t) {
                end += 1;
            }
            while times.get(start).is_some_and(|&x| x + window <= t) {
                start += 1;
            }
            end.saturating_sub(start) as u64
        })
        .collect()
}

/// The largest number of times within any half-open window `(t − W, t]`.
fn most_in_any_window(times: &[u64], window: u64) -> u64 {
    let mut start = 0;
    let mut most = 0;
    for (end, &t) in times.iter().enumerate() {
        while times.get(start).is_some_and(|&s| s + window <= t) {
            start += 1;
        }
        most = most.max((end + 1 - start) as u64);
    }
    most
}

pub fn table(scenario: &Scenario, reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pattern {:?}, limit {} per {}, load {}x, {} simulated, seed {}",
        scenario.pattern,
        scenario.requests_per_unit,
        format_duration(scenario.window_millis),
        scenario.load,
        format_duration(scenario.duration_millis),
        scenario.seed
    );
    let _ = writeln!(
        out,
        "{:<15} {:>9} {:>9} {:>9} {:>16} {:>22}",
        "algorithm", "offered", "admitted", "rejected", "worst overshoot", "mean error vs exact"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:<15} {:>9} {:>9} {:>9} {:>15.2}x {:>21.2}%",
            r.algorithm.name(),
            r.offered,
            r.admitted,
            r.offered - r.admitted,
            r.worst_overshoot,
            r.mean_error * 100.0
        );
    }
    out
}

/// An SVG line chart of admitted requests over time, one line per algorithm.
pub fn svg(scenario: &Scenario, reports: &[Report]) -> String {
    const COLOURS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let (width, height, margin) = (900.0, 360.0, 50.0);
    let peak = reports
        .iter()
        .flat_map(|r| r.admitted_over_time.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |i: usize| margin + (width - 2.0 * margin) * i as f64 / (BUCKETS - 1) as f64;
    let y = |v: u64| height - margin - (height - 2.0 * margin) * v as f64 / peak;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(out, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        out,
        "<text x=\"{margin}\" y=\"20\" font-size=\"14\">Admitted per {} — {:?}, limit {} per {}</text>",
        format_duration(scenario.duration_millis / BUCKETS as u64),
        scenario.pattern,
        scenario.requests_per_unit,
        format_duration(scenario.window_millis)
    );
    let _ = writeln!(
        out,
        "<line x1=\"{margin}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        height - margin,
        width - margin,
        height - margin
    );
    let _ = writeln!(
        out,
        "<line x1=\"{margin}\" y1=\"{margin}\" x2=\"{margin}\" y2=\"{}\" stroke=\"black\"/>",
        height - margin
    );
    let _ = writeln!(
        out,
        "<text x=\"5\" y=\"{}\">{peak}</text><text x=\"5\" y=\"{}\">0</text>",
        margin + 4.0,
        height - margin
    );
    for (i, (report, colour)) in reports.iter().zip(COLOURS.iter().cycle()).enumerate() {
        let points: Vec<String> = report
            .admitted_over_time
            .iter()
            .enumerate()
            .map(|(j, &v)| format!("{:.1},{:.1}", x(j), y(v)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{} (worst {:.2}x)</text>",
            width - margin - 200.0,
            margin + 16.0 * i as f64,
            report.algorithm.name(),
            report.worst_overshoot
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(pattern: Pattern) -> Scenario {
        Scenario {
            pattern,
            requests_per_unit: 100,
            window_millis: 60_000,
            load: 2.0,
            duration_millis: 20 * 60_000,
            seed: 7,
        }
    }

    fn report(reports: &[Report], algorithm: Algorithm) -> &Report {
        reports.iter().find(|r| r.algorithm == algorithm).unwrap()
    }

    #[test]
    fn the_boundary_burst_doubles_a_fixed_window_and_not_the_others() {
        let reports = run(&scenario(Pattern::BoundaryBurst), &Algorithm::ALL);
        assert_eq!(
            report(&reports, Algorithm::FixedWindow).worst_overshoot,
            2.0
        );
        assert!(report(&reports, Algorithm::SlidingLog).worst_overshoot <= 1.0);
        assert!(report(&reports, Algorithm::SlidingWindow).worst_overshoot < 1.2);
        assert_eq!(report(&reports, Algorithm::SlidingLog).mean_error, 0.0);
        assert!(
            report(&reports, Algorithm::FixedWindow).mean_error
                > report(&reports, Algorithm::SlidingWindow).mean_error
        );
    }

    #[test]
    fn steady_overload_admits_about_the_limit_rate() {
        let s = scenario(Pattern::Steady);
        let reports = run(&s, &Algorithm::ALL);
        let windows = (s.duration_millis / s.window_millis) as f64;
        for r in &reports {
            let per_window = r.admitted as f64 / windows;
            assert!(
                (80.0..=125.0).contains(&per_window),
                "{:?} admitted {per_window} per window",
                r.algorithm
            );
        }
        // Roughly twice the limit is offered.
        assert!(reports[0].offered as f64 / windows > 180.0);
    }

    #[test]
    fn runs_are_reproducible_and_the_window_count_is_exact() {
        let s = scenario(Pattern::Bursty);
        assert_eq!(run(&s, &Algorithm::ALL), run(&s, &Algorithm::ALL));
        assert_eq!(most_in_any_window(&[0, 10, 999, 1_000, 1_500], 1_000), 3);
        assert_eq!(
            window_counts(&[0, 10, 999, 1_000], &[5, 999, 1_000, 2_500], 1_000),
            [1, 3, 3, 0]
        );
    }

    #[test]
    fn the_plot_has_one_line_per_algorithm() {
        let s = scenario(Pattern::BoundaryBurst);
        let text = svg(&s, &run(&s, &Algorithm::ALL));
        assert_eq!(text.matches("<polyline").count(), 5);
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    }
}
