//! Maintenance windows: when a rollout may dispatch.
//!
//! A [`Window`] is a cron pattern that marks when the window *opens*, a
//! duration (at least [`MIN_DURATION_MINUTES`]) and a named IANA time zone the
//! pattern is read in. It is open at an instant `t` when some opening `S`
//! satisfies `S <= t < S + duration`. The duration is elapsed time, so a
//! window of 60 minutes is open for 60 real minutes even across a DST change.
//!
//! A [`Schedule`] is the union of its windows; an empty schedule is always
//! open (the default: no restriction).
//!
//! Cron patterns follow POSIX: `min hour dom month dow`, optionally with a
//! leading seconds field, or one of `@hourly`, `@daily`, `@weekly`,
//! `@monthly`, `@yearly`/`@annually`. Day of week 0 and 7 are Sunday, so
//! `1-5` is Monday to Friday; when both day of month and day of week are
//! restricted, either matching is enough (POSIX), unless the day of week is
//! prefixed with `+`. Croner's extensions (`L`, `W`, `#`, names like `MON`)
//! are accepted too.
//!
//! Daylight saving time, in the window's zone:
//! - an opening that falls into a spring-forward gap (e.g. `30 2 * * *` in
//!   Europe/Berlin on the last Sunday of March) opens at the first instant
//!   after the gap (03:00 local) that day;
//! - a wall-clock opening that the fall-back hour repeats opens once, on its
//!   first occurrence, when the pattern fixes a single second, minute and
//!   hour (`30 2 * * *`). A pattern with several times of day (`*/15 * * *
//!   *`, `0 2,14 * * *`) opens on both occurrences, so a window that is open
//!   around the clock stays open through the repeated hour.
//!
//! Instants are Unix milliseconds (`u64`), like the rest of the runner.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, Offset, TimeZone};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::{Cron, JobType};
use serde::{Deserialize, Serialize};

/// The shortest window allowed, in minutes.
pub const MIN_DURATION_MINUTES: u32 = 30;

/// What [`Window::close_of`] and [`Schedule::close_of`] return for a window
/// that stays open beyond their look-ahead (about a year): it does not close
/// in any future the runner plans for. An empty schedule never closes.
pub const NEVER_CLOSES: u64 = u64::MAX;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const DAY_SECS: i64 = 24 * 60 * 60;
/// How far ahead `close_of` follows back-to-back openings, and `next_open`
/// looks for a spring-forward gap when the pattern has no next opening.
const HORIZON_MS: u64 = 366 * 24 * 60 * MINUTE_MS;

const NICKNAMES: [&str; 6] = [
    "@hourly",
    "@daily",
    "@weekly",
    "@monthly",
    "@yearly",
    "@annually",
];

/// Why a window was rejected. Each message says what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("invalid cron '{cron}': {reason}")]
    InvalidCron { cron: String, reason: String },
    #[error(
        "duration {minutes} min is below the {MIN_DURATION_MINUTES} min minimum: \
         use a duration_minutes of at least {MIN_DURATION_MINUTES}"
    )]
    DurationTooShort { minutes: u32 },
    #[error(
        "unknown time zone '{timezone}': use an IANA name like Europe/Berlin{}",
        did_you_mean(.suggestion)
    )]
    UnknownTimeZone {
        timezone: String,
        /// A zone whose name differs only in case, if there is one.
        suggestion: Option<String>,
    },
    #[error("instant {at_ms} ms is past the end of the calendar")]
    OutOfRange { at_ms: u64 },
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(name) => format!(" (did you mean {name}?)"),
        None => String::new(),
    }
}

/// A maintenance window: opens at each time `cron` matches in `timezone` and
/// stays open for `duration_minutes`.
///
/// Always valid: [`Window::parse`] and deserialization are the only ways to
/// make one. The pattern is compiled once, so [`Window::is_open`] does not
/// parse. Serializes as `{"cron", "duration_minutes", "timezone"}`; equality
/// compares those three fields as written.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "WindowSpec")]
pub struct Window {
    cron: String,
    duration_minutes: u32,
    timezone: String,
    #[serde(skip_serializing)]
    compiled: Compiled,
}

/// The parsed form of a window, kept next to its text.
#[derive(Clone)]
struct Compiled {
    pattern: Cron,
    tz: Tz,
    duration_ms: u64,
    /// Croner's "fixed-time job" (one second, minute and hour). Croner moves
    /// such a job out of a spring-forward gap itself; other patterns need
    /// [`Window::gap_openings`].
    fixed_time: bool,
}

/// The serialized shape of a [`Window`], validated on the way in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowSpec {
    cron: String,
    /// Default: a whole day, as the EnOS OTA reference has it.
    #[serde(default = "default_duration")]
    duration_minutes: u32,
    timezone: String,
}

/// A window's length when none is given: 24 hours.
pub const DEFAULT_DURATION_MINUTES: u32 = 24 * 60;

fn default_duration() -> u32 {
    DEFAULT_DURATION_MINUTES
}

