//! `cargo xtask …`: project automation.
//!
//! - `build`: the `switchboard` binary and the adapter plugins, copied into
//!   `target/plugins/<profile>/` (the plugin directory the demo and the tests use);
//! - `fixtures`: the adapter libraries the host's tests load by name (builds broken on purpose,
//!   a second tagged build), from `tests/fixtures/` (a cargo workspace of its own, built into
//!   `target/fixtures/build/`), installed as `target/fixtures/<name>.so`;
//! - `real-servers [synapse]`: the real chat servers some tests run against, installed under
//!   `target/real-servers/` (Synapse: a Python venv with a pinned `matrix-synapse`); idempotent;
//! - `test`: `build` + `fixtures` + `real-servers` + `check-template`, then the whole test suite;
//! - `ci`: what `.ci/run` calls: `test`, `cargo doc` with warnings as errors, then `bench --quick`;
//! - `demo`: `build`, then the simulator, the gateway and a short scripted conversation;
//! - `bench [--quick] [--only parts]`: release builds, then the benchmark (`tests/src/bin/bench.rs`);
//! - `new-plugin <name>`: a new adapter crate in `plugins/<name>/` from `xtask/templates/plugin/`,
//!   added to the workspace (see `docs/plugin-guide.md`);
//! - `check-template`: generate a plugin into a scratch workspace and run its tests and clippy
//!   there, then build its library and run `switchboard check-plugin --conformance` on it (part
//!   of `test`), so the template keeps compiling against the current ABI and keeps passing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod new_plugin;
mod real_servers;

#[derive(Parser)]
#[command(name = "xtask", about = "switchboard project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the gateway binary and the adapter plugins into `target/plugins/<profile>/`.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build the fixture adapters the tests load (tests/fixtures/), into target/fixtures/.
    Fixtures,
    /// Install the real chat servers tests run against into target/real-servers/ (all when none
    /// is named); quick when they are installed already.
    RealServers {
        #[arg(value_enum)]
        servers: Vec<real_servers::RealServer>,
    },
    /// Build everything the tests need, then run the test suite (extra args go to cargo test).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// What CI runs: the test task, the API docs (warnings as errors), then the quick benchmark.
    Ci,
    /// Start the simulator and the gateway and play a short conversation, with a chatmode
    /// reload (SIGUSR1) in the middle.
    Demo {
        #[arg(long)]
        release: bool,
        /// `mattermost` (the simulator) or `matrix` (a real Synapse, installed when missing).
        #[arg(long, default_value = "mattermost")]
        platform: String,
    },
    /// Release builds, then the benchmark against a floor in the same run; prints a table and
    /// writes target/bench/results.json. `--quick` takes seconds (CI) and still fails on any
    /// lost, duplicated or misrouted message.
    Bench {
        #[arg(long)]
        quick: bool,
        /// Only these parts (the floor always runs): throughput, latency, reload, scale, matrix.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Create an adapter crate in `plugins/<name>/` (lower-case letters, digits, hyphens) from the
    /// template, with passing conformance tests, and add it to the workspace.
    NewPlugin { name: String },
    /// Generate a plugin from the template into a scratch workspace, run its tests there, then
    /// the conformance checks on its built library.
    CheckTemplate,
}

/// Plugin crates: (package, library file stem without the `lib` prefix).
const PLUGINS: &[(&str, &str)] =
    &[("switchboard-mattermost", "switchboard_mattermost"), ("switchboard-matrix", "switchboard_matrix")];

