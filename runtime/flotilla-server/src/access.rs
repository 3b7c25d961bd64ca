//! Who may call what on the management API: named tokens with roles.
//!
//! - [`Role`]: `read` (GET only), `operate` (tasks: create, pause, resume,
//!   promote, cancel, rollback) and `admin` (releases, policies, nodes,
//!   tokens, the control plane, the audit log, and all `operate` may do).
//! - [`ROLES`]: the one table of every management route and the role it
//!   needs. The guard ([`crate::api::guard`]) looks a request's matched route
//!   up there; a route missing from it is refused (500), so a new route
//!   cannot be served without a role, and a test compares the table with
//!   `openapi.json` both ways.
//! - [`Tokens`]: the tokens a presented bearer value is checked against:
//!   the config's `token` (an admin token named `config`), the config's
//!   `[[tokens]]` (digests), and tokens made with `flotilla token create`
//!   (stored as digests in the `mgmt_tokens` tree of the runner's database,
//!   beside the agents' tokens). Only SHA-256 digests are kept; a presented
//!   token is hashed and compared with every known digest in constant time.
//!
//! With no token at all (no `token`, no `[[tokens]]`, none stored) the API is
//! open and every caller acts as `admin` under the name `anonymous`: the
//! loopback default for a first try. A runner on another address needs
//! `token` or an admin `[[tokens]]` entry ([`crate::Config::check`]).

use crate::error::ApiError;
use axum::http::Method;
use flotilla_engine::store::StoreError;
use flotilla_store_sled::{Kv, SledStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use subtle::ConstantTimeEq;

/// What a token may do; each role can do all the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every GET of the management API.
    Read,
    /// `read`, and creating and steering tasks.
    Operate,
    /// Everything: releases, policies, nodes, tokens, the control plane, the audit log.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
            Role::Admin => "admin",
        }
    }

    /// Whether a holder of `self` may do what needs `need`.
    pub fn allows(self, need: Role) -> bool {
        self >= need
    }
}

/// A role name that is none of `read`, `operate`, `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {0:?}: expected read, operate or admin")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "read" => Ok(Role::Read),
            "operate" => Ok(Role::Operate),
            "admin" => Ok(Role::Admin),
            _ => Err(UnknownRole(s.to_string())),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every management route (method, route as the router spells it) and the
/// role it needs. The only place roles are decided.
pub const ROLES: &[(&str, &str, Role)] = &[
    ("GET", "/v1/nodes", Role::Read),
    ("GET", "/v1/nodes/{id}", Role::Read),
    ("PUT", "/v1/nodes/{id}", Role::Admin),
    ("POST", "/v1/nodes/{id}/enroll-token", Role::Admin),
    ("POST", "/v1/nodes/{id}/reenroll", Role::Admin),
    ("GET", "/v1/releases", Role::Read),
    ("POST", "/v1/releases", Role::Admin),
    // Agents download with their node token; operators with any role.
    (
        "GET",
        "/v1/releases/{package}/{version}/artifact",
        Role::Read,
    ),
    (
        "PUT",
        "/v1/releases/{package}/{version}/artifact",
        Role::Admin,
    ),
    ("PUT", "/v1/control-plane/{component}", Role::Admin),
    ("GET", "/v1/policies", Role::Read),
    ("GET", "/v1/policies/{name}", Role::Read),
    ("PUT", "/v1/policies/{name}", Role::Admin),
    // Compiles a policy (CPU and memory): with the uploads.
    ("POST", "/v1/policies/{name}/check", Role::Admin),
    ("GET", "/v1/tasks", Role::Read),
    ("POST", "/v1/tasks", Role::Operate),
    ("GET", "/v1/tasks/{id}", Role::Read),
    ("GET", "/v1/tasks/{id}/runs", Role::Read),
    ("GET", "/v1/tasks/{id}/events", Role::Read),
    ("POST", "/v1/tasks/{id}/{action}", Role::Operate),
    ("GET", "/v1/tokens", Role::Admin),
    ("POST", "/v1/tokens", Role::Admin),
    ("DELETE", "/v1/tokens/{name}", Role::Admin),
    ("GET", "/v1/audit", Role::Admin),
    // The dashboard's reads (see `dashboard.rs`).
    ("GET", "/v1/whoami", Role::Read),
    ("GET", "/v1/tasks/{id}/live", Role::Read),
    ("GET", "/v1/tasks/{id}/grid", Role::Read),
    ("GET", "/v1/tasks/{id}/grid/nodes", Role::Read),
    ("GET", "/v1/nodes/{id}/history", Role::Read),
    ("GET", "/v1/policies/{name}/source", Role::Read),
];

