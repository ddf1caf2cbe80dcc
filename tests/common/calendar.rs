//! The tests' own reading of the calendar, to check calendar windows against: when the
//! coming midnight of some day is in a zone, and how far off it is.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, Zoned};

/// The first instant of the day `next` gives for today in `zone`, and the seconds from now
/// until then.
pub fn midnight_of(zone: &str, next: impl Fn(Date) -> Date) -> (Timestamp, i64) {
    let now = Zoned::now().with_time_zone(TimeZone::get(zone).expect("a zone the database has"));
    let midnight = next(now.date())
        .to_zoned(now.time_zone().clone())
        .expect("the day has a midnight")
        .timestamp();
    (midnight, midnight.as_second() - now.timestamp().as_second())
}

pub fn tomorrow(today: Date) -> Date {
    today.tomorrow().expect("a tomorrow")
}

/// The coming Sunday (a week on, on a Sunday).
pub fn next_sunday(today: Date) -> Date {
    today + Span::new().days(7 - i64::from(today.weekday().to_sunday_zero_offset()))
}

/// The first of next month.
pub fn first_of_next_month(today: Date) -> Date {
    today.first_of_month() + Span::new().months(1)
}
