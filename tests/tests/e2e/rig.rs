//! The rig the durability and replacement scenarios share: a simulator, its demo world and a
//! gateway directory that outlives gateway processes (restarts, crashes, re-execs).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::Result;
use switchboard_tests::{
    assert_eventually,
    harness::{install_plugin, mattermost_file_name, seed_config, Artifacts, Gateway},
    sim::{demo_world, ChannelType, DemoWorld, SimOptions, Simulator},
};

/// What the `build-b` fixture appends to every reply.
pub const BUILD_B_TAG: &str = " [build b]";

/// How a [`Rig`] is set up beyond the defaults.
pub struct RigOptions<'a> {
    pub chatmode: &'a str,
    pub agent: &'a str,
    /// Extra `[gateway]` keys, one `key = value` per line.
    pub gateway_keys: &'a str,
    /// Extra `[channels.mattermost]` keys (the adapter's), one per line; later keys of the
    /// seed config can be replaced by the same key here only if they are not in the seed.
    pub channel_keys: &'a str,
    pub sim: SimOptions,
}

impl Default for RigOptions<'_> {
    fn default() -> Self {
        // The server's `pending_post_id` de-duplication is best effort (30 s): every scenario
        // proves its guarantees without it.
        Self {
            chatmode: "onmessage",
            agent: "kind = \"echo\"",
            gateway_keys: "",
            channel_keys: "",
            sim: SimOptions { dedup_pending_post_ids: false, ..SimOptions::default() },
        }
    }
}

pub struct Rig {
    pub sim: Simulator,
    pub world: DemoWorld,
    pub artifacts: Artifacts,
    pub config_path: PathBuf,
    pub scratch: tempfile::TempDir,
}

impl Rig {
    pub async fn new(chatmode: &str, agent: &str) -> Result<Self> {
        Self::with_gateway_keys(chatmode, agent, "").await
    }

    /// Like [`Rig::new`], with extra `[gateway]` keys (one `key = value` per line).
    pub async fn with_gateway_keys(chatmode: &str, agent: &str, gateway_keys: &str) -> Result<Self> {
        Self::with(RigOptions { chatmode, agent, gateway_keys, ..RigOptions::default() }).await
    }

    pub async fn with(options: RigOptions<'_>) -> Result<Self> {
        let artifacts = Artifacts::discover()?;
        let sim = Simulator::start_with(options.sim).await?;
        let world = demo_world(&sim);
        let scratch = tempfile::tempdir()?;
        let plugin_dir = scratch.path().join("plugins");
        install_plugin(&artifacts.mattermost_plugin(), &plugin_dir, &mattermost_file_name())?;
        let config_path = scratch.path().join("switchboard.toml");
        let config = seed_config(&sim.base_url(), &plugin_dir, options.chatmode, options.agent)
            .replacen("[gateway]\n", &format!("[gateway]\n{}\n", options.gateway_keys), 1)
            .replacen("allow_from = []\n", &format!("allow_from = []\n{}\n", options.channel_keys), 1);
        std::fs::write(&config_path, config)?;
        Ok(Self { sim, world, artifacts, config_path, scratch })
    }

    pub fn plugin_dir(&self) -> PathBuf {
        self.scratch.path().join("plugins")
    }

    /// Drop a build into the plugin directory the way a deployer should (copy, rename).
    pub fn drop_build(&self, build: &std::path::Path) -> Result<()> {
        install_plugin(build, &self.plugin_dir(), &mattermost_file_name())?;
        Ok(())
    }

    pub async fn start(&self, env: &[(&str, &str)]) -> Result<Gateway> {
        let mut all = vec![("MM_BOT_TOKEN", self.world.bot.token.as_str())];
        all.extend_from_slice(env);
        let gateway = Gateway::start(&self.artifacts.switchboard, self.scratch.path(), &self.config_path, &all).await?;
        assert_eventually!(
            // A resumed connection gets no hello: the open socket is the sign.
            gateway.count(&["WebSocket open"]) > 0,
            "the adapter connects\n--- gateway log ---\n{}",
            gateway.log_text()
        );
        Ok(gateway)
    }

