//! The release store on a node, modelled on a hot-upgrade release manager:
//! `DIR/releases/<version>/` per unpacked release, a `current` symlink switched
//! atomically, and a `permanent` marker naming the release a restart returns to.
//! Everything lives in `DIR`, so a restarted agent knows where it is.

use serde::Serialize;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

/// What went wrong in the release store; each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{0}` is not a usable version name: use letters, digits, `.`, `_`, `+` and `-` only (at most 128)"
    )]
    BadVersion(String),
    #[error("release {0} is not installed; `flotilla agent versions` lists the installed releases")]
    NotInstalled(String),
    #[error(
        "release {0} is the current release; switch to another one first (`flotilla agent downgrade VERSION`)"
    )]
    IsCurrent(String),
    #[error(
        "release {0} is the permanent release; make another one permanent first (`flotilla agent install VERSION`)"
    )]
    IsPermanent(String),
    #[error("the archive is unsafe and was not unpacked: entry `{0}` {1}")]
    UnsafeArchive(String, &'static str),
    #[error("the archive could not be read ({0}); is it a .tar.gz?")]
    BadArchive(io::Error),
    #[error(
        "the archive unpacks to more than {limit} {what}, the agent's cap; nothing was installed \
         (a genuine release this big needs a higher `unpack_ratio`, `unpack_min_bytes` or \
         `unpack_max_entries` in the agent's config)"
    )]
    TooLarge { limit: u64, what: &'static str },
}

impl ReleaseError {
    /// The node's disk failed (an I/O error), not the request: the same
    /// request may work later.
    pub fn is_fault(&self) -> bool {
        matches!(self, ReleaseError::Io { .. })
    }
}

/// How much one archive may unpack to: a compressed archive is small on the
/// wire and may be enormous on disk (a gzip bomb), so the agent stops at a
/// cap instead of filling the node's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of the uncompressed tar stream: file contents plus headers.
    pub max_bytes: u64,
    /// Entries (files, directories, links) in the archive.
    pub max_entries: u64,
}

impl UnpackLimits {
    /// What the agent allows by default: 16 times the artifact, at least 64 MiB.
    pub const RATIO: u64 = 16;
    pub const MIN_BYTES: u64 = 64 << 20;
    pub const MAX_ENTRIES: u64 = 100_000;

    /// `ratio` times an artifact of `size` bytes, but never below `min_bytes`.
    pub fn for_artifact(size: u64, ratio: u64, min_bytes: u64, max_entries: u64) -> Self {
        UnpackLimits {
            max_bytes: size.saturating_mul(ratio).max(min_bytes),
            max_entries,
        }
    }
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: Self::MIN_BYTES,
            max_entries: Self::MAX_ENTRIES,
        }
    }
}

type Result<T> = std::result::Result<T, ReleaseError>;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReleaseError + 'a {
    move |source| ReleaseError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A version name is used as a directory name, so it must be one plain path
/// component (it arrives from the network).
pub fn check_version(version: &str) -> Result<()> {
    let ok = !version.is_empty()
        && version.len() <= 128
        && version != "."
        && version != ".."
        && !version.starts_with('.')
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ReleaseError::BadVersion(version.to_string()))
    }
}

/// One installed release and its standing, as `flotilla agent versions` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReleaseInfo {
    pub version: String,
    pub current: bool,
    pub permanent: bool,
    /// Neither current nor permanent: a candidate for `uninstall`.
    pub old: bool,
}

/// What [`ReleaseStore::revert_trial`] did at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reverted {
    pub from: String,
    pub to: String,
}

/// The on-node release store rooted at the agent's state directory.
#[derive(Debug, Clone)]
pub struct ReleaseStore {
    dir: PathBuf,
}