impl TryFrom<WindowSpec> for Window {
    type Error = WindowError;

    fn try_from(spec: WindowSpec) -> Result<Self, Self::Error> {
        Window::parse(&spec.cron, spec.duration_minutes, &spec.timezone)
    }
}

impl Window {
    /// Validates and compiles a window. `cron` and `timezone` are trimmed.
    pub fn parse(cron: &str, duration_minutes: u32, timezone: &str) -> Result<Window, WindowError> {
        let cron = cron.trim();
        let timezone = timezone.trim();
        let pattern = compile_cron(cron)?;
        if duration_minutes < MIN_DURATION_MINUTES {
            return Err(WindowError::DurationTooShort {
                minutes: duration_minutes,
            });
        }
        let tz = parse_timezone(timezone)?;
        let fixed_time = pattern.determine_job_type() == JobType::FixedTime;
        Ok(Window {
            cron: cron.to_owned(),
            duration_minutes,
            timezone: timezone.to_owned(),
            compiled: Compiled {
                pattern,
                tz,
                duration_ms: u64::from(duration_minutes) * MINUTE_MS,
                fixed_time,
            },
        })
    }

    /// The cron pattern, as written (trimmed).
    pub fn cron(&self) -> &str {
        &self.cron
    }

    pub fn duration_minutes(&self) -> u32 {
        self.duration_minutes
    }

    /// The IANA name of the zone the pattern is read in.
    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    /// Whether the window is open at `at_ms` (Unix milliseconds).
    pub fn is_open(&self, at_ms: u64) -> bool {
        self.open_start(at_ms).is_some()
    }

    /// The earliest instant `>= after_ms` at which the window is open:
    /// `after_ms` itself when it is open then. `None` only past the end of the
    /// calendar (year 262143).
    pub fn next_open(&self, after_ms: u64) -> Option<u64> {
        if self.is_open(after_ms) {
            return Some(after_ms);
        }
        let c = &self.compiled;
        let local = local_time(c.tz, after_ms)?;
        // Not open at `after_ms`, so no opening lies in
        // [floor_to_second(after_ms), after_ms]: the next one is after it.
        let next = c
            .pattern
            .find_next_occurrence(&local, true)
            .ok()
            .and_then(|dt| unix_ms(&dt));
        if c.fixed_time {
            return next;
        }
        // A gap opening croner skips may come first.
        let lo = (after_ms.div_ceil(SECOND_MS) as i64) - 1;
        let hi = next.unwrap_or_else(|| after_ms.saturating_add(HORIZON_MS)) / SECOND_MS;
        let gap = self
            .gap_openings(lo, i64::try_from(hi).ok()?)
            .first()
            .copied();
        match (next, gap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the window that is open at `at_ms` closes: the end of the
    /// contiguous open span, following openings that start before the
    /// previous one ends. `None` when the window is closed at `at_ms`;
    /// [`NEVER_CLOSES`] when it is still open a year later.
    pub fn close_of(&self, at_ms: u64) -> Option<u64> {
        let d = self.compiled.duration_ms;
        let mut end = self.open_start(at_ms)?.saturating_add(d);
        let limit = at_ms.saturating_add(HORIZON_MS);
        // Each opening found here starts at or before `end` and ends after
        // it, so `end` grows every round.
        while let Some(start) = self.open_start(end) {
            let later = start.saturating_add(d);
            if later <= end {
                break;
            }
            end = later;
            if end > limit {
                return Some(NEVER_CLOSES);
            }
        }
        Some(end)
    }

    /// The latest opening `S <= at_ms` with `at_ms < S + duration`, if any.
    /// The latest opening before `at_ms` ends last, so it is the only one to
    /// check.
    fn open_start(&self, at_ms: u64) -> Option<u64> {
        let c = &self.compiled;
        let local = local_time(c.tz, at_ms)?;
        let open = c
            .pattern
            .find_previous_occurrence(&local, true)
            .ok()
            .and_then(|dt| unix_ms(&dt))
            .filter(|&start| at_ms < start.saturating_add(c.duration_ms));
        if open.is_some() || c.fixed_time {
            return open;
        }
        // Croner skips the openings of a multi-time pattern that fall in a
        // spring-forward gap; they open at the gap's end. Only a gap end in
        // (at - duration, at] can hold `at_ms` open.
        let lo = at_ms.saturating_sub(c.duration_ms) / SECOND_MS;
        let hi = at_ms / SECOND_MS;
        self.gap_openings(i64::try_from(lo).ok()?, i64::try_from(hi).ok()?)
            .last()
            .copied()
            .filter(|&start| start <= at_ms && at_ms < start.saturating_add(c.duration_ms))
    }

    /// Openings at the end of spring-forward gaps whose transition lies in
    /// (`lo`, `hi`] (Unix seconds), in order: one for each gap in which the
    /// pattern matches some wall-clock time.
    fn gap_openings(&self, lo: i64, hi: i64) -> Vec<u64> {
        let c = &self.compiled;
        spring_forward_gaps(c.tz, lo, hi)
            .into_iter()
            .filter(|gap| {
                c.pattern
                    .find_next_occurrence(&gap.start, true)
                    .is_ok_and(|wall| wall < gap.end)
            })
            .filter_map(|gap| u64::try_from(gap.at_secs).ok())
            .map(|secs| secs * SECOND_MS)
            .collect()
    }
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        self.cron == other.cron
            && self.duration_minutes == other.duration_minutes
            && self.timezone == other.timezone
    }
}

impl Eq for Window {}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Window")
            .field("cron", &self.cron)
            .field("duration_minutes", &self.duration_minutes)
            .field("timezone", &self.timezone)
            .finish()
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' for {} min ({})",
            self.cron, self.duration_minutes, self.timezone
        )
    }
}