    pub fn open_channels(&self, count: usize) -> Vec<String> {
        (0..count)
            .map(|i| {
                let id = self.sim.add_channel(
                    &self.world.team_id,
                    &format!("load-{i}"),
                    &format!("Load {i}"),
                    ChannelType::Open,
                );
                for user in [&self.world.bot.id, &self.world.alice.id] {
                    self.sim.add_member(&id, user);
                }
                id
            })
            .collect()
    }

    /// For every bot post, the channels it appeared in, by message (the build tag removed).
    pub fn bot_posts(&self) -> BTreeMap<String, Vec<String>> {
        let mut posts: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for post in self.sim.posts_by(&self.world.bot.id) {
            let message = post.message.strip_suffix(BUILD_B_TAG).map(str::to_string).unwrap_or(post.message);
            posts.entry(message).or_default().push(post.channel_id);
        }
        posts
    }

    /// Post `text` in `channel` and wait for the bot's answer to it; the answer as posted.
    pub async fn ask(&self, channel: &str, text: &str, gateway: &Gateway) -> String {
        self.sim.post_as(&self.world.alice.id, channel, text, None);
        let wanted = format!("echo: {text}");
        let answer = || {
            self.sim
                .posts_by(&self.world.bot.id)
                .into_iter()
                .rev()
                .find(|p| p.message.strip_suffix(BUILD_B_TAG).unwrap_or(&p.message) == wanted)
                .map(|p| p.message)
        };
        assert_eventually!(
            @within Duration::from_secs(30),
            answer().is_some(),
            "{text:?} is answered\n--- gateway log (tail) ---\n{}",
            tail(gateway, 40)
        );
        answer().unwrap_or_default()
    }

    /// Every `(channel, token)` answered `echo: <token>` exactly once, in its own channel.
    pub async fn assert_answered_once(&self, expected: &[(String, String)], gateway: &Gateway) {
        let unanswered = || {
            let posts = self.bot_posts();
            expected.iter().filter(|(_, token)| !posts.contains_key(&format!("echo: {token}"))).count()
        };
        assert_eventually!(
            @within Duration::from_secs(90),
            unanswered() == 0,
            "{} of {} messages unanswered\n--- gateway log (tail) ---\n{}",
            unanswered(),
            expected.len(),
            tail(gateway, 60)
        );
        // Duplicates would come late (a resend after a restart): give them time to show.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let posts = self.bot_posts();
        for (channel, token) in expected {
            let places = &posts[&format!("echo: {token}")];
            if places != &vec![channel.clone()] {
                panic!(
                    "{token} must be answered once, in its own channel: {places:?}\n{}",
                    self.story_of(token, gateway)
                );
            }
        }
    }

    /// What the gateway logged about `token`'s message and the bot's answers to it.
    pub fn story_of(&self, token: &str, gateway: &Gateway) -> String {
        let asked: Vec<String> =
            self.sim.posts_by(&self.world.alice.id).into_iter().filter(|p| p.message == token).map(|p| p.id).collect();
        let answers: Vec<String> = self
            .sim
            .posts_by(&self.world.bot.id)
            .into_iter()
            .filter(|p| p.message.strip_suffix(BUILD_B_TAG).unwrap_or(&p.message) == format!("echo: {token}"))
            .map(|p| format!("{} (pending_post_id {:?}, props {})", p.id, p.pending_post_id, p.props))
            .collect();
        let ids: Vec<&str> = asked.iter().map(String::as_str).collect();
        let lines: Vec<String> =
            gateway.log().into_iter().filter(|line| ids.iter().any(|id| line.contains(id))).collect();
        format!("asked as {asked:?}; answered by {answers:?}\n--- gateway lines ---\n{}", lines.join("\n"))
    }
}

pub fn tail(gateway: &Gateway, lines: usize) -> String {
    let log = gateway.log();
    log[log.len().saturating_sub(lines)..].join("\n")
}
