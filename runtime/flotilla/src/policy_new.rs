//! `flotilla policy new NAME --lang rust|rhai|python|js`: a ready policy
//! project (the policy, one scenario, build and test commands, a README) that
//! builds and passes its scenario as generated.

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Rhai,
    Python,
    Js,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The policy's name: lowercase letters, digits and `-`, starting with a letter.
    pub name: String,
    #[arg(long, value_enum)]
    pub lang: Lang,
    /// Where to create the project (default: ./NAME); must not exist or be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Rust: the flotilla-sdk to depend on, a path to its folder (default:
    /// the git repository).
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

const WIT: &str = include_str!("../../../wit/policy.wit");
const REPOSITORY: &str = "https://github.com/flotilla-rs/flotilla";

/// The files of a new project, relative to its folder.
pub fn files(name: &str, lang: Lang, sdk: Option<&Path>) -> anyhow::Result<Vec<(String, String)>> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !valid {
        bail!(
            "invalid policy name {name:?}: use lowercase letters, digits and `-` \
             (at most 64, starting with a letter, not ending with `-`)"
        );
    }
    let artifact = match lang {
        Lang::Rust => format!(
            "target/wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_")
        ),
        Lang::Rhai => "policy.rhai".to_string(),
        Lang::Python | Lang::Js => "policy.wasm".to_string(),
    };
    let (lang_name, source, build, test, tool) = match lang {
        Lang::Rust => (
            "Rust",
            "src/lib.rs",
            "rustup target add wasm32-wasip2 && cargo build --release --target wasm32-wasip2",
            "cargo test".to_string(),
            "",
        ),
        Lang::Rhai => (
            "Rhai",
            "policy.rhai",
            "(nothing to build: the runner loads the script)",
            "flotilla policy test scenarios".to_string(),
            "",
        ),
        Lang::Python => (
            "Python",
            "app.py",
            "componentize-py -d wit -w policy componentize app -o policy.wasm",
            "flotilla policy test scenarios".to_string(),
            "- Tool: `pip install componentize-py==0.25.1`\n",
        ),
        Lang::Js => (
            "JavaScript",
            "policy.js",
            "componentize-js policy.js --wit wit --world-name policy --disable http fetch-event -o policy.wasm",
            "flotilla policy test scenarios".to_string(),
            "- Tool: `npm install -g @bytecodealliance/componentize-js@0.23.0`\n",
        ),
    };
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{lang}}", lang_name)
            .replace("{{source}}", source)
            .replace("{{build}}", build)
            .replace("{{test}}", &test)
            .replace("{{tool}}", tool)
            .replace("{{artifact}}", &artifact)
            .replace("{{policy}}", &format!("../{artifact}"))
    };
    let mut out = vec![
        (
            format!("scenarios/{name}.yaml"),
            fill(include_str!("templates/scenario.yaml")),
        ),
        (
            "README.md".into(),
            fill(include_str!("templates/README.md")),
        ),
    ];
    match lang {
        Lang::Rust => {
            let sdk = match sdk {
                Some(p) => {
                    let p = std::path::absolute(p)
                        .with_context(|| format!("{} is not a usable path", p.display()))?;
                    let p = p.to_str().context("the SDK path is not UTF-8")?;
                    format!("path = {}", toml_string(p))
                }
                None => format!("git = \"{REPOSITORY}\""),
            };
            out.push((
                "Cargo.toml".into(),
                fill(include_str!("templates/Cargo.toml.in")).replace("{{sdk}}", &sdk),
            ));
            out.push(("src/lib.rs".into(), fill(include_str!("templates/lib.rs"))));
            out.push((
                "tests/scenarios.rs".into(),
                fill(include_str!("templates/scenarios.rs")),
            ));
            out.push((".gitignore".into(), "/target\n".into()));
        }
        Lang::Rhai => out.push((
            "policy.rhai".into(),
            fill(include_str!("templates/policy.rhai")),
        )),
        Lang::Python => {
            out.push(("app.py".into(), fill(include_str!("templates/app.py"))));
            out.push(("wit/policy.wit".into(), WIT.into()));
            out.push((
                ".gitignore".into(),
                "/policy.wasm\n/wit_world\n__pycache__\n".into(),
            ));
        }
        Lang::Js => {
            out.push((
                "policy.js".into(),
                fill(include_str!("templates/policy.js")),
            ));
            out.push(("wit/policy.wit".into(), WIT.into()));
            out.push((".gitignore".into(), "/policy.wasm\n".into()));
        }
    }
    Ok(out)
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes the project into `dir` (created; an existing folder must be empty).
pub fn create(dir: &Path, name: &str, lang: Lang, sdk: Option<&Path>) -> anyhow::Result<()> {
    let files = files(name, lang, sdk)?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty: nothing written", dir.display());
    }
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub fn run(args: NewArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    create(&dir, &args.name, args.lang, args.sdk.as_deref())?;
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap_or_default();
    outln!("created {} ({:?}); next:", dir.display(), args.lang);
    for line in readme.lines().filter(|l| l.starts_with("    ")) {
        outln!("  cd {} && {}", dir.display(), line.trim());
    }
    Ok(ExitCode::SUCCESS)
}
