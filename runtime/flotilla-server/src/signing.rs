//! Release signatures on the runner: `release_keys` and
//! `require_signed_releases` (see [`crate::Config`]). A release's minisign
//! signature is checked when it is registered (its key and trusted comment)
//! and, for uploaded artifacts, against the bytes as they stream in; a
//! refused release or upload stores nothing. The runner's check is a gate
//! for operators' mistakes and a stolen management token; the agents check
//! again on the node, against keys the runner never holds.

use flotilla_model::signing::{
    MAX_SIGNATURE_BYTES, parse_trusted_comment, public_key_id, signature_comment, signature_key_id,
};
use minisign_verify::{PublicKey, Signature, StreamVerifier};

/// A `release_keys` entry that is no key.
#[derive(Debug, thiserror::Error)]
pub enum PublicKeyError {
    #[error(
        "{entry:?} is neither a minisign public key (the base64 line of a .pub file) nor a readable .pub file: {source}"
    )]
    Unreadable {
        entry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{entry} is not a minisign public key file: {source}")]
    NotAKey {
        entry: String,
        #[source]
        source: minisign_verify::Error,
    },
}

/// Which `release_keys` entry is no key, and why.
#[derive(Debug, thiserror::Error)]
#[error("release_keys[{index}]: {source}")]
pub struct ReleaseKeyError {
    pub index: usize,
    #[source]
    pub source: PublicKeyError,
}

/// Why a release's signature is refused. Every case is a refusal of the
/// release (or upload) as given, never a fault of the runner.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature is {0} bytes; a minisign signature is a few hundred")]
    TooLarge(usize),
    #[error("the signature is not a minisign signature (the .minisig text): {0}")]
    NotMinisign(#[source] minisign_verify::Error),
    #[error("the signature is by key {id}, which is not among the runner's release_keys ({known})")]
    UnknownKey { id: String, known: String },
    #[error(transparent)]
    Comment(#[from] flotilla_model::signing::CommentError),
    #[error(transparent)]
    OtherRelease(#[from] flotilla_model::signing::ClaimMismatch),
    #[error("legacy (not prehashed) minisign signatures are not accepted; sign without -l")]
    Legacy,
    #[error("the signature cannot be checked: {0}")]
    Unverifiable(#[source] minisign_verify::Error),
    #[error("the signature is not by any of the runner's release_keys ({known})")]
    NotByAnyKey { known: String },
    #[error(
        "bad signature: it does not verify against key {key} for these bytes (the artifact is not the one that was signed, or the signature was altered)"
    )]
    Bad { key: String },
}

/// The runner's release keys, loaded from the config's `release_keys`.
pub struct ReleaseKeys {
    keys: Vec<(String, PublicKey)>,
}

/// One `release_keys` (or agent `trusted_keys`) entry: a public key's
/// base64 line, or the path of a minisign `.pub` file.
pub fn load_key(entry: &str) -> Result<(String, PublicKey), PublicKeyError> {
    let entry = entry.trim();
    if let Ok(key) = PublicKey::from_base64(entry) {
        let id = public_key_id(entry).unwrap_or_default();
        return Ok((id, key));
    }
    let text = std::fs::read_to_string(entry).map_err(|source| PublicKeyError::Unreadable {
        entry: entry.to_string(),
        source,
    })?;
    let key = PublicKey::decode(&text).map_err(|source| PublicKeyError::NotAKey {
        entry: entry.to_string(),
        source,
    })?;
    let id = text
        .lines()
        .nth(1)
        .and_then(public_key_id)
        .unwrap_or_default();
    Ok((id, key))
}

impl ReleaseKeys {
    pub fn load(entries: &[String]) -> Result<ReleaseKeys, ReleaseKeyError> {
        let keys = entries
            .iter()
            .enumerate()
            .map(|(index, e)| load_key(e).map_err(|source| ReleaseKeyError { index, source }))
            .collect::<Result<_, _>>()?;
        Ok(ReleaseKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn ids(&self) -> String {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        ids.join(", ")
    }

    /// What can be checked before the artifact's bytes: the signature is a
    /// prehashed minisign signature, by one of the keys (when any are
    /// configured), whose trusted comment names this package and version,
    /// and this sha256 and size when they are known. Returns the decoded
    /// signature.
    pub fn check(
        &self,
        minisig: &str,
        package: &str,
        version: &str,
        known: Option<(&str, u64)>,
    ) -> Result<Signature, SignatureError> {
        if minisig.len() > MAX_SIGNATURE_BYTES {
            return Err(SignatureError::TooLarge(minisig.len()));
        }
        let sig = Signature::decode(minisig).map_err(SignatureError::NotMinisign)?;
        if !self.keys.is_empty() {
            let id = signature_key_id(minisig).unwrap_or_default();
            if !self
                .keys
                .iter()
                .any(|(kid, _)| kid.eq_ignore_ascii_case(&id))
            {
                return Err(SignatureError::UnknownKey {
                    id,
                    known: self.ids(),
                });
            }
        }
        let comment = signature_comment(minisig).unwrap_or_default();
        let claim = parse_trusted_comment(comment)?;
        // Before the upload only the package and version can be compared.
        let (sha256, size) = match known {
            Some((sha256, size)) => (sha256.to_string(), size),
            None => (claim.sha256.clone(), claim.size),
        };
        claim.check(package, version, &sha256, size)?;
        Ok(sig)
    }

    /// A verifier over the artifact's bytes for `sig` (checked by
    /// [`ReleaseKeys::check`]), by the key that made it; `None` when no
    /// keys are configured (nothing to verify against).
    pub fn verifier<'a>(
        &'a self,
        sig: &'a Signature,
    ) -> Result<Option<Verifier<'a>>, SignatureError> {
        for (id, key) in &self.keys {
            match key.verify_stream(sig) {
                Ok(v) => {
                    return Ok(Some(Verifier {
                        inner: v,
                        key: id.clone(),
                    }));
                }
                Err(minisign_verify::Error::UnexpectedKeyId) => continue,
                Err(minisign_verify::Error::UnsupportedLegacyMode) => {
                    return Err(SignatureError::Legacy);
                }
                Err(e) => return Err(SignatureError::Unverifiable(e)),
            }
        }
        if self.keys.is_empty() {
            Ok(None)
        } else {
            Err(SignatureError::NotByAnyKey { known: self.ids() })
        }
    }
}

/// The signature's check over an artifact streamed through it.
pub struct Verifier<'a> {
    inner: StreamVerifier<'a>,
    key: String,
}

impl Verifier<'_> {
    pub fn update(&mut self, chunk: &[u8]) {
        self.inner.update(chunk);
    }

    pub fn finish(mut self) -> Result<(), SignatureError> {
        self.inner
            .finalize()
            .map_err(|_| SignatureError::Bad { key: self.key })
    }
}
