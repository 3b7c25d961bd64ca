//! Signed releases on the node: with `trusted_keys` set, an install is
//! refused unless the work carries a minisign signature by one of those
//! keys whose trusted comment names this very release
//! (`flotilla-release package=P version=V sha256=H size=N`, see
//! [`flotilla_model::signing`]) and which verifies over the downloaded
//! bytes. The comment and the key are checked before the download, the
//! bytes after it and before anything is unpacked, so a runner (or whoever
//! holds it) cannot get bytes installed that the keys' owner did not sign.

use flotilla_model::protocol::Artifact;
use flotilla_model::signing::{
    ClaimMismatch, CommentError, MAX_SIGNATURE_BYTES, parse_trusted_comment, public_key_id,
    signature_comment, signature_key_id,
};
use minisign_verify::{PublicKey, Signature};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// A `trusted_keys` entry that is no key.
#[derive(Debug, thiserror::Error)]
pub enum TrustedKeyError {
    #[error(
        "trusted key {entry:?} is neither a minisign public key (the base64 line of a .pub file) nor a readable .pub file: {source}"
    )]
    Unreadable {
        entry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("trusted key file {entry} is not a minisign public key: {source}")]
    NotAKey {
        entry: String,
        #[source]
        source: minisign_verify::Error,
    },
}

/// Why a release is not installed under `trusted_keys`. Every case but
/// [`VerifyError::Read`] is the release's fault (the node declines it);
/// `Read` is the node's own disk failing it.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "no signature: this node installs only releases signed by its trusted_keys ({keys}), and release {package} {version} has none"
    )]
    Unsigned {
        package: String,
        version: String,
        keys: String,
    },
    #[error("bad signature: {0} bytes, not a minisign signature")]
    TooLarge(usize),
    #[error("bad signature: not a minisign signature ({0})")]
    NotMinisign(#[source] minisign_verify::Error),
    #[error(
        "unknown key id {id}: the signature is not by one of this node's trusted_keys ({keys})"
    )]
    UnknownKey { id: String, keys: String },
    #[error("comment mismatch: {0}")]
    Comment(#[source] CommentError),
    #[error("comment mismatch: {0}")]
    OtherRelease(#[source] ClaimMismatch),
    #[error("bad signature: legacy (not prehashed) minisign signatures are not accepted")]
    Legacy,
    #[error("bad signature: {0}")]
    Unverifiable(#[source] minisign_verify::Error),
    /// The downloaded file cannot be read: a fault on the node.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "bad signature: the downloaded bytes or the trusted comment do not verify against key {key} (not what the key's owner signed)"
    )]
    Bad { key: String },
}

impl VerifyError {
    /// A fault of the node (its disk), not a reason to decline the release.
    pub fn is_fault(&self) -> bool {
        matches!(self, VerifyError::Read { .. })
    }
}

/// The minisign public keys this node trusts for releases (several during
/// a key rotation). Empty: signatures are not required or checked.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, PublicKey)>,
}

/// A signature that passed [`TrustedKeys::precheck`]: the key that made it.
#[derive(Clone)]
pub struct Prechecked {
    signature: Signature,
    key: usize,
}

impl std::fmt::Debug for Prechecked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prechecked")
            .field("key", &self.key)
            .field("trusted_comment", &self.signature.trusted_comment())
            .finish()
    }
}

impl TrustedKeys {
    /// Each entry is a public key's base64 line (the second line of a
    /// minisign `.pub` file) or the path of such a file.
    pub fn load(entries: &[String]) -> Result<TrustedKeys, TrustedKeyError> {
        let mut keys = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.trim();
            let (line, key) = match PublicKey::from_base64(entry) {
                Ok(key) => (entry.to_string(), key),
                Err(_) => {
                    let text = std::fs::read_to_string(entry).map_err(|source| {
                        TrustedKeyError::Unreadable {
                            entry: entry.to_string(),
                            source,
                        }
                    })?;
                    let key =
                        PublicKey::decode(&text).map_err(|source| TrustedKeyError::NotAKey {
                            entry: entry.to_string(),
                            source,
                        })?;
                    (text.lines().nth(1).unwrap_or_default().to_string(), key)
                }
            };
            keys.push((public_key_id(&line).unwrap_or_default(), key));
        }
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    fn ids(&self) -> String {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        ids.join(", ")
    }

