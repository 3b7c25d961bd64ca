//! What a release's minisign signature must say, shared by the runner (which
//! checks it at upload) and the agent (which checks it before it unpacks).
//! No cryptography here: the runner and the agent verify with
//! `minisign-verify`; this module is the trusted comment that binds a
//! signature to one release, and the key ids named in refusals.
//!
//! The trusted comment (signed together with the signature) is exactly
//! `flotilla-release package=P version=V sha256=H size=N`, so a valid
//! signature of one artifact cannot be reused for another package, version,
//! digest or size.

/// The first word of a release's trusted comment.
pub const COMMENT_PREFIX: &str = "flotilla-release";

/// A `.minisig` file is four short lines; anything much longer is not one.
pub const MAX_SIGNATURE_BYTES: usize = 4096;

/// The trusted comment that binds a signature to this release.
pub fn trusted_comment(package: &str, version: &str, sha256: &str, size: u64) -> String {
    format!("{COMMENT_PREFIX} package={package} version={version} sha256={sha256} size={size}")
}

/// What a trusted comment says about the release it signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseClaim {
    pub package: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
}

/// A trusted comment that is not one [`trusted_comment`] writes: the
/// comment as shown (at most 200 characters, control characters as `?`)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the trusted comment {shown} {problem}")]
pub struct CommentError {
    pub shown: String,
    pub problem: CommentProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommentProblem {
    #[error(
        "is not a flotilla release's (expected `flotilla-release package=P version=V sha256=SHA256 size=N`)"
    )]
    NotARelease,
    #[error("has a word without `=`")]
    WordWithoutEquals,
    #[error("has an unknown field `{0}`")]
    UnknownField(String),
    #[error("names `{0}` twice")]
    Twice(String),
    #[error("has no `{0}=`")]
    Missing(&'static str),
    #[error("has a size that is not a number")]
    SizeNotANumber,
}

/// Parses a trusted comment of the form [`trusted_comment`] writes: the
/// prefix, then each of the four fields exactly once, nothing else.
pub fn parse_trusted_comment(comment: &str) -> Result<ReleaseClaim, CommentError> {
    let bad = |problem| {
        let s: String = comment
            .chars()
            .take(200)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        CommentError {
            shown: format!("{s:?}"),
            problem,
        }
    };
    let mut words = comment.split(' ');
    if words.next() != Some(COMMENT_PREFIX) {
        return Err(bad(CommentProblem::NotARelease));
    }
    let (mut package, mut version, mut sha256, mut size) = (None, None, None, None);
    for w in words {
        let (key, value) = w
            .split_once('=')
            .ok_or_else(|| bad(CommentProblem::WordWithoutEquals))?;
        let slot = match key {
            "package" => &mut package,
            "version" => &mut version,
            "sha256" => &mut sha256,
            "size" => &mut size,
            _ => return Err(bad(CommentProblem::UnknownField(key.to_string()))),
        };
        if slot.replace(value.to_string()).is_some() {
            return Err(bad(CommentProblem::Twice(key.to_string())));
        }
    }
    let need = |v: Option<String>, key: &'static str| {
        v.filter(|v| !v.is_empty())
            .ok_or_else(|| bad(CommentProblem::Missing(key)))
    };
    let size = need(size, "size")?;
    Ok(ReleaseClaim {
        package: need(package, "package")?,
        version: need(version, "version")?,
        sha256: need(sha256, "sha256")?,
        size: size
            .parse()
            .map_err(|_| bad(CommentProblem::SizeNotANumber))?,
    })
}

/// A signature whose trusted comment names another release: every field
/// that differs, with what the comment says and what the release is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the signature's trusted comment names another release: {}", list(.0))]
pub struct ClaimMismatch(pub Vec<FieldDiff>);

/// One field of a [`ClaimMismatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    pub field: &'static str,
    pub claimed: String,
    pub actual: String,
}

