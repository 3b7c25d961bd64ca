//! Shared secrets (the management token, the enrollment secret): how long
//! they must be, and how a presented one is compared.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The shortest secret accepted on an address other than loopback: 32
/// characters (`openssl rand -hex 32` gives 64).
pub const MIN_LEN: usize = 32;

/// Whether `got` is `want`. Both are hashed first and the digests compared
/// in constant time, so neither the time taken nor an early exit on a
/// length mismatch tells a caller anything about `want`.
pub fn matches(want: &str, got: &str) -> bool {
    let want = Sha256::digest(want.as_bytes());
    let got = Sha256::digest(got.as_bytes());
    want.ct_eq(&got).into()
}

/// Refuses a missing or short secret for a listener on `listen`.
pub fn check(
    what: &str,
    key: &str,
    env: &str,
    secret: Option<&str>,
    listen: std::net::SocketAddr,
) -> Result<(), String> {
    let how = "make one with `openssl rand -hex 32`";
    match secret.map(str::chars).map(Iterator::count) {
        None | Some(0) => Err(format!(
            "refusing to listen on {listen} without {what}: set `{key}` in the config or {env} ({how}), or listen on 127.0.0.1"
        )),
        Some(n) if n < MIN_LEN => Err(format!(
            "refusing to listen on {listen} with {what} of {n} characters: it must have at least {MIN_LEN} ({how}) and be set as `{key}` in the config or {env}"
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_themselves() {
        assert!(matches("s3cret", "s3cret"));
        assert!(!matches("s3cret", "s3cre"));
        assert!(!matches("s3cret", "s3cret "));
        assert!(!matches("s3cret", ""));
        assert!(matches("", ""));
    }

    #[test]
    fn a_public_listener_needs_long_secrets() {
        let public = "0.0.0.0:7878".parse().unwrap();
        let check =
            |s: Option<&str>| check("a management token", "token", "FLOTILLA_TOKEN", s, public);
        let err = check(Some("x")).unwrap_err();
        assert!(
            err.contains("1 characters") && err.contains("openssl rand -hex 32"),
            "{err}"
        );
        let err = check(None).unwrap_err();
        assert!(err.contains("without a management token"), "{err}");
        assert!(check(Some(&"a".repeat(31))).is_err());
        assert!(check(Some(&"a".repeat(32))).is_ok());
    }
}