/// When a rollout may dispatch: the union of its windows. Empty (the
/// default) means always open. Serializes as `{"windows": [...]}`; a missing
/// `windows` is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    #[serde(default)]
    windows: Vec<Window>,
}

impl Schedule {
    pub fn new(windows: Vec<Window>) -> Schedule {
        Schedule { windows }
    }

    /// No restriction: always open.
    pub fn always() -> Schedule {
        Schedule::default()
    }

    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    pub fn is_always_open(&self) -> bool {
        self.windows.is_empty()
    }

    /// Whether any window is open at `at_ms` (always, when there are none).
    pub fn is_open(&self, at_ms: u64) -> bool {
        self.windows.is_empty() || self.windows.iter().any(|w| w.is_open(at_ms))
    }

    /// The earliest instant `>= after_ms` at which some window is open.
    pub fn next_open(&self, after_ms: u64) -> Option<u64> {
        if self.windows.is_empty() {
            return Some(after_ms);
        }
        self.windows
            .iter()
            .filter_map(|w| w.next_open(after_ms))
            .min()
    }

    /// When the schedule, open at `at_ms`, closes: the end of the contiguous
    /// span in which some window is open. `None` when closed at `at_ms`;
    /// [`NEVER_CLOSES`] when there are no windows or it is still open a year
    /// later.
    pub fn close_of(&self, at_ms: u64) -> Option<u64> {
        if self.windows.is_empty() {
            return Some(NEVER_CLOSES);
        }
        let close_at = |t: u64| self.windows.iter().filter_map(|w| w.close_of(t)).max();
        let mut end = close_at(at_ms)?;
        let limit = at_ms.saturating_add(HORIZON_MS);
        while end != NEVER_CLOSES {
            match close_at(end) {
                Some(later) if later > end => end = later,
                _ => return Some(end),
            }
            if end > limit {
                return Some(NEVER_CLOSES);
            }
        }
        Some(end)
    }
}

impl From<Vec<Window>> for Schedule {
    fn from(windows: Vec<Window>) -> Schedule {
        Schedule { windows }
    }
}

fn compile_cron(cron: &str) -> Result<Cron, WindowError> {
    let invalid = |reason: String| WindowError::InvalidCron {
        cron: cron.to_owned(),
        reason,
    };
    if cron.starts_with('@') {
        if !NICKNAMES.iter().any(|n| n.eq_ignore_ascii_case(cron)) {
            return Err(invalid(format!(
                "unknown nickname: use one of {}",
                NICKNAMES.join(", ")
            )));
        }
    } else {
        let fields = cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(invalid(format!(
                "expected 5 fields (min hour dom month dow) or 6 with leading seconds, \
                 found {fields}"
            )));
        }
    }
    let pattern = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(cron)
        .map_err(|e| invalid(e.to_string()))?;
    // Reject patterns that match no real date (`0 0 30 2 *`): the window
    // would never open. Wall-clock time, so no zone is involved.
    if pattern
        .find_next_occurrence(&DateTime::UNIX_EPOCH.naive_utc(), true)
        .is_err()
    {
        return Err(invalid(
            "it matches no date, so the window would never open: check the day of month \
             against the month"
                .to_owned(),
        ));
    }
    Ok(pattern)
}

fn parse_timezone(name: &str) -> Result<Tz, WindowError> {
    name.parse::<Tz>()
        .map_err(|_| WindowError::UnknownTimeZone {
            timezone: name.to_owned(),
            suggestion: chrono_tz::TZ_VARIANTS
                .iter()
                .find(|tz| tz.name().eq_ignore_ascii_case(name))
                .map(|tz| tz.name().to_owned()),
        })
}

/// `ms` in `tz`, truncated to the second: openings fall on whole seconds, so
/// an opening `<= ms` is also `<=` the truncated time.
/// The date and time on the wall clock of a named zone at an instant: what
/// a policy needs to put each node into its own night.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalTime {
    pub year: i32,
    /// 1-12.
    pub month: u32,
    /// 1-31.
    pub day: u32,
    /// 0-23.
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// ISO 8601: 1 = Monday ... 7 = Sunday.
    pub weekday: u32,
    /// Minutes east of UTC in force at that instant (120 for CEST).
    pub offset_minutes: i32,
    /// The zone's abbreviation then (`CEST`, `EST`, or an offset like `+09`).
    pub abbreviation: String,
}

