//! Calendar windows: a limit's day, week, month or year as a time zone's calendar has
//! them (`calendar: Europe/Berlin` on a limit), so a plan's "10 000 calls a month" starts
//! over on the 1st at midnight where its customer is, and a daily budget at local midnight.
//!
//! envoyproxy/ratelimit's units are fixed lengths aligned to the Unix epoch: its month is
//! 30 days, so a monthly quota resets on a different day each month, at 00:00 UTC. A
//! calendar window has the calendar's length instead (28 to 31 days; a day of 23 or 25
//! hours when the clocks change) and is counted as a fixed window (`fixed_window`), whose
//! count starts over at each boundary.
//!
//! The zone rules are jiff's bundled copy of the IANA database, not the host's, so every
//! replica sharing counters in Redis agrees on where a window starts.
//!
//! A week starts on Monday (ISO 8601), or on the day `week_starts` names: Sunday in the
//! United States, Saturday across much of the Middle East.

use std::cell::Cell;
use std::fmt;

use jiff::ToSpan;
use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use parking_lot::RwLock;

use crate::limit::Unit;

/// A limit's calendar: which unit, in which zone, and for weeks the day they start on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Calendar {
    period: Period,
    pub zone: Zone,
}

/// The unit, and a week's first day, in one byte: the week's weekday leaves the other
/// units (and `Option`'s `None`) values of the same byte, so `Limit` stays 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Period {
    Day,
    Week(Weekday),
    Month,
    Year,
}

/// An IANA time zone, interned so a `Limit` holding one stays small and `Copy`: its
/// number in the table of zones named so far, one byte, so a limit with its calendar is
/// the 24 bytes it was without (the request path copies a check's limit several times: a
/// reference made it 40 bytes and a request at 8 descriptors +0.4 % instructions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Zone(u8);

struct Interned {
    name: Box<str>,
    time_zone: TimeZone,
}

/// The zones named so far. A config names a handful; the database holds about 600, so the
/// table (and the entries leaked into it) stays bounded however often configs reload.
static ZONES: RwLock<Vec<&'static Interned>> = RwLock::new(Vec::new());

impl Zone {
    /// The zone an IANA name (`UTC`, `Europe/Berlin`; any case) stands for.
    pub fn named(name: &str) -> Result<Zone, String> {
        let time_zone = TimeZone::get(name.trim()).map_err(|_| unknown_zone(name))?;
        // Spelled as the database does, so `europe/berlin` and `Europe/Berlin` count on
        // the same key.
        let canonical = time_zone.iana_name().unwrap_or(name).to_string();
        let find = |zones: &[&'static Interned]| {
            let at = zones.iter().position(|z| *z.name == canonical)?;
            u8::try_from(at).ok().map(Zone)
        };
        if let Some(zone) = find(&ZONES.read()) {
            return Ok(zone);
        }
        let mut zones = ZONES.write();
        if let Some(zone) = find(&zones) {
            return Ok(zone);
        }
        let at = u8::try_from(zones.len()).map_err(|_| {
            format!("`{name}` would be the 257th time zone this process has seen; a config names a few — restart meshlimit if reloads went through hundreds")
        })?;
        zones.push(Box::leak(Box::new(Interned {
            name: canonical.into_boxed_str(),
            time_zone,
        })));
        Ok(Zone(at))
    }

    pub fn name(self) -> &'static str {
        self.interned().map_or("UTC", |z| &z.name)
    }

    /// Only `named` makes a `Zone`, after its entry is in the table.
    fn interned(self) -> Option<&'static Interned> {
        ZONES.read().get(usize::from(self.0)).copied()
    }

    fn time_zone(self) -> &'static TimeZone {
        static UTC: TimeZone = TimeZone::UTC;
        self.interned().map_or(&UTC, |z| &z.time_zone)
    }
}

