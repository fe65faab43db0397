//! `cargo xtask real-servers [synapse]`: installs the real chat servers some end-to-end tests
//! run against, under `<target>/real-servers/`.
//!
//! - **Synapse** (Matrix homeserver): a Python virtual environment
//!   `<target>/real-servers/synapse-venv` with `matrix-synapse==`[`SYNAPSE_VERSION`] from PyPI
//!   (prebuilt wheels only: no compiler needed). Needs Python ≥ 3.10 with `venv`: `python3`, or
//!   the interpreter named by `SWITCHBOARD_PYTHON`. A second run checks the installed version
//!   (one interpreter start, well under a second) and does nothing else.
//!
//! The test harness (`tests/src/matrix.rs`) finds the venv at the same place, or wherever
//! `SWITCHBOARD_SYNAPSE_VENV` points.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// The Synapse release the tests run against (pinned exactly; a bump is a deliberate change).
pub const SYNAPSE_VERSION: &str = "1.163.2";

/// Synapse's dependencies as tested, pinned (`pip install -c`): what PyPI resolves on another
/// day could differ.
const SYNAPSE_CONSTRAINTS: &str = include_str!("../real-servers/synapse-constraints.txt");

/// Where the venv keeps the constraints it was installed with (a change reinstalls).
fn constraints_stamp(venv: &Path) -> PathBuf {
    venv.join("switchboard-constraints.txt")
}

/// Oldest Python the pinned Synapse supports (its wheel is `cp310-abi3`).
const MIN_PYTHON: (u32, u32) = (3, 10);

/// The servers `cargo xtask real-servers` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RealServer {
    /// Synapse, the Matrix homeserver (a Python venv with a pinned `matrix-synapse`).
    Synapse,
}

/// Install `servers` (all of them when empty) under `<target>/real-servers/`.
pub fn install(target: &Path, servers: &[RealServer]) -> Result<()> {
    let all = [RealServer::Synapse];
    for server in if servers.is_empty() { &all[..] } else { servers } {
        match server {
            RealServer::Synapse => install_synapse(target)?,
        }
    }
    Ok(())
}

/// `<target>/real-servers/synapse-venv`.
pub fn synapse_venv(target: &Path) -> PathBuf {
    target.join("real-servers").join("synapse-venv")
}

fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// Make sure the venv exists and holds exactly [`SYNAPSE_VERSION`]; quick when it already does.
fn install_synapse(target: &Path) -> Result<()> {
    let started = Instant::now();
    let venv = synapse_venv(target);
    let python = venv_python(&venv);
    if python.exists() {
        match installed_synapse(&python) {
            Ok(Some(version))
                if version == SYNAPSE_VERSION
                    && std::fs::read_to_string(constraints_stamp(&venv)).is_ok_and(|c| c == SYNAPSE_CONSTRAINTS) =>
            {
                eprintln!(
                    "xtask: Synapse {version} already installed in {} (checked in {} ms)",
                    venv.display(),
                    started.elapsed().as_millis()
                );
                return Ok(());
            }
            Ok(Some(version)) => eprintln!(
                "xtask: {} has Synapse {version} (or other pinned dependencies); installing {SYNAPSE_VERSION}",
                venv.display()
            ),
            Ok(None) => eprintln!("xtask: {} has no Synapse yet; installing {SYNAPSE_VERSION}", venv.display()),
            Err(error) => {
                // A venv whose interpreter no longer runs (its base Python moved or was
                // upgraded): start over.
                eprintln!("xtask: {} is broken ({error:#}); making it again", venv.display());
                std::fs::remove_dir_all(&venv).with_context(|| format!("cannot remove {}", venv.display()))?;
            }
        }
    }
    if !python.exists() {
        if venv.exists() {
            // Left over from a failed creation, or its interpreter link dangles.
            std::fs::remove_dir_all(&venv).with_context(|| format!("cannot remove {}", venv.display()))?;
        }
        create_venv(&venv)?;
    }
    let requirement = format!("matrix-synapse=={SYNAPSE_VERSION}");
    eprintln!("xtask: pip install {requirement} into {}", venv.display());
    let constraints = venv.join("constraints-to-install.txt");
    std::fs::write(&constraints, SYNAPSE_CONSTRAINTS)
        .with_context(|| format!("cannot write {}", constraints.display()))?;
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary", ":all:"])
        .arg("-c")
        .arg(&constraints)
        .arg(&requirement)
        .status()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !status.success() {
        bail!("pip install {requirement} failed ({status}); is PyPI reachable?");
    }
    match installed_synapse(&python)? {
        Some(version) if version == SYNAPSE_VERSION => {
            std::fs::write(constraints_stamp(&venv), SYNAPSE_CONSTRAINTS)
                .with_context(|| format!("cannot write {}", constraints_stamp(&venv).display()))?;
        }
        other => bail!("after pip install, {} reports Synapse {other:?}, not {SYNAPSE_VERSION}", venv.display()),
    }
    eprintln!(
        "xtask: Synapse {SYNAPSE_VERSION} installed in {} in {:.1} s",
        venv.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The `matrix-synapse` version installed in the venv of `python`, `None` if it has none;
/// an error if the interpreter does not run.
fn installed_synapse(python: &Path) -> Result<Option<String>> {
    let output = Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m\n\
             try:\n    print(m.version('matrix-synapse'))\n\
             except m.PackageNotFoundError:\n    print('')",
        ])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !output.status.success() {
        bail!("{} failed: {}", python.display(), String::from_utf8_lossy(&output.stderr).trim());
    }
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Ok((!version.is_empty()).then_some(version))
}

/// `python3 -m venv <venv>` with a base interpreter new enough for Synapse.
fn create_venv(venv: &Path) -> Result<()> {
    let base = std::env::var("SWITCHBOARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&base)
        .args(["-c", "import sys, venv, ensurepip; print('%d %d' % sys.version_info[:2])"])
        .output()
        .with_context(|| {
            format!("cannot run `{base}`: Synapse needs Python >= 3.10 (set SWITCHBOARD_PYTHON to pick one)")
        })?;
    if !output.status.success() {
        bail!(
            "`{base}` cannot make a virtual environment (install python3-venv?): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let version: Vec<u32> = text.split_whitespace().filter_map(|part| part.parse().ok()).collect();
    let [major, minor] = version[..] else { bail!("cannot read the version of `{base}` from {text:?}") };
    if (major, minor) < MIN_PYTHON {
        bail!(
            "`{base}` is Python {major}.{minor}; Synapse {SYNAPSE_VERSION} needs >= {}.{} \
             (set SWITCHBOARD_PYTHON to a newer interpreter)",
            MIN_PYTHON.0,
            MIN_PYTHON.1
        );
    }
    let parent = venv.parent().context("the venv path has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    eprintln!("xtask: {base} (Python {major}.{minor}) -m venv {}", venv.display());
    let status = Command::new(&base)
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .with_context(|| format!("cannot run `{base} -m venv`"))?;
    if !status.success() {
        // Leave nothing half-made for the next run to mistake for a venv.
        let _ = std::fs::remove_dir_all(venv);
        bail!("`{base} -m venv {}` failed ({status})", venv.display());
    }
    Ok(())
}
