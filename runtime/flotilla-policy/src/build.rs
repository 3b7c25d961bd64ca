//! Builds a Rust policy crate into a component (`cargo build --target
//! wasm32-wasip2`), for tests, benchmarks and `flotilla policy build`-style tools.
//! Guests are never committed; they are built from source on demand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const GUEST_TARGET: &str = "wasm32-wasip2";

/// Why a policy could not be built, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The build tool (cargo, rustup, componentize-py, componentize-js)
    /// could not be started: not installed, or not on `PATH`.
    #[error("cannot run {tool} ({source}){hint}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
        /// What to install (empty when there is nothing to add).
        hint: String,
    },
    /// The tool ran and failed: what it printed.
    #[error("building {what} failed:\n{output}{hint}")]
    Failed {
        what: String,
        output: String,
        hint: &'static str,
    },
    /// `rustup target add wasm32-wasip2` ran and failed.
    #[error("`rustup target add {GUEST_TARGET}` failed ({0}); run it by hand")]
    Target(std::process::ExitStatus),
    /// The build said it succeeded but left no component where it should.
    #[error("cargo built {package} but {} is missing", path.display())]
    Missing { package: String, path: PathBuf },
    /// A source, output or folder could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No source to build in the policy's folder.
    #[error("no .js file in {}", .0.display())]
    NoSource(PathBuf),
}

impl BuildError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
        let path = path.to_path_buf();
        move |source| BuildError::Io {
            action,
            path,
            source,
        }
    }
}

/// The `guest` profile policies are built with: small and fast (the same as
/// `[profile.guest]` of this workspace's Cargo.toml).
pub const GUEST_PROFILE: [&str; 7] = [
    "profile.guest.inherits=\"release\"",
    "profile.guest.opt-level=3",
    "profile.guest.debug=false",
    "profile.guest.strip=true",
    "profile.guest.lto=true",
    "profile.guest.codegen-units=1",
    "profile.guest.panic=\"abort\"",
];

/// Builds `package` from the workspace at `workspace` with the `guest` profile
/// into `workspace/target/guests` (a target dir of its own, so a build started
/// from inside `cargo test` never waits on the outer cargo's lock) and returns
/// the `.wasm` path.
pub fn build_component(workspace: &Path, package: &str) -> Result<PathBuf, BuildError> {
    ensure_target()?;
    let target_dir = workspace.join("target").join("guests");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--quiet",
            "--profile",
            "guest",
            "--target",
            GUEST_TARGET,
            "-p",
            package,
        ])
        // The `guest` profile is defined here rather than taken from the
        // workspace's Cargo.toml: a policy crate outside this repository
        // (every user's) has no such profile. Config overrides the manifest,
        // so inside this workspace the values are the same.
        .args(GUEST_PROFILE.iter().flat_map(|kv| ["--config", kv]))
        .env("CARGO_TARGET_DIR", &target_dir)
        // Flags meant for the host (coverage, sanitizers) must not leak into the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|source| BuildError::Spawn {
            tool: "cargo".into(),
            source,
            hint: String::new(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("may not be installed")
            || stderr.contains("can't find crate for `core`")
        {
            "\nhint: rustup target add wasm32-wasip2"
        } else {
            ""
        };
        return Err(BuildError::Failed {
            what: format!("policy {package}"),
            output: stderr.into_owned(),
            hint,
        });
    }
    let file = format!("{}.wasm", package.replace('-', "_"));
    let path = target_dir.join(GUEST_TARGET).join("guest").join(file);
    if path.exists() {
        Ok(path)
    } else {
        Err(BuildError::Missing {
            package: package.into(),
            path,
        })
    }
}