    /// What can be checked before downloading: the work carries a signature,
    /// by a trusted key, whose trusted comment names this package, version,
    /// sha256 and size. `Ok(None)` when no keys are configured.
    pub fn precheck(
        &self,
        package: &str,
        version: &str,
        artifact: &Artifact,
    ) -> Result<Option<Prechecked>, VerifyError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let Some(minisig) = artifact.signature.as_deref() else {
            return Err(VerifyError::Unsigned {
                package: package.to_string(),
                version: version.to_string(),
                keys: self.ids(),
            });
        };
        if minisig.len() > MAX_SIGNATURE_BYTES {
            return Err(VerifyError::TooLarge(minisig.len()));
        }
        let signature = Signature::decode(minisig).map_err(VerifyError::NotMinisign)?;
        let id = signature_key_id(minisig).unwrap_or_default();
        let Some(key) = self
            .keys
            .iter()
            .position(|(kid, _)| kid.eq_ignore_ascii_case(&id))
        else {
            return Err(VerifyError::UnknownKey {
                id,
                keys: self.ids(),
            });
        };
        let claim = parse_trusted_comment(signature_comment(minisig).unwrap_or_default())
            .map_err(VerifyError::Comment)?;
        claim
            .check(package, version, &artifact.sha256, artifact.size)
            .map_err(VerifyError::OtherRelease)?;
        Ok(Some(Prechecked { signature, key }))
    }

    /// The downloaded file verifies against the prechecked signature (its
    /// bytes and its trusted comment both).
    pub fn verify_file(&self, checked: &Prechecked, path: &Path) -> Result<(), VerifyError> {
        let (id, key) = &self.keys[checked.key];
        let mut v = key.verify_stream(&checked.signature).map_err(|e| match e {
            minisign_verify::Error::UnsupportedLegacyMode => VerifyError::Legacy,
            e => VerifyError::Unverifiable(e),
        })?;
        let read = |source| VerifyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(read)?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = f.read(&mut buf).map_err(read)?;
            if n == 0 {
                break;
            }
            v.update(&buf[..n]);
        }
        v.finalize()
            .map_err(|_| VerifyError::Bad { key: id.clone() })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flotilla_model::signing::trusted_comment;
    use sha2::{Digest, Sha256};

    /// A key pair made in process: (public key base64 line, the pair).
    pub fn keypair() -> (String, minisign::KeyPair) {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        (kp.pk.to_base64(), kp)
    }

    /// A `.minisig` text of `bytes` with `comment` as its trusted comment.
    pub fn sign(kp: &minisign::KeyPair, bytes: &[u8], comment: &str) -> String {
        minisign::sign(Some(&kp.pk), &kp.sk, bytes, Some(comment), None)
            .unwrap()
            .into_string()
    }

    /// The signature of `bytes` as release `package` `version`.
    pub fn sign_release(
        kp: &minisign::KeyPair,
        package: &str,
        version: &str,
        bytes: &[u8],
    ) -> String {
        let sha = hex::encode(Sha256::digest(bytes));
        sign(
            kp,
            bytes,
            &trusted_comment(package, version, &sha, bytes.len() as u64),
        )
    }

    fn artifact(bytes: &[u8], signature: Option<String>) -> Artifact {
        Artifact {
            url: "/a".into(),
            sha256: hex::encode(Sha256::digest(bytes)),
            size: bytes.len() as u64,
            kind: Default::default(),
            signature,
        }
    }

    #[test]
    fn a_signature_by_a_trusted_key_naming_this_release_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let (old_pub, old) = keypair();
        let (new_pub, new) = keypair();
        // Rotation: both keys trusted, one as a line, one as a .pub file.
        let pub_file = tmp.path().join("new.pub");
        std::fs::write(
            &pub_file,
            format!("untrusted comment: minisign public key\n{new_pub}\n"),
        )
        .unwrap();
        let keys = TrustedKeys::load(&[old_pub, pub_file.display().to_string()]).unwrap();
        assert_eq!(keys.len(), 2);
        let bytes = b"the release".to_vec();
        let file = tmp.path().join("artifact");
        std::fs::write(&file, &bytes).unwrap();
        for kp in [&old, &new] {
            let a = artifact(&bytes, Some(sign_release(kp, "edge", "2.0.0", &bytes)));
            let checked = keys.precheck("edge", "2.0.0", &a).unwrap().unwrap();
            keys.verify_file(&checked, &file).unwrap();
        }
        // No keys: nothing is required or checked.
        assert!(
            TrustedKeys::default()
                .precheck("edge", "2.0.0", &artifact(&bytes, None))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn each_refusal_names_its_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let (pub_line, kp) = keypair();
        let (_, stranger) = keypair();
        let keys = TrustedKeys::load(&[pub_line]).unwrap();
        let bytes = b"the release".to_vec();
        let file = tmp.path().join("artifact");
        std::fs::write(&file, &bytes).unwrap();

        let err = keys
            .precheck("edge", "2.0.0", &artifact(&bytes, None))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("no signature"), "{err}");

        let by_stranger = sign_release(&stranger, "edge", "2.0.0", &bytes);
        let err = keys
            .precheck("edge", "2.0.0", &artifact(&bytes, Some(by_stranger)))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unknown key id "), "{err}");

        // A valid signature of this artifact as another version.
        let other_version = sign_release(&kp, "edge", "1.9.0", &bytes);
        let err = keys
            .precheck("edge", "2.0.0", &artifact(&bytes, Some(other_version)))
            .unwrap_err();
        assert!(matches!(err, VerifyError::OtherRelease(_)), "{err}");
        let err = err.to_string();
        assert!(
            err.starts_with("comment mismatch") && err.contains("version 1.9.0 (not 2.0.0)"),
            "{err}"
        );
        let not_ours = sign(&kp, &bytes, "timestamp:1 file:x");
        let err = keys
            .precheck("edge", "2.0.0", &artifact(&bytes, Some(not_ours)))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("comment mismatch"), "{err}");

        let err = keys
            .precheck("edge", "2.0.0", &artifact(&bytes, Some("junk".into())))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad signature"), "{err}");

        // The comment names these bytes, but the file on disk is others of
        // the same size (swapped after the digest check, say).
        let good = sign_release(&kp, "edge", "2.0.0", &bytes);
        let checked = keys
            .precheck("edge", "2.0.0", &artifact(&bytes, Some(good.clone())))
            .unwrap()
            .unwrap();
        std::fs::write(&file, b"the relea5e").unwrap();
        let err = keys.verify_file(&checked, &file).unwrap_err().to_string();
        assert!(err.starts_with("bad signature"), "{err}");

        // A trusted comment edited after signing (to name other bytes):
        // the comment matches the work, the signature does not verify.
        let forged_bytes = b"other bytes".to_vec();
        let forged_sha = hex::encode(Sha256::digest(&forged_bytes));
        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines[2] = format!(
            "trusted comment: {}",
            trusted_comment("edge", "2.0.0", &forged_sha, forged_bytes.len() as u64)
        );
        let forged = lines.join("\n");
        std::fs::write(&file, &forged_bytes).unwrap();
        let checked = keys
            .precheck("edge", "2.0.0", &artifact(&forged_bytes, Some(forged)))
            .unwrap()
            .unwrap();
        let err = keys.verify_file(&checked, &file).unwrap_err();
        assert!(matches!(err, VerifyError::Bad { .. }), "{err}");
        assert!(!err.is_fault(), "{err}");

        // The file cannot be read: a fault of the node, not of the release.
        let err = keys
            .verify_file(&checked, &tmp.path().join("gone"))
            .unwrap_err();
        assert!(err.is_fault(), "{err}");
    }

    #[test]
    fn a_key_that_is_neither_a_key_nor_a_file_is_an_error() {
        let err = TrustedKeys::load(&["RWQnot-a-key".into()]).unwrap_err();
        assert!(matches!(err, TrustedKeyError::Unreadable { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains("neither a minisign public key"), "{err}");
    }
}