impl ReleaseStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        for sub in ["releases", "downloads", "backups"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn releases_dir(&self) -> PathBuf {
        self.dir.join("releases")
    }

    pub fn release_dir(&self, version: &str) -> PathBuf {
        self.releases_dir().join(version)
    }

    pub fn downloads_dir(&self) -> PathBuf {
        self.dir.join("downloads")
    }

    /// Where `Backup::Default` keeps the backup of `version`.
    pub fn default_backup(&self, version: &str) -> PathBuf {
        self.dir.join("backups").join(version)
    }

    pub fn is_installed(&self, version: &str) -> bool {
        check_version(version).is_ok() && self.release_dir(version).is_dir()
    }

    /// The release the `current` link points at, if any.
    pub fn current(&self) -> Result<Option<String>> {
        let link = self.dir.join("current");
        match fs::read_link(&link) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot read the link", &link)(e)),
        }
    }

    /// The release a restart comes back on, if one was made permanent.
    pub fn permanent(&self) -> Result<Option<String>> {
        let path = self.dir.join("permanent");
        match fs::read_to_string(&path) {
            Ok(s) => {
                let v = s.trim().to_string();
                Ok((!v.is_empty()).then_some(v))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot read", &path)(e)),
        }
    }

    /// Installed releases, newest first (by lenient semver, then by name).
    pub fn installed(&self) -> Result<Vec<String>> {
        let dir = self.releases_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
            let entry = entry.map_err(io_err("cannot list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && check_version(&name).is_ok() {
                out.push(name);
            }
        }
        out.sort_by(
            |a, b| match (flotilla_version::parse(a), flotilla_version::parse(b)) {
                (Ok(x), Ok(y)) => y.cmp(&x),
                _ => b.cmp(a),
            },
        );
        Ok(out)
    }

    /// Every installed release with its standing.
    pub fn versions(&self) -> Result<Vec<ReleaseInfo>> {
        let current = self.current()?;
        let permanent = self.permanent()?;
        Ok(self
            .installed()?
            .into_iter()
            .map(|version| {
                let is_current = current.as_deref() == Some(&version);
                let is_permanent = permanent.as_deref() == Some(&version);
                ReleaseInfo {
                    old: !is_current && !is_permanent,
                    current: is_current,
                    permanent: is_permanent,
                    version,
                }
            })
            .collect())
    }

    /// Points `current` at `version`: a new link beside it, renamed over the
    /// old one, so a crash leaves either the old or the new link, never none.
    pub fn switch(&self, version: &str) -> Result<()> {
        check_version(version)?;
        if !self.is_installed(version) {
            return Err(ReleaseError::NotInstalled(version.to_string()));
        }
        let tmp = self.dir.join(format!(".current.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let target = Path::new("releases").join(version);
        std::os::unix::fs::symlink(&target, &tmp)
            .map_err(io_err("cannot create the link", &tmp))?;
        let link = self.dir.join("current");
        fs::rename(&tmp, &link).map_err(io_err("cannot replace the link", &link))?;
        sync_dir(&self.dir);
        Ok(())
    }

    /// Removes the `current` link (a node back to "nothing installed").
    pub fn clear_current(&self) -> Result<()> {
        let link = self.dir.join("current");
        match fs::remove_file(&link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot remove the link", &link)(e)),
        }
    }

    /// Marks `version` as the release a restart comes back on.
    pub fn make_permanent(&self, version: &str) -> Result<()> {
        if !self.is_installed(version) {
            return Err(ReleaseError::NotInstalled(version.to_string()));
        }
        write_atomic(&self.dir.join("permanent"), version.as_bytes())
    }

    /// At start-up: a trial release (current but not permanent) gives way to
    /// the permanent one. Returns what was switched, if anything.
    pub fn revert_trial(&self) -> Result<Option<Reverted>> {
        let (Some(current), Some(permanent)) = (self.current()?, self.permanent()?) else {
            return Ok(None);
        };
        if current == permanent || !self.is_installed(&permanent) {
            return Ok(None);
        }
        self.switch(&permanent)?;
        Ok(Some(Reverted {
            from: current,
            to: permanent,
        }))
    }

    /// `install VERSION`: switch to an installed release (if it is not
    /// current already) and make it permanent.
    pub fn install(&self, version: &str) -> Result<()> {
        check_version(version)?;
        if !self.is_installed(version) {
            return Err(ReleaseError::NotInstalled(version.to_string()));
        }
        if self.current()?.as_deref() != Some(version) {
            self.switch(version)?;
        }
        self.make_permanent(version)
    }

    /// Deletes an old release; refuses the current and the permanent one.
    pub fn uninstall(&self, version: &str) -> Result<()> {
        check_version(version)?;
        if !self.is_installed(version) {
            return Err(ReleaseError::NotInstalled(version.to_string()));
        }
        if self.current()?.as_deref() == Some(version) {
            return Err(ReleaseError::IsCurrent(version.to_string()));
        }
        if self.permanent()?.as_deref() == Some(version) {
            return Err(ReleaseError::IsPermanent(version.to_string()));
        }
        let dir = self.release_dir(version);
        fs::remove_dir_all(&dir).map_err(io_err("cannot remove", &dir))
    }

    /// Unpacks a `.tar.gz` into `releases/<version>/`, replacing a previous
    /// unpack of the same version. With `base`, the archive is a patch laid
    /// over a copy of that installed release. Entries that would land outside
    /// the release (absolute paths, `..`, links pointing out, devices), and
    /// archives that unpack to more than `limits`, refuse the whole archive
    /// before anything is written to the release directory. Modes are kept
    /// but for the setuid, setgid and sticky bits: an agent running as root
    /// must not install a setuid binary because an archive said so.
    pub fn unpack(
        &self,
        version: &str,
        archive: &Path,
        base: Option<&str>,
        limits: &UnpackLimits,
    ) -> Result<PathBuf> {
        check_version(version)?;
        check_archive(archive, limits)?;
        let staging = self.releases_dir().join(format!(".{version}.unpack"));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err("cannot clear", &staging))?;
        }
        match base {
            Some(base) => {
                if !self.is_installed(base) {
                    return Err(ReleaseError::NotInstalled(base.to_string()));
                }
                copy_tree(&self.release_dir(base), &staging)?;
            }
            None => fs::create_dir_all(&staging).map_err(io_err("cannot create", &staging))?,
        }
        let file = fs::File::open(archive).map_err(io_err("cannot open", archive))?;
        // Checked above; capped again here so that what is written can never
        // be more than what was checked.
        let mut tar = tar::Archive::new(Capped::new(
            flate2::read::GzDecoder::new(file),
            limits.max_bytes,
        ));
        // Not preserved: tar then keeps `mode & 0o777`, dropping the setuid,
        // setgid and sticky bits of files and directories alike.
        tar.set_preserve_permissions(false);
        tar.set_overwrite(true);
        if let Err(e) = tar.unpack(&staging) {
            let _ = fs::remove_dir_all(&staging);
            return Err(archive_error(e, limits.max_bytes));
        }
        let dest = self.release_dir(version);
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(io_err("cannot replace", &dest))?;
        }
        fs::rename(&staging, &dest).map_err(io_err("cannot move the release into", &dest))?;
        Ok(dest)
    }

    /// Copies `releases/<version>/` to `to` (replacing what was there).
    pub fn backup(&self, version: &str, to: &Path) -> Result<()> {
        let from = self.release_dir(version);
        if !from.is_dir() {
            return Err(ReleaseError::NotInstalled(version.to_string()));
        }
        let staging = sibling(to, ".backup");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err("cannot clear", &staging))?;
        }
        copy_tree(&from, &staging)?;
        if to.exists() {
            fs::remove_dir_all(to).map_err(io_err("cannot replace", to))?;
        }
        fs::rename(&staging, to).map_err(io_err("cannot move the backup into", to))
    }

    /// Puts the backup at `from` back as `releases/<version>/`.
    pub fn restore_backup(&self, version: &str, from: &Path) -> Result<()> {
        check_version(version)?;
        if !from.is_dir() {
            return Err(ReleaseError::Io {
                action: "no backup at",
                path: from.to_path_buf(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let dest = self.release_dir(version);
        let staging = self.releases_dir().join(format!(".{version}.restore"));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err("cannot clear", &staging))?;
        }
        copy_tree(from, &staging)?;
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(io_err("cannot replace", &dest))?;
        }
        fs::rename(&staging, &dest).map_err(io_err("cannot move the release into", &dest))
    }
}