/// Adds the `wasm32-wasip2` target with rustup when the toolchain lacks it,
/// so `cargo test` passes on a fresh machine without a step to remember.
/// Once per process; a toolchain without rustup gets the hint instead.
fn ensure_target() -> Result<(), BuildError> {
    // What failed, kept for every later call of this process (an error is
    // not `Clone`: its text is, and a failure is told once in full).
    static ONCE: OnceLock<Result<(), String>> = OnceLock::new();
    let once = ONCE.get_or_init(|| {
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let libdir = Command::new(rustc)
            .args(["--print", "target-libdir", "--target", GUEST_TARGET])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        if libdir.is_some_and(|d| d.is_dir()) {
            return Ok(());
        }
        eprintln!("flotilla: the {GUEST_TARGET} target is missing; running `rustup target add {GUEST_TARGET}`");
        let status = Command::new("rustup")
            .args(["target", "add", GUEST_TARGET])
            .status()
            .map_err(|source| BuildError::Spawn {
                tool: "rustup".into(),
                source,
                hint: format!("; install the {GUEST_TARGET} target for your toolchain"),
            });
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(BuildError::Target(s).to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    once.clone().map_err(|output| BuildError::Failed {
        what: format!("the {GUEST_TARGET} target"),
        output,
        hint: "",
    })
}

/// The workspace root, from a crate inside it (`CARGO_MANIFEST_DIR/..` upwards
/// until a `Cargo.toml` with `[workspace]`).
pub fn workspace_root(start: &Path) -> PathBuf {
    let mut dir = start.to_path_buf();
    loop {
        let manifest = dir.join("Cargo.toml");
        if std::fs::read_to_string(&manifest).is_ok_and(|s| s.contains("[workspace]")) {
            return dir;
        }
        if !dir.pop() {
            return start.to_path_buf();
        }
    }
}

/// The pinned guest toolchains of the Python and JavaScript policies
/// (installed by `.ci/run`; see README "Testing").
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
pub const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

/// A guest language built by an external tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpreted {
    /// `componentize-py -d WIT -w policy componentize app` in the policy's folder
    /// (its module `app.py`).
    Python,
    /// `componentize-js FILE.js --wit WIT --world-name policy --disable http
    /// fetch-event` (the runner provides no `wasi:http`).
    JavaScript,
}

/// Builds the Python (`app.py`) or JavaScript (the only `*.js`) policy in
/// `dir` against `wit` into `out_dir`, unless a build of the same sources is
/// there already; returns the `.wasm` path. The tool is looked up on `PATH`
/// (`componentize-py`, `componentize-js`) unless `FLOTILLA_COMPONENTIZE_PY` /
/// `FLOTILLA_COMPONENTIZE_JS` name it.
pub fn build_interpreted(
    lang: Interpreted,
    dir: &Path,
    wit: &Path,
    out_dir: &Path,
) -> Result<PathBuf, BuildError> {
    let (var, tool, pin) = match lang {
        Interpreted::Python => (
            "FLOTILLA_COMPONENTIZE_PY",
            "componentize-py",
            COMPONENTIZE_PY,
        ),
        Interpreted::JavaScript => (
            "FLOTILLA_COMPONENTIZE_JS",
            "componentize-js",
            COMPONENTIZE_JS,
        ),
    };
    let tool = std::env::var_os(var).unwrap_or_else(|| tool.into());
    let source = match lang {
        Interpreted::Python => dir.join("app.py"),
        Interpreted::JavaScript => std::fs::read_dir(dir)
            .map_err(BuildError::io("read", dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "js"))
            .ok_or_else(|| BuildError::NoSource(dir.to_path_buf()))?,
    };
    // Same sources, same tool, same contract: the earlier build stands.
    let mut hash = sha2::Sha256::new();
    use sha2::Digest;
    for f in [&source, &wit.join("policy.wit")] {
        hash.update(std::fs::read(f).map_err(BuildError::io("read", f))?);
    }
    hash.update(pin.as_bytes());
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy".into());
    let out = out_dir.join(format!(
        "{name}-{}.wasm",
        &hex::encode(hash.finalize())[..16]
    ));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(out_dir).map_err(BuildError::io("create", out_dir))?;
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let mut cmd = Command::new(&tool);
    cmd.current_dir(dir);
    match lang {
        Interpreted::Python => cmd
            .arg("-d")
            .arg(wit)
            .args(["-w", "policy", "componentize", "app", "-o"])
            .arg(&tmp),
        Interpreted::JavaScript => cmd
            .arg(&source)
            .arg("--wit")
            .arg(wit)
            .args([
                "--world-name",
                "policy",
                "--disable",
                "http",
                "fetch-event",
                "-o",
            ])
            .arg(&tmp),
    };
    let output = cmd.output().map_err(|source| BuildError::Spawn {
        tool: tool.to_string_lossy().into_owned(),
        source,
        hint: format!(": install {pin} (`.ci/run` does; see README \"Testing\")"),
    })?;
    if !output.status.success() || !tmp.is_file() {
        let _ = std::fs::remove_file(&tmp);
        return Err(BuildError::Failed {
            what: format!("{} with {}", dir.display(), tool.to_string_lossy()),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            hint: "",
        });
    }
    std::fs::rename(&tmp, &out).map_err(BuildError::io("move", &tmp))?;
    Ok(out)
}
