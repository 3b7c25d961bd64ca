//! TLS on the runner's own listener (rustls, the `ring` provider).
//!
//! `tls = { cert = "PATH", key = "PATH" }` in the config: PEM files, the
//! certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or
//! SEC1). With `client_ca = "PATH"` as well, the runner asks every client for
//! a certificate issued by that CA: an agent's must name its node in its
//! subject's common name (CN), and on the agents' routes the node in the
//! request must be that node (see [`ClientCert`]). The management API and
//! `/healthz` stay reachable without one: at the TLS level a client
//! certificate is optional; the agents' routes require it.
//!
//! `tls = "proxy"` says a TLS-terminating proxy is in front: the runner
//! itself speaks plain HTTP, and may then listen on a non-loopback address.
//!
//! The files are read at start (a bad file stops the start) and again on
//! SIGHUP ([`reload_on_sighup`]): new connections get the new certificate,
//! open ones keep theirs, the listener stays; a file that does not load is
//! logged and the configuration in force is kept.

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The `tls` setting: the runner's own certificate, or a proxy in front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsConfig {
    /// `tls = "proxy"`: a TLS-terminating proxy is in front; plain HTTP here.
    Proxy,
    /// `tls = { cert, key, client_ca }`.
    Files(TlsFiles),
}

/// The PEM files of `tls = { ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
    /// CA certificates that issue the agents' client certificates: mutual TLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for TlsConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TlsConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"`tls = { cert = "PATH", key = "PATH" }` (optionally `client_ca = "PATH"`) or `tls = "proxy"`"#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TlsConfig, E> {
                match v {
                    "proxy" => Ok(TlsConfig::Proxy),
                    other => Err(E::custom(format!(
                        r#"tls = {other:?} is not a setting: use tls = "proxy" (a TLS-terminating proxy in front) or tls = {{ cert = "PATH", key = "PATH" }}"#
                    ))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TlsConfig, A::Error> {
                TlsFiles::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TlsConfig::Files)
            }
        }
        d.deserialize_any(V)
    }
}

impl TlsConfig {
    /// The files, when the runner terminates TLS itself.
    pub fn files(&self) -> Option<&TlsFiles> {
        match self {
            TlsConfig::Files(f) => Some(f),
            TlsConfig::Proxy => None,
        }
    }

    /// Whether agents must present a client certificate naming their node.
    pub fn requires_client_cert(&self) -> bool {
        self.files().is_some_and(|f| f.client_ca.is_some())
    }
}

/// What a verified client certificate says: the node it names (its subject
/// CN), set as a request extension on every request of a TLS connection of
/// a runner with `client_ca`. `node` is `None` when the client sent no
/// certificate or one without a usable CN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert {
    pub node: Option<Arc<str>>,
}

/// Why the TLS files cannot be used: the file (and the config key that
/// names it) and what is wrong, with the underlying error as its source.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {} is not valid PEM: {source}", path.display())]
    NotPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the {what} {} holds no `BEGIN CERTIFICATE` block", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error(
        "the key (tls.key) {} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {source}",
        path.display()
    )]
    NoKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS: {0}")]
    Rustls(#[source] rustls::Error),
    #[error(
        "the client CA (tls.client_ca) {} holds a certificate that cannot be a trust anchor: {source}",
        path.display()
    )]
    NotAnAnchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the client CA (tls.client_ca) {}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error(
        "the certificate {} and the key {} do not go together: {source}",
        cert.display(),
        key.display()
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The TLS configuration in force, swapped whole on a reload.
pub struct TlsState {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("files", &self.files)
            .finish()
    }
}

impl TlsState {
    /// Reads and checks the files (certificate, matching key, client CA).
    pub fn load(files: &TlsFiles) -> Result<TlsState, TlsError> {
        Ok(TlsState {
            current: RwLock::new(server_config(files)?),
            files: files.clone(),
        })
    }