/// A reader that fails once more than `left` bytes have come through it: the
/// decompressed tar stream, so a gzip bomb stops at the cap (metadata such as
/// long names and pax headers, which tar reads into memory, included).
struct Capped<R> {
    inner: R,
    left: u64,
}

/// The error [`Capped`] fails with, told apart from a broken archive.
#[derive(Debug)]
struct OverCap;

impl std::fmt::Display for OverCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the archive unpacks to more than the agent's cap")
    }
}

impl std::error::Error for OverCap {}

impl<R> Capped<R> {
    fn new(inner: R, cap: u64) -> Self {
        Capped { inner, left: cap }
    }
}

impl<R: io::Read> io::Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // One byte past the cap is asked for, so a stream of exactly the cap
        // passes and one byte more fails.
        let want = buf
            .len()
            .min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(io::Error::other(OverCap));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A tar error, or the cap's own error (tar wraps it in one of its own, with
/// the path of the entry it was reading, so the chain is searched).
fn archive_error(e: io::Error, max_bytes: u64) -> ReleaseError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if s.is::<OverCap>() {
            return ReleaseError::TooLarge {
                limit: max_bytes,
                what: "bytes",
            };
        }
        source = match s.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => s.source(),
        };
    }
    ReleaseError::BadArchive(e)
}

