//! What the runner knows besides tasks: nodes, releases and their artifacts,
//! control-plane versions, agent tokens, one-time enrollment tokens and
//! re-enrollment allowances, webhook deliveries and policies.
//! Records live in sled trees of the engine's database (so one flush covers
//! them); artifacts and policies are files in the data directory.
//!
//! The engine reads nodes through an in-memory [`MemoryFleet`] that every
//! write here updates after it is stored.

use super::metrics::Metrics;
use flotilla_engine::store::StoreError;
use flotilla_engine::{Command, PolicySource};
use flotilla_model::protocol::{Artifact, Work};
use flotilla_model::{
    Node, PolicyInfo, Release, ReleaseKind, ReleaseRecord, TaskContext, WaveReport,
};
use flotilla_policy::world::{Delivery, Fleet, MemoryFleet, World};
use flotilla_policy::{
    CompiledPolicy, Limits, Policy, PolicyError, PolicyKind, RhaiPolicy, WasmRuntime,
};
use flotilla_store_sled::{Kv, SledStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AgentRecord {
    token_sha256: String,
    enrolled_at: u64,
}

/// A one-time enrollment token for one node id (`flotilla node token`),
/// kept as its hash only.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EnrollTokenRecord {
    token_sha256: String,
    /// Unix ms.
    expires_at: u64,
}

/// An operator's leave for an enrolled node id to enroll once more
/// (`flotilla node reenroll`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReenrollRecord {
    /// Unix ms.
    expires_at: u64,
}

/// What a presented secret is to a node's one-time enrollment token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeToken {
    /// It is that node's token, unexpired.
    Valid,
    /// It was that node's token; it expired at this Unix ms.
    Expired(u64),
    /// It is not (the node has none, or another one).
    No,
}

/// Whether an operator allowed an enrolled node to enroll again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reenroll {
    Allowed,
    /// The allowance ended at this Unix ms.
    Expired(u64),
    No,
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Token hashes both ways: a node's own (to check a node's call) and the
/// node of a hash (to tell "another node's token" from "no token", and to
/// let any enrolled node download artifacts) — each one lookup, however
/// many nodes are enrolled.
#[derive(Default)]
struct Tokens {
    by_node: HashMap<String, [u8; 32]>,
    by_hash: HashMap<[u8; 32], String>,
}

impl Tokens {
    fn set(&mut self, node: String, hash: [u8; 32]) {
        if let Some(old) = self.by_node.insert(node.clone(), hash) {
            self.by_hash.remove(&old);
        }
        self.by_hash.insert(hash, node);
    }
}

pub struct Inventory {
    fleet: Arc<MemoryFleet>,
    nodes: Kv,
    releases: Kv,
    release_cache: RwLock<BTreeMap<(String, String), ReleaseRecord>>,
    control_plane: Kv,
    control_plane_cache: RwLock<BTreeMap<String, String>>,
    agents: Kv,
    tokens: RwLock<Tokens>,
    enroll_tokens: Kv,
    reenroll: Kv,
    /// Held while one enrollment is decided and stored, so two racing
    /// enrollments of one node id (or one one-time token) cannot both pass.
    enrolling: Mutex<()>,
    pub deliveries: Kv,
    artifacts: PathBuf,
}

fn release_key(package: &str, version: &str) -> String {
    format!("{package}\u{0}{version}")
}