    /// Reads the files again; on any error the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The configuration for the next connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::NotPem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A rustls server configuration from the files: HTTP/1.1 only, TLS 1.2 and
/// 1.3, client certificates verified against `client_ca` when it is given
/// (and then optional at the TLS level; see the module doc).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&files.cert, "certificate (tls.cert)")?;
    let key_bytes = std::fs::read(&files.key).map_err(|source| TlsError::Read {
        what: "key (tls.key)",
        path: files.key.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|source| TlsError::NoKey {
        path: files.key.clone(),
        source,
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca, "client CA (tls.client_ca)")? {
                roots.add(c).map_err(|source| TlsError::NotAnAnchor {
                    path: ca.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|source| TlsError::ClientCa {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reloads `tls` on every SIGHUP until the task is dropped.
pub async fn reload_on_sighup(tls: Arc<TlsState>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP, TLS files will not be reloaded: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!(
                cert = %tls.files.cert.display(),
                "SIGHUP: TLS certificate, key and client CA reloaded; new connections use them"
            ),
            Err(e) => {
                tracing::error!("SIGHUP: TLS not reloaded, keeping the configuration in force: {e}")
            }
        }
    }
}

/// The node a client certificate names: its subject's single common name,
/// if that is a valid node id. `None` for anything else (no CN, two CNs, a
/// CN in an encoding other than UTF8String, PrintableString or IA5String).
pub fn cert_node(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let cn = common_name(parsed.subject())?;
    let valid = !cn.is_empty()
        && cn.len() <= 253
        && cn
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    valid.then_some(cn)
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The one common name (2.5.4.3) in an X.501 Name's contents (the
/// sequence of relative distinguished names, outer tag removed).
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut found = None;
    while !name.is_empty() {
        let (tag, mut set, rest) = der(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (tag, atv, rest) = der(set)?;
            set = rest;
            if tag != 0x30 {
                return None;
            }
            let (tag, oid, value) = der(atv)?;
            if tag != 0x06 || oid != CN {
                continue;
            }
            let (tag, text, _) = der(value)?;
            // UTF8String, PrintableString, IA5String.
            if !matches!(tag, 0x0c | 0x13 | 0x16) || found.is_some() {
                return None;
            }
            found = Some(String::from_utf8(text.to_vec()).ok()?);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn ca() -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "test CA");
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert, Issuer::new(p, key))
    }

    fn leaf(issuer: &Issuer<'static, KeyPair>, cn: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        for c in cn {
            p.distinguished_name.push(DnType::CommonName, *c);
        }
        p.distinguished_name.push(DnType::OrganizationName, "fleet");
        let key = KeyPair::generate().unwrap();
        (p.signed_by(&key, issuer).unwrap(), key)
    }

    #[test]
    fn the_node_is_the_single_common_name() {
        let (_, issuer) = ca();
        let name = |cn: &[&str]| cert_node(leaf(&issuer, cn).0.der());
        assert_eq!(name(&["edge-0042"]).as_deref(), Some("edge-0042"));
        assert_eq!(name(&["a:b_c.d"]).as_deref(), Some("a:b_c.d"));
        assert_eq!(name(&[]), None, "no CN");
        // rcgen keeps one value per attribute: two CNs by hand.
        let rdn = |c: u8| {
            [
                0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, c,
            ]
        };
        assert_eq!(common_name(&rdn(b'a')).as_deref(), Some("a"));
        assert_eq!(
            common_name(&[rdn(b'a'), rdn(b'b')].concat()),
            None,
            "two CNs"
        );
        assert_eq!(name(&["has space"]), None, "not a node id");
        assert_eq!(common_name(&[0x31, 0x05, 0x30]), None, "truncated");
    }

    #[test]
    fn the_setting_is_files_or_proxy_and_says_what_is_wrong() {
        #[derive(Deserialize)]
        struct C {
            tls: TlsConfig,
        }
        let c: C = toml::from_str(r#"tls = "proxy""#).unwrap();
        assert_eq!(c.tls, TlsConfig::Proxy);
        let c: C = toml::from_str(r#"tls = { cert = "a", key = "b", client_ca = "c" }"#).unwrap();
        assert!(c.tls.requires_client_cert());
        let e = toml::from_str::<C>(r#"tls = "on""#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(r#"tls = "proxy""#), "{e}");
        let e = toml::from_str::<C>(r#"tls = { cert = "a" }"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("key"), "{e}");
        let e = toml::from_str::<C>(r#"tls = { cert = "a", key = "b", ca = "c" }"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason_and_a_reload_keeps_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_cert, issuer) = ca();
        let (cert, key) = leaf(&issuer, &["runner"]);
        let (other, _) = leaf(&issuer, &["runner"]);
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(p("cert.pem"), cert.pem()).unwrap();
        std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
        let files = TlsFiles {
            cert: p("cert.pem"),
            key: p("key.pem"),
            client_ca: Some(p("ca.pem")),
        };
        let state = TlsState::load(&files).unwrap();
        let before = state.config();

        std::fs::write(p("cert.pem"), other.pem()).unwrap();
        let e = state.reload().unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("do not go together"), "{e}");
        assert!(
            Arc::ptr_eq(&before, &state.config()),
            "the old config stays"
        );

        std::fs::write(p("cert.pem"), "garbage").unwrap();
        let e = state.reload().unwrap_err().to_string();
        assert!(e.contains("no `BEGIN CERTIFICATE`"), "{e}");
        std::fs::remove_file(p("key.pem")).unwrap();
        std::fs::write(p("cert.pem"), cert.pem()).unwrap();
        let e = state.reload().unwrap_err();
        assert!(
            matches!(&e, TlsError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{e}"
        );
        assert!(e.to_string().contains("cannot read the key"), "{e}");
        assert!(Arc::ptr_eq(&before, &state.config()));

        std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
        state.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &state.config()), "reloaded");
    }
}