/// The local date and time in the IANA zone `timezone` at `at_ms` (Unix ms).
pub fn local_time_in(timezone: &str, at_ms: u64) -> Result<LocalTime, WindowError> {
    use chrono::{Datelike, Timelike};
    let tz = parse_timezone(timezone.trim())?;
    let dt = local_time(tz, at_ms).ok_or(WindowError::OutOfRange { at_ms })?;
    Ok(LocalTime {
        year: dt.year(),
        month: dt.month(),
        day: dt.day(),
        hour: dt.hour(),
        minute: dt.minute(),
        second: dt.second(),
        weekday: dt.weekday().number_from_monday(),
        offset_minutes: dt.offset().fix().local_minus_utc() / 60,
        abbreviation: dt.format("%Z").to_string(),
    })
}

fn local_time(tz: Tz, ms: u64) -> Option<DateTime<Tz>> {
    let secs = i64::try_from(ms / SECOND_MS).ok()?;
    DateTime::from_timestamp(secs, 0).map(|utc| utc.with_timezone(&tz))
}

fn unix_ms(dt: &DateTime<Tz>) -> Option<u64> {
    u64::try_from(dt.timestamp_millis()).ok()
}

/// Seconds east of UTC in effect in `tz` at Unix second `secs`.
fn offset_at(tz: Tz, secs: i64) -> Option<i32> {
    let utc = DateTime::from_timestamp(secs, 0)?;
    Some(
        tz.offset_from_utc_datetime(&utc.naive_utc())
            .fix()
            .local_minus_utc(),
    )
}

/// A spring-forward gap: wall-clock times in [`start`, `end`) do not exist;
/// `at_secs` is the transition, the first instant after the gap.
#[derive(Clone, Copy, Debug)]
struct Gap {
    at_secs: i64,
    start: NaiveDateTime,
    end: NaiveDateTime,
}

