//! A Mattermost server simulator on `127.0.0.1:0`, faithful to MATTERMOST.md: REST
//! (`/api/v4`), the WebSocket API with `hello`, per-connection seqs and resume, and a control
//! API for tests (the [`Simulator`] methods, and `/_sim/*` over HTTP for other processes).
//!
//! Modules: [`model`] (the world and the broadcast/resume rules), `server` (HTTP, WebSocket
//! and control routes).

pub mod model;
mod server;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use model::{new_id, Channel, World};
pub use model::{ChannelType, SimPost, SimUser};

#[derive(Clone, Debug)]
pub struct SimOptions {
    /// How often the server sends WebSocket ping control frames.
    pub ping_interval: Duration,
    /// A connection that sent no pong for this long is dropped.
    pub pong_timeout: Duration,
    /// A connection that did not authenticate within this time is closed.
    pub auth_timeout: Duration,
    /// How long a disconnected connection id stays resumable.
    pub reap_after: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(60),
            pong_timeout: Duration::from_secs(100),
            auth_timeout: Duration::from_secs(5),
            reap_after: Duration::from_secs(300),
        }
    }
}

pub struct Simulator {
    world: Arc<Mutex<World>>,
    base_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Simulator {
    pub async fn start() -> Result<Self> {
        Self::start_with(SimOptions::default()).await
    }

    pub async fn start_with(options: SimOptions) -> Result<Self> {
        Self::start_on(options, 0).await
    }

    pub async fn start_on(options: SimOptions, port: u16) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.context("cannot bind the simulator")?;
        let address = listener.local_addr()?;
        let world = Arc::new(Mutex::new(World::default()));
        let app = server::router(server::Shared { world: world.clone(), options });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Like the real server (Go turns Nagle off on every TCP connection by default).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self { world, base_url: format!("http://{address}"), stop: Some(stop), task })
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn add_team(&self, name: &str) -> String {
        let id = new_id();
        self.world.lock().unwrap().teams.insert(id.clone(), name.into());
        id
    }

    pub fn add_user(&self, username: &str, is_bot: bool) -> SimUser {
        let user = SimUser { id: new_id(), username: username.into(), token: new_id(), is_bot };
        let mut world = self.world.lock().unwrap();
        world.tokens.insert(user.token.clone(), user.id.clone());
        world.users.insert(user.id.clone(), user.clone());
        user
    }

    pub fn add_channel(&self, team_id: &str, name: &str, display_name: &str, kind: ChannelType) -> String {
        let kind = match kind {
            ChannelType::Open => "O",
            ChannelType::Private => "P",
        };
        self.insert_channel(team_id, name, display_name, kind, Vec::new())
    }

    fn insert_channel(
        &self,
        team_id: &str,
        name: &str,
        display_name: &str,
        kind: &'static str,
        members: Vec<String>,
    ) -> String {
        let id = new_id();
        let channel = Channel {
            id: id.clone(),
            team_id: team_id.into(),
            name: name.into(),
            display_name: display_name.into(),
            kind,
            members,
        };
        self.world.lock().unwrap().channels.insert(id.clone(), channel);
        id
    }

    pub fn add_member(&self, channel_id: &str, user_id: &str) {
        if let Some(channel) = self.world.lock().unwrap().channels.get_mut(channel_id) {
            if !channel.members.iter().any(|m| m == user_id) {
                channel.members.push(user_id.into());
            }
        }
    }

    /// A DM channel: type D, named `<idA>__<idB>` with the ids sorted, no team.
    pub fn direct_channel(&self, user_a: &str, user_b: &str) -> String {
        let mut ids = [user_a.to_string(), user_b.to_string()];
        ids.sort();
        let name = format!("{}__{}", ids[0], ids[1]);
        self.insert_channel("", &name, "", "D", ids.to_vec())
    }

    pub fn group_channel(&self, user_ids: &[&str]) -> String {
        let members: Vec<String> = user_ids.iter().map(|s| s.to_string()).collect();
        self.insert_channel("", &new_id(), "", "G", members)
    }

    pub fn channel_id_by_name(&self, name: &str) -> Option<String> {
        self.world.lock().unwrap().channels.values().find(|c| c.name == name).map(|c| c.id.clone())
    }

