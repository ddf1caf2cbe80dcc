//! What a rule says: a number of requests per time unit, counted by an algorithm.

use std::fmt;
use std::str::FromStr;

use crate::calendar::Calendar;
use crate::proto::rate_limit_response::rate_limit::Unit as ProtoUnit;

/// The time unit of a limit. Lengths match envoyproxy/ratelimit (a month is 30 days, a
/// year 365), so windows line up with counters an operator migrates from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    pub fn millis(self) -> u64 {
        self.seconds() * 1_000
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// The unit whose length is exactly `millis`, if any.
    pub fn from_millis(millis: u64) -> Option<Unit> {
        Unit::ALL.into_iter().find(|unit| unit.millis() == millis)
    }

    /// The unit of a request-supplied limit override; `None` for UNKNOWN or a number we do not know.
    pub fn from_proto(value: i32) -> Option<Unit> {
        match ProtoUnit::try_from(value).ok()? {
            ProtoUnit::Unknown => None,
            ProtoUnit::Second => Some(Unit::Second),
            ProtoUnit::Minute => Some(Unit::Minute),
            ProtoUnit::Hour => Some(Unit::Hour),
            ProtoUnit::Day => Some(Unit::Day),
            ProtoUnit::Week => Some(Unit::Week),
            ProtoUnit::Month => Some(Unit::Month),
            ProtoUnit::Year => Some(Unit::Year),
        }
    }

    pub fn to_proto(self) -> ProtoUnit {
        match self {
            Unit::Second => ProtoUnit::Second,
            Unit::Minute => ProtoUnit::Minute,
            Unit::Hour => ProtoUnit::Hour,
            Unit::Day => ProtoUnit::Day,
            Unit::Week => ProtoUnit::Week,
            Unit::Month => ProtoUnit::Month,
            Unit::Year => ProtoUnit::Year,
        }
    }
}

impl FromStr for Unit {
    type Err = ();

    /// Case-insensitive, as envoyproxy/ratelimit accepts `minute` and `MINUTE` alike.
    fn from_str(s: &str) -> Result<Self, ()> {
        Unit::ALL
            .into_iter()
            .find(|unit| unit.name().eq_ignore_ascii_case(s))
            .ok_or(())
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How hits are counted against a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Algorithm {
    /// The previous window's count, weighted by how much of it still overlaps the sliding
    /// window, plus the current window's count. No boundary burst; meshlimit's default.
    #[default]
    #[value(name = "sliding_window")]
    SlidingWindow,
    /// Epoch-aligned windows that reset at each boundary: envoyproxy/ratelimit's decisions.
    #[value(name = "fixed_window")]
    FixedWindow,
    /// GCRA, the token bucket kept as one timestamp: a steady rate with bursts up to `burst`.
    #[value(name = "token_bucket")]
    TokenBucket,
    /// Every admitted hit's timestamp: exact, no boundary burst; memory grows with the limit.
    #[value(name = "sliding_log")]
    SlidingLog,
    /// A bucket of `capacity` that drains at the limit's rate; a hit is admitted when it fits.
    #[value(name = "leaky_bucket")]
    LeakyBucket,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] = [
        Algorithm::SlidingWindow,
        Algorithm::FixedWindow,
        Algorithm::TokenBucket,
        Algorithm::SlidingLog,
        Algorithm::LeakyBucket,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::SlidingLog => "sliding_log",
            Algorithm::LeakyBucket => "leaky_bucket",
        }
    }
}