/// The gaps in `tz` whose transition lies in (`lo`, `hi`] (Unix seconds), in
/// order. Compares offsets a day apart and bisects where the offset grows;
/// zones do not change their offset twice within a day.
fn spring_forward_gaps(tz: Tz, lo: i64, hi: i64) -> Vec<Gap> {
    let mut gaps = Vec::new();
    let mut a = lo;
    let Some(mut offset_a) = offset_at(tz, a) else {
        return gaps;
    };
    while a < hi {
        let b = (a + DAY_SECS).min(hi);
        let Some(offset_b) = offset_at(tz, b) else {
            break;
        };
        if offset_b > offset_a {
            // Offset is `offset_a` at `l` and differs at `h`.
            let (mut l, mut h) = (a, b);
            while h - l > 1 {
                let m = l + (h - l) / 2;
                if offset_at(tz, m) == Some(offset_a) {
                    l = m;
                } else {
                    h = m;
                }
            }
            let after = offset_at(tz, h).unwrap_or(offset_b);
            let wall = |offset: i32| {
                DateTime::from_timestamp(h + i64::from(offset), 0).map(|dt| dt.naive_utc())
            };
            if let (true, Some(start), Some(end)) = (after > offset_a, wall(offset_a), wall(after))
            {
                gaps.push(Gap {
                    at_secs: h,
                    start,
                    end,
                });
            }
        }
        a = b;
        offset_a = offset_b;
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    /// Unix ms of a UTC wall-clock time.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .unwrap()
            .timestamp_millis() as u64
    }

    fn window(cron: &str, minutes: u32, tz: &str) -> Window {
        Window::parse(cron, minutes, tz).unwrap()
    }

    #[test]
    fn weekdays_at_two_utc() {
        let w = window("0 2 * * 1-5", 60, "UTC");
        // 2026-11-23 is a Monday.
        for day in 23..=27 {
            assert!(!w.is_open(utc(2026, 11, day, 1, 59, 59)), "day {day}");
            assert!(w.is_open(utc(2026, 11, day, 2, 0, 0)), "day {day}");
            assert!(w.is_open(utc(2026, 11, day, 2, 30, 0)), "day {day}");
            assert!(w.is_open(utc(2026, 11, day, 2, 59, 59) + 999), "day {day}");
            assert!(!w.is_open(utc(2026, 11, day, 3, 0, 0)), "day {day}");
        }
        // Saturday 28th and Sunday 29th.
        for day in 28..=29 {
            for hour in 0..24 {
                assert!(!w.is_open(utc(2026, 11, day, hour, 30, 0)), "{day} {hour}");
            }
        }
        assert!(w.is_open(utc(2026, 11, 30, 2, 0, 0)));
    }

    #[test]
    fn sunday_is_zero_and_seven() {
        for cron in ["0 2 * * 0", "0 2 * * 7", "0 2 * * SUN"] {
            let w = window(cron, 30, "UTC");
            assert!(w.is_open(utc(2026, 11, 29, 2, 10, 0)), "{cron} on Sunday");
            assert!(!w.is_open(utc(2026, 11, 23, 2, 10, 0)), "{cron} on Monday");
            assert!(
                !w.is_open(utc(2026, 11, 28, 2, 10, 0)),
                "{cron} on Saturday"
            );
        }
    }

    #[test]
    fn six_fields_have_leading_seconds() {
        let w = window("30 0 2 * * *", 30, "UTC");
        assert!(!w.is_open(utc(2026, 11, 23, 2, 0, 29)));
        assert!(w.is_open(utc(2026, 11, 23, 2, 0, 30)));
        assert!(w.is_open(utc(2026, 11, 23, 2, 30, 29)));
        assert!(!w.is_open(utc(2026, 11, 23, 2, 30, 30)));
        assert_eq!(
            w.next_open(utc(2026, 11, 23, 3, 0, 0)),
            Some(utc(2026, 11, 24, 2, 0, 30))
        );
    }

    #[test]
    fn nicknames() {
        let daily = window("@daily", 30, "UTC");
        assert!(daily.is_open(utc(2026, 11, 23, 0, 0, 0)));
        assert!(daily.is_open(utc(2026, 11, 23, 0, 29, 59)));
        assert!(!daily.is_open(utc(2026, 11, 23, 0, 30, 0)));
        assert!(!daily.is_open(utc(2026, 11, 23, 12, 0, 0)));

        let hourly = window("@hourly", 30, "UTC");
        assert!(hourly.is_open(utc(2026, 11, 23, 13, 10, 0)));
        assert!(!hourly.is_open(utc(2026, 11, 23, 13, 40, 0)));

        // @weekly is Sunday midnight.
        let weekly = window("@WEEKLY", 60, "UTC");
        assert!(weekly.is_open(utc(2026, 11, 29, 0, 30, 0)));
        assert!(!weekly.is_open(utc(2026, 11, 23, 0, 30, 0)));

        let monthly = window("@monthly", 60, "UTC");
        assert!(monthly.is_open(utc(2026, 12, 1, 0, 30, 0)));
        assert!(!monthly.is_open(utc(2026, 12, 2, 0, 30, 0)));

        for yearly in ["@yearly", "@annually"] {
            let w = window(yearly, 60, "UTC");
            assert!(w.is_open(utc(2027, 1, 1, 0, 30, 0)), "{yearly}");
            assert_eq!(
                w.next_open(utc(2026, 3, 1, 0, 0, 0)),
                Some(utc(2027, 1, 1, 0, 0, 0))
            );
        }
    }

    #[test]
    fn spring_forward_gap_opens_after_the_gap() {
        // 2026-03-29, Europe/Berlin: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        let w = window("30 2 * * *", 60, "Europe/Berlin");
        // The day before: 02:30 CET = 01:30 UTC.
        assert!(w.is_open(utc(2026, 3, 28, 1, 30, 0)));
        assert!(!w.is_open(utc(2026, 3, 28, 2, 30, 0)));
        // The gap day: opens at 03:00 CEST = 01:00 UTC, for 60 minutes.
        assert!(!w.is_open(utc(2026, 3, 29, 0, 59, 59)));
        assert!(w.is_open(utc(2026, 3, 29, 1, 0, 0)));
        assert!(w.is_open(utc(2026, 3, 29, 1, 59, 59)));
        assert!(!w.is_open(utc(2026, 3, 29, 2, 0, 0)));
        assert_eq!(
            w.next_open(utc(2026, 3, 28, 12, 0, 0)),
            Some(utc(2026, 3, 29, 1, 0, 0))
        );
        assert_eq!(
            w.close_of(utc(2026, 3, 29, 1, 20, 0)),
            Some(utc(2026, 3, 29, 2, 0, 0))
        );
        // The day after: 02:30 CEST = 00:30 UTC.
        assert!(w.is_open(utc(2026, 3, 30, 0, 30, 0)));
        assert!(!w.is_open(utc(2026, 3, 30, 1, 30, 0)));
    }

    #[test]
    fn spring_forward_gap_opens_multi_time_patterns_too() {
        // Croner skips gap times of patterns with several times of day; the
        // window still opens at 03:00 CEST (01:00 UTC).
        for (cron, minutes) in [
            ("0,30 2 * * *", 30),
            ("0 2,14 * * *", 60),
            ("*/20 2 * * *", 30),
        ] {
            let w = window(cron, minutes, "Europe/Berlin");
            let gap_end = utc(2026, 3, 29, 1, 0, 0);
            let close = gap_end + u64::from(minutes) * MINUTE_MS;
            assert!(!w.is_open(gap_end - 1), "{cron}");
            assert!(w.is_open(gap_end), "{cron}");
            assert!(w.is_open(close - 1), "{cron}");
            assert!(!w.is_open(close), "{cron}");
            assert_eq!(
                w.next_open(utc(2026, 3, 29, 0, 0, 0)),
                Some(gap_end),
                "{cron}"
            );
            assert_eq!(w.close_of(gap_end + 1000), Some(close), "{cron}");
        }
        // The afternoon opening of `0 2,14` is unaffected: 14:00 CEST.
        let w = window("0 2,14 * * *", 60, "Europe/Berlin");
        assert_eq!(
            w.next_open(utc(2026, 3, 29, 2, 0, 0)),
            Some(utc(2026, 3, 29, 12, 0, 0))
        );
        // A pattern with no time in the gap gets no extra opening.
        let w = window("0 1,4 * * *", 60, "Europe/Berlin");
        assert!(w.is_open(utc(2026, 3, 29, 0, 30, 0))); // 01:30 CET
        assert!(!w.is_open(utc(2026, 3, 29, 1, 0, 0))); // 03:00 CEST
        assert_eq!(
            w.next_open(utc(2026, 3, 29, 1, 0, 0)),
            Some(utc(2026, 3, 29, 2, 0, 0))
        );
    }

    #[test]
    fn fall_back_repeated_hour_opens_once() {
        // 2026-10-25, Europe/Berlin: 03:00 CEST falls back to 02:00 CET at
        // 01:00 UTC, so 02:30 local happens at 00:30 and 01:30 UTC.
        let w = window("30 2 * * *", 60, "Europe/Berlin");
        assert!(!w.is_open(utc(2026, 10, 25, 0, 29, 59)));
        assert!(w.is_open(utc(2026, 10, 25, 0, 30, 0)));
        assert!(w.is_open(utc(2026, 10, 25, 1, 29, 59)));
        // The repeated 02:30 (CET) does not open it again.
        assert!(!w.is_open(utc(2026, 10, 25, 1, 30, 0)));
        assert!(!w.is_open(utc(2026, 10, 25, 2, 0, 0)));
        assert_eq!(
            w.close_of(utc(2026, 10, 25, 0, 45, 0)),
            Some(utc(2026, 10, 25, 1, 30, 0))
        );
        assert_eq!(w.close_of(utc(2026, 10, 25, 1, 45, 0)), None);
        assert_eq!(
            w.next_open(utc(2026, 10, 25, 1, 30, 0)),
            Some(utc(2026, 10, 26, 1, 30, 0))
        );
        assert_eq!(
            w.next_open(utc(2026, 10, 24, 12, 0, 0)),
            Some(utc(2026, 10, 25, 0, 30, 0))
        );
        // Day before (CEST) and after (CET).
        assert!(w.is_open(utc(2026, 10, 24, 0, 30, 0)));
        assert!(w.is_open(utc(2026, 10, 26, 1, 30, 0)));
        assert!(!w.is_open(utc(2026, 10, 26, 0, 30, 0)));
    }

    #[test]
    fn fall_back_keeps_round_the_clock_windows_open() {
        let w = window("0 * * * *", 60, "Europe/Berlin");
        for minute in (0..4 * 60).step_by(5) {
            let t = utc(2026, 10, 24, 23, 0, 0) + minute * MINUTE_MS;
            assert!(w.is_open(t), "{minute}");
        }
        assert_eq!(w.close_of(utc(2026, 10, 25, 1, 0, 0)), Some(NEVER_CLOSES));
    }

    #[test]
    fn new_york_offsets() {
        let w = window("0 9 * * *", 60, "America/New_York");
        // Winter, EST (UTC-5): 09:00 local = 14:00 UTC.
        assert!(!w.is_open(utc(2026, 1, 15, 13, 59, 59)));
        assert!(w.is_open(utc(2026, 1, 15, 14, 0, 0)));
        assert!(!w.is_open(utc(2026, 1, 15, 15, 0, 0)));
        assert!(!w.is_open(utc(2026, 1, 15, 9, 30, 0)));
        // Summer, EDT (UTC-4): 09:00 local = 13:00 UTC.
        assert!(w.is_open(utc(2026, 7, 15, 13, 0, 0)));
        assert!(!w.is_open(utc(2026, 7, 15, 14, 0, 0)));
        assert_eq!(
            w.next_open(utc(2026, 7, 15, 0, 0, 0)),
            Some(utc(2026, 7, 15, 13, 0, 0))
        );
        // Local evening is the next UTC day: 23:00 EST = 04:00 UTC.
        let late = window("0 23 * * 1", 60, "America/New_York");
        assert!(late.is_open(utc(2026, 11, 24, 4, 30, 0)));
        assert!(!late.is_open(utc(2026, 11, 23, 23, 30, 0)));
        // Spring forward 2026-03-08: 02:30 does not exist, opens 03:00 EDT.
        let gap = window("30 2 * * *", 60, "America/New_York");
        assert_eq!(
            gap.next_open(utc(2026, 3, 8, 0, 0, 0)),
            Some(utc(2026, 3, 8, 7, 0, 0))
        );
    }

    #[test]
    fn duration_below_minimum_is_rejected() {
        let err = Window::parse("0 2 * * *", 10, "UTC").unwrap_err();
        assert_eq!(err, WindowError::DurationTooShort { minutes: 10 });
        assert!(
            err.to_string()
                .starts_with("duration 10 min is below the 30 min minimum"),
            "{err}"
        );
        assert!(Window::parse("0 2 * * *", 29, "UTC").is_err());
        assert!(Window::parse("0 2 * * *", 30, "UTC").is_ok());
    }

    #[test]
    fn unknown_time_zone_is_rejected() {
        let err = Window::parse("0 2 * * *", 60, "Europe/Berln").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown time zone 'Europe/Berln': use an IANA name like Europe/Berlin"
        );
        let err = Window::parse("0 2 * * *", 60, "europe/berlin").unwrap_err();
        assert!(
            err.to_string().ends_with("(did you mean Europe/Berlin?)"),
            "{err}"
        );
        for bad in ["", "+02:00", "Mars/Olympus"] {
            assert!(
                matches!(
                    Window::parse("0 2 * * *", 60, bad),
                    Err(WindowError::UnknownTimeZone { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(Window::parse("0 2 * * *", 60, "UTC").is_ok());
    }

    #[test]
    fn invalid_cron_is_rejected() {
        for bad in [
            "",
            "* * * *",
            "0 0 0 2 * * *",
            "61 * * * *",
            "0 24 * * *",
            "0 2 * * 8",
            "0 2 * 13 *",
            "@fortnightly",
            "@reboot",
            "0 2 * * x",
            "0 0 30 2 *",
        ] {
            let err = Window::parse(bad, 60, "UTC").unwrap_err();
            assert!(
                matches!(err, WindowError::InvalidCron { .. }),
                "{bad:?}: {err}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid cron '{bad}': ")),
                "{err}"
            );
        }
        let err = Window::parse("0 0 30 2 *", 60, "UTC").unwrap_err();
        assert!(err.to_string().contains("never open"), "{err}");
        // Feb 29 exists, in leap years.
        let leap = window("0 0 29 2 *", 60, "UTC");
        assert_eq!(
            leap.next_open(utc(2026, 1, 1, 0, 0, 0)),
            Some(utc(2028, 2, 29, 0, 0, 0))
        );
    }

    #[test]
    fn next_open_inside_before_and_across_the_weekend() {
        let w = window("0 2 * * 1-5", 60, "UTC");
        let inside = utc(2026, 11, 23, 2, 15, 0) + 123;
        assert_eq!(w.next_open(inside), Some(inside));
        assert_eq!(w.close_of(inside), Some(utc(2026, 11, 23, 3, 0, 0)));
        assert_eq!(
            w.next_open(utc(2026, 11, 23, 1, 0, 0)),
            Some(utc(2026, 11, 23, 2, 0, 0))
        );
        assert_eq!(
            w.next_open(utc(2026, 11, 23, 1, 59, 59) + 1),
            Some(utc(2026, 11, 23, 2, 0, 0))
        );
        // The close is exclusive: from 03:00 the next is Tuesday.
        assert_eq!(
            w.next_open(utc(2026, 11, 23, 3, 0, 0)),
            Some(utc(2026, 11, 24, 2, 0, 0))
        );
        // Friday after the window, Saturday, Sunday: all Monday 2026-11-30.
        for from in [
            utc(2026, 11, 27, 3, 0, 0),
            utc(2026, 11, 28, 2, 30, 0),
            utc(2026, 11, 29, 23, 59, 59),
        ] {
            assert_eq!(w.next_open(from), Some(utc(2026, 11, 30, 2, 0, 0)));
            assert_eq!(w.close_of(from), None);
        }
    }

    #[test]
    fn back_to_back_openings_close_together() {
        let w = window("0 2,3 * * *", 60, "UTC");
        assert_eq!(
            w.close_of(utc(2026, 11, 23, 2, 10, 0)),
            Some(utc(2026, 11, 23, 4, 0, 0))
        );
        let w = window("*/10 * * * *", 30, "UTC");
        assert_eq!(w.close_of(utc(2026, 11, 23, 2, 10, 0)), Some(NEVER_CLOSES));
    }

    #[test]
    fn serde_round_trip() {
        let w = window("0 2 * * 1-5", 60, "Europe/Berlin");
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(
            json,
            r#"{"cron":"0 2 * * 1-5","duration_minutes":60,"timezone":"Europe/Berlin"}"#
        );
        let back: Window = serde_json::from_str(&json).unwrap();
        assert_eq!(back, w);
        // The deserialized window is compiled, not just equal.
        assert!(back.is_open(utc(2026, 11, 23, 1, 30, 0)));
        assert!(!back.is_open(utc(2026, 11, 23, 2, 30, 0)));

        let schedule = Schedule::new(vec![w.clone(), window("@daily", 30, "UTC")]);
        let json = serde_json::to_string(&schedule).unwrap();
        let back: Schedule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, schedule);
    }

    #[test]
    fn serde_rejects_bad_windows() {
        let cases = [
            (
                r#"{"cron":"0 2 * * *","duration_minutes":10,"timezone":"UTC"}"#,
                "duration 10 min is below the 30 min minimum",
            ),
            (
                r#"{"cron":"0 2 * * *","duration_minutes":60,"timezone":"Europe/Berln"}"#,
                "unknown time zone 'Europe/Berln'",
            ),
            (
                r#"{"cron":"0 25 * * *","duration_minutes":60,"timezone":"UTC"}"#,
                "invalid cron '0 25 * * *'",
            ),
            (
                r#"{"cron":"0 2 * * *","duration_minutes":60,"timezone":"UTC","tz":"UTC"}"#,
                "unknown field `tz`",
            ),
        ];
        let day: Window = serde_json::from_str(r#"{"cron":"0 2 * * 1","timezone":"UTC"}"#).unwrap();
        assert_eq!(
            day.duration_minutes(),
            DEFAULT_DURATION_MINUTES,
            "no duration: a whole day"
        );
        let monday = utc(2026, 11, 23, 2, 0, 0);
        assert!(day.is_open(monday) && day.is_open(monday + 86_399_000));
        assert!(!day.is_open(monday - 1000) && !day.is_open(monday + 86_400_000));
        for (json, message) in cases {
            let err = serde_json::from_str::<Window>(json).unwrap_err();
            assert!(err.to_string().contains(message), "{json}: {err}");
        }
        let bad = r#"{"windows":[{"cron":"0 2 * * *","duration_minutes":5,"timezone":"UTC"}]}"#;
        assert!(serde_json::from_str::<Schedule>(bad).is_err());
    }

    #[test]
    fn empty_schedule_is_always_open() {
        for schedule in [
            Schedule::always(),
            Schedule::default(),
            serde_json::from_str::<Schedule>("{}").unwrap(),
            serde_json::from_str::<Schedule>(r#"{"windows":[]}"#).unwrap(),
        ] {
            assert!(schedule.is_always_open());
            for t in [0, utc(2026, 11, 28, 13, 37, 0), u64::MAX] {
                assert!(schedule.is_open(t));
                assert_eq!(schedule.next_open(t), Some(t));
                assert_eq!(schedule.close_of(t), Some(NEVER_CLOSES));
            }
        }
    }

    #[test]
    fn schedule_is_the_union() {
        let schedule = Schedule::new(vec![
            window("0 2 * * 1-5", 60, "UTC"),
            window("0 10 * * 6,0", 120, "UTC"),
            window("0 3 * * 1", 30, "UTC"),
        ]);
        assert!(!schedule.is_always_open());
        assert!(schedule.is_open(utc(2026, 11, 23, 2, 30, 0)));
        assert!(schedule.is_open(utc(2026, 11, 28, 11, 30, 0)));
        assert!(!schedule.is_open(utc(2026, 11, 28, 2, 30, 0)));
        assert!(!schedule.is_open(utc(2026, 11, 24, 10, 30, 0)));
        // Friday night: the weekend window comes first.
        assert_eq!(
            schedule.next_open(utc(2026, 11, 27, 3, 0, 0)),
            Some(utc(2026, 11, 28, 10, 0, 0))
        );
        // Monday 02:00-03:00 and 03:00-03:30 touch: one span.
        assert_eq!(
            schedule.close_of(utc(2026, 11, 23, 2, 30, 0)),
            Some(utc(2026, 11, 23, 3, 30, 0))
        );
        assert_eq!(
            schedule.close_of(utc(2026, 11, 24, 2, 30, 0)),
            Some(utc(2026, 11, 24, 3, 0, 0))
        );
        assert_eq!(schedule.close_of(utc(2026, 11, 24, 5, 0, 0)), None);
    }

    #[test]
    fn local_time_follows_each_zone_and_its_daylight_saving() {
        // 2026-03-29 00:30 UTC: Berlin still on CET (01:30); at 01:30 UTC it
        // is 03:30 CEST (the clocks jumped from 02:00 to 03:00).
        let before = 1_774_744_200_000;
        let t = local_time_in("Europe/Berlin", before).unwrap();
        assert_eq!((t.day, t.hour, t.minute, t.offset_minutes), (29, 1, 30, 60));
        assert_eq!((t.weekday, t.abbreviation.as_str()), (7, "CET"));
        let t = local_time_in("Europe/Berlin", before + 3_600_000).unwrap();
        assert_eq!((t.hour, t.minute, t.offset_minutes), (3, 30, 120));
        assert_eq!(t.abbreviation, "CEST");
        let t = local_time_in("Asia/Tokyo", before).unwrap();
        assert_eq!((t.day, t.hour, t.offset_minutes), (29, 9, 540));
        let t = local_time_in("America/New_York", before).unwrap();
        assert_eq!(
            (t.month, t.day, t.hour, t.offset_minutes),
            (3, 28, 20, -240)
        );
        let err = local_time_in("Europe/Berlln", before).unwrap_err();
        assert!(err.to_string().contains("IANA"), "{err}");
    }
}
