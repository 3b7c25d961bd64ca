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

/// A secret a listener on a public address lacks: `what` it is (`a
/// management token`), the config `key` and the environment variable `env`
/// that set it.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "refusing to listen on {listen} without {what}: set `{key}` in the config or {env} (make one with `openssl rand -hex 32`), or listen on 127.0.0.1"
    )]
    Missing {
        listen: std::net::SocketAddr,
        what: &'static str,
        key: &'static str,
        env: &'static str,
    },
    #[error(
        "refusing to listen on {listen} with {what} of {len} characters: it must have at least {MIN_LEN} (make one with `openssl rand -hex 32`) and be set as `{key}` in the config or {env}"
    )]
    Short {
        listen: std::net::SocketAddr,
        what: &'static str,
        key: &'static str,
        env: &'static str,
        len: usize,
    },
}

/// Refuses a missing or short secret for a listener on `listen`.
pub fn check(
    what: &'static str,
    key: &'static str,
    env: &'static str,
    secret: Option<&str>,
    listen: std::net::SocketAddr,
) -> Result<(), SecretError> {
    match secret.map(str::chars).map(Iterator::count) {
        None | Some(0) => Err(SecretError::Missing {
            listen,
            what,
            key,
            env,
        }),
        Some(len) if len < MIN_LEN => Err(SecretError::Short {
            listen,
            what,
            key,
            env,
            len,
        }),
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
        let err = check(Some("x")).unwrap_err().to_string();
        assert!(
            err.contains("1 characters") && err.contains("openssl rand -hex 32"),
            "{err}"
        );
        let err = check(None).unwrap_err().to_string();
        assert!(err.contains("without a management token"), "{err}");
        assert!(check(Some(&"a".repeat(31))).is_err());
        assert!(check(Some(&"a".repeat(32))).is_ok());
    }
}