fn list(diffs: &[FieldDiff]) -> String {
    diffs
        .iter()
        .map(|d| format!("{} {} (not {})", d.field, d.claimed, d.actual))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ReleaseClaim {
    /// Whether the claim is this release; the error names every field that
    /// differs, with both values.
    pub fn check(
        &self,
        package: &str,
        version: &str,
        sha256: &str,
        size: u64,
    ) -> Result<(), ClaimMismatch> {
        let mut wrong = Vec::new();
        let mut differs = |field, claimed: &dyn ToString, actual: &dyn ToString| {
            wrong.push(FieldDiff {
                field,
                claimed: claimed.to_string(),
                actual: actual.to_string(),
            })
        };
        if self.package != package {
            differs("package", &self.package, &package);
        }
        if self.version != version {
            differs("version", &self.version, &version);
        }
        if !self.sha256.eq_ignore_ascii_case(sha256) {
            differs("sha256", &self.sha256, &sha256);
        }
        if self.size != size {
            differs("size", &self.size, &size);
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(ClaimMismatch(wrong))
        }
    }
}

/// The trusted comment line of a `.minisig` text (without its
/// `trusted comment: ` prefix), if it has one.
pub fn signature_comment(minisig: &str) -> Option<&str> {
    minisig.lines().nth(2)?.strip_prefix("trusted comment: ")
}

/// The key id of a `.minisig` text as the minisign CLI prints it (16
/// uppercase hex digits), if the text has a well-formed signature line.
pub fn signature_key_id(minisig: &str) -> Option<String> {
    let bin = base64_decode(minisig.lines().nth(1)?.trim())?;
    (bin.len() == 74).then(|| key_id_hex(&bin[2..10]))
}

/// The key id of a minisign public key (its base64 line), as the minisign
/// CLI prints it.
pub fn public_key_id(base64_line: &str) -> Option<String> {
    let bin = base64_decode(base64_line.trim())?;
    (bin.len() == 42).then(|| key_id_hex(&bin[2..10]))
}

/// minisign prints a key id as its 8 bytes read as a little-endian u64.
fn key_id_hex(bytes: &[u8]) -> String {
    bytes.iter().rev().map(|b| format!("{b:02X}")).collect()
}

/// Standard base64 with padding (what minisign writes); `None` if malformed.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.as_bytes();
    if s.is_empty() || !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, quad) in s.chunks(4).enumerate() {
        let last = i == s.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_comment_round_trips_and_names_what_differs() {
        let c = trusted_comment("edge", "1.2.0", &"ab".repeat(32), 42);
        assert_eq!(
            c,
            format!(
                "flotilla-release package=edge version=1.2.0 sha256={} size=42",
                "ab".repeat(32)
            )
        );
        let claim = parse_trusted_comment(&c).unwrap();
        assert!(claim.check("edge", "1.2.0", &"AB".repeat(32), 42).is_ok());
        let err = claim
            .check("edge", "1.3.0", &"ab".repeat(32), 43)
            .unwrap_err();
        assert_eq!(
            err.0.iter().map(|d| d.field).collect::<Vec<_>>(),
            ["version", "size"]
        );
        let err = err.to_string();
        assert_eq!(
            err,
            "the signature's trusted comment names another release: version 1.2.0 (not 1.3.0), size 42 (not 43)"
        );
        assert!(!err.contains("package"), "{err}");
        for bad in [
            "timestamp:1555779966\tfile:test",
            "flotilla-release package=a version=1 sha256=x",
            "flotilla-release package=a package=b version=1 sha256=x size=1",
            "flotilla-release package=a version=1 sha256=x size=1 extra=2",
            "flotilla-release package=a version=1 sha256=x size=one",
            "flotilla-release package= version=1 sha256=x size=1",
        ] {
            assert!(parse_trusted_comment(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_trusted_comment("timestamp:1\tfile:x")
                .unwrap_err()
                .to_string(),
            "the trusted comment \"timestamp:1?file:x\" is not a flotilla release's (expected `flotilla-release package=P version=V sha256=SHA256 size=N`)"
        );
        assert_eq!(
            parse_trusted_comment("flotilla-release package=a version=1 sha256=x")
                .unwrap_err()
                .problem,
            CommentProblem::Missing("size")
        );
    }

    #[test]
    fn key_ids_read_like_the_minisign_cli_prints_them() {
        // From minisign-verify's own test: key E7620F1842B4E81F.
        assert_eq!(
            public_key_id("RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3").as_deref(),
            Some("E7620F1842B4E81F")
        );
        let sig = "untrusted comment: signature from minisign secret key
RWQf6LRCGA9i59SLOFxz6NxvASXDJeRtuZykwQepbDEGt87ig1BNpWaVWuNrm73YiIiJbq71Wi+dP9eKL8OC351vwIasSSbXxwA=
trusted comment: timestamp:1555779966\tfile:test
QtKMXWyYcwdpZAlPF7tE2ENJkRd1ujvKjlj1m9RtHTBnZPa5WKU5uWRs5GoP5M/VqE81QFuMKI5k/SfNQUaOAA==";
        assert_eq!(signature_key_id(sig).as_deref(), Some("E7620F1842B4E81F"));
        assert_eq!(
            signature_comment(sig),
            Some("timestamp:1555779966\tfile:test")
        );
        assert_eq!(signature_key_id("nonsense"), None);
        assert_eq!(public_key_id("RWQ*"), None);
        assert_eq!(base64_decode("aGk="), Some(b"hi".to_vec()));
        assert_eq!(base64_decode("aA=="), Some(b"h".to_vec()));
        assert_eq!(base64_decode("a==="), None);
    }
}