impl Inventory {
    /// Loads everything stored; `control_plane` from the config seeds
    /// components that have no stored version yet.
    pub fn open(
        store: &SledStore,
        data: &Path,
        control_plane: BTreeMap<String, String>,
    ) -> Result<Inventory, StoreError> {
        let nodes = store.kv("nodes")?;
        let releases = store.kv("releases")?;
        let cp = store.kv("control_plane")?;
        let agents = store.kv("agents")?;
        let fleet = MemoryFleet::new(nodes.all::<Node>()?.into_iter().map(|(_, n)| n));
        let release_cache = releases
            .all::<ReleaseRecord>()?
            .into_iter()
            .map(|(_, r)| ((r.package.clone(), r.version.clone()), r))
            .collect();
        let mut cp_cache: BTreeMap<String, String> = cp.all()?.into_iter().collect();
        for (k, v) in control_plane {
            if let std::collections::btree_map::Entry::Vacant(slot) = cp_cache.entry(k) {
                cp.put(slot.key(), &v)?;
                slot.insert(v);
            }
        }
        let mut tokens = Tokens::default();
        for (node, rec) in agents.all::<AgentRecord>()? {
            let mut h = [0u8; 32];
            if hex::decode_to_slice(&rec.token_sha256, &mut h).is_ok() {
                tokens.set(node, h);
            }
        }
        let artifacts = data.join("artifacts");
        std::fs::create_dir_all(&artifacts)
            .map_err(|e| StoreError::io(format!("creating {}", artifacts.display()), e))?;
        Ok(Inventory {
            fleet: Arc::new(fleet),
            nodes,
            releases,
            release_cache: RwLock::new(release_cache),
            control_plane: cp,
            control_plane_cache: RwLock::new(cp_cache),
            agents,
            tokens: RwLock::new(tokens),
            enroll_tokens: store.kv("enroll_tokens")?,
            reenroll: store.kv("reenroll")?,
            enrolling: Mutex::new(()),
            deliveries: store.kv("deliveries")?,
            artifacts,
        })
    }

    pub fn fleet(&self) -> Arc<MemoryFleet> {
        self.fleet.clone()
    }

    // ----- nodes -----

    /// Stores a node and makes it visible to the engine.
    pub fn upsert_node(&self, node: Node) -> Result<(), StoreError> {
        self.nodes.put(&node.id, &node)?;
        self.fleet.upsert(node);
        Ok(())
    }

    pub fn node(&self, id: &str) -> Option<Node> {
        self.fleet.get(id)
    }

    /// Changes a node with `f`; stores it only when something other than
    /// `last_seen` changed (a poll must not cost a write).
    pub fn update_node(
        &self,
        id: &str,
        f: impl FnOnce(&mut Node),
    ) -> Result<Option<Node>, StoreError> {
        let Some(before) = self.fleet.get(id) else {
            return Ok(None);
        };
        let mut after = before.clone();
        f(&mut after);
        let mut cmp = after.clone();
        cmp.last_seen = before.last_seen;
        if cmp != before {
            self.nodes.put(id, &after)?;
        }
        self.fleet.upsert(after.clone());
        Ok(Some(after))
    }

    pub fn all_nodes(&self) -> Vec<Node> {
        self.fleet.query(&Default::default(), 0, u32::MAX)
    }

    // ----- releases -----

    pub fn release(&self, package: &str, version: &str) -> Option<ReleaseRecord> {
        let cache = self.release_cache.read().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cache.get(&(package.to_string(), version.to_string())) {
            return Some(r.clone());
        }
        // Versions compare as semver: `v1.13` finds `1.13.0`.
        let want = flotilla_version::parse(version).ok()?;
        cache
            .values()
            .find(|r| {
                r.package == package && flotilla_version::parse(&r.version).is_ok_and(|v| v == want)
            })
            .cloned()
    }

    pub fn releases_of(&self, package: Option<&str>) -> Vec<ReleaseRecord> {
        let cache = self.release_cache.read().unwrap_or_else(|e| e.into_inner());
        cache
            .values()
            .filter(|r| package.is_none_or(|p| r.package == p))
            .cloned()
            .collect()
    }

    pub fn put_release(&self, r: ReleaseRecord) -> Result<(), StoreError> {
        self.releases
            .put(&release_key(&r.package, &r.version), &r)?;
        self.release_cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((r.package.clone(), r.version.clone()), r);
        Ok(())
    }

    pub fn artifact_file(&self, sha256: &str) -> PathBuf {
        self.artifacts.join(sha256)
    }

    pub fn artifacts_dir(&self) -> &Path {
        &self.artifacts
    }

    pub fn set_control_plane(&self, component: &str, version: &str) -> Result<(), StoreError> {
        self.control_plane.put(component, &version)?;
        self.control_plane_cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(component.into(), version.into());
        Ok(())
    }