fn unknown_zone(name: &str) -> String {
    let wanted = name.trim().to_ascii_lowercase();
    // A close spelling is most often a city without its region, or a typo in case.
    let close = jiff::tz::db()
        .available()
        .map(|n| n.as_str().to_string())
        .find(|n| {
            let lower = n.to_ascii_lowercase();
            lower.rsplit('/').next() == Some(wanted.as_str())
                || lower.replace('_', " ") == wanted.replace('_', " ")
        });
    match close {
        Some(close) => format!("unknown time zone `{name}`; did you mean `{close}`?"),
        None => format!(
            "unknown time zone `{name}`; write an IANA name such as `UTC`, `Europe/Berlin` or `America/New_York`"
        ),
    }
}

/// One calendar window: when it starts and when the next one does, in milliseconds since
/// the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_millis: u64,
    pub end_millis: u64,
}

thread_local! {
    /// The window the last decision on this thread fell in: most decisions fall in the
    /// window of the one before, and finding it in the zone's rules costs more than the
    /// rest of a fixed window's arithmetic.
    static LAST: Cell<Option<(Calendar, Window)>> = const { Cell::new(None) };
}

impl Calendar {
    /// The units a calendar has: shorter ones start on the same boundaries as their fixed
    /// windows in every zone whose offset is whole hours.
    pub const UNITS: [Unit; 4] = [Unit::Day, Unit::Week, Unit::Month, Unit::Year];

    pub fn new(unit: Unit, zone: Zone) -> Result<Calendar, String> {
        if Self::UNITS.contains(&unit) {
            let period = match unit {
                Unit::Week => Period::Week(Weekday::Monday),
                Unit::Month => Period::Month,
                Unit::Year => Period::Year,
                _ => Period::Day,
            };
            Ok(Calendar { period, zone })
        } else {
            Err(format!(
                "`calendar` windows are days, weeks, months or years; a window of one {unit} needs none, so drop `calendar`, or write `unit: day`"
            ))
        }
    }

    /// Weeks that start on `day` rather than Monday.
    pub fn starting_weeks_on(self, day: Weekday) -> Result<Calendar, String> {
        match self.unit() {
            Unit::Week => Ok(Calendar {
                period: Period::Week(day),
                ..self
            }),
            unit => Err(format!(
                "`week_starts` applies to `unit: week`; a {unit} starts on its first day whatever the weekday — drop `week_starts`"
            )),
        }
    }

    pub fn unit(self) -> Unit {
        match self.period {
            Period::Day => Unit::Day,
            Period::Week(_) => Unit::Week,
            Period::Month => Unit::Month,
            Period::Year => Unit::Year,
        }
    }

    /// The day a week starts on; Monday for the other units.
    pub fn week_starts(self) -> Weekday {
        match self.period {
            Period::Week(day) => day,
            _ => Weekday::Monday,
        }
    }

    /// Appends the unit as counter keys name it: `week-sunday` for weeks that start on
    /// Sunday, so their counts are not a Monday week's.
    pub fn push_key_unit(self, out: &mut String) {
        out.push_str(self.unit().name());
        if self.week_starts() != Weekday::Monday {
            out.push('-');
            out.push_str(weekday_name(self.week_starts()));
        }
    }

    /// The unit's byte in a packed key: the unit, with the week's first day in the high
    /// bits when it is not Monday (so a Monday week's key is what it always was).
    pub fn key_byte(self) -> u8 {
        let offset = self.week_starts().to_monday_zero_offset() as u8;
        self.unit() as u8 | offset << 4
    }

    /// The window that holds `now_millis`.
    pub fn window_at(self, now_millis: u64) -> Window {
        if let Some((calendar, window)) = LAST.get()
            && calendar == self
            && (window.start_millis..window.end_millis).contains(&now_millis)
        {
            return window;
        }
        let window = window_in(
            self.zone.time_zone(),
            self.unit(),
            self.week_starts(),
            now_millis,
        );
        LAST.set(Some((self, window)));
        window
    }