impl FromStr for Algorithm {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Algorithm::ALL
            .into_iter()
            .find(|algorithm| algorithm.name() == s)
            .ok_or(())
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A counted limit: at most `requests_per_unit` hits per window, counted by `algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    pub requests_per_unit: u32,
    /// The window length: a unit's length, or any duration written as `per: 10s`.
    pub window_millis: u64,
    pub algorithm: Algorithm,
    /// Token bucket: the most hits admitted at once (`burst`); leaky bucket: what the bucket
    /// holds (`capacity`). `None` means `requests_per_unit`.
    pub burst: Option<u32>,
    /// `hybrid: true` (fixed window only): with the Redis store, each replica counts locally
    /// and adds its hits to Redis in batches, trading a bounded overshoot for no round trip
    /// per request (`store::redis::hybrid`). The memory store ignores it.
    pub hybrid: bool,
    /// `calendar: <zone>`: the window is that zone's day, week, month or year rather than
    /// `window_millis` since the epoch (which stays the unit's nominal length, for headers).
    pub calendar: Option<Calendar>,
}

impl Limit {
    /// A limit of `requests_per_unit` per `unit`, as envoyproxy/ratelimit's `rate_limit` says.
    pub fn per_unit(requests_per_unit: u32, unit: Unit, algorithm: Algorithm) -> Self {
        Self {
            requests_per_unit,
            window_millis: unit.millis(),
            algorithm,
            burst: None,
            hybrid: false,
            calendar: None,
        }
    }

    pub fn window_millis(&self) -> u64 {
        self.window_millis
    }

    /// The fixed window that holds `now_millis`: a number every instant of it shares, and
    /// how long until it ends.
    #[inline]
    pub fn window_at(&self, now_millis: u64) -> (u64, u64) {
        match self.calendar {
            None => {
                let length = self.window_millis.max(1);
                (now_millis / length, length - now_millis % length)
            }
            Some(calendar) => {
                let window = calendar.window_at(now_millis);
                (window.start_millis, window.end_millis - now_millis)
            }
        }
    }

    /// When the fixed window that holds `now_millis` starts and ends.
    pub fn window_bounds(&self, now_millis: u64) -> (u64, u64) {
        let (window, reset_after_millis) = self.window_at(now_millis);
        let end = now_millis + reset_after_millis;
        match self.calendar {
            Some(_) => (window, end),
            None => (end - self.window_millis.max(1), end),
        }
    }

    /// The unit reported to Envoy: exact when the window is one unit long; otherwise none
    /// (Envoy then leaves the window out of its `x-ratelimit-limit` header).
    pub fn unit(&self) -> Option<Unit> {
        Unit::from_millis(self.window_millis)
    }

    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_unit)
    }
}

impl fmt::Display for Limit {
    /// `100/minute`, or `10/10s` for windows that are not one unit.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.requests_per_unit)?;
        match self.unit() {
            Some(unit) => write!(f, "{unit}")?,
            None => write!(f, "{}", crate::limit::format_duration(self.window_millis))?,
        }
        write!(f, " {}", self.algorithm)?;
        if let Some(calendar) = self.calendar {
            write!(f, " calendar {}", calendar.zone.name())?;
            if calendar.week_starts() != jiff::civil::Weekday::Monday {
                write!(f, " from {:?}", calendar.week_starts())?;
            }
        }
        match self.algorithm {
            Algorithm::TokenBucket => write!(f, " burst {}", self.burst())?,
            Algorithm::LeakyBucket => write!(f, " capacity {}", self.burst())?,
            _ => {}
        }
        Ok(())
    }
}

/// `1500ms`, `10s`, `5m`, `2h`, `3d`: the shortest exact spelling.
pub fn format_duration(millis: u64) -> String {
    let mut out = String::new();
    write_duration(&mut out, millis);
    out
}

/// `format_duration` into an existing buffer: the counter key path writes one per key and
/// must not allocate for it.
pub fn write_duration(out: &mut String, millis: u64) {
    // The windows of Envoy's units are spelled from a table; the search below divides by
    // every unit size, which on the counter key path cost more than the rest of the key.
    let common = match millis {
        1_000 => "1s",
        60_000 => "1m",
        3_600_000 => "1h",
        86_400_000 => "1d",
        _ => "",
    };
    if !common.is_empty() {
        out.push_str(common);
        return;
    }
    const STEPS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    let (count, suffix) = STEPS
        .iter()
        .find(|(size, _)| millis >= *size && millis.is_multiple_of(*size))
        .map_or((millis, "ms"), |(size, suffix)| (millis / size, *suffix));
    push_decimal(out, count);
    out.push_str(suffix);
}

/// Appends `n` in decimal. Counter keys are built on every request, and `write!` through
/// `core::fmt` cost more than the rest of the key.
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        start -= 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &digit in digits.iter().skip(start) {
        out.push(char::from(digit));
    }
}

/// Parses `per:` durations: a whole number followed by ms, s, m, h or d.
pub fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, suffix) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let scale = match suffix {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.checked_mul(scale).filter(|millis| *millis > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_stays_24_bytes_with_its_calendar() {
        // The request path copies a check's limit several times; a calendar's zone is a
        // table number, not a reference, and its unit and week's first day one byte, to
        // keep it so (32 bytes cost a request at 8 descriptors ~0.1 % instructions).
        assert!(
            std::mem::size_of::<Limit>() <= 24,
            "{}",
            std::mem::size_of::<Limit>()
        );
    }

    #[test]
    fn decimals_are_written_without_fmt() {
        for n in [0, 7, 10, 1_000, 4_000_000_000, u64::MAX] {
            let mut out = String::from("x");
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}"));
        }
    }

    #[test]
    fn durations_parse_and_print_back() {
        for (text, millis) in [
            ("10s", 10_000),
            ("1500ms", 1_500),
            ("5m", 300_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
        ] {
            assert_eq!(parse_duration(text), Some(millis), "{text}");
            assert_eq!(format_duration(millis), text);
        }
        for bad in ["", "10", "s", "0s", "1.5s", "10 minutes", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
