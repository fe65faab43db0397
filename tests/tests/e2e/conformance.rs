//! `switchboard check-plugin --conformance`: the real binary against real libraries — the
//! Mattermost adapter (a WebSocket adapter) passes, and builds broken on purpose (a panicking
//! constructor, a panic and an abort on `Started`, a hanging constructor) fail with what
//! happened, in bounded time. (The HTTP-only template passes in `cargo xtask check-template`.)

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;
use switchboard_tests::harness::Artifacts;

/// `check-plugin --conformance <file> --json <extra…>`: the exit code and the report.
fn conformance(artifacts: &Artifacts, file: &Path, extra: &[&str]) -> Result<(i32, Value)> {
    let output = Command::new(&artifacts.switchboard)
        .arg("check-plugin")
        .arg("--conformance")
        .arg(file)
        .arg("--json")
        .args(extra)
        .output()?;
    let report = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "not a JSON report: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((output.status.code().context("killed by a signal")?, report))
}

/// The check `name` of `report`: (status, its reasons joined).
fn check(report: &Value, name: &str) -> (String, String) {
    let found = report["checks"].as_array().and_then(|checks| checks.iter().find(|c| c["name"] == name));
    let Some(found) = found else { return ("missing".into(), report.to_string()) };
    let reasons: Vec<&str> = found["reasons"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    (found["status"].as_str().unwrap_or_default().to_string(), reasons.join(" | "))
}

#[test]
fn the_mattermost_adapter_passes_from_its_sample_config_and_from_a_given_one() -> Result<()> {
    let artifacts = Artifacts::discover()?;
    let (code, report) = conformance(&artifacts, &artifacts.mattermost_plugin(), &[])?;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["manifest"]["adapter_name"], "mattermost");
    assert!(report["config_source"].as_str().unwrap_or_default().contains("sample"), "{report:#}");
    let checks = report["checks"].as_array().context("checks")?;
    assert!(checks.len() >= 13 && checks.iter().all(|c| c["status"] == "pass"), "{report:#}");
    assert_eq!(check(&report, "garbage_ws").0, "pass", "a WebSocket adapter gets garbage frames: {report:#}");

    let scratch = tempfile::tempdir()?;
    let config = scratch.path().join("instance.toml");
    std::fs::write(
        &config,
        "plugin = \"mattermost\"\nthread_sessions = true\nbase_url = \"https://chat.example.com\"\n\
         bot_token_env = \"SOME_TOKEN\"\nchatmode = \"onmessage\"\n",
    )?;
    let (code, report) =
        conformance(&artifacts, &artifacts.mattermost_plugin(), &["--config", config.to_str().unwrap()])?;
    assert_eq!(code, 0, "{report:#}");
    assert!(report["config_source"].as_str().unwrap_or_default().contains("instance.toml"), "{report:#}");

    // A config the adapter refuses is the operator's to fix: a usage error, with the problem.
    std::fs::write(&config, "base_url = \"https://chat.example.com\"\nbot_token_env = \"T\"\ncolour = \"blue\"\n")?;
    let (code, report) =
        conformance(&artifacts, &artifacts.mattermost_plugin(), &["--config", config.to_str().unwrap()])?;
    assert_eq!(code, 2, "{report:#}");
    assert!(report["error"].as_str().unwrap_or_default().contains("`colour`"), "{report:#}");
    Ok(())
}

#[test]
fn broken_plugins_fail_the_conformance_checks_with_what_happened() -> Result<()> {
    let artifacts = Artifacts::discover()?;

    let (code, report) = conformance(&artifacts, &artifacts.fixture("panicking-constructor")?, &[])?;
    assert_eq!(code, 1, "{report:#}");
    let (status, reasons) = check(&report, "new_adapter_cold");
    assert_eq!(status, "fail", "{report:#}");
    assert!(reasons.contains("adapter panicked: fixture: constructor panics on purpose"), "{reasons}");
    assert_eq!(check(&report, "handover").0, "not_run", "{report:#}");
    assert!(report["aborted"].is_null(), "a caught panic is no crash: {report:#}");

    let (code, report) = conformance(&artifacts, &artifacts.fixture("panic-on-started")?, &[])?;
    assert_eq!(code, 1, "{report:#}");
    let (status, reasons) = check(&report, "new_adapter_cold");
    assert_eq!(status, "fail", "{report:#}");
    assert!(reasons.contains("handle(Started { generation: 1 }) failed: adapter panicked: fixture:"), "{reasons}");

    let (code, report) = conformance(&artifacts, &artifacts.fixture("abort-on-started")?, &[])?;
    assert_eq!(code, 1, "{report:#}");
    let aborted = report["aborted"].as_str().unwrap_or_default();
    assert!(aborted.contains("SIGABRT") && aborted.contains("handle(Started { generation: 1 })"), "{report:#}");
    assert!(aborted.contains("this build aborts when it is started"), "its stderr is quoted: {aborted}");
    assert_eq!(check(&report, "new_adapter_cold").0, "fail", "{report:#}");
    assert_eq!(check(&report, "manifest").0, "pass", "what ran before the crash is kept: {report:#}");

    let started = Instant::now();
    let (code, report) =
        conformance(&artifacts, &artifacts.fixture("hang-on-construct")?, &["--call-timeout-ms", "1000"])?;
    let took = started.elapsed();
    assert_eq!(code, 1, "{report:#}");
    let (status, reasons) = check(&report, "new_adapter_cold");
    assert_eq!(status, "fail", "{report:#}");
    assert!(reasons.contains("hung") && reasons.contains("new_adapter(generation 1, cold"), "{reasons}");
    assert!(took < Duration::from_secs(15), "a hang is bounded by the call timeout: {took:?}");
    Ok(())
}

#[test]
fn files_the_loader_refuses_and_configs_that_cannot_be_used_are_usage_errors() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let artifacts = Artifacts::discover()?;
    let scratch = tempfile::tempdir()?;
    let writable = scratch.path().join("writable.so");
    std::fs::copy(artifacts.mattermost_plugin(), &writable)?;
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666))?;
    let (code, report) = conformance(&artifacts, &writable, &[])?;
    assert_eq!(code, 2, "{report:#}");
    assert!(report["error"].as_str().unwrap_or_default().contains("writable by group or others"), "{report:#}");

    let not_toml = scratch.path().join("broken.toml");
    std::fs::write(&not_toml, "base_url = \n")?;
    let (code, report) =
        conformance(&artifacts, &artifacts.mattermost_plugin(), &["--config", not_toml.to_str().unwrap()])?;
    assert_eq!(code, 2, "{report:#}");
    assert!(report["error"].as_str().unwrap_or_default().contains("not valid TOML"), "{report:#}");
    Ok(())
}