    /// The longest a window of this unit lasts: a state is kept this long after its last
    /// change (a 31-day month with the hour the clocks went back).
    pub fn longest_millis(self) -> u64 {
        let days = match self.unit() {
            Unit::Week => 7,
            Unit::Month => 31,
            Unit::Year => 366,
            _ => 1,
        };
        (days * 24 + 1) * 3_600_000
    }
}

/// `week from Sunday`, or the unit's name: how a description names the window.
impl fmt::Display for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.week_starts() {
            Weekday::Monday => write!(f, "{}", self.unit()),
            day => write!(f, "week from {day:?}"),
        }
    }
}

/// A weekday as `week_starts` spells it: `monday` … `sunday`, any case.
pub fn parse_weekday(text: &str) -> Result<Weekday, String> {
    let wanted = text.trim().to_ascii_lowercase();
    (0..7)
        .filter_map(|offset| Weekday::from_monday_zero_offset(offset).ok())
        .find(|day| {
            let name = weekday_name(*day);
            name == wanted || (wanted.len() >= 3 && name.starts_with(&wanted))
        })
        .ok_or_else(|| {
            format!("`{text}` is not a weekday; write `week_starts: sunday` (or monday … saturday)")
        })
}

/// A weekday as configs and `/v1/usage` write it: `sunday`.
pub fn weekday_name(day: Weekday) -> &'static str {
    match day {
        Weekday::Monday => "monday",
        Weekday::Tuesday => "tuesday",
        Weekday::Wednesday => "wednesday",
        Weekday::Thursday => "thursday",
        Weekday::Friday => "friday",
        Weekday::Saturday => "saturday",
        Weekday::Sunday => "sunday",
    }
}

/// The `unit` of `zone`'s calendar that holds `now_millis`; weeks start on `week_starts`.
fn window_in(zone: &TimeZone, unit: Unit, week_starts: Weekday, now_millis: u64) -> Window {
    let found = timestamp(now_millis).and_then(|at| {
        let today = zone.to_datetime(at).date();
        let first = match unit {
            Unit::Week => today
                .checked_sub(i64::from(today.weekday().since(week_starts)).days())
                .ok()?,
            Unit::Month => today.first_of_month(),
            Unit::Year => today.first_of_year(),
            _ => today,
        };
        let next = match unit {
            Unit::Week => first.checked_add(1.week()),
            Unit::Month => first.checked_add(1.month()),
            Unit::Year => first.checked_add(1.year()),
            _ => first.checked_add(1.day()),
        }
        .ok()?;
        Some(Window {
            start_millis: midnight(first, zone)?,
            end_millis: midnight(next, zone)?,
        })
    });
    // Only an instant past jiff's year 9999 has no window; count it in the unit's
    // epoch-aligned one rather than fail a decision.
    found
        .filter(|w| (w.start_millis..w.end_millis).contains(&now_millis))
        .unwrap_or_else(|| {
            let length = unit.millis();
            let start = now_millis - now_millis % length;
            Window {
                start_millis: start,
                end_millis: start + length,
            }
        })
}

/// `millis` in RFC 3339 with `zone`'s offset at that instant, for `/v1/usage`:
/// `2027-03-01T00:00:00+13:00` (milliseconds when there are any).
pub fn rfc3339_in(millis: u64, zone: Zone) -> Option<String> {
    let at = timestamp(millis)?;
    let offset = zone.time_zone().to_offset(at);
    Some(at.display_with_offset(offset).to_string())
}

/// `millis` as a reader of `zone`'s clocks says it, with its offset, for `explain`:
/// `2026-03-01 00:00:00 +01:00`; `UTC` without a zone.
pub fn local_time(millis: u64, zone: Option<Zone>) -> String {
    let Some(at) = timestamp(millis) else {
        return format!("{millis} ms after the Unix epoch");
    };
    match zone {
        None => at.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
        Some(zone) => at
            .to_zoned(zone.time_zone().clone())
            .strftime("%Y-%m-%d %H:%M:%S %:z")
            .to_string(),
    }
}