/// Reads the whole archive once and refuses it if any entry could escape or
/// it unpacks to more than `limits`.
fn check_archive(archive: &Path, limits: &UnpackLimits) -> Result<()> {
    let file = fs::File::open(archive).map_err(io_err("cannot open", archive))?;
    let mut tar = tar::Archive::new(Capped::new(
        flate2::read::GzDecoder::new(file),
        limits.max_bytes,
    ));
    let bad = |e| archive_error(e, limits.max_bytes);
    let (mut entries, mut bytes) = (0u64, 0u64);
    for entry in tar.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        entries += 1;
        if entries > limits.max_entries {
            return Err(ReleaseError::TooLarge {
                limit: limits.max_entries,
                what: "entries",
            });
        }
        // A sparse file's holes take no bytes in the stream but make a file
        // that big on disk (and in every backup copy of it).
        let header = entry.header();
        let size = header
            .as_gnu()
            .filter(|_| header.entry_type().is_gnu_sparse())
            .and_then(|g| g.real_size().ok())
            .unwrap_or(0)
            .max(entry.size());
        bytes = bytes.saturating_add(size);
        if bytes > limits.max_bytes {
            return Err(ReleaseError::TooLarge {
                limit: limits.max_bytes,
                what: "bytes",
            });
        }
        let path = entry.path().map_err(ReleaseError::BadArchive)?.into_owned();
        let shown = path.display().to_string();
        if !is_contained(&path) {
            return Err(ReleaseError::UnsafeArchive(
                shown,
                "points outside the release (absolute or `..`)",
            ));
        }
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular | T::Directory | T::Continuous | T::GNUSparse => {}
            T::Symlink | T::Link => {
                let target = entry
                    .link_name()
                    .map_err(ReleaseError::BadArchive)?
                    .unwrap_or_default();
                // A link target is relative to the link's own directory.
                let joined = path.parent().unwrap_or(Path::new("")).join(&target);
                if target.is_absolute() || !is_contained(&joined) {
                    return Err(ReleaseError::UnsafeArchive(
                        shown,
                        "is a link that points outside the release",
                    ));
                }
            }
            T::XHeader | T::XGlobalHeader | T::GNULongName | T::GNULongLink => {}
            _ => {
                return Err(ReleaseError::UnsafeArchive(
                    shown,
                    "is a device, fifo or other special file",
                ));
            }
        }
    }
    Ok(())
}

