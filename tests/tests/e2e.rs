//! End-to-end tests: the real `switchboard` binary, the real Mattermost adapter `.so` loaded
//! with dlopen, the simulator on a loopback WebSocket. One test binary (see `harness`).
//!
//! Build first with `cargo xtask test` (it builds the binary, the plugin and the fixtures).

#[path = "e2e/abi.rs"]
mod abi;
#[path = "e2e/admin.rs"]
mod admin;
#[path = "e2e/bounds.rs"]
mod bounds;
#[path = "e2e/check_config.rs"]
mod check_config;
#[path = "e2e/cli.rs"]
mod cli;
#[path = "e2e/conformance.rs"]
mod conformance;
#[path = "e2e/durability.rs"]
mod durability;
#[path = "e2e/logs.rs"]
mod logs;
#[path = "e2e/matrix.rs"]
mod matrix;
#[path = "e2e/matrix_server.rs"]
mod matrix_server;
#[path = "e2e/metrics.rs"]
mod metrics;
#[path = "e2e/real_server.rs"]
mod real_server;
#[path = "e2e/replacement.rs"]
mod replacement;
#[path = "e2e/rig.rs"]
mod rig;
#[path = "e2e/systemd.rs"]
mod systemd;
#[path = "e2e/tls.rs"]
mod tls;
#[path = "e2e/watchdog.rs"]
mod watchdog;

use std::path::{Path, PathBuf};

use anyhow::Result;
use switchboard_tests::{
    assert_eventually,
    harness::{install_plugin, mattermost_file_name, seed_config, Artifacts, Gateway},
    sim::{DemoWorld, SimPost, Simulator},
};

/// One gateway against one simulator, in a scratch directory.
struct Scene {
    sim: Simulator,
    world: DemoWorld,
    gateway: Gateway,
    artifacts: Artifacts,
    plugin_dir: PathBuf,
    _scratch: tempfile::TempDir,
}

#[derive(Clone)]
struct Settings {
    chatmode: &'static str,
    /// The body of `[agents.main]`.
    agent: String,
}

impl Settings {
    fn chatmode(chatmode: &'static str) -> Self {
        Self { chatmode, agent: "kind = \"echo\"".into() }
    }
}

fn config_text(sim: &Simulator, plugin_dir: &Path, settings: &Settings) -> String {
    seed_config(&sim.base_url(), plugin_dir, settings.chatmode, &settings.agent)
}

impl Scene {
    async fn start(settings: Settings) -> Result<Self> {
        let rig = rig::Rig::new(settings.chatmode, &settings.agent).await?;
        let gateway = rig.start(&[]).await?;
        let plugin_dir = rig.plugin_dir();
        let rig::Rig { sim, world, artifacts, scratch, .. } = rig;
        let scene = Self { sim, world, gateway, artifacts, plugin_dir, _scratch: scratch };
        assert_eventually!(scene.sim.ws_connections_active() == 1, "the adapter connects its WebSocket");
        assert_eventually!(
            scene.gateway.admin_get("/readyz").await.map(|(code, _)| code).unwrap_or(0) == 200,
            "the gateway reports ready"
        );
        Ok(scene)
    }

    fn config(&self, settings: &Settings) -> String {
        config_text(&self.sim, &self.plugin_dir, settings)
    }

    fn bot_posts_in(&self, channel_id: &str) -> Vec<SimPost> {
        self.sim.posts_in(channel_id).into_iter().filter(|p| p.user_id == self.world.bot.id).collect()
    }

    fn bot_reply(&self, channel_id: &str, text: &str) -> Option<SimPost> {
        let wanted = format!("echo: {text}");
        self.bot_posts_in(channel_id).into_iter().find(|p| p.message == wanted)
    }

    /// Alice posts `message` in `channel_id` and the bot answers `echo: <answered_text>` there.
    async fn ask(&self, channel_id: &str, message: &str, answered_text: &str) -> SimPost {
        self.sim.post_as(&self.world.alice.id, channel_id, message, None);
        assert_eventually!(
            self.bot_reply(channel_id, answered_text).is_some(),
            "a reply `echo: {answered_text}` in {channel_id}; bot posts there: {:?}\n--- gateway log ---\n{}",
            self.bot_posts_in(channel_id).iter().map(|p| &p.message).collect::<Vec<_>>(),
            self.gateway.log_text()
        );
        self.bot_reply(channel_id, answered_text).unwrap()
    }