/// The fixture adapters for the tests (`tests/fixtures/<name>/`, package
/// `switchboard-fixture-<name>`), by name: `Artifacts::fixture(name)` in the tests.
const FIXTURES: &[&str] = &[
    "panicking-constructor",
    "abi-version",
    "abi-skew",
    "build-b",
    "panic-on-message",
    "panic-on-started",
    "hang-on-message",
    "hang-on-construct",
    "abort-on-started",
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Build { release } => build(&root, release).map(|_| ()),
        Task::Fixtures => fixtures(&root),
        Task::RealServers { servers } => real_servers::install(&target_dir(&root), &servers),
        Task::Test { cargo_test_args } => test(&root, &cargo_test_args),
        Task::Ci => test(&root, &[]).and_then(|()| docs(&root)).and_then(|()| bench(&root, true, &[])),
        Task::Demo { release, platform } => demo(&root, release, &platform),
        Task::Bench { quick, only } => bench(&root, quick, &only),
        Task::NewPlugin { name } => new_plugin::new_plugin(&root, &name),
        Task::CheckTemplate => new_plugin::check_template(&root, &target_dir(&root)),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().map(Path::to_path_buf).context("xtask lives one level below the workspace root")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

fn profile_dir(root: &Path, release: bool) -> PathBuf {
    target_dir(root).join(if release { "release" } else { "debug" })
}

fn dylib_name(stem: &str) -> String {
    format!("{}{stem}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status =
        Command::new(&cargo).args(args).current_dir(root).status().with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Copy via a temporary name and rename, so a watcher never sees a half-written library.
fn install(from: &Path, to: &Path) -> Result<()> {
    let dir = to.parent().context("destination has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let staging = dir.join(format!(".{}.tmp", to.file_name().unwrap_or_default().to_string_lossy()));
    std::fs::copy(from, &staging)
        .with_context(|| format!("cannot copy {} to {}", from.display(), staging.display()))?;
    std::fs::rename(&staging, to).with_context(|| format!("cannot move {} into place", to.display()))?;
    Ok(())
}

/// Returns the plugin directory.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let profile_flag: &[&str] = if release { &["--release"] } else { &[] };
    let mut args = vec!["build", "--package", "switchboard", "--package", "switchboard-tests", "--bins"];
    args.extend(profile_flag);
    cargo(root, &args)?;
    let mut args = vec!["build"];
    for (package, _) in PLUGINS {
        args.extend(["--package", package]);
    }
    args.extend(profile_flag);
    cargo(root, &args)?;
    let profile = profile_dir(root, release);
    let plugin_dir = target_dir(root).join("plugins").join(if release { "release" } else { "debug" });
    for (_, stem) in PLUGINS {
        let name = dylib_name(stem);
        install(&profile.join(&name), &plugin_dir.join(&name))?;
    }
    eprintln!("xtask: plugins in {}", plugin_dir.display());
    Ok(plugin_dir)
}

/// Build these fixtures (names from [`FIXTURES`]) in the fixture workspace, which has a
/// target directory of its own (its lock file and features are its own); returns the
/// directory the libraries are in.
fn build_fixtures(root: &Path, release: bool, names: &[&str]) -> Result<PathBuf> {
    let manifest = root.join("tests").join("fixtures").join("Cargo.toml");
    let fixture_target = target_dir(root).join("fixtures").join("build");
    let mut args: Vec<String> = vec![
        "build".into(),
        "--manifest-path".into(),
        manifest.to_str().context("the fixture manifest path is not UTF-8")?.into(),
        "--target-dir".into(),
        fixture_target.to_str().context("the target directory path is not UTF-8")?.into(),
    ];
    for name in names {
        args.extend(["--package".into(), format!("switchboard-fixture-{name}")]);
    }
    if release {
        args.push("--release".into());
    }
    cargo(root, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(fixture_target.join(if release { "release" } else { "debug" }))
}

/// The library file cargo makes for fixture `name`.
fn fixture_library(name: &str) -> String {
    dylib_name(&format!("switchboard_fixture_{}", name.replace('-', "_")))
}

fn fixtures(root: &Path) -> Result<()> {
    let built = build_fixtures(root, false, FIXTURES)?;
    let fixture_dir = target_dir(root).join("fixtures");
    let installed = |name: &str| fixture_dir.join(format!("{name}{}", std::env::consts::DLL_SUFFIX));
    for name in FIXTURES {
        install(&built.join(fixture_library(name)), &installed(name))?;
    }
    // Built with the `panic-abort` profile: the plugin and all it links abort on a panic.
    let fixture_target = target_dir(root).join("fixtures").join("build");
    let fixture_manifest = root.join("tests").join("fixtures").join("Cargo.toml");
    cargo(
        root,
        &[
            "build",
            "--manifest-path",
            fixture_manifest.to_str().context("the fixture manifest path is not UTF-8")?,
            "--target-dir",
            fixture_target.to_str().context("the target directory path is not UTF-8")?,
            "--package",
            "switchboard-fixture-panic-abort",
            "--profile",
            "panic-abort",
        ],
    )?;
    install(&fixture_target.join("panic-abort").join(fixture_library("panic-abort")), &installed("panic-abort"))?;
    // The frozen v1.0 interface is a workspace of its own (a second `switchboard-plugin-api`).
    let v1_0_target = target_dir(root).join("fixtures").join("abi-v1_0");
    let v1_0_manifest = root.join("tests").join("fixtures").join("abi-v1_0").join("Cargo.toml");
    cargo(
        root,
        &[
            "build",
            "--manifest-path",
            v1_0_manifest.to_str().context("the fixture manifest path is not UTF-8")?,
            "--target-dir",
            v1_0_target.to_str().context("the target directory path is not UTF-8")?,
        ],
    )?;
    install(
        &v1_0_target.join("debug").join(dylib_name("switchboard_fixture_abi_v1_0_echo")),
        &installed("abi-v1_0-echo"),
    )?;
    eprintln!("xtask: fixtures in {}", fixture_dir.display());
    Ok(())
}

fn bench(root: &Path, quick: bool, only: &[String]) -> Result<()> {
    // The Matrix row runs against a real Synapse.
    real_servers::install(&target_dir(root), &[real_servers::RealServer::Synapse])?;
    // The second build the reload part swaps in.
    let built = build_fixtures(root, true, &["build-b"])?;
    let build_b = target_dir(root).join("fixtures").join("release").join(dylib_name("switchboard_mattermost_b"));
    install(&built.join(fixture_library("build-b")), &build_b)?;
    let plugin_dir = build(root, true)?;
    let profile = profile_dir(root, true);
    let out = target_dir(root).join("bench").join("results.json");
    let mut command = Command::new(profile.join("bench"));
    command
        .arg("--switchboard")
        .arg(profile.join("switchboard"))
        .arg("--plugin")
        .arg(plugin_dir.join(dylib_name("switchboard_mattermost")))
        .arg("--matrix-plugin")
        .arg(plugin_dir.join(dylib_name("switchboard_matrix")))
        .arg("--build-b")
        .arg(&build_b)
        .arg("--out")
        .arg(&out)
        .current_dir(root);
    if quick {
        command.arg("--quick");
    }
    if !only.is_empty() {
        command.arg("--only").arg(only.join(","));
    }
    let status = command.status().context("cannot run the bench program")?;
    if !status.success() {
        bail!("the bench failed ({status})");
    }
    Ok(())
}

/// The API docs of every crate, warnings as errors: a broken link or a doc comment that names
/// a private item fails CI instead of rotting.
fn docs(root: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo doc --workspace --no-deps (RUSTDOCFLAGS=-D warnings)");
    let status = Command::new(&cargo)
        .args(["doc", "--workspace", "--no-deps", "--quiet"])
        .env("RUSTDOCFLAGS", "-D warnings")
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo doc found broken docs ({status})");
    }
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    real_servers::install(&target_dir(root), &[])?;
    new_plugin::check_template(root, &target_dir(root))?;
    fixtures(root)?;
    build(root, false)?;
    let mut args: Vec<&str> = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args)
}

fn demo(root: &Path, release: bool, platform: &str) -> Result<()> {
    if platform == "matrix" {
        real_servers::install(&target_dir(root), &[real_servers::RealServer::Synapse])?;
    }
    let plugin_dir = build(root, release)?;
    let profile = profile_dir(root, release);
    let status = Command::new(profile.join("demo"))
        .arg("--switchboard")
        .arg(profile.join("switchboard"))
        .arg("--plugins")
        .arg(&plugin_dir)
        .arg("--platform")
        .arg(platform)
        .current_dir(root)
        .status()
        .context("cannot run the demo program")?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}
