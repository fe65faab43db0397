//! `cargo xtask demo --platform matrix`: a real Synapse (installed by `cargo xtask
//! real-servers synapse`), the real gateway with the Matrix plugin, and the same short
//! conversation as the Mattermost demo, with a chatmode reload (SIGUSR1) in the middle.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use reqwest::Method;
use serde_json::json;
use switchboard_tests::{
    harness::Gateway,
    matrix::{matrix_seed_config, MatrixUser, Preset, Synapse, TextMessage},
};

struct MatrixDemo {
    synapse: Synapse,
    bot: MatrixUser,
    alice: MatrixUser,
    gateway: Gateway,
    rooms: Vec<(String, &'static str)>,
}

impl MatrixDemo {
    fn room_name(&self, id: &str) -> &'static str {
        self.rooms.iter().find(|(room, _)| room == id).map_or("?", |(_, name)| name)
    }

    async fn bot_messages(&self, room: &str) -> Result<Vec<TextMessage>> {
        Ok(self
            .synapse
            .messages(&self.alice, room)
            .await?
            .into_iter()
            .filter(|m| m.sender == self.bot.user_id)
            .collect())
    }

    /// Alice says `message` in `room` (in the thread of `thread_root` when given); wait up to
    /// `patience` for a new bot message there and show it with the session key logged.
    async fn say(
        &self,
        room: &str,
        message: &str,
        thread_root: Option<&str>,
        patience: Duration,
    ) -> Result<Option<String>> {
        let before = self.bot_messages(room).await?.len();
        println!("  alice in {:<20} {message:?}", self.room_name(room));
        let event_id = match thread_root {
            None => self.synapse.send_text(&self.alice, room, message).await?,
            Some(root) => {
                let txn = format!("demo-thread-{}", message.len());
                let path = ["_matrix", "client", "v3", "rooms", room, "send", "m.room.message", txn.as_str()];
                let content = json!({
                    "msgtype": "m.text",
                    "body": message,
                    "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": true,
                                     "m.in_reply_to": {"event_id": root}},
                });
                let answer = self.synapse.api_ok(Method::PUT, Some(&self.alice), &path, &[], Some(&content)).await?;
                answer["event_id"].as_str().unwrap_or_default().to_string()
            }
        };
        let deadline = Instant::now() + patience;
        loop {
            if let Some(reply) = self.bot_messages(room).await?.into_iter().nth(before) {
                let session = self
                    .gateway
                    .lines_with(&["inbound", &format!("message_id={event_id}")])
                    .first()
                    .and_then(|line| {
                        line.split_whitespace().find_map(|w| w.strip_prefix("session=")).map(str::to_string)
                    })
                    .unwrap_or_else(|| "?".into());
                let thread = if thread_root.is_some() { " (in the thread)" } else { "" };
                println!("  bot   in {:<20} {:?}{thread}", self.room_name(room), reply.body);
                println!("        session {session}");
                return Ok(Some(event_id));
            }
            if Instant::now() > deadline {
                println!("  (no reply)");
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Wait until `user` has joined each of `rooms` (the adapter accepts the invites).
async fn joined(synapse: &Synapse, user: &MatrixUser, rooms: &[&str], gateway: &Gateway) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sync = synapse.sync(user, None).await?;
        let joined = sync.joined_rooms();
        if rooms.iter().all(|room| joined.iter().any(|j| j == room)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the bot did not join {rooms:?}:\n{}", gateway.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(switchboard: &Path, plugins: &Path) -> Result<()> {
    let started = Instant::now();
    let synapse = Synapse::start().await?;
    let bot = synapse.register("switchboard", false).await?;
    let alice = synapse.register("alice", false).await?;
    let bob = synapse.register("bob", false).await?;
    println!(
        "Synapse on {} (started in {} ms; bot {}, humans alice and bob)",
        synapse.base_url(),
        synapse.started_in().as_millis(),
        bot.user_id
    );
    let general = synapse.create_room(&alice, Preset::PublicChat, &[&bot.user_id, &bob.user_id]).await?;
    let protocol = synapse.create_room(&alice, Preset::PrivateChat, &[&bot.user_id, &bob.user_id]).await?;
    let dm = synapse.create_room(&alice, Preset::TrustedPrivateChat, &[&bot.user_id]).await?;
    // Bob is in both rooms: a room of two is taken for a DM.
    for room in [&general, &protocol] {
        synapse.join(&bob, room).await?;
    }
    let workdir = tempfile::tempdir()?;
    let config_path = workdir.path().join("switchboard.toml");
    let (homeserver, bot_id) = (synapse.base_url(), bot.user_id.clone());
    let config = |chatmode: &str| matrix_seed_config(&homeserver, &bot_id, plugins, chatmode, "kind = \"echo\"");
    std::fs::write(&config_path, config("oncall"))?;
    let gateway =
        Gateway::start(switchboard, workdir.path(), &config_path, &[("MATRIX_ACCESS_TOKEN", &bot.access_token)])
            .await?;
    joined(&synapse, &bot, &[&general, &protocol, &dm], &gateway).await?;
    println!("gateway up, invites accepted, in {} ms (admin on {})\n", started.elapsed().as_millis(), gateway.admin);
    let demo = MatrixDemo {
        rooms: vec![
            (general.clone(), "#office-general"),
            (protocol.clone(), "#protocol-evolution"),
            (dm.clone(), "DM alice↔bot"),
        ],
        synapse,
        bot,
        alice,
        gateway,
    };
    let quiet = Duration::from_millis(2500);
    let answer = Duration::from_secs(15);

    println!("chatmode = \"oncall\": the bot answers only when mentioned");
    demo.say(&protocol, "switchboard: is the v2 schema frozen?", None, answer).await?;
    demo.say(&protocol, "does anyone know when the freeze is?", None, quiet).await?;

    println!("\nrewrite the config to chatmode = \"onmessage\" and send SIGUSR1");
    std::fs::write(&config_path, config("onmessage"))?;
    demo.gateway.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(line) = demo.gateway.lines_with(&["generation started", "generation=2"]).first() {
            let pause = line.split_whitespace().find_map(|w| w.strip_prefix("pause_us=")).unwrap_or("?");
            println!("  generation 2 of the adapter started; events were held for {pause} µs during the swap");
            break;
        }
        if Instant::now() > deadline {
            bail!("the reload did not happen:\n{}", demo.gateway.log_text());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    demo.say(&protocol, "does anyone know when the freeze is?", None, answer).await?;
    demo.say(&general, "good morning everyone", None, answer).await?;
    let root = demo.say(&general, "switchboard: status of the release?", None, answer).await?;
    if let Some(root) = root {
        demo.say(&general, "and the changelog?", Some(&root), answer).await?;
    }
    demo.say(&dm, "can you keep a secret?", None, answer).await?;

    let syncs = demo.synapse.access_lines(&["GET", "/sync"]).len();
    println!("\n/sync requests Synapse served: {syncs} (the reload carried the long-poll over, no gap)");
    let status = demo.gateway.status().await?;
    for generation in status["generations"].as_array().into_iter().flatten() {
        println!(
            "generation {} of {}: {} (mapped: {}), {} events handled",
            generation["generation"],
            generation["channel"],
            generation["state"],
            generation["mapped"],
            generation["events_handled"]
        );
    }
    let exit = demo.gateway.stop().await?;
    println!("gateway stopped: {exit}");
    let stopped = demo.synapse.stop().await?;
    println!("Synapse stopped: {}", stopped.status);
    Ok(())
}