    /// A human posts: stored and broadcast exactly like `POST /api/v4/posts`.
    pub fn post_as(&self, user_id: &str, channel_id: &str, message: &str, root_id: Option<&str>) -> SimPost {
        self.world.lock().unwrap().create_post(
            user_id,
            channel_id,
            message,
            root_id.unwrap_or_default(),
            "",
            Value::Null,
        )
    }

    pub fn posts_in(&self, channel_id: &str) -> Vec<SimPost> {
        self.world.lock().unwrap().posts.iter().filter(|p| p.channel_id == channel_id).cloned().collect()
    }

    /// Every post created from now on, with the instant it was created.
    pub fn observe_posts(&self) -> tokio::sync::mpsc::UnboundedReceiver<(SimPost, std::time::Instant)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.world.lock().unwrap().post_observers.push(tx);
        rx
    }

    pub fn posts_by(&self, user_id: &str) -> Vec<SimPost> {
        self.world.lock().unwrap().posts.iter().filter(|p| p.user_id == user_id).cloned().collect()
    }

    pub fn ws_connections_opened(&self) -> u64 {
        self.world.lock().unwrap().ws_opened
    }

    pub fn ws_connections_active(&self) -> usize {
        self.world.lock().unwrap().active_connections()
    }

    pub fn resumed_connections(&self) -> u64 {
        self.world.lock().unwrap().resumed
    }

    /// `(user id, channel id, parent id)` of every typing indicator received.
    pub fn typing_received(&self) -> Vec<(String, String, String)> {
        self.world.lock().unwrap().typing.clone()
    }

    /// Cut every WebSocket without a close frame; the connection ids stay resumable.
    pub fn drop_connections(&self) {
        self.world.lock().unwrap().drop_connections();
    }

    /// Cut every WebSocket and forget the connection ids (a resume is impossible).
    pub fn drop_and_forget_connections(&self) {
        self.world.lock().unwrap().drop_and_forget_connections();
    }

    /// Answer WebSocket upgrades with 503 for `duration` (the server is unreachable).
    pub fn refuse_websockets_for(&self, duration: Duration) {
        self.world.lock().unwrap().websockets_refused_until = Some(std::time::Instant::now() + duration);
    }

    /// Answer the next `count` `POST /posts` with `status` (429: text/plain + Retry-After).
    pub fn fail_next_posts(&self, count: usize, status: u16) {
        self.world.lock().unwrap().fail_next_posts = (count > 0).then_some((count, status));
    }

    pub async fn shutdown(mut self) {
        self.drop_connections();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The world of the demo and the seed scenario.
pub struct DemoWorld {
    pub team_id: String,
    pub bot: SimUser,
    pub alice: SimUser,
    pub bob: SimUser,
    pub office_general: String,
    pub protocol_evolution: String,
    pub alice_dm: String,
}

/// Team `office`; bot `switchboard-bot`; humans `alice` and `bob`; open channels
/// `office-general` and `protocol-evolution` with all three; a DM alice↔bot.
pub fn demo_world(sim: &Simulator) -> DemoWorld {
    let team_id = sim.add_team("office");
    let bot = sim.add_user("switchboard-bot", true);
    let alice = sim.add_user("alice", false);
    let bob = sim.add_user("bob", false);
    let office_general = sim.add_channel(&team_id, "office-general", "Office General", ChannelType::Open);
    let protocol_evolution = sim.add_channel(&team_id, "protocol-evolution", "Protocol Evolution", ChannelType::Open);
    for channel in [&office_general, &protocol_evolution] {
        for user in [&bot, &alice, &bob] {
            sim.add_member(channel, &user.id);
        }
    }
    let alice_dm = sim.direct_channel(&alice.id, &bot.id);
    DemoWorld { team_id, bot, alice, bob, office_general, protocol_evolution, alice_dm }
}

impl DemoWorld {
    pub fn to_json(&self) -> Value {
        let user = |u: &SimUser| json!({"id": u.id, "username": u.username, "token": u.token, "is_bot": u.is_bot});
        json!({
            "team_id": self.team_id,
            "bot": user(&self.bot),
            "alice": user(&self.alice),
            "bob": user(&self.bob),
            "channels": {
                "office-general": self.office_general,
                "protocol-evolution": self.protocol_evolution,
                "alice-dm": self.alice_dm,
            },
        })
    }
}

#[cfg(test)]
mod tests;
