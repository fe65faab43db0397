//! `cargo xtask …`: project automation.
//!
//! - `build`: the `switchboard` binary and the adapter plugins, copied into
//!   `target/plugins/<profile>/` (the plugin directory the demo and the tests use);
//! - `fixtures`: deliberately broken builds of the Mattermost adapter for the refusal tests,
//!   in `target/fixtures/`;
//! - `test`: `build` + `fixtures`, then the whole test suite;
//! - `ci`: what `.ci/run` calls: `test`, then `bench --quick`;
//! - `demo`: `build`, then the simulator, the gateway and a short scripted conversation;
//! - `bench [--quick] [--only parts]`: release builds, then the benchmark (`tests/src/bin/bench.rs`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "switchboard project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the gateway binary and the adapter plugins into target/plugins/<profile>/.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build the broken adapter variants the refusal tests load, into target/fixtures/.
    Fixtures,
    /// Build everything the tests need, then run the test suite (extra args go to cargo test).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// What CI runs: the test task, then the quick benchmark.
    Ci,
    /// Start the simulator and the gateway and play a short conversation, with a chatmode
    /// reload (SIGUSR1) in the middle.
    Demo {
        #[arg(long)]
        release: bool,
    },
    /// Release builds, then the benchmark against a floor in the same run; prints a table and
    /// writes target/bench/results.json. `--quick` takes seconds (CI) and still fails on any
    /// lost, duplicated or misrouted message.
    Bench {
        #[arg(long)]
        quick: bool,
        /// Only these parts (the floor always runs): throughput, latency, reload, scale.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

/// Plugin crates: (package, library file stem without the `lib` prefix).
const PLUGINS: &[(&str, &str)] = &[("switchboard-mattermost", "switchboard_mattermost")];

/// Variants of the Mattermost adapter for the tests (broken ones, a second good build):
/// (cargo feature, fixture file name).
const FIXTURES: &[(&str, &str)] = &[
    ("fixture-panicking-constructor", "panicking-constructor"),
    ("fixture-abi-version", "abi-version"),
    ("fixture-abi-skew", "abi-skew"),
    ("fixture-build-b", "build-b"),
    ("fixture-panic-on-message", "panic-on-message"),
    ("fixture-panic-on-started", "panic-on-started"),
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Build { release } => build(&root, release).map(|_| ()),
        Task::Fixtures => fixtures(&root),
        Task::Test { cargo_test_args } => test(&root, &cargo_test_args),
        Task::Ci => test(&root, &[]).and_then(|()| bench(&root, true, &[])),
        Task::Demo { release } => demo(&root, release),
        Task::Bench { quick, only } => bench(&root, quick, &only),
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

fn fixtures(root: &Path) -> Result<()> {
    let profile = profile_dir(root, false);
    let fixture_dir = target_dir(root).join("fixtures");
    let built = profile.join(dylib_name("switchboard_mattermost"));
    for (feature, name) in FIXTURES {
        cargo(root, &["build", "--package", "switchboard-mattermost", "--features", feature])?;
        install(&built, &fixture_dir.join(format!("{name}{}", std::env::consts::DLL_SUFFIX)))?;
    }
    // Leave the normal build in place for whoever builds next.
    cargo(root, &["build", "--package", "switchboard-mattermost"])?;
    eprintln!("xtask: fixtures in {}", fixture_dir.display());
    Ok(())
}

fn bench(root: &Path, quick: bool, only: &[String]) -> Result<()> {
    // The second build the reload part swaps in, built first: the normal build below must
    // be the last one in target/release.
    let profile = profile_dir(root, true);
    let built = profile.join(dylib_name("switchboard_mattermost"));
    cargo(root, &["build", "--release", "--package", "switchboard-mattermost", "--features", "fixture-build-b"])?;
    let build_b = target_dir(root).join("fixtures").join("release").join(dylib_name("switchboard_mattermost_b"));
    install(&built, &build_b)?;
    let plugin_dir = build(root, true)?;
    let out = target_dir(root).join("bench").join("results.json");
    let mut command = Command::new(profile.join("bench"));
    command
        .arg("--switchboard")
        .arg(profile.join("switchboard"))
        .arg("--plugin")
        .arg(plugin_dir.join(dylib_name("switchboard_mattermost")))
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

fn test(root: &Path, extra: &[String]) -> Result<()> {
    fixtures(root)?;
    build(root, false)?;
    let mut args: Vec<&str> = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args)
}

fn demo(root: &Path, release: bool) -> Result<()> {
    let plugin_dir = build(root, release)?;
    let profile = profile_dir(root, release);
    let status = Command::new(profile.join("demo"))
        .arg("--switchboard")
        .arg(profile.join("switchboard"))
        .arg("--plugins")
        .arg(&plugin_dir)
        .current_dir(root)
        .status()
        .context("cannot run the demo program")?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}