/// The role `method` on `route` needs; `None` for a route not in [`ROLES`].
pub fn role_of(method: &Method, route: &str) -> Option<Role> {
    ROLES
        .iter()
        .find(|(m, r, _)| *r == route && method.as_str() == *m)
        .map(|(_, _, role)| *role)
}

/// A token listed in the config as a digest (`[[tokens]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token (`flotilla token digest`).
    pub sha256: String,
}

/// The name the config's `token` goes by.
pub const CONFIG_TOKEN_NAME: &str = "config";
/// The caller's name when the API is open (no token configured).
pub const ANONYMOUS: &str = "anonymous";
/// The most tokens `flotilla token create` keeps.
pub const MAX_STORED_TOKENS: usize = 1000;

impl TokenConfig {
    pub fn check(&self) -> Result<(), crate::ConfigError> {
        use crate::ConfigError;
        flotilla_model::check_name("token", &self.name).map_err(ConfigError::TokenName)?;
        if self.name == ANONYMOUS {
            return Err(ConfigError::TokenNameReserved(ANONYMOUS.into()));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::TokenDigest(self.name.clone()));
        }
        Ok(())
    }
}

/// Where a token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config's `token` or `[[tokens]]`: changed by editing the config.
    Config,
    /// `flotilla token create`: revocable through the API.
    Stored,
}

/// A token as `GET /v1/tokens` lists it: never the secret, nor its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub source: Source,
    /// Unix ms; `None` for config tokens.
    pub created_at: Option<u64>,
    /// Unix ms, to the minute (kept in memory, stored at most once a minute).
    pub last_used: Option<u64>,
}

/// What `flotilla token create` stores.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    name: String,
    role: Role,
    sha256: String,
    created_at: u64,
    #[serde(default)]
    last_used: Option<u64>,
}