    // ----- agents -----

    /// Issues a fresh token for `node` (replacing any earlier one).
    pub fn issue_token(&self, node: &str, now: u64) -> Result<String, StoreError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| StoreError::io("no randomness", e.to_string()))?;
        let token = format!("fln_{}", hex::encode(raw));
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.agents.put(
            node,
            &AgentRecord {
                token_sha256: hex::encode(hash),
                enrolled_at: now,
            },
        )?;
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set(node.to_string(), hash);
        Ok(token)
    }

    /// Whether `token` is `node`'s token (compared in constant time).
    pub fn check_token(&self, node: &str, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens
            .by_node
            .get(node)
            .is_some_and(|want| bool::from(want.ct_eq(&hash)))
    }

    /// Whether `node` holds a token (has enrolled).
    pub fn is_enrolled(&self, node: &str) -> bool {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens.by_node.contains_key(node)
    }

    /// Serialises enrollments: hold it from the decision to the stored token.
    pub fn enrolling(&self) -> std::sync::MutexGuard<'_, ()> {
        self.enrolling.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A one-time token that enrolls `node` (and no other id) once before
    /// `expires_at` (Unix ms); replaces any earlier one. Only its hash is kept.
    pub fn issue_enroll_token(&self, node: &str, expires_at: u64) -> Result<String, StoreError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| StoreError::io("no randomness", e.to_string()))?;
        let token = format!("flne_{}", hex::encode(raw));
        self.enroll_tokens.put(
            node,
            &EnrollTokenRecord {
                token_sha256: hex::encode(sha256(&token)),
                expires_at,
            },
        )?;
        Ok(token)
    }

    /// Whether `presented` is `node`'s one-time enrollment token (compared in
    /// constant time). Changes nothing: [`Inventory::consume_enroll_token`]
    /// once the enrollment is stored.
    pub fn enroll_token(
        &self,
        node: &str,
        presented: &str,
        now: u64,
    ) -> Result<NodeToken, StoreError> {
        use subtle::ConstantTimeEq;
        let Some(rec) = self.enroll_tokens.get::<EnrollTokenRecord>(node)? else {
            return Ok(NodeToken::No);
        };
        let mut want = [0u8; 32];
        if hex::decode_to_slice(&rec.token_sha256, &mut want).is_err()
            || !bool::from(want.ct_eq(&sha256(presented)))
        {
            return Ok(NodeToken::No);
        }
        if now >= rec.expires_at {
            // Of no use to anyone any more.
            self.enroll_tokens.remove(node)?;
            return Ok(NodeToken::Expired(rec.expires_at));
        }
        Ok(NodeToken::Valid)
    }

    pub fn consume_enroll_token(&self, node: &str) -> Result<(), StoreError> {
        self.enroll_tokens.remove(node)
    }

    /// Lets the enrolled `node` enroll once more before `expires_at`.
    pub fn allow_reenroll(&self, node: &str, expires_at: u64) -> Result<(), StoreError> {
        self.reenroll.put(node, &ReenrollRecord { expires_at })
    }

    /// Whether an operator allowed `node` to enroll again (an expired
    /// allowance is dropped). Changes nothing else:
    /// [`Inventory::consume_reenroll`] once the enrollment is stored.
    pub fn reenroll_allowed(&self, node: &str, now: u64) -> Result<Reenroll, StoreError> {
        match self.reenroll.get::<ReenrollRecord>(node)? {
            None => Ok(Reenroll::No),
            Some(r) if now >= r.expires_at => {
                self.reenroll.remove(node)?;
                Ok(Reenroll::Expired(r.expires_at))
            }
            Some(_) => Ok(Reenroll::Allowed),
        }
    }

    pub fn consume_reenroll(&self, node: &str) -> Result<(), StoreError> {
        self.reenroll.remove(node)
    }

    /// Whether `token` belongs to any enrolled node (artifact downloads).
    pub fn any_token(&self, token: &str) -> bool {
        self.token_node(token).is_some()
    }

    /// The node whose token `token` is.
    pub fn token_node(&self, token: &str) -> Option<String> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens.by_hash.get(&hash).cloned()
    }

    /// The agent-facing form of an engine command.
    pub fn work(&self, command: &Command) -> (String, Work) {
        match command {
            Command::Deliver {
                task,
                node,
                package,
                version,
                backup,
                permanent,
            } => {
                let release = self.release(package, version);
                let artifact = match release {
                    Some(r) => Artifact {
                        url: r.url.clone().unwrap_or_else(|| r.artifact_path()),
                        sha256: r.sha256.clone(),
                        size: r.size,
                        kind: r.kind,
                        signature: r.signature.clone(),
                    },
                    // Refused at task creation; an agent given this fails
                    // its digest check and reports it.
                    None => Artifact {
                        url: format!("/v1/releases/{package}/{version}/artifact"),
                        sha256: String::new(),
                        size: 0,
                        kind: ReleaseKind::Full,
                        signature: None,
                    },
                };
                (
                    node.clone(),
                    Work::Install {
                        task: task.clone(),
                        package: package.clone(),
                        version: version.clone(),
                        artifact,
                        backup: backup.clone(),
                        permanent: *permanent,
                    },
                )
            }
            Command::Restore {
                task,
                node,
                package,
                version,
            } => (
                node.clone(),
                Work::Restore {
                    task: task.clone(),
                    package: package.clone(),
                    version: version.clone(),
                },
            ),
            Command::MakePermanent {
                task,
                node,
                package,
                version,
            } => (
                node.clone(),
                Work::MakePermanent {
                    task: task.clone(),
                    package: package.clone(),
                    version: version.clone(),
                },
            ),
        }
    }
}