    /// Every generation record of the `mattermost` channel from `/status`.
    async fn generations(&self) -> Vec<serde_json::Value> {
        let status = self.gateway.status().await.unwrap_or_default();
        status["generations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|g| g["channel"] == "mattermost")
            .collect()
    }

    async fn generation_state(&self, number: u64) -> Option<(String, Option<bool>)> {
        self.generations()
            .await
            .into_iter()
            .find(|g| g["generation"] == number)
            .map(|g| (g["state"].as_str().unwrap_or_default().to_string(), g["mapped"].as_bool()))
    }

    fn session_lines(&self, key: &str, what: &str) -> usize {
        self.gateway.count(&[what, &format!("session={key}")])
    }
}

/// The failure this project exists to prevent: a chatmode reload must not move conversations
/// into another session, lose replies, or reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatmode_reload_keeps_sessions_routing_and_the_connection() -> Result<()> {
    let scene = Scene::start(Settings::chatmode("oncall")).await?;
    let world = &scene.world;
    let protocol = world.protocol_evolution.clone();
    let general = world.office_general.clone();
    let protocol_key = format!("agent:main:mattermost:channel:{protocol}");
    let general_key = format!("agent:main:mattermost:channel:{general}");

    // oncall: a mention is answered where it was asked; a plain message is not.
    scene.ask(&protocol, "@switchboard-bot what is the plan?", "what is the plan?").await;
    scene.sim.post_as(&world.alice.id, &protocol, "just chatting, no mention", None);
    // Lanes keep order, so once the next mention is answered the plain one had its chance.
    scene.ask(&protocol, "@switchboard-bot still there?", "still there?").await;
    assert!(
        scene.bot_reply(&protocol, "just chatting, no mention").is_none(),
        "oncall answered an un-mentioned message"
    );
    assert_eventually!(scene.session_lines(&protocol_key, "inbound") >= 2, "inbound lines carry {protocol_key}");
    assert_eventually!(
        scene.gateway.count(&[&format!("delivered reply to channel:{protocol}"), &format!("session={protocol_key}")])
            >= 2,
        "delivery lines carry {protocol_key}"
    );
    scene.ask(&general, "@switchboard-bot morning", "morning").await;
    let connections_before = scene.sim.ws_connections_opened();
    assert_eq!(connections_before, 1);

    // Reload to onmessage with SIGUSR1; keys that only a start can apply change too.
    let onmessage = scene.config(&Settings::chatmode("onmessage"));
    assert!(onmessage.contains("[gateway]"));
    scene.gateway.reload_with(&onmessage.replace("[gateway]", "[gateway]\nio_threads = 3\ndurability = \"normal\""))?;
    assert_eventually!(
        scene.gateway.count(&["generation started", "generation=2"]) == 1,
        "generation 2 starts after SIGUSR1:\n{}",
        scene.gateway.log_text()
    );
    assert_eq!(
        scene.gateway.count(&[
            "these changed keys take effect at the next start",
            "gateway.durability",
            "gateway.io_threads"
        ]),
        1,
        "the reload says which changed keys wait for the next start:\n{}",
        scene.gateway.log_text()
    );

    let inbound_before = scene.session_lines(&protocol_key, "inbound");
    let reply = scene.ask(&protocol, "no mention after the reload", "no mention after the reload").await;
    assert_eq!(reply.channel_id, protocol, "answered in protocol-evolution");
    assert_eventually!(
        scene.session_lines(&protocol_key, "inbound") == inbound_before + 1,
        "logged under {protocol_key}"
    );
    assert_eventually!(
        scene.gateway.count(&[&format!("delivered reply to channel:{protocol}"), &format!("session={protocol_key}")])
            >= 3,
        "the reply after the reload is delivered under {protocol_key}"
    );

    let reply = scene.ask(&general, "also no mention here", "also no mention here").await;
    assert_eq!(reply.channel_id, general, "answered in office-general");
    assert_eventually!(scene.session_lines(&general_key, "inbound") >= 2, "office-general stays under {general_key}");

