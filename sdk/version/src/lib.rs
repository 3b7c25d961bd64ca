//! Lenient version parsing shared by the Flotilla runtime and the guest SDK, so a
//! Rhai policy and a Rust policy read `v1.13` the same way.
//!
//! Fleets report versions loosely (`v1.13`, `1.12`, `4.2.0`, `5.0.1-rc.1`); they are
//! normalised to semver by dropping a leading `v`/`V` and padding missing minor or
//! patch numbers with zeros.

pub use semver::Version;
use semver::VersionReq;

/// Parses `v1.13`, `1.12`, `4.2.0`, `5.0.1-rc.1+build` as semver.
pub fn parse(s: &str) -> Result<Version, semver::Error> {
    let s = s.trim();
    let s = s.strip_prefix(['v', 'V']).unwrap_or(s);
    let end = s.find(['-', '+']).unwrap_or(s.len());
    let (core, rest) = s.split_at(end);
    let mut parts = core.splitn(3, '.');
    // The fast path (no allocation) covers `1`, `1.2` and `1.2.3` with plain
    // numbers; anything else goes to semver, padded, for its exact error.
    let num = |p: Option<&str>| -> Option<u64> {
        match p {
            None => Some(0),
            Some(p)
                if !p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (p == "0" || !p.starts_with('0')) =>
            {
                p.parse().ok()
            }
            Some(_) => None,
        }
    };
    let first = parts.next();
    // Pre-releases and build metadata (rare in fleets) go the slow way below.
    if rest.is_empty()
        && first.is_some_and(|f| !f.is_empty())
        && let (Some(major), Some(minor), Some(patch)) =
            (num(first), num(parts.next()), num(parts.next()))
    {
        return Ok(Version::new(major, minor, patch));
    }
    let dots = core.matches('.').count();
    let padded = match dots {
        0 => format!("{core}.0.0{rest}"),
        1 => format!("{core}.0{rest}"),
        _ => return Version::parse(s),
    };
    Version::parse(&padded)
}

/// Parses a semver range (`>=1.10, <2`, `~4.2`, `*`).
pub fn parse_range(s: &str) -> Result<VersionReq, semver::Error> {
    VersionReq::parse(s.trim())
}

/// `true` when both parse and are equal as semver (`v1.13` == `1.13.0`), or,
/// when either does not parse, when the strings are equal.
pub fn same(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.trim() == b.trim(),
    }
}

/// `true` when `version` parses and lies in `range`. Pre-releases match only
/// ranges that name a pre-release of the same core, as in Cargo.
pub fn in_range(version: &str, range: &str) -> Result<bool, semver::Error> {
    Ok(parse_range(range)?.matches(&parse(version)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_forms() {
        assert_eq!(parse("v1.13").unwrap(), Version::new(1, 13, 0));
        assert_eq!(parse("1.12").unwrap(), Version::new(1, 12, 0));
        assert_eq!(parse("4.2.0").unwrap(), Version::new(4, 2, 0));
        assert_eq!(parse("7").unwrap(), Version::new(7, 0, 0));
        assert_eq!(parse("1.2-rc.1").unwrap().to_string(), "1.2.0-rc.1");
        assert!(parse("one.two").is_err());
        assert_eq!(parse("1.2.3+b.7").unwrap().to_string(), "1.2.3+b.7");
        assert_eq!(parse("1.2.3-rc.1+b").unwrap().to_string(), "1.2.3-rc.1+b");
        assert!(parse("01.2.3").is_err(), "leading zeros are not semver");
        assert!(parse("1.2.3.4").is_err());
        assert!(parse("1..3").is_err());
        assert!(parse("1.2.3-").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn comparisons() {
        assert!(same("v1.13", "1.13.0"));
        assert!(!same("1.13", "1.14"));
        assert!(same("weird", "weird"));
        assert!(in_range("1.12", ">=1.10, <2").unwrap());
        assert!(!in_range("2.0", ">=1.10, <2").unwrap());
        assert!(in_range("x", "*").is_err());
    }
}
