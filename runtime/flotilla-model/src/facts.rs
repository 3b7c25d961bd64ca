//! What a node says about itself (its version, labels, attributes and place
//! in the asset tree), and the rules every writer of those facts is held to:
//! the runner stores them as sent and shows them to operators, policies and
//! logs, so they are short, printable and parse as what they claim to be.

use crate::Node;

/// A fact that breaks its rule: the field it is in (`labels.tier`,
/// `metrics.load1`) and what is wrong with it. Shown as `FIELD: PROBLEM`.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FactError {
    pub field: String,
    pub problem: FactProblem,
}

/// What is wrong with one fact.
#[derive(Debug, thiserror::Error)]
pub enum FactProblem {
    #[error(
        "a version is at most {MAX_VERSION_LEN} printable ASCII characters without spaces ({len} bytes given)"
    )]
    VersionNotPrintable { len: usize },
    #[error("{given:?} is not a version (like 1.13 or v4.2.1): {source}")]
    NotAVersion {
        given: String,
        #[source]
        source: semver::Error,
    },
    #[error("{given} given, at most {max}")]
    TooMany { given: usize, max: usize },
    #[error("key {0:?} must be 1-{MAX_KEY_LEN} characters of A-Z, a-z, 0-9, '.', '_', '-', '/'")]
    BadKey(String),
    #[error("key {0:?} is given twice")]
    DuplicateKey(String),
    #[error("{given} bytes given, at most {max}")]
    TooLong { given: usize, max: usize },
    #[error("control character {0:?} is not allowed")]
    ControlCharacter(char),
    #[error("{0:?} must start with '/' (like /site-1/rack-2)")]
    NotRooted(String),
    #[error("name {0:?} must be 1-64 characters of a-z, 0-9, '_', '.', '-'")]
    BadMetricName(String),
    #[error("{0} is not a finite number")]
    NotFinite(f64),
}

impl FactProblem {
    /// This problem, in `field`.
    pub fn at(self, field: impl Into<String>) -> FactError {
        FactError {
            field: field.into(),
            problem: self,
        }
    }
}

/// Longest version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Most labels (and, separately, attributes) on one node.
pub const MAX_PAIRS: usize = 64;
/// Longest label or attribute key.
pub const MAX_KEY_LEN: usize = 128;
/// Longest label or attribute value.
pub const MAX_VALUE_LEN: usize = 256;
/// Longest asset path.
pub const MAX_ASSET_PATH_LEN: usize = 1024;

/// A version as a node reports it: empty (it runs no release yet), or at
/// most [`MAX_VERSION_LEN`] characters that parse as a version (`1.13`,
/// `v4.2.1`, `5.0.1-rc.1`).
pub fn check_version(field: &str, version: &str) -> Result<(), FactError> {
    if version.is_empty() {
        return Ok(());
    }
    if version.len() > MAX_VERSION_LEN || !version.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FactProblem::VersionNotPrintable { len: version.len() }.at(field));
    }
    flotilla_version::parse(version).map(|_| ()).map_err(|e| {
        FactProblem::NotAVersion {
            given: version.to_string(),
            source: e,
        }
        .at(field)
    })
}

/// Labels or attributes: at most [`MAX_PAIRS`], keys 1–[`MAX_KEY_LEN`]
/// characters of `A-Z a-z 0-9 . _ - /` and unique, values at most
/// [`MAX_VALUE_LEN`] characters with no control characters.
pub fn check_pairs(field: &str, pairs: &[(String, String)]) -> Result<(), FactError> {
    if pairs.len() > MAX_PAIRS {
        return Err(FactProblem::TooMany {
            given: pairs.len(),
            max: MAX_PAIRS,
        }
        .at(field));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, value) in pairs {
        let ok_key = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !ok_key {
            return Err(FactProblem::BadKey(shorten(key)).at(field));
        }
        if !seen.insert(key.as_str()) {
            return Err(FactProblem::DuplicateKey(key.clone()).at(field));
        }
        printable(&format!("{field}.{key}"), value, MAX_VALUE_LEN)?;
    }
    Ok(())
}

