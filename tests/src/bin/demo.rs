//! `cargo xtask demo`: the simulator, the real gateway with the real Mattermost plugin, and a
//! short conversation with a chatmode reload (SIGUSR1) in the middle. Shows every reply, the
//! channel it landed in and the session key the gateway logged.
//!
//! With `--platform matrix`, the same against a real Synapse and the Matrix plugin
//! (`demo/matrix.rs`).
//!
//! Usage: `demo --switchboard <binary> --plugins <plugin dir> [--platform mattermost|matrix]`.

#[path = "demo/matrix.rs"]
mod matrix;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use switchboard_tests::{
    harness::{seed_config, Gateway},
    sim::{demo_world, DemoWorld, SimPost, Simulator},
};

struct Args {
    switchboard: PathBuf,
    plugins: PathBuf,
    platform: String,
}

fn parse_args() -> Result<Args> {
    let mut switchboard = None;
    let mut plugins = None;
    let mut platform = "mattermost".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--switchboard" => switchboard = args.next().map(PathBuf::from),
            "--plugins" => plugins = args.next().map(PathBuf::from),
            "--platform" => platform = args.next().context("--platform mattermost|matrix")?,
            other => bail!(
                "unknown argument {other:?}; usage: demo --switchboard <binary> --plugins <dir> [--platform mattermost|matrix]"
            ),
        }
    }
    Ok(Args {
        switchboard: switchboard.context("--switchboard <binary> is required")?,
        plugins: plugins.context("--plugins <dir> is required")?,
        platform,
    })
}

fn config(sim: &Simulator, plugins: &Path, chatmode: &str) -> String {
    seed_config(&sim.base_url(), plugins, chatmode, "kind = \"echo\"")
}

struct Demo {
    sim: Simulator,
    world: DemoWorld,
    gateway: Gateway,
}

impl Demo {
    fn channel_name(&self, id: &str) -> &'static str {
        if id == self.world.office_general {
            "~office-general"
        } else if id == self.world.protocol_evolution {
            "~protocol-evolution"
        } else if id == self.world.alice_dm {
            "DM alice↔bot"
        } else {
            "?"
        }
    }

    fn bot_posts(&self) -> Vec<SimPost> {
        self.sim.posts_by(&self.world.bot.id)
    }

    /// Alice says `message`; wait up to `patience` for a new bot post and show what happened.
    async fn say(
        &self,
        channel: &str,
        message: &str,
        root_id: Option<&str>,
        patience: Duration,
    ) -> Result<Option<SimPost>> {
        let before = self.bot_posts().len();
        println!("  alice in {:<20} {message:?}", self.channel_name(channel));
        let post = self.sim.post_as(&self.world.alice.id, channel, message, root_id);
        let deadline = Instant::now() + patience;
        loop {
            if let Some(reply) = self.bot_posts().into_iter().nth(before) {
                let session = self
                    .gateway
                    .lines_with(&["inbound", &format!("message_id={}", post.id)])
                    .first()
                    .and_then(|line| {
                        line.split_whitespace().find_map(|w| w.strip_prefix("session=")).map(str::to_string)
                    })
                    .unwrap_or_else(|| "?".into());
                let thread = if reply.root_id.is_empty() { String::new() } else { " (in the thread)".into() };
                println!("  bot   in {:<20} {:?}{thread}", self.channel_name(&reply.channel_id), reply.message);
                println!("        session {session}");
                return Ok(Some(reply));
            }
            if Instant::now() > deadline {
                println!("  (no reply)");
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    match args.platform.as_str() {
        "mattermost" => {}
        "matrix" => return matrix::run(&args.switchboard, &args.plugins).await,
        other => bail!("unknown platform {other:?} (mattermost or matrix)"),
    }
    let sim = Simulator::start().await?;
    let world = demo_world(&sim);
    let workdir = tempfile::tempdir()?;
    let config_path = workdir.path().join("switchboard.toml");
    std::fs::write(&config_path, config(&sim, &args.plugins, "oncall"))?;
    println!("Mattermost simulator on {} (bot @{}, humans alice and bob)", sim.base_url(), world.bot.username);
    let started = Instant::now();
    let gateway =
        Gateway::start(&args.switchboard, workdir.path(), &config_path, &[("MM_BOT_TOKEN", &world.bot.token)]).await?;
    let demo = Demo { sim, world, gateway };
    let deadline = Instant::now() + Duration::from_secs(20);
    while demo.sim.ws_connections_active() == 0 {
        if Instant::now() > deadline {
            bail!("the adapter did not connect:\n{}", demo.gateway.log_text());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("gateway up and connected in {} ms (admin on {})\n", started.elapsed().as_millis(), demo.gateway.admin);

    let protocol = demo.world.protocol_evolution.clone();
    let general = demo.world.office_general.clone();
    let quiet = Duration::from_millis(1500);
    let answer = Duration::from_secs(10);

    println!("chatmode = \"oncall\": the bot answers only when mentioned");
    demo.say(&protocol, "@switchboard-bot is the v2 schema frozen?", None, answer).await?;
    demo.say(&protocol, "does anyone know when the freeze is?", None, quiet).await?;

    println!("\nrewrite the config to chatmode = \"onmessage\" and send SIGUSR1");
    std::fs::write(&config_path, config(&demo.sim, &args.plugins, "onmessage"))?;
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
    let root = demo.say(&general, "@switchboard-bot status of the release?", None, answer).await?;
    if let Some(root) = root {
        demo.say(&general, "and the changelog?", Some(&root.id), answer).await?;
    }
    demo.say(&demo.world.alice_dm.clone(), "can you keep a secret?", None, answer).await?;

    println!(
        "\nWebSocket connections the simulator accepted: {} (the reload reused the connection)",
        demo.sim.ws_connections_opened()
    );
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
    Ok(())
}