/// `millis` since the Unix epoch as an instant; none past jiff's year 9999.
pub fn timestamp(millis: u64) -> Option<jiff::Timestamp> {
    i64::try_from(millis)
        .ok()
        .and_then(|millis| jiff::Timestamp::from_millisecond(millis).ok())
}

/// The first instant of `date` in `zone` (where the clocks skip midnight, the instant
/// they land on).
fn midnight(date: Date, zone: &TimeZone) -> Option<u64> {
    let start = date.to_zoned(zone.clone()).ok()?.start_of_day().ok()?;
    u64::try_from(start.timestamp().as_millisecond()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(text: &str) -> u64 {
        let at: jiff::Timestamp = text.parse().unwrap();
        at.as_millisecond() as u64
    }

    fn window(unit: Unit, zone: &str, at: &str) -> (u64, u64) {
        let calendar = Calendar::new(unit, Zone::named(zone).unwrap()).unwrap();
        let w = calendar.window_at(millis(at));
        (w.start_millis, w.end_millis)
    }

    #[test]
    fn local_time_carries_the_offset_of_its_instant() {
        let berlin = Some(Zone::named("Europe/Berlin").unwrap());
        assert_eq!(
            local_time(millis("2026-02-28T23:00:00Z"), berlin),
            "2026-03-01 00:00:00 +01:00"
        );
        assert_eq!(
            local_time(millis("2026-03-31T22:00:00Z"), berlin),
            "2026-04-01 00:00:00 +02:00"
        );
        assert_eq!(
            local_time(millis("2026-12-07T17:30:05Z"), None),
            "2026-12-07 17:30:05 UTC"
        );
    }

    #[test]
    fn rfc3339_in_a_zone_names_the_instant_with_its_offset_then() {
        let auckland = Zone::named("Pacific/Auckland").unwrap();
        assert_eq!(
            rfc3339_in(millis("2027-02-28T11:00:00Z"), auckland).unwrap(),
            "2027-03-01T00:00:00+13:00"
        );
        assert_eq!(
            rfc3339_in(millis("2027-06-30T12:00:00.250Z"), auckland).unwrap(),
            "2027-07-01T00:00:00.25+12:00"
        );
    }

    #[test]
    fn a_month_runs_from_the_first_to_the_first_in_its_zone() {
        assert_eq!(
            window(Unit::Month, "UTC", "2026-02-14T12:00:00Z"),
            (
                millis("2026-02-01T00:00:00Z"),
                millis("2026-03-01T00:00:00Z")
            )
        );
        // Berlin is an hour ahead in winter: its February starts at 23:00 UTC on 31 January.
        assert_eq!(
            window(Unit::Month, "Europe/Berlin", "2026-01-31T23:30:00Z"),
            (
                millis("2026-01-31T23:00:00Z"),
                millis("2026-02-28T23:00:00Z")
            )
        );
        // A leap year's February.
        let (start, end) = window(Unit::Month, "UTC", "2028-02-29T23:59:59Z");
        assert_eq!(end - start, 29 * 86_400_000);
    }

    #[test]
    fn a_day_lasts_23_or_25_hours_when_the_clocks_change() {
        let (start, end) = window(Unit::Day, "Europe/Berlin", "2026-03-29T12:00:00Z");
        assert_eq!(start, millis("2026-03-28T23:00:00Z"));
        assert_eq!(end - start, 23 * 3_600_000);
        let (start, end) = window(Unit::Day, "America/New_York", "2026-11-01T12:00:00Z");
        assert_eq!(start, millis("2026-11-01T04:00:00Z"));
        assert_eq!(end - start, 25 * 3_600_000);
        // A zone half an hour off the hour.
        assert_eq!(
            window(Unit::Day, "Asia/Kolkata", "2026-06-01T18:29:59Z").1,
            millis("2026-06-01T18:30:00Z")
        );
    }

    #[test]
    fn a_week_starts_on_monday_and_a_year_on_the_first_of_january() {
        // 2026-12-07 is a Monday; the Sunday before belongs to the week before.
        assert_eq!(
            window(Unit::Week, "UTC", "2026-12-09T08:00:00Z"),
            (
                millis("2026-12-07T00:00:00Z"),
                millis("2026-12-14T00:00:00Z")
            )
        );
        assert_eq!(
            window(Unit::Week, "UTC", "2026-12-06T23:59:59Z").0,
            millis("2026-11-30T00:00:00Z")
        );
        assert_eq!(
            window(Unit::Year, "Asia/Tokyo", "2026-12-31T15:00:00Z"),
            (
                millis("2026-12-31T15:00:00Z"),
                millis("2027-12-31T15:00:00Z")
            )
        );
    }

    /// A week from Sunday in New York, from Saturday in Riyadh: the day named starts it at
    /// local midnight, and the day before ends it.
    #[test]
    fn a_week_starts_on_the_day_week_starts_names() {
        let week = |zone: &str, day: &str, at: &str| {
            let calendar = Calendar::new(Unit::Week, Zone::named(zone).unwrap())
                .unwrap()
                .starting_weeks_on(parse_weekday(day).unwrap())
                .unwrap();
            let w = calendar.window_at(millis(at));
            (w.start_millis, w.end_millis)
        };
        // Monday 2026-12-07, noon in New York: its week began on Sunday the 6th.
        assert_eq!(
            week("America/New_York", "sunday", "2026-12-07T17:00:00Z"),
            (
                millis("2026-12-06T05:00:00Z"),
                millis("2026-12-13T05:00:00Z")
            )
        );
        // Saturday 23:30 in New York is still that week; its Sunday starts the next.
        assert_eq!(
            week("America/New_York", "Sun", "2026-12-13T04:30:00Z").1,
            millis("2026-12-13T05:00:00Z")
        );
        assert_eq!(
            week("Asia/Riyadh", "SATURDAY", "2026-12-07T17:00:00Z"),
            (
                millis("2026-12-04T21:00:00Z"),
                millis("2026-12-11T21:00:00Z")
            )
        );
        // A week from Monday is the calendar with no `week_starts`.
        let utc = Calendar::new(Unit::Week, Zone::named("UTC").unwrap()).unwrap();
        assert_eq!(utc.starting_weeks_on(Weekday::Monday), Ok(utc));
        assert_eq!(utc.to_string(), "week");
        let sunday = utc.starting_weeks_on(Weekday::Sunday).unwrap();
        assert_eq!(sunday.to_string(), "week from Sunday");
        let (mut monday_key, mut sunday_key) = (String::new(), String::new());
        utc.push_key_unit(&mut monday_key);
        sunday.push_key_unit(&mut sunday_key);
        assert_eq!(
            (monday_key.as_str(), sunday_key.as_str()),
            ("week", "week-sunday")
        );
        assert_eq!(utc.key_byte(), Unit::Week as u8);
        assert_ne!(sunday.key_byte(), utc.key_byte());
    }

    #[test]
    fn week_starts_is_a_weekday_and_only_for_weeks() {
        assert_eq!(parse_weekday(" Wed "), Ok(Weekday::Wednesday));
        assert!(
            parse_weekday("su")
                .unwrap_err()
                .contains("`su` is not a weekday; write `week_starts: sunday`")
        );
        let month = Calendar::new(Unit::Month, Zone::named("UTC").unwrap()).unwrap();
        assert!(
            month
                .starting_weeks_on(Weekday::Sunday)
                .unwrap_err()
                .contains("`week_starts` applies to `unit: week`")
        );
    }

    #[test]
    fn the_window_cached_for_a_thread_is_left_at_its_end() {
        let calendar = Calendar::new(Unit::Day, Zone::named("UTC").unwrap()).unwrap();
        let last_millisecond = millis("2026-12-07T23:59:59.999Z");
        assert_eq!(
            calendar.window_at(last_millisecond).start_millis,
            millis("2026-12-07T00:00:00Z")
        );
        assert_eq!(
            calendar.window_at(last_millisecond + 1).start_millis,
            millis("2026-12-08T00:00:00Z")
        );
        // Another calendar on the same thread is not answered from the first one's window.
        let tokyo = Calendar::new(Unit::Day, Zone::named("Asia/Tokyo").unwrap()).unwrap();
        assert_eq!(
            tokyo.window_at(last_millisecond + 1).start_millis,
            millis("2026-12-07T15:00:00Z")
        );
    }

    #[test]
    fn zones_are_named_as_the_database_spells_them() {
        let berlin = Zone::named("europe/berlin").unwrap();
        assert_eq!(berlin, Zone::named("Europe/Berlin").unwrap());
        assert_eq!(berlin.name(), "Europe/Berlin");
        assert_eq!(
            Zone::named("Berlin").unwrap_err(),
            "unknown time zone `Berlin`; did you mean `Europe/Berlin`?"
        );
        assert!(
            Zone::named("Mars/Olympus")
                .unwrap_err()
                .contains("write an IANA name such as `UTC`")
        );
        assert!(
            Calendar::new(Unit::Hour, berlin)
                .unwrap_err()
                .contains("days, weeks, months or years")
        );
    }

    #[test]
    fn every_zone_of_the_database_tiles_2026_with_its_days_weeks_and_months() {
        // Zones whose clocks skip or repeat midnight (Santiago, Havana, Beirut, …) included:
        // each window starts where the one before ended, holds its instants, and is as
        // long as a day or a month can be there.
        let (from, to) = (
            millis("2026-01-01T00:00:00Z"),
            millis("2027-01-01T00:00:00Z"),
        );
        let mut zones = 0;
        for name in jiff::tz::db().available() {
            let zone = TimeZone::get(name.as_str()).unwrap();
            zones += 1;
            for (unit, first_day, shortest, longest) in [
                (Unit::Day, Weekday::Monday, 22 * 3_600_000, 26 * 3_600_000),
                (
                    Unit::Week,
                    Weekday::Sunday,
                    7 * 86_400_000 - 7_200_000,
                    7 * 86_400_000 + 7_200_000,
                ),
                (
                    Unit::Month,
                    Weekday::Monday,
                    27 * 86_400_000,
                    32 * 86_400_000,
                ),
            ] {
                let mut at = from;
                let mut previous_end = None;
                while at < to {
                    let w = window_in(&zone, unit, first_day, at);
                    assert!(
                        w.start_millis <= at && at < w.end_millis,
                        "{name:?} {unit} at {at}"
                    );
                    let length = w.end_millis - w.start_millis;
                    assert!(
                        (shortest..=longest).contains(&length),
                        "{name:?} {unit} of {length} ms at {at}"
                    );
                    if let Some(end) = previous_end {
                        assert_eq!(
                            w.start_millis, end,
                            "{name:?} {unit}: a gap or overlap at {at}"
                        );
                    }
                    previous_end = Some(w.end_millis);
                    at = w.end_millis;
                }
            }
        }
        assert!(zones > 400, "the bundled database has its zones: {zones}");
    }

    #[test]
    fn a_window_is_never_longer_than_its_longest() {
        for unit in Calendar::UNITS {
            let calendar = Calendar::new(unit, Zone::named("America/New_York").unwrap()).unwrap();
            let mut at = millis("2024-01-01T00:00:00Z");
            while at < millis("2029-01-01T00:00:00Z") {
                let w = calendar.window_at(at);
                assert!(w.start_millis <= at && at < w.end_millis);
                assert!(w.end_millis - w.start_millis <= calendar.longest_millis());
                at = w.end_millis;
            }
        }
    }
}