    assert_eq!(scene.sim.ws_connections_opened(), connections_before, "the reload opened no new WebSocket");
    assert_eq!(scene.sim.ws_connections_active(), 1);
    // No message was answered twice or in the wrong place.
    for channel in [&protocol, &general] {
        let posts = scene.bot_posts_in(channel);
        let mut texts: Vec<&str> = posts.iter().map(|p| p.message.as_str()).collect();
        texts.sort_unstable();
        let before = texts.len();
        texts.dedup();
        assert_eq!(before, texts.len(), "duplicate replies in {channel}: {texts:?}");
    }
    assert_eq!(scene.bot_posts_in(&protocol).len(), 3);
    assert_eq!(scene.bot_posts_in(&general).len(), 2);
    assert!(scene.bot_posts_in(&world.alice_dm).is_empty());

    // The old generation's copy is gone from the address space.
    assert_eventually!(
        scene.generation_state(1).await == Some(("unloaded".into(), Some(false))),
        "generation 1 is unloaded and unmapped: {:?}",
        scene.generations().await
    );
    assert_eq!(scene.generation_state(2).await.map(|s| s.0), Some("running".into()));
    assert_eventually!(
        scene.gateway.count(&["generation unloaded", "generation=1"]) == 1,
        "generation 1 unloaded is logged"
    );