/// Empty, or a `/`-rooted path (`/site-1/rack-2`) of at most
/// [`MAX_ASSET_PATH_LEN`] characters with no control characters.
pub fn check_asset_path(field: &str, path: &str) -> Result<(), FactError> {
    if path.is_empty() {
        return Ok(());
    }
    if !path.starts_with('/') {
        return Err(FactProblem::NotRooted(shorten(path)).at(field));
    }
    printable(field, path, MAX_ASSET_PATH_LEN)
}

/// At most `max` bytes, none of them a control character (ANSI escapes, CR,
/// LF, NUL) or a bidirectional override that would make a log line lie.
fn printable(field: &str, s: &str, max: usize) -> Result<(), FactError> {
    if s.len() > max {
        return Err(FactProblem::TooLong {
            given: s.len(),
            max,
        }
        .at(field));
    }
    if let Some(c) = s.chars().find(|&c| c.is_control() || is_bidi_control(c)) {
        return Err(FactProblem::ControlCharacter(c).at(field));
    }
    Ok(())
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

/// The start of a long value, for an error message that stays short.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Every fact a node reports, by the rules above; the error names the field.
pub fn check_all(
    version: &str,
    labels: &[(String, String)],
    attributes: &[(String, String)],
    asset_path: &str,
) -> Result<(), FactError> {
    check_version("version", version)?;
    check_pairs("labels", labels)?;
    check_pairs("attributes", attributes)?;
    check_asset_path("asset_path", asset_path)
}

impl Node {
    /// [`check_all`] over the node's facts (its id has its own rule,
    /// checked where ids are named).
    pub fn check_facts(&self) -> Result<(), FactError> {
        check_all(
            &self.version,
            &self.labels,
            &self.attributes,
            &self.asset_path,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_short_printable_and_parse() {
        for ok in ["", "1", "v1.13", "4.2.0", "5.0.1-rc.1+build.7"] {
            check_version("version", ok).unwrap();
        }
        let hostile = format!("1.0.0\u{1b}[31m\r\nX-Injected: yes{}", "9".repeat(60_000));
        let err = check_version("version", &hostile).unwrap_err().to_string();
        assert!(err.starts_with("version:") && err.len() < 200, "{err}");
        assert!(check_version("version", "1.0\r\n").is_err());
        assert!(check_version("version", "1.0 beta").is_err());
        assert!(
            check_version("version", "latest")
                .unwrap_err()
                .to_string()
                .contains("not a version")
        );
    }

    #[test]
    fn labels_attributes_and_asset_paths_are_capped() {
        let pair = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        check_pairs("labels", &pair("example.com/zone", "eu-west 1")).unwrap();
        check_pairs("labels", &pair("site", "Zürich")).unwrap();
        assert!(check_pairs("labels", &pair("", "a")).is_err());
        assert!(check_pairs("labels", &pair("a b", "a")).is_err());
        let err = check_pairs("labels", &pair("tier", "edge\u{1b}[2J")).unwrap_err();
        assert_eq!(err.field, "labels.tier");
        assert!(matches!(
            err.problem,
            FactProblem::ControlCharacter('\u{1b}')
        ));
        assert_eq!(
            err.to_string(),
            "labels.tier: control character '\\u{1b}' is not allowed"
        );
        assert!(check_pairs("attributes", &pair("os", "linux\u{202e}")).is_err());
        assert!(check_pairs("labels", &pair("k", &"v".repeat(257))).is_err());
        let many: Vec<_> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(
            check_pairs("labels", &many)
                .unwrap_err()
                .to_string()
                .contains("at most 64")
        );
        let twice = vec![("k".into(), "a".into()), ("k".into(), "b".into())];
        assert!(matches!(
            check_pairs("labels", &twice).unwrap_err().problem,
            FactProblem::DuplicateKey(k) if k == "k"
        ));

        check_asset_path("asset_path", "/site-1/rack-2").unwrap();
        assert!(check_asset_path("asset_path", "site-1").is_err());
        assert!(check_asset_path("asset_path", "/a\nb").is_err());
        assert!(check_asset_path("asset_path", &format!("/{}", "a".repeat(1024))).is_err());
    }
}