struct Entry {
    name: String,
    role: Role,
    hash: [u8; 32],
    source: Source,
    created_at: Option<u64>,
    /// Unix ms; 0 = never.
    last_used: AtomicU64,
    /// What the store holds of `last_used`.
    stored_last_used: AtomicU64,
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The management tokens. See the module docs.
pub struct Tokens {
    entries: RwLock<Vec<Entry>>,
    kv: Kv,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The hex SHA-256 of a token, as `[[tokens]]` lists it (`flotilla token digest`).
pub fn token_digest(token: &str) -> String {
    hex::encode(digest(token.trim()))
}

impl Tokens {
    /// The config's tokens and those stored in `store`. A stored token whose
    /// name the config now uses is ignored (the config wins; logged).
    pub fn open(
        store: &SledStore,
        token: Option<&str>,
        configured: &[TokenConfig],
    ) -> Result<Tokens, StoreError> {
        let kv = store.kv("mgmt_tokens")?;
        let mut entries = Vec::new();
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            entries.push(Entry::new(
                CONFIG_TOKEN_NAME,
                Role::Admin,
                digest(t),
                Source::Config,
                None,
                None,
            ));
        }
        for t in configured {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&t.sha256, &mut h)
                .map_err(|e| StoreError::Invalid(format!("token {}: sha256: {e}", t.name)))?;
            entries.push(Entry::new(&t.name, t.role, h, Source::Config, None, None));
        }
        for (_, rec) in kv.all::<TokenRecord>()? {
            if entries.iter().any(|e| e.name == rec.name) {
                tracing::warn!(
                    token = %rec.name,
                    "a stored token has the name of a configured one; the configured one wins"
                );
                continue;
            }
            let mut h = [0u8; 32];
            if hex::decode_to_slice(&rec.sha256, &mut h).is_err() {
                return Err(StoreError::Corrupt {
                    key: format!("mgmt_tokens/{}", rec.name),
                    reason: "sha256 is not 64 hex characters".into(),
                });
            }
            entries.push(Entry::new(
                &rec.name,
                rec.role,
                h,
                Source::Stored,
                Some(rec.created_at),
                rec.last_used,
            ));
        }
        Ok(Tokens {
            entries: RwLock::new(entries),
            kv,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any token exists: if not, the API is open.
    pub fn enabled(&self) -> bool {
        !self.read().is_empty()
    }

    /// Who presents `token`, if anyone. The presented value is hashed and
    /// compared with every known digest in constant time (no early exit).
    pub fn authenticate(&self, token: &str, now: u64) -> Option<Caller> {
        let got = digest(token);
        let entries = self.read();
        let mut found: Option<usize> = None;
        for (i, e) in entries.iter().enumerate() {
            let hit: bool = e.hash.ct_eq(&got).into();
            if hit {
                found = Some(i);
            }
        }
        let e = &entries[found?];
        let minute = now - now % 60_000;
        e.last_used.store(minute, Ordering::Relaxed);
        if e.source == Source::Stored && e.stored_last_used.load(Ordering::Relaxed) < minute {
            e.stored_last_used.store(minute, Ordering::Relaxed);
            // Best effort, unflushed: the next flush of any change carries it.
            let rec = TokenRecord {
                name: e.name.clone(),
                role: e.role,
                sha256: hex::encode(e.hash),
                created_at: e.created_at.unwrap_or(0),
                last_used: Some(minute),
            };
            if let Err(err) = self.kv.put(&e.name, &rec) {
                tracing::warn!(token = %e.name, "storing last_used: {err}");
            }
        }
        Some(Caller {
            name: e.name.clone(),
            role: e.role,
        })
    }

    pub fn list(&self) -> Vec<TokenInfo> {
        let mut out: Vec<TokenInfo> = self
            .read()
            .iter()
            .map(|e| TokenInfo {
                name: e.name.clone(),
                role: e.role,
                source: e.source,
                created_at: e.created_at,
                last_used: Some(e.last_used.load(Ordering::Relaxed)).filter(|t| *t > 0),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Makes a token `name` with `role`: the secret is returned once, only
    /// its digest stored (not flushed: the caller flushes before answering).
    pub fn create(&self, name: &str, role: Role, now: u64) -> Result<String, ApiError> {
        flotilla_model::check_name("token", name)
            .map_err(|e| ApiError::unprocessable(e.to_string()))?;
        if name == ANONYMOUS {
            return Err(ApiError::unprocessable(format!(
                "token name {ANONYMOUS:?} is reserved"
            )));
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.iter().find(|e| e.name == name) {
            return Err(ApiError::conflict(format!(
                "a token named {name} exists (role {}); revoke it first or pick another name",
                e.role
            )));
        }
        if entries.is_empty() && role != Role::Admin {
            return Err(ApiError::conflict(format!(
                "the runner has no token yet: a first {role} token would lock every admin call out"
            ))
            .hint("create an admin token first: flotilla token create NAME --role admin"));
        }
        let stored = entries
            .iter()
            .filter(|e| e.source == Source::Stored)
            .count();
        if stored >= MAX_STORED_TOKENS {
            return Err(ApiError::conflict(format!(
                "the runner keeps at most {MAX_STORED_TOKENS} tokens; revoke unused ones first"
            )));
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw)
            .map_err(|e| ApiError::store_fault(format!("no randomness: {e}")))?;
        let token = format!("flt_{}", hex::encode(raw));
        let hash = digest(&token);
        self.kv.put(
            name,
            &TokenRecord {
                name: name.into(),
                role,
                sha256: hex::encode(hash),
                created_at: now,
                last_used: None,
            },
        )?;
        entries.push(Entry::new(
            name,
            role,
            hash,
            Source::Stored,
            Some(now),
            None,
        ));
        Ok(token)
    }

    /// Revokes the stored token `name` (not flushed: the caller flushes).
    pub fn revoke(&self, name: &str) -> Result<TokenInfo, ApiError> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let Some(i) = entries.iter().position(|e| e.name == name) else {
            return Err(ApiError::not_found(format!("no token named {name}")));
        };
        if entries[i].source == Source::Config {
            return Err(ApiError::conflict(format!(
                "token {name} is in the runner's config; remove it there and restart"
            )));
        }
        let admins = entries.iter().filter(|e| e.role == Role::Admin).count();
        if entries[i].role == Role::Admin && admins == 1 && entries.len() > 1 {
            return Err(ApiError::conflict(format!(
                "token {name} is the last admin token: without it nobody could manage tokens"
            ))
            .hint("create another admin token first"));
        }
        self.kv.remove(name)?;
        let e = entries.remove(i);
        Ok(TokenInfo {
            name: e.name,
            role: e.role,
            source: e.source,
            created_at: e.created_at,
            last_used: Some(e.last_used.load(Ordering::Relaxed)).filter(|t| *t > 0),
        })
    }
}

impl Entry {
    fn new(
        name: &str,
        role: Role,
        hash: [u8; 32],
        source: Source,
        created_at: Option<u64>,
        last_used: Option<u64>,
    ) -> Entry {
        let used = last_used.unwrap_or(0);
        Entry {
            name: name.into(),
            role,
            hash,
            source,
            created_at,
            last_used: AtomicU64::new(used),
            stored_last_used: AtomicU64::new(used),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.allows(Role::Operate));
        assert!(Role::Operate.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Operate));
        assert!(!Role::Operate.allows(Role::Admin));
    }

    #[test]
    fn every_get_is_read_and_the_table_has_no_duplicates() {
        let mut seen = BTreeSet::new();
        for (m, r, role) in ROLES {
            assert!(seen.insert((m, r)), "{m} {r} is listed twice");
            if *m == "GET" && !["/v1/tokens", "/v1/audit"].contains(r) {
                assert_eq!(*role, Role::Read, "{m} {r}");
            }
            if *m != "GET" {
                assert_ne!(*role, Role::Read, "{m} {r} changes state");
            }
        }
        assert_eq!(role_of(&Method::GET, "/v1/nodes"), Some(Role::Read));
        assert_eq!(role_of(&Method::DELETE, "/v1/nodes"), None);
        assert_eq!(role_of(&Method::GET, "/v1/unknown"), None);
    }

    /// Every management operation in `openapi.json` has a role here, and
    /// every route here is documented there.
    #[test]
    fn the_role_table_and_the_openapi_document_agree() {
        let doc: serde_json::Value = serde_json::from_str(crate::api::OPENAPI).unwrap();
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let security = op["security"].to_string();
                if security.contains("management") {
                    let m = method.to_ascii_uppercase();
                    let role = role_of(&m.parse().unwrap(), path);
                    assert!(
                        role.is_some(),
                        "{m} {path} takes the management token but has no role in access::ROLES"
                    );
                    assert_eq!(
                        op["x-flotilla-role"].as_str(),
                        role.map(Role::as_str),
                        "{m} {path}: x-flotilla-role in openapi.json"
                    );
                    documented.insert((m, path.clone()));
                }
            }
        }
        for (m, r, _) in ROLES {
            assert!(
                documented.contains(&(m.to_string(), r.to_string())),
                "{m} {r} is in access::ROLES but not in openapi.json (with security management)"
            );
        }
    }

    #[test]
    fn tokens_are_stored_hashed_survive_a_reopen_and_revoke() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("db")).unwrap();
        let ci = TokenConfig {
            name: "ci".into(),
            role: Role::Operate,
            sha256: token_digest("ci-secret"),
        };
        let tokens = Tokens::open(&store, Some("master"), std::slice::from_ref(&ci)).unwrap();
        assert_eq!(
            tokens.authenticate("master", 0).unwrap(),
            Caller {
                name: "config".into(),
                role: Role::Admin
            }
        );
        assert_eq!(
            tokens.authenticate("ci-secret", 0).unwrap().role,
            Role::Operate
        );
        assert!(tokens.authenticate("ci-secret ", 0).is_none());
        let t = tokens.create("viewer", Role::Read, 5).unwrap();
        assert!(t.starts_with("flt_") && t.len() == 68, "{t}");
        let stored: Vec<(String, serde_json::Value)> =
            store.kv("mgmt_tokens").unwrap().all().unwrap();
        assert!(
            !stored[0].1.to_string().contains(&t[4..]),
            "stored in the clear"
        );
        assert_eq!(
            tokens.create("viewer", Role::Admin, 5).unwrap_err().status,
            409
        );
        assert_eq!(tokens.create("ci", Role::Admin, 5).unwrap_err().status, 409);
        assert_eq!(tokens.revoke("ci").unwrap_err().status, 409);
        drop(tokens);
        let tokens = Tokens::open(&store, Some("master"), &[ci]).unwrap();
        let c = tokens.authenticate(&t, 120_000).unwrap();
        assert_eq!((c.name.as_str(), c.role), ("viewer", Role::Read));
        let listed = tokens.list();
        assert_eq!(
            listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["ci", "config", "viewer"]
        );
        assert_eq!(listed[2].last_used, Some(120_000));
        assert_eq!(listed[2].created_at, Some(5));
        tokens.revoke("viewer").unwrap();
        assert!(tokens.authenticate(&t, 0).is_none());
        assert_eq!(tokens.revoke("viewer").unwrap_err().status, 404);
    }

    #[test]
    fn an_open_runner_cannot_lock_its_admins_out() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("db")).unwrap();
        let tokens = Tokens::open(&store, None, &[]).unwrap();
        assert!(!tokens.enabled());
        let e = tokens.create("ro", Role::Read, 0).unwrap_err();
        assert_eq!(e.status, 409, "{}", e.error);
        tokens.create("root", Role::Admin, 0).unwrap();
        assert!(tokens.enabled());
        tokens.create("ro", Role::Read, 0).unwrap();
        let e = tokens.revoke("root").unwrap_err();
        assert!(e.error.contains("last admin"), "{}", e.error);
        tokens.revoke("ro").unwrap();
        // The very last token may go: the runner is open again, as at first.
        tokens.revoke("root").unwrap();
        assert!(!tokens.enabled());
    }
}