impl Delivery for Inventory {
    fn releases(&self, package: &str) -> Vec<Release> {
        self.releases_of(Some(package))
            .into_iter()
            .map(|r| Release {
                package: r.package,
                version: r.version,
                kind: r.kind,
                size: r.size,
                sha256: r.sha256,
            })
            .collect()
    }

    fn control_plane_version(&self, component: &str) -> Option<String> {
        self.control_plane_cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(component)
            .cloned()
    }
}

// ----- policies -----

/// Policies shipped with the runner, usable by name without an upload.
pub const BUILTIN: &[(&str, &str)] = &[
    ("canary", include_str!("../../../policies/canary.rhai")),
    (
        "version-gate",
        include_str!("../../../policies/version-gate.rhai"),
    ),
];

/// A policy as listed by the API.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyListing {
    pub name: String,
    pub kind: &'static str,
    pub sha256: String,
    pub size: u64,
    pub builtin: bool,
    pub info: PolicyInfo,
}

/// Why an upload is not stored: the policy is refused, or the runner's
/// disk failed to store it (a fault: sending it again later is right).
#[derive(Debug, thiserror::Error)]
pub enum SavePolicyError {
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    #[error("policy {name}: storing the policy: {source}")]
    Store {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Uploaded policies in `DATA/policies/NAME.{wasm,rhai}` and the built-in
/// ones; an upload of a built-in name takes its place.
pub struct PolicyDir {
    dir: PathBuf,
    runtime: WasmRuntime,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Compiled components by name, with the digest they were compiled from.
    compiled: Mutex<HashMap<String, (String, Arc<CompiledPolicy>)>>,
}

enum Source {
    Wasm(PathBuf),
    Rhai { text: String, builtin: bool },
}

impl PolicyDir {
    pub fn new(dir: PathBuf, limits: Limits, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        let cache = dir.parent().map(|d| d.join("cache"));
        Ok(PolicyDir {
            runtime: WasmRuntime::new(cache)?,
            dir,
            limits,
            metrics,
            compiled: Mutex::new(HashMap::new()),
        })
    }

    /// Where `name` comes from: an uploaded component or script, else a
    /// built-in; `Ok(None)` when there is no such policy. A stored file that
    /// is there but cannot be read is a fault ([`PolicyError::Io`]), never
    /// taken for a missing one.
    fn source(&self, name: &str) -> Result<Option<Source>, PolicyError> {
        // A name is never a path: nothing outside the directory is read,
        // whichever caller forgot to check.
        if flotilla_model::check_name("policy", name).is_err() {
            return Ok(None);
        }
        let reading = |p: &Path, e| PolicyError::io(name, format!("reading {}", p.display()), e);
        let wasm = self.dir.join(format!("{name}.wasm"));
        match std::fs::metadata(&wasm) {
            Ok(m) if m.is_file() => return Ok(Some(Source::Wasm(wasm))),
            Ok(_) => {
                let e = std::io::Error::other("not a regular file");
                return Err(reading(&wasm, e));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(reading(&wasm, e)),
        }
        let rhai = self.dir.join(format!("{name}.rhai"));
        match std::fs::read_to_string(&rhai) {
            Ok(text) => {
                return Ok(Some(Source::Rhai {
                    text,
                    builtin: false,
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(reading(&rhai, e)),
        }
        Ok(BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| Source::Rhai {
                text: text.to_string(),
                builtin: true,
            }))
    }

    fn compiled(&self, name: &str, path: &Path) -> Result<Arc<CompiledPolicy>, PolicyError> {
        let bytes = std::fs::read(path)
            .map_err(|e| PolicyError::io(name, format!("reading {}", path.display()), e))?;
        self.compiled_bytes(name, name, &bytes)
    }

    /// Compiles `bytes` once per `key` and digest.
    fn compiled_bytes(
        &self,
        name: &str,
        key: &str,
        bytes: &[u8],
    ) -> Result<Arc<CompiledPolicy>, PolicyError> {
        let digest = hex::encode(Sha256::digest(bytes));
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((d, c)) = compiled.get(key)
            && *d == digest
        {
            return Ok(c.clone());
        }
        let c = Arc::new(self.runtime.load_bytes(name, bytes)?);
        compiled.insert(key.to_string(), (digest, c.clone()));
        Ok(c)
    }

    /// Where pinned copies of policies live: `DATA/policies/.pinned/SHA256.KIND`
    /// (a task's bytes, kept whatever is uploaded later under its name).
    pub fn pinned_dir(&self) -> PathBuf {
        self.dir.join(".pinned")
    }

    /// Keeps a copy of `name`'s current bytes under their digest.
    fn pin_bytes(&self, name: &str) -> Result<String, PolicyError> {
        let err = |reason: String| PolicyError::Load {
            policy: name.into(),
            reason,
        };
        let (bytes, kind) = match self.source(name)? {
            None => return Err(err("no such policy".into())),
            Some(Source::Wasm(p)) => (
                std::fs::read(&p)
                    .map_err(|e| PolicyError::io(name, format!("reading {}", p.display()), e))?,
                "wasm",
            ),
            Some(Source::Rhai { text, .. }) => (text.into_bytes(), "rhai"),
        };
        let sha = hex::encode(Sha256::digest(&bytes));
        let dir = self.pinned_dir();
        let path = dir.join(format!("{sha}.{kind}"));
        if !path.is_file() {
            let io = |e| PolicyError::io(name, "keeping a copy of the policy", e);
            std::fs::create_dir_all(&dir).map_err(io)?;
            let tmp = dir.join(format!(".{sha}.{kind}.tmp"));
            std::fs::write(&tmp, &bytes).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        Ok(sha)
    }

    /// The pinned bytes of `sha256` and their kind, checked against the digest.
    pub fn pinned(&self, name: &str, sha256: &str) -> Result<(Vec<u8>, &'static str), PolicyError> {
        let err = |reason: String| PolicyError::Load {
            policy: name.into(),
            reason,
        };
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(err(format!("{sha256:?} is not a lowercase hex SHA-256")));
        }
        let dir = self.pinned_dir();
        for kind in ["wasm", "rhai"] {
            let path = dir.join(format!("{sha256}.{kind}"));
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    let context = format!("reading {}", path.display());
                    return Err(PolicyError::io(name, context, e));
                }
            };
            if hex::encode(Sha256::digest(&bytes)) != sha256 {
                return Err(err(format!(
                    "{} does not hash to its name: the task's policy bytes were changed",
                    path.display()
                )));
            }
            return Ok((bytes, kind));
        }
        Err(err(format!(
            "the bytes this task was created with (sha256 {sha256}) are gone from {}",
            dir.display()
        )))
    }

    fn instantiate(&self, name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        if let Err(e) = flotilla_model::check_name("policy", name) {
            return Err(PolicyError::Load {
                policy: name.into(),
                reason: e.to_string(),
            });
        }
        match self.source(name)? {
            None => Err(PolicyError::Load {
                policy: name.into(),
                reason: "no such policy: upload it with `flotilla policy upload NAME FILE` (built in: canary, version-gate)".into(),
            }),
            Some(Source::Wasm(path)) => Ok(Box::new(
                self.compiled(name, &path)?.instantiate(world, self.limits)?,
            )),
            Some(Source::Rhai { text, .. }) => Ok(Box::new(RhaiPolicy::load_str(
                name,
                &text,
                world,
                self.limits,
            )?)),
        }
    }

    /// Checks `bytes` (a component or a Rhai script) without storing it.
    pub fn check(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<(&'static str, PolicyInfo), PolicyError> {
        if bytes.starts_with(b"\0asm") {
            let c = self.runtime.load_bytes(name, bytes)?;
            Ok(("wasm", c.info().clone()))
        } else {
            let text = std::str::from_utf8(bytes).map_err(|_| PolicyError::Load {
                policy: name.into(),
                reason: "neither a WebAssembly component (no `\\0asm` header) nor UTF-8 Rhai text"
                    .into(),
            })?;
            let p = RhaiPolicy::load_str(name, text, World::empty(), self.limits)?;
            Ok(("rhai", p.info().clone()))
        }
    }

    /// Checks and stores a policy under `name`.
    pub fn save(&self, name: &str, bytes: &[u8]) -> Result<PolicyListing, SavePolicyError> {
        flotilla_model::check_name("policy", name).map_err(|e| PolicyError::Load {
            policy: name.into(),
            reason: e.to_string(),
        })?;
        let (kind, info) = self.check(name, bytes)?;
        let io = |source| SavePolicyError::Store {
            name: name.into(),
            source,
        };
        let path = self.dir.join(format!("{name}.{kind}"));
        let tmp = self.dir.join(format!(".{name}.{kind}.tmp"));
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })?;
        let other = if kind == "wasm" { "rhai" } else { "wasm" };
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.{other}")));
        Ok(PolicyListing {
            name: name.into(),
            kind,
            sha256: hex::encode(Sha256::digest(bytes)),
            size: bytes.len() as u64,
            builtin: false,
            info,
        })
    }

    /// One policy, as listed.
    pub fn get(&self, name: &str) -> Result<Option<PolicyListing>, PolicyError> {
        let (bytes, builtin) = match self.source(name)? {
            None => return Ok(None),
            Some(Source::Wasm(p)) => (
                std::fs::read(&p)
                    .map_err(|e| PolicyError::io(name, format!("reading {}", p.display()), e))?,
                false,
            ),
            Some(Source::Rhai { text, builtin }) => (text.into_bytes(), builtin),
        };
        let (kind, info) = self.check(name, &bytes)?;
        Ok(Some(PolicyListing {
            name: name.into(),
            kind,
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
            builtin,
            info,
        }))
    }

    /// The text of a Rhai policy: `None` when there is no such policy,
    /// `Some(None)` for a component (its source is not kept here).
    pub fn rhai_text(&self, name: &str) -> Result<Option<Option<String>>, PolicyError> {
        Ok(self.source(name)?.map(|s| match s {
            Source::Wasm(_) => None,
            Source::Rhai { text, .. } => Some(text),
        }))
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
        if let Ok(dir) = std::fs::read_dir(&self.dir) {
            for e in dir.flatten() {
                let p = e.path();
                if let (Some(stem), Some(_)) = (
                    p.file_stem().and_then(|s| s.to_str()),
                    p.extension()
                        .and_then(|s| s.to_str())
                        .and_then(PolicyKind::from_extension),
                ) && !stem.starts_with('.')
                {
                    names.push(stem.to_string());
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }
}

impl PolicySource for PolicyDir {
    fn load(&self, name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        let inner = self.instantiate(name, world)?;
        Ok(Box::new(Timed {
            inner,
            metrics: self.metrics.clone(),
        }))
    }

    fn pin(&self, name: &str) -> Result<Option<String>, PolicyError> {
        self.pin_bytes(name).map(Some)
    }

    fn load_pinned(
        &self,
        name: &str,
        sha256: &str,
        world: World,
    ) -> Result<Box<dyn Policy>, PolicyError> {
        let (bytes, kind) = self.pinned(name, sha256)?;
        let inner: Box<dyn Policy> = if kind == "wasm" {
            Box::new(
                self.compiled_bytes(name, &format!("@{sha256}"), &bytes)?
                    .instantiate(world, self.limits)?,
            )
        } else {
            let text = String::from_utf8(bytes).map_err(|_| PolicyError::Load {
                policy: name.into(),
                reason: "a pinned Rhai policy is not UTF-8".into(),
            })?;
            Box::new(RhaiPolicy::load_str(name, &text, world, self.limits)?)
        };
        Ok(Box::new(Timed {
            inner,
            metrics: self.metrics.clone(),
        }))
    }
}

/// Records each hook call's latency for `/metrics`.
struct Timed {
    inner: Box<dyn Policy>,
    metrics: Arc<Metrics>,
}

impl Timed {
    fn time<R>(&mut self, hook: &'static str, f: impl FnOnce(&mut dyn Policy) -> R) -> R {
        let start = Instant::now();
        let r = f(&mut *self.inner);
        self.metrics.policy_call(hook, start.elapsed());
        r
    }
}

impl Policy for Timed {
    fn info(&self) -> &PolicyInfo {
        self.inner.info()
    }

    fn call_select(
        &mut self,
        ctx: &TaskContext,
        nodes: &[Node],
    ) -> Result<Vec<flotilla_model::Selection>, PolicyError> {
        self.time("select", |p| p.call_select(ctx, nodes))
    }

    fn call_select_chunks(
        &mut self,
        ctx: &TaskContext,
        chunks: &[&[Node]],
    ) -> Result<Vec<Vec<flotilla_model::Selection>>, PolicyError> {
        self.time("select", |p| p.call_select_chunks(ctx, chunks))
    }

    fn call_plan(
        &mut self,
        ctx: &TaskContext,
        nodes: &[Node],
    ) -> Result<Vec<flotilla_model::Wave>, PolicyError> {
        self.time("plan", |p| p.call_plan(ctx, nodes))
    }

    fn call_admit(
        &mut self,
        ctx: &TaskContext,
        node: &Node,
        now: u64,
    ) -> Result<flotilla_model::Admission, PolicyError> {
        self.time("admit", |p| p.call_admit(ctx, node, now))
    }

    fn call_evaluate(
        &mut self,
        ctx: &TaskContext,
        report: &WaveReport,
    ) -> Result<flotilla_model::Verdict, PolicyError> {
        self.time("evaluate", |p| p.call_evaluate(ctx, report))
    }

    fn call_on_request(
        &mut self,
        ctx: &TaskContext,
        node: &Node,
    ) -> Result<flotilla_model::Offer, PolicyError> {
        self.time("on-request", |p| p.call_on_request(ctx, node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_tokens_are_kept_hashed_and_match_one_node_until_they_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("db")).unwrap();
        let inv = Inventory::open(&store, tmp.path(), BTreeMap::new()).unwrap();
        let token = inv.issue_enroll_token("n1", 1_000).unwrap();
        assert!(token.starts_with("flne_"), "{token}");
        let stored: Vec<(String, serde_json::Value)> =
            store.kv("enroll_tokens").unwrap().all().unwrap();
        assert_eq!(stored.len(), 1);
        assert!(
            !stored[0].1.to_string().contains(&token[5..]),
            "the token is stored in the clear"
        );
        assert_eq!(inv.enroll_token("n2", &token, 0).unwrap(), NodeToken::No);
        assert_eq!(
            inv.enroll_token("n1", "flne_guess", 0).unwrap(),
            NodeToken::No
        );
        assert_eq!(
            inv.enroll_token("n1", &token, 999).unwrap(),
            NodeToken::Valid
        );
        assert_eq!(
            inv.enroll_token("n1", &token, 1_000).unwrap(),
            NodeToken::Expired(1_000)
        );
        // An expired token is dropped: asked again, it is no token at all.
        assert_eq!(inv.enroll_token("n1", &token, 0).unwrap(), NodeToken::No);

        inv.allow_reenroll("n1", 500).unwrap();
        assert_eq!(inv.reenroll_allowed("n1", 499).unwrap(), Reenroll::Allowed);
        assert_eq!(inv.reenroll_allowed("n2", 0).unwrap(), Reenroll::No);
        inv.consume_reenroll("n1").unwrap();
        assert_eq!(inv.reenroll_allowed("n1", 0).unwrap(), Reenroll::No);
        inv.allow_reenroll("n1", 500).unwrap();
        assert_eq!(
            inv.reenroll_allowed("n1", 500).unwrap(),
            Reenroll::Expired(500)
        );
        assert_eq!(inv.reenroll_allowed("n1", 0).unwrap(), Reenroll::No);
    }

    #[test]
    fn a_pinned_policy_keeps_its_bytes_after_a_new_upload() {
        let tmp = tempfile::tempdir().unwrap();
        let policies = PolicyDir::new(
            tmp.path().join("policies"),
            Limits::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let v1 =
            "const VERSION = \"1.0.0\";\nfn select(ctx, nodes) { nodes.map(|n| \"include\") }\n";
        let v2 = v1.replace("1.0.0", "2.0.0");
        policies.save("gate", v1.as_bytes()).unwrap();
        let sha1 = policies.pin("gate").unwrap().unwrap();
        assert_eq!(sha1, hex::encode(Sha256::digest(v1.as_bytes())));
        policies.save("gate", v2.as_bytes()).unwrap();
        let pinned = policies.load_pinned("gate", &sha1, World::empty()).unwrap();
        assert_eq!(pinned.info().version, "1.0.0");
        assert_eq!(
            policies
                .load("gate", World::empty())
                .unwrap()
                .info()
                .version,
            "2.0.0"
        );
        // The pinned copy is not listed as a policy, and a changed copy is refused.
        assert_eq!(policies.names(), ["canary", "gate", "version-gate"]);
        std::fs::write(policies.pinned_dir().join(format!("{sha1}.rhai")), &v2).unwrap();
        let err = policies
            .load_pinned("gate", &sha1, World::empty())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not hash to its name"), "{err}");
        let err = policies
            .load_pinned("gate", "../../etc", World::empty())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a lowercase hex"), "{err}");
    }

    #[test]
    fn a_policy_name_never_reaches_outside_the_policies_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data").join("policies");
        std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(tmp.path().join("outside").join("evil.rhai"), "let x = 1;\n").unwrap();
        std::fs::write(tmp.path().join("data").join("evil.rhai"), "let x = 1;\n").unwrap();
        let policies = PolicyDir::new(dir, Limits::default(), Arc::new(Metrics::new())).unwrap();
        for name in ["../../outside/evil", "../evil", "/etc/passwd", ".evil"] {
            let err = policies
                .load(name, World::empty())
                .err()
                .expect(name)
                .to_string();
            assert!(err.contains("policy"), "{name}: {err}");
            assert!(policies.get(name).unwrap().is_none(), "{name}");
        }
        // (Relative names only: an absolute one would write where it says.)
        for name in ["../../outside/evil", "../../outside/new", ".evil"] {
            assert!(policies.save(name, b"let x = 1;").is_err(), "{name}");
        }
        assert!(!tmp.path().join("outside").join("evil.wasm").exists());
        assert_eq!(
            std::fs::read_dir(tmp.path().join("outside"))
                .unwrap()
                .count(),
            1,
            "a save wrote outside the policies dir"
        );
    }
}
