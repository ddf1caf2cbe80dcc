//! What a rule says: a number of requests per time unit, counted by an algorithm.

use std::fmt;
use std::str::FromStr;

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
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::SlidingWindow, Algorithm::FixedWindow];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
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

/// A counted limit: at most `requests_per_unit` hits per `unit`, counted by `algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub unit: Unit,
    pub algorithm: Algorithm,
}

impl Limit {
    pub fn window_millis(&self) -> u64 {
        self.unit.millis()
    }
}