    let status = scene.gateway.stop().await?;
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_and_threads_are_answered_where_they_were_asked() -> Result<()> {
    let scene = Scene::start(Settings::chatmode("oncall")).await?;
    let world = &scene.world;

    // A DM needs no mention and gets its own DM session.
    let reply = scene.ask(&world.alice_dm, "hello in private", "hello in private").await;
    assert_eq!(reply.root_id, "");
    let dm_key = format!("agent:main:mattermost:dm:{}", world.alice.id);
    assert_eventually!(
        scene.session_lines(&dm_key, "inbound") == 1,
        "DM logged under {dm_key}:\n{}",
        scene.gateway.log_text()
    );
    assert_eventually!(
        scene.gateway.count(&[&format!("delivered reply to channel:{}", world.alice_dm), &format!("session={dm_key}")])
            == 1,
        "DM delivery logged under {dm_key}"
    );

    // A message inside a thread is answered inside that thread.
    let root = scene.sim.post_as(&world.bob.id, &world.office_general, "a thread about the release", None);
    scene.sim.post_as(&world.alice.id, &world.office_general, "@switchboard-bot summarise please", Some(&root.id));
    assert_eventually!(
        scene.bot_reply(&world.office_general, "summarise please").is_some(),
        "a reply to the thread message:\n{}",
        scene.gateway.log_text()
    );
    let reply = scene.bot_reply(&world.office_general, "summarise please").unwrap();
    assert_eq!(reply.root_id, root.id, "the reply is in the thread");
    // The echo agent answers at once, well within `typing_delay_ms`: no typing indicator.
    let typing = scene.sim.typing_received();
    assert!(typing.iter().all(|(user, _, _)| *user != world.bot.id), "the bot showed typing: {typing:?}");
    Ok(())
}

/// The `command` agent gets the request as JSON on stdin; while it works the bot shows typing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_agent_answers_from_its_stdin_request_and_typing_shows_meanwhile() -> Result<()> {
    let agent = r#"kind = "command"
command = ["sh", "-c", "sleep 0.5; sed -n 's/.*\"text\":\"\\([^\"]*\\)\".*/command saw: \\1/p'"]
timeout_ms = 10000"#;
    let scene = Scene::start(Settings { chatmode: "oncall", agent: agent.into() }).await?;
    let world = &scene.world;
    scene.sim.post_as(&world.alice.id, &world.alice_dm, "slow question", None);
    let wanted = "command saw: slow question";
    assert_eventually!(
        scene.bot_posts_in(&world.alice_dm).iter().any(|p| p.message == wanted),
        "the command agent's reply in the DM: {:?}\n{}",
        scene.bot_posts_in(&world.alice_dm).iter().map(|p| &p.message).collect::<Vec<_>>(),
        scene.gateway.log_text()
    );
    let typing: Vec<_> = scene
        .sim
        .typing_received()
        .into_iter()
        .filter(|(user, channel, _)| *user == world.bot.id && *channel == world.alice_dm)
        .collect();
    assert!(!typing.is_empty(), "the bot sent a typing indicator to the DM while the agent worked");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_on_reload_is_reported_in_full_and_the_old_one_keeps_running() -> Result<()> {
    let scene = Scene::start(Settings::chatmode("oncall")).await?;
    let world = &scene.world;
    scene.ask(&world.protocol_evolution, "@switchboard-bot before", "before").await;

    let broken = scene
        .config(&Settings::chatmode("sometimes"))
        .replace("dm_policy = \"open\"", "dm_policy = \"maybe\"\ncolour = \"blue\"")
        .replace("kind = \"echo\"", "kind = \"oracle\"");
    scene.gateway.reload_with(&broken)?;
    assert_eventually!(
        scene.gateway.count(&["reload rejected"]) == 1,
        "the reload is rejected:\n{}",
        scene.gateway.log_text()
    );
    for key in [
        "channels.mattermost.chatmode",
        "channels.mattermost.dm_policy",
        "channels.mattermost.colour",
        "agents.main.kind",
    ] {
        assert!(
            scene.gateway.count(&["config error", &format!("key={key}")]) == 1,
            "a config error at {key}:\n{}",
            scene.gateway.log_text()
        );
    }
    // Old behaviour: oncall still applies, the old generation still serves.
    scene.sim.post_as(&world.alice.id, &world.protocol_evolution, "un-mentioned after a bad reload", None);
    scene.ask(&world.protocol_evolution, "@switchboard-bot after", "after").await;
    assert!(scene.bot_reply(&world.protocol_evolution, "un-mentioned after a bad reload").is_none());
    assert_eq!(scene.gateway.count(&["generation started"]), 1, "no new generation was started");
    assert_eq!(scene.sim.ws_connections_opened(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_plugin_files_are_refused_and_the_running_adapter_keeps_serving() -> Result<()> {
    let scene = Scene::start(Settings::chatmode("oncall")).await?;
    let world = &scene.world;
    let channel = world.office_general.clone();
    scene.ask(&channel, "@switchboard-bot first", "first").await;

    let not_a_library = scene._scratch.path().join("not-a-library.so");
    std::fs::write(&not_a_library, "this is a text file, not a shared library\n")?;
    let cases: Vec<(&str, PathBuf, &[&str])> = vec![
        ("not a library", not_a_library, &["plugin file refused", "is not a loadable library"]),
        (
            "incompatible ABI layout",
            scene.artifacts.fixture("abi-skew")?,
            &["plugin file refused", "incompatible adapter interface"],
        ),
        (
            "other ABI version",
            scene.artifacts.fixture("abi-version")?,
            &["plugin file refused", "speaks adapter ABI v2"],
        ),
        (
            "constructor panics",
            scene.artifacts.fixture("panicking-constructor")?,
            &["generation refused, rolled back", "adapter panicked", "constructor panics on purpose"],
        ),
    ];
    for (round, (what, file, expected)) in cases.iter().enumerate() {
        let before = scene.gateway.count(expected);
        install_plugin(file, &scene.plugin_dir, &mattermost_file_name())?;
        scene.gateway.signal(libc::SIGUSR1);
        assert_eventually!(
            scene.gateway.count(expected) > before,
            "{what}: a refusal mentioning {expected:?}:\n{}",
            scene.gateway.log_text()
        );
        let text = format!("still serving after {what}");
        scene.ask(&channel, &format!("@switchboard-bot {text}"), &text).await;
        assert_eq!(scene.bot_posts_in(&channel).len(), round + 2, "one reply per question after {what}");
    }
    assert_eq!(scene.gateway.count(&["generation started"]), 1, "generation 1 serves throughout");
    assert_eq!(scene.generation_state(1).await.map(|s| s.0), Some("running".into()));
    assert_eq!(scene.sim.ws_connections_opened(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_lists_every_error_and_exits_non_zero() -> Result<()> {
    let artifacts = Artifacts::discover()?;
    let scratch = tempfile::tempdir()?;
    let config = scratch.path().join("bad.toml");
    std::fs::write(
        &config,
        r#"
[gateway]
state_dir = 7
max_concurrent_turns = -1

[plugins]
dir = "plugins"

[channels.mattermost]
thread_sessions = "yes"

[agents.main]
kind = "oracle"

[[bindings]]
channel = "nowhere"
agent = "ghost"
"#,
    )?;
    let output = std::process::Command::new(&artifacts.switchboard).arg("check-config").arg(&config).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "check-config exits non-zero:\n{stdout}");
    for key in [
        "gateway.state_dir",
        "gateway.max_concurrent_turns",
        "channels.mattermost.plugin",
        "channels.mattermost.thread_sessions",
        "agents.main.kind",
        "bindings[0].channel",
        "bindings[0].agent",
    ] {
        assert!(stdout.contains(key), "check-config names {key}:\n{stdout}");
    }
    Ok(())
}
