//! The operator's commands (`switchboard status`, `reload`, `restart`, `sessions`, `plugins`,
//! `dead-letters`), run as the real binary against a running gateway found through its config
//! file (the admin socket in the state directory), with the exit codes scripts rely on:
//! 0 done, 1 refused or not found, 2 usage or config error, 3 no gateway running.

use anyhow::Result;
use serde_json::Value;
use switchboard_tests::assert_eventually;

use crate::rig::{tail, Rig};

/// What the `panic-on-message` fixture panics on.
const PANIC_TRIGGER: &str = "PANIC-ON-THIS";

/// One run of the `switchboard` binary.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.code, self.stdout, self.stderr)
    }
}

/// `switchboard <args> --config <the rig's config>`, from the rig's directory. Not on the
/// test's thread: the simulator the gateway talks to runs there.
async fn switchboard(rig: &Rig, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(&rig.artifacts.switchboard)
        .args(args)
        .arg("--config")
        .arg(&rig.config_path)
        .current_dir(rig.scratch.path())
        .output()
        .await
        .expect("the switchboard binary runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn every_cli_verb_reports_on_and_steers_the_running_gateway() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "hello cli", &gateway).await;
    let session = format!("agent:main:mattermost:channel:{channel}");

    let status = switchboard(&rig, &["status", "--json"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    let status = status.json();
    let generation = &status["generations"][0];
    assert_eq!((generation["channel"].as_str(), generation["state"].as_str()), (Some("mattermost"), Some("running")));
    let table = switchboard(&rig, &["status"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.contains("mattermost") && table.stdout.contains("running"), "{table:?}");
    assert!(table.stdout.contains("dead letters 0"), "{table:?}");

    let sessions = switchboard(&rig, &["sessions", "--json"]).await;
    assert_eq!(sessions.code, 0, "{sessions:?}");
    let keys: Vec<String> =
        sessions.json()["sessions"].as_array().unwrap().iter().map(|s| s["key"].as_str().unwrap().into()).collect();
    assert_eq!(keys, vec![session.clone()]);
    let one = switchboard(&rig, &["sessions", "--channel", "mattermost", "--limit", "1"]).await;
    assert_eq!(one.code, 0, "{one:?}");
    assert!(one.stdout.starts_with("SESSION") && one.stdout.contains(&session), "{one:?}");
    let elsewhere = switchboard(&rig, &["sessions", "--channel", "nowhere"]).await;
    assert_eq!((elsewhere.code, elsewhere.stdout.as_str()), (0, "no sessions\n"), "{elsewhere:?}");

    let plugins = switchboard(&rig, &["plugins", "--json"]).await;
    assert_eq!(plugins.code, 0, "{plugins:?}");
    let plugins = plugins.json();
    let file = &plugins["files"][0];
    assert_eq!(file["sha256"], generation["sha256"], "the file's hash is the running generation's: {plugins}");
    assert_eq!(file["generations"][0]["generation"], generation["generation"], "{plugins}");
    assert_eq!(plugins["budget"]["libraries_opened"], 1, "{plugins}");
    assert_eq!(plugins["budget"]["generation_budget"], 900, "{plugins}");
    let table = switchboard(&rig, &["plugins"]).await;
    assert!(table.stdout.contains("generation budget: 1 of 900 libraries opened"), "{table:?}");
    assert!(table.stdout.contains(generation["sha256"].as_str().unwrap()), "{table:?}");

    let letters = switchboard(&rig, &["dead-letters", "list"]).await;
    assert_eq!((letters.code, letters.stdout.as_str()), (0, "no dead letters\n"), "{letters:?}");

    let reload = switchboard(&rig, &["reload", "--json"]).await;
    assert_eq!(reload.code, 0, "{reload:?}");
    assert_eq!(reload.json()["outcome"], "applied");
    assert_eq!(reload.json()["unchanged"], serde_json::json!(["mattermost"]));
    // A config the gateway rejects (the file still names its socket): exit 1, old config kept.
    let good = std::fs::read_to_string(&rig.config_path)?;
    std::fs::write(&rig.config_path, good.replace("typing_interval_ms = 200", "typing_interval_ms = \"soon\""))?;
    let rejected = switchboard(&rig, &["reload"]).await;
    assert_eq!(rejected.code, 1, "{rejected:?}");
    assert!(
        rejected.stdout.contains("reload rejected") && rejected.stdout.contains("typing_interval_ms"),
        "{rejected:?}"
    );
    std::fs::write(&rig.config_path, good)?;

    let restart = switchboard(&rig, &["restart"]).await;
    assert_eq!(restart.code, 0, "{restart:?}");
    assert!(restart.stdout.contains("restart requested"), "{restart:?}");
    assert_eventually!(gateway.count(&["gateway running"]) == 2, "the gateway started again\n{}", tail(&gateway, 30));
    assert_eventually!(
        switchboard(&rig, &["status"]).await.code == 0,
        "the restarted gateway answers on its socket\n{}",
        tail(&gateway, 30)
    );
    assert_eq!(rig.ask(&channel, "after the restart", &gateway).await, "echo: after the restart");
    Ok(())
}

#[tokio::test]
async fn cli_refusals_exit_with_codes_scripts_can_rely_on() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let socket = rig.scratch.path().join("state").join("admin.sock");

    // No gateway yet: exit 3, saying for which config and where it looked.
    for verb in [&["status"][..], &["dead-letters", "list"], &["reload"], &["sessions", "--json"]] {
        let run = switchboard(&rig, verb).await;
        assert_eq!(run.code, 3, "{verb:?}: {run:?}");
        let expected =
            format!("no gateway is running for {}: cannot connect to {}", rig.config_path.display(), socket.display());
        assert!(run.stderr.contains(&expected), "{verb:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{run:?}");
    }

    // Usage and config errors: exit 2.
    for bad in [
        &["dead-letters", "show", "first"][..],
        &["dead-letters"],
        &["sessions", "--limit", "0"],
        &["dead-letters", "replay"],
        &["status", "--bogus"],
    ] {
        let run = switchboard(&rig, bad).await;
        assert_eq!(run.code, 2, "{bad:?}: {run:?}");
    }
    let missing = tokio::process::Command::new(&rig.artifacts.switchboard)
        .args(["status", "--config", "/nonexistent/switchboard.toml"])
        .output()
        .await?;
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the file"), "{missing:?}");
    let help =
        tokio::process::Command::new(&rig.artifacts.switchboard).args(["dead-letters", "--help"]).output().await?;
    assert!(String::from_utf8_lossy(&help.stdout).contains("3 no gateway is running"), "{help:?}");

    // A running gateway with nothing under that id: exit 1.
    let gateway = rig.start(&[]).await?;
    for verb in ["show", "replay", "drop"] {
        let run = switchboard(&rig, &["dead-letters", verb, "42", "--json"]).await;
        assert_eq!(run.code, 1, "{verb}: {run:?}");
        assert!(run.stderr.contains("no dead letter with id 42"), "{verb}: {run:?}");
        assert!(run.stdout.is_empty(), "{run:?}");
    }
    assert!(gateway.lines_with(&["dead letter"]).iter().all(|l| !l.contains("replay")), "{}", tail(&gateway, 20));
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_is_listed_shown_replayed_once_and_dropped_through_the_cli() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    rig.drop_build(&rig.artifacts.fixture("panic-on-message")?)?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "before", &gateway).await;
    let poisoned = format!("{PANIC_TRIGGER} please");
    rig.sim.post_as(&rig.world.alice.id, &channel, &poisoned, None);
    assert_eventually!(
        gateway.count(&["dead-lettered an event the adapter failed on twice"]) == 1,
        "the poisoned post is dead-lettered\n{}",
        tail(&gateway, 40)
    );

    let list = switchboard(&rig, &["dead-letters", "list", "--json"]).await;
    assert_eq!(list.code, 0, "{list:?}");
    let letters = list.json()["dead_letters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    let id = letter["id"].as_i64().unwrap().to_string();
    assert_eq!(
        (letter["channel_instance"].as_str(), letter["event_kind"].as_str()),
        (Some("mattermost"), Some("ws_frame"))
    );
    assert_eq!(letter["session_key"], format!("agent:main:mattermost:channel:{channel}"));
    assert!(letter["replayed_at_ms"].is_null(), "{letter}");
    let table = switchboard(&rig, &["dead-letters", "list"]).await;
    assert!(table.stdout.starts_with("ID") && table.stdout.contains("ws_frame"), "{table:?}");

    let show = switchboard(&rig, &["dead-letters", "show", &id]).await;
    assert_eq!(show.code, 0, "{show:?}");
    assert!(show.stdout.contains(&poisoned) && show.stdout.contains("fixture: this build panics"), "{show:?}");

    // The good build back, the replay is answered once.
    rig.drop_build(&rig.artifacts.mattermost_plugin())?;
    assert_eventually!(gateway.count(&["generation started"]) == 2, "the good build is loaded\n{}", tail(&gateway, 40));
    let replay = switchboard(&rig, &["dead-letters", "replay", &id]).await;
    assert_eq!(replay.code, 0, "{replay:?}");
    assert!(replay.stdout.contains("handed to channel instance mattermost"), "{replay:?}");
    let answer = format!("echo: {poisoned}");
    let answers = || rig.sim.posts_by(&rig.world.bot.id).into_iter().filter(|p| p.message == answer).count();
    assert_eventually!(answers() == 1, "the replayed post is answered\n{}", tail(&gateway, 40));

    let again = switchboard(&rig, &["dead-letters", "replay", &id]).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("replayed before"), "{again:?}");
    let shown = switchboard(&rig, &["dead-letters", "show", &id, "--json"]).await;
    assert!(shown.json()["replayed_at_ms"].is_i64(), "{shown:?}");
    // A message after the replay is answered after it: nothing of the replay is still to come.
    rig.ask(&channel, "after the replay", &gateway).await;
    assert_eq!(answers(), 1, "answered exactly once\n{}", tail(&gateway, 40));
    assert_eq!(rig.sim.ws_connections_opened(), 1, "a replay does not disturb the WebSocket");

    let dropped = switchboard(&rig, &["dead-letters", "drop", &id]).await;
    assert_eq!(dropped.code, 0, "{dropped:?}");
    let empty = switchboard(&rig, &["dead-letters", "list", "--json"]).await;
    assert_eq!(empty.json()["dead_letters"], serde_json::json!([]));
    let twice = switchboard(&rig, &["dead-letters", "drop", &id]).await;
    assert_eq!(twice.code, 1, "{twice:?}");
    Ok(())
}
