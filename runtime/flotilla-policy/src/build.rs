//! Builds a Rust policy crate into a component (`cargo build --target
//! wasm32-wasip2`), for tests, benchmarks and `flotilla policy build`-style tools.
//! Guests are never committed; they are built from source on demand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const GUEST_TARGET: &str = "wasm32-wasip2";

/// Builds `package` from the workspace at `workspace` with the `guest` profile
/// into `workspace/target/guests` (a target dir of its own, so a build started
/// from inside `cargo test` never waits on the outer cargo's lock) and returns
/// the `.wasm` path.
pub fn build_component(workspace: &Path, package: &str) -> Result<PathBuf, String> {
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
        .env("CARGO_TARGET_DIR", &target_dir)
        // Flags meant for the host (coverage, sanitizers) must not leak into the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("may not be installed")
            || stderr.contains("can't find crate for `core`")
        {
            "\nhint: rustup target add wasm32-wasip2"
        } else {
            ""
        };
        return Err(format!("building policy {package} failed:\n{stderr}{hint}"));
    }
    let file = format!("{}.wasm", package.replace('-', "_"));
    let path = target_dir.join(GUEST_TARGET).join("guest").join(file);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "cargo built {package} but {} is missing",
            path.display()
        ))
    }
}

/// Adds the `wasm32-wasip2` target with rustup when the toolchain lacks it,
/// so `cargo test` passes on a fresh machine without a step to remember.
/// Once per process; a toolchain without rustup gets the hint instead.
fn ensure_target() -> Result<(), String> {
    static ONCE: OnceLock<Result<(), String>> = OnceLock::new();
    ONCE.get_or_init(|| {
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
            .map_err(|e| format!("cannot run rustup ({e}); install the {GUEST_TARGET} target for your toolchain"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("`rustup target add {GUEST_TARGET}` failed ({status}); run it by hand"))
        }
    })
    .clone()
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