/// `true` when `path`, resolved lexically, stays inside its root.
fn is_contained(path: &Path) -> bool {
    let mut depth = 0usize;
    for c in path.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Copies a directory tree (files, directories, symlinks as links).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).map_err(io_err("cannot create", to))?;
    for entry in fs::read_dir(from).map_err(io_err("cannot list", from))? {
        let entry = entry.map_err(io_err("cannot list", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let kind = entry.file_type().map_err(io_err("cannot stat", &src))?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&src).map_err(io_err("cannot read the link", &src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io_err("cannot create", &dst))?;
        } else {
            fs::copy(&src, &dst).map_err(io_err("cannot copy to", &dst))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temp file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let tmp = sibling(path, &format!(".tmp{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(io_err("cannot write", &tmp))?;
    f.write_all(bytes).map_err(io_err("cannot write", &tmp))?;
    f.sync_all().map_err(io_err("cannot sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("cannot replace", path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Best effort: make a rename in `dir` durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `.tar.gz` holding `files` (path, contents) as regular files.
    pub(crate) fn targz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    /// A store with `versions` unpacked, the first current and permanent.
    pub(crate) fn store_with(dir: &Path, versions: &[&str]) -> ReleaseStore {
        let store = ReleaseStore::open(dir).unwrap();
        for v in versions {
            let archive = dir.join(format!("{v}.tar.gz"));
            fs::write(&archive, targz(&[("bin/app", v.as_bytes())])).unwrap();
            store
                .unpack(v, &archive, None, &UnpackLimits::default())
                .unwrap();
        }
        if let Some(first) = versions.first() {
            store.install(first).unwrap();
        }
        store
    }

    #[test]
    fn switch_moves_current_and_keeps_permanent() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store_with(tmp.path(), &["1.0.0", "1.0.1"]);
        assert_eq!(store.current().unwrap().as_deref(), Some("1.0.0"));
        store.switch("1.0.1").unwrap();
        assert_eq!(store.current().unwrap().as_deref(), Some("1.0.1"));
        assert_eq!(store.permanent().unwrap().as_deref(), Some("1.0.0"));
        let app = fs::read_to_string(tmp.path().join("current/bin/app")).unwrap();
        assert_eq!(app, "1.0.1");
        let v = store.versions().unwrap();
        assert_eq!(v[0].version, "1.0.1");
        assert!(v[0].current && !v[0].permanent && !v[0].old);
        assert!(v[1].permanent && !v[1].current);
        assert!(matches!(
            store.switch("9.9.9"),
            Err(ReleaseError::NotInstalled(_))
        ));
    }

    #[test]
    fn a_trial_reverts_on_restart_unless_made_permanent() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store_with(tmp.path(), &["1.0.0", "1.0.1"]);
        store.switch("1.0.1").unwrap();
        // A restart: a fresh store over the same directory.
        let again = ReleaseStore::open(tmp.path()).unwrap();
        let reverted = again.revert_trial().unwrap().unwrap();
        assert_eq!(
            (reverted.from.as_str(), reverted.to.as_str()),
            ("1.0.1", "1.0.0")
        );
        assert_eq!(again.current().unwrap().as_deref(), Some("1.0.0"));

        again.switch("1.0.1").unwrap();
        again.install("1.0.1").unwrap();
        assert_eq!(again.revert_trial().unwrap(), None);
        assert_eq!(again.current().unwrap().as_deref(), Some("1.0.1"));
        assert_eq!(again.permanent().unwrap().as_deref(), Some("1.0.1"));
    }

    #[test]
    fn uninstall_refuses_current_and_permanent() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store_with(tmp.path(), &["1.0.0", "1.0.1", "1.0.2"]);
        store.switch("1.0.1").unwrap();
        assert!(matches!(
            store.uninstall("1.0.1"),
            Err(ReleaseError::IsCurrent(_))
        ));
        assert!(matches!(
            store.uninstall("1.0.0"),
            Err(ReleaseError::IsPermanent(_))
        ));
        assert!(matches!(
            store.uninstall("3.0.0"),
            Err(ReleaseError::NotInstalled(_))
        ));
        store.uninstall("1.0.2").unwrap();
        assert_eq!(store.installed().unwrap(), ["1.0.1", "1.0.0"]);
    }

    #[test]
    fn unpack_refuses_path_traversal_and_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ReleaseStore::open(tmp.path().join("state")).unwrap();
        // tar::Builder refuses `..` itself, so write the name into the header raw.
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../escaped.sh");
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"hi"[..]).unwrap();
        let bytes = b.into_inner().unwrap().finish().unwrap();
        let archive = tmp.path().join("evil.tar.gz");
        fs::write(&archive, bytes).unwrap();

        let err = store
            .unpack("2.0.0", &archive, None, &UnpackLimits::default())
            .unwrap_err();
        assert!(matches!(err, ReleaseError::UnsafeArchive(..)), "{err}");
        assert!(!tmp.path().join("state/releases/escaped.sh").exists());
        assert!(!tmp.path().join("state/escaped.sh").exists());
        assert!(!store.is_installed("2.0.0"));

        // A symlink out of the release is refused too.
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_cksum();
        b.append_link(&mut h, "etc", "../../../etc").unwrap();
        fs::write(&archive, b.into_inner().unwrap().finish().unwrap()).unwrap();
        assert!(matches!(
            store.unpack("2.0.0", &archive, None, &UnpackLimits::default()),
            Err(ReleaseError::UnsafeArchive(..))
        ));

        for bad in ["../x", "a/b", "", ".hidden", ".."] {
            assert!(matches!(
                check_version(bad),
                Err(ReleaseError::BadVersion(_))
            ));
        }
    }

    #[test]
    fn a_patch_is_laid_over_a_copy_of_its_base() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store_with(tmp.path(), &["1.0.0"]);
        let patch = tmp.path().join("patch.tar.gz");
        fs::write(&patch, targz(&[("lib/fix.so", b"fixed")])).unwrap();
        let dir = store
            .unpack("1.0.1", &patch, Some("1.0.0"), &UnpackLimits::default())
            .unwrap();
        assert_eq!(fs::read_to_string(dir.join("bin/app")).unwrap(), "1.0.0");
        assert_eq!(fs::read_to_string(dir.join("lib/fix.so")).unwrap(), "fixed");
        assert!(!store.release_dir("1.0.0").join("lib").exists());
        assert!(matches!(
            store.unpack("1.0.2", &patch, Some("0.1.0"), &UnpackLimits::default()),
            Err(ReleaseError::NotInstalled(_))
        ));
    }

    #[test]
    fn backup_and_restore_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store_with(tmp.path(), &["1.0.0"]);
        let at = store.default_backup("1.0.0");
        store.backup("1.0.0", &at).unwrap();
        fs::remove_dir_all(store.release_dir("1.0.0")).unwrap();
        store.restore_backup("1.0.0", &at).unwrap();
        let app = fs::read_to_string(store.release_dir("1.0.0").join("bin/app")).unwrap();
        assert_eq!(app, "1.0.0");
    }
}
