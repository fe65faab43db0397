//! JSON logs: with `gateway.log_format = "json"` every line the gateway writes is one JSON
//! object, and what operators grep for (session, channel instance, generation, message id)
//! are top-level fields; `SWITCHBOARD_LOG_FORMAT` wins over the config, and a value that is
//! neither `text` nor `json` is an error that names where it came from.

use anyhow::Result;
use serde_json::Value;
use switchboard_tests::{assert_eventually, harness::Gateway};

use crate::rig::{tail, Rig, RigOptions};

/// Every log line as JSON (panics on one that is not an object).
fn json_lines(gateway: &Gateway) -> Vec<Value> {
    gateway
        .log()
        .iter()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(value) if value.is_object() => value,
            _ => panic!("a log line that is not a JSON object: {line}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_fields_operators_grep_for() -> Result<()> {
    let rig = Rig::with(RigOptions { gateway_keys: "log_format = \"json\"", ..RigOptions::default() }).await?;
    let gateway = rig.start(&[]).await?;
    let channel = rig.world.office_general.clone();
    rig.ask(&channel, "structured, please", &gateway).await;
    let asked = rig.sim.posts_by(&rig.world.alice.id).into_iter().find(|p| p.message == "structured, please").unwrap();
    let session = format!("agent:main:mattermost:channel:{channel}");
    assert_eventually!(
        json_lines(&gateway).iter().any(|l| l["message"] == format!("delivered reply to channel:{channel}")),
        "the delivery is logged:\n{}",
        tail(&gateway, 20)
    );
    let lines = json_lines(&gateway);
    for line in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.get(key).is_some(), "every line has {key}: {line}");
        }
    }
    let inbound = lines.iter().find(|l| l["message"] == "inbound").expect("an inbound line");
    assert_eq!(inbound["session"], session.as_str(), "{inbound}");
    assert_eq!(inbound["channel"], "mattermost", "{inbound}");
    assert_eq!(inbound["message_id"], asked.id.as_str(), "{inbound}");
    assert_eq!(inbound["conversation"], channel.as_str(), "{inbound}");
    let delivered = lines
        .iter()
        .find(|l| l["message"] == format!("delivered reply to channel:{channel}"))
        .expect("a delivery line");
    assert_eq!(delivered["session"], session.as_str(), "{delivered}");
    assert_eq!(delivered["conversation"], channel.as_str(), "{delivered}");
    assert_eq!(delivered["channel"], "mattermost", "{delivered}");
    let started = lines.iter().find(|l| l["message"] == "generation started").expect("a generation line");
    assert_eq!(started["generation"], 1, "{started}");
    // The adapter's own lines come through the host with its instance and generation.
    let adapter = lines.iter().find(|l| l["target"] == "adapter").expect("an adapter line");
    assert_eq!(adapter["channel"], "mattermost", "{adapter}");
    assert_eq!(adapter["generation"], 1, "{adapter}");
    println!("the inbound line: {inbound}");
    let status = gateway.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_wins_over_the_config_and_unknown_formats_are_errors() -> Result<()> {
    let rig = Rig::with(RigOptions { gateway_keys: "log_format = \"json\"", ..RigOptions::default() }).await?;
    let gateway = rig.start(&[("SWITCHBOARD_LOG_FORMAT", "text")]).await?;
    assert!(
        gateway.log().iter().all(|line| serde_json::from_str::<Value>(line).is_err()),
        "SWITCHBOARD_LOG_FORMAT=text wins:\n{}",
        tail(&gateway, 10)
    );
    gateway.stop().await?;

    let run = |env: Option<&str>| {
        let mut command = std::process::Command::new(&rig.artifacts.switchboard);
        command.arg("run").arg("--config").arg(&rig.config_path).current_dir(rig.scratch.path());
        command.env("MM_BOT_TOKEN", &rig.world.bot.token);
        if let Some(value) = env {
            command.env("SWITCHBOARD_LOG_FORMAT", value);
        }
        command.output()
    };
    let refused = run(Some("xml"))?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("SWITCHBOARD_LOG_FORMAT") && stderr.contains("\"xml\""), "{stderr}");

    let config = std::fs::read_to_string(&rig.config_path)?.replace("log_format = \"json\"", "log_format = \"xml\"");
    std::fs::write(&rig.config_path, config)?;
    let checked =
        std::process::Command::new(&rig.artifacts.switchboard).arg("check-config").arg(&rig.config_path).output()?;
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(!checked.status.success());
    assert!(stdout.contains("gateway.log_format") && stdout.contains("text, json"), "{stdout}");
    let refused = run(None)?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("gateway.log_format"));
    Ok(())
}
