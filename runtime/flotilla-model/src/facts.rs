//! What a node says about itself (its version, labels, attributes and place
//! in the asset tree), and the rules every writer of those facts is held to:
//! the runner stores them as sent and shows them to operators, policies and
//! logs, so they are short, printable and parse as what they claim to be.

use crate::Node;

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
pub fn check_version(field: &str, version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Ok(());
    }
    if version.len() > MAX_VERSION_LEN || !version.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{field}: a version is at most {MAX_VERSION_LEN} printable ASCII characters without spaces ({} bytes given)",
            version.len()
        ));
    }
    flotilla_version::parse(version)
        .map(|_| ())
        .map_err(|e| format!("{field}: {version:?} is not a version (like 1.13 or v4.2.1): {e}"))
}

/// Labels or attributes: at most [`MAX_PAIRS`], keys 1–[`MAX_KEY_LEN`]
/// characters of `A-Z a-z 0-9 . _ - /` and unique, values at most
/// [`MAX_VALUE_LEN`] characters with no control characters.
pub fn check_pairs(field: &str, pairs: &[(String, String)]) -> Result<(), String> {
    if pairs.len() > MAX_PAIRS {
        return Err(format!(
            "{field}: {} given, at most {MAX_PAIRS}",
            pairs.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, value) in pairs {
        let ok_key = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !ok_key {
            return Err(format!(
                "{field}: key {:?} must be 1-{MAX_KEY_LEN} characters of A-Z, a-z, 0-9, '.', '_', '-', '/'",
                shorten(key)
            ));
        }
        if !seen.insert(key.as_str()) {
            return Err(format!("{field}: key {key:?} is given twice"));
        }
        printable(&format!("{field}.{key}"), value, MAX_VALUE_LEN)?;
    }
    Ok(())
}

/// Empty, or a `/`-rooted path (`/site-1/rack-2`) of at most
/// [`MAX_ASSET_PATH_LEN`] characters with no control characters.
pub fn check_asset_path(field: &str, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    if !path.starts_with('/') {
        return Err(format!(
            "{field}: {:?} must start with '/' (like /site-1/rack-2)",
            shorten(path)
        ));
    }
    printable(field, path, MAX_ASSET_PATH_LEN)
}

/// At most `max` bytes, none of them a control character (ANSI escapes, CR,
/// LF, NUL) or a bidirectional override that would make a log line lie.
fn printable(field: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{field}: {} bytes given, at most {max}", s.len()));
    }
    if let Some(c) = s.chars().find(|&c| c.is_control() || is_bidi_control(c)) {
        return Err(format!("{field}: control character {:?} is not allowed", c));
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
) -> Result<(), String> {
    check_version("version", version)?;
    check_pairs("labels", labels)?;
    check_pairs("attributes", attributes)?;
    check_asset_path("asset_path", asset_path)
}

impl Node {
    /// [`check_all`] over the node's facts (its id has its own rule,
    /// checked where ids are named).
    pub fn check_facts(&self) -> Result<(), String> {
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
        let err = check_version("version", &hostile).unwrap_err();
        assert!(err.starts_with("version:") && err.len() < 200, "{err}");
        assert!(check_version("version", "1.0\r\n").is_err());
        assert!(check_version("version", "1.0 beta").is_err());
        assert!(
            check_version("version", "latest")
                .unwrap_err()
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
        assert!(
            err.contains("labels.tier") && err.contains("control"),
            "{err}"
        );
        assert!(check_pairs("attributes", &pair("os", "linux\u{202e}")).is_err());
        assert!(check_pairs("labels", &pair("k", &"v".repeat(257))).is_err());
        let many: Vec<_> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(
            check_pairs("labels", &many)
                .unwrap_err()
                .contains("at most 64")
        );
        let twice = vec![("k".into(), "a".into()), ("k".into(), "b".into())];
        assert!(check_pairs("labels", &twice).unwrap_err().contains("twice"));

        check_asset_path("asset_path", "/site-1/rack-2").unwrap();
        assert!(check_asset_path("asset_path", "site-1").is_err());
        assert!(check_asset_path("asset_path", "/a\nb").is_err());
        assert!(check_asset_path("asset_path", &format!("/{}", "a".repeat(1024))).is_err());
    }
}
