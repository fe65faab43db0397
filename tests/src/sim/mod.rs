//! A Mattermost server simulator on `127.0.0.1:0`, faithful to MATTERMOST.md: REST
//! (`/api/v4`), the WebSocket API with `hello`, per-connection seqs and resume, and a control
//! API for tests (the [`Simulator`] methods, and `/_sim/*` over HTTP for other processes).
//! Where the real server's behaviour is in doubt the simulator is the stricter one.
//!
//! Modules: [`model`] (the world: posts, mentions, broadcast and resume rules), `server`
//! (HTTP, WebSocket, rate limiting, timers and control routes). Each lists the real-server
//! behaviour it follows with the server file and function (MATTERMOST.md §A6); in short
//! (paths under `server/channels/`):
//!
//! 1. `since` queries filter on UpdateAt, include deleted posts, return an arbitrary 1000 and add
//!    roots of replies (`store/sqlstore/post_store.go` `GetPostsSince`); edits, deletes, pins,
//!    reactions (`reaction_store.go` `Save`) and replies move UpdateAt forward.
//! 2. A resume only happens for a connection the server considers inactive; a half-open drop
//!    stays active until the pong read deadline (`app/platform/web_hub.go`, `web_conn.go`);
//!    inactive connections are reaped on a tick ([`SimOptions::reap_interval`]).
//! 3. `hello` only for a fresh connection, never on a resume (`web_hub.go` register,
//!    `reuseCount == 0`).
//! 4. A lossy resume: new connection id + `hello`, then the queued events; a full send queue
//!    ([`SimOptions::send_queue`]) closes the connection (`web_conn.go`, `web_hub.go`).
//! 5. Bot posts carry `props.from_bot`, webhook posts `from_webhook`/`override_username`
//!    (`app/post.go` `CreatePost`, `app/notification.go` `SendNotifications`).
//! 6. `@channel`, `@all`, `@here` and mention keys in `mentions` (`app/notification.go`,
//!    `app/mention_keywords.go`); DMs and GMs mention every other member.
//! 7. Rate limiting of every `/api/v4` route incl. the WebSocket upgrade (`app/ratelimit.go`,
//!    `web/handlers.go`), off by default ([`SimOptions::rate_limit`]).
//! 8. `pending_post_id` de-duplication for 30 s, 500 while the first request runs
//!    (`app/post.go` `deduplicateCreatePost`).
//! 9. A reply to a deleted (or missing, or other-channel) root gets 400
//!    `api.post.create_post.root_id.app_error` (`app/post.go` `CreatePost`).
//! 10. A wrong or revoked token on a header-authenticated upgrade leaves the socket
//!     unauthenticated: no `hello`, closed after 5 s (`api4/websocket.go`, `web_conn.go`).
//! 11. WebSocket ping control frames every 60 s, dropped without a pong for 100 s.
//! 12. `me` posts are user posts; `system_*` posts are sent by "System" and mention no one.
//!
//! Best-effort server features tests can switch off: `pending_post_id` de-duplication
//! ([`SimOptions::dedup_pending_post_ids`], [`Simulator::set_dedup`], `POST /_sim/dedup`), and
//! the rate limiter is off unless [`SimOptions::rate_limit`] / [`Simulator::set_rate_limit`]
//! turn it on. Arbitrary-1000 `since` results can be made small with
//! [`SimOptions::since_limit`].

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
pub use model::{ChannelType, PostSpec, SimPost, SimUser};

/// The rate limiter's quota (`RateLimitSettings`: `PerSec`, `MaxBurst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_sec: u32,
    pub burst: u32,
}

#[derive(Clone, Debug)]
pub struct SimOptions {
    /// How often the server sends WebSocket ping control frames.
    pub ping_interval: Duration,
    /// A connection that sent no pong for this long is dropped.
    pub pong_timeout: Duration,
    /// A connection that did not authenticate within this time is closed.
    pub auth_timeout: Duration,
    /// An inactive connection idle for longer than this is removed by the reaper.
    pub reap_after: Duration,
    /// How often the reaper runs (`inactiveConnReaperInterval`, 5 min).
    pub reap_interval: Duration,
    /// Events a live connection can have queued (`sendQueueSize`, 256); one more closes it.
    pub send_queue: usize,
    /// At most this many posts answer a `since` query (the server's `LIMIT 1000`).
    pub since_limit: usize,
    /// Whether `POST /posts` de-duplicates `pending_post_id` (the server always does).
    pub dedup_pending_post_ids: bool,
    /// Rate limiting of `/api/v4` (off by default, like the server's).
    pub rate_limit: Option<RateLimit>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(60),
            pong_timeout: Duration::from_secs(100),
            auth_timeout: Duration::from_secs(5),
            reap_after: Duration::from_secs(300),
            reap_interval: Duration::from_secs(300),
            send_queue: 256,
            since_limit: 1000,
            dedup_pending_post_ids: true,
            rate_limit: None,
        }
    }
}

pub struct Simulator {
    world: Arc<Mutex<World>>,
    shared: server::Shared,
    base_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    ticker: JoinHandle<()>,
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
        let world = Arc::new(Mutex::new(World::new(options.dedup_pending_post_ids)));
        let limiter = Arc::new(Mutex::new(server::Limiter::new(options.rate_limit)));
        let shared = server::Shared { world: world.clone(), options: options.clone(), limiter };
        let app = server::router(shared.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
        let ticker = tokio::spawn(server::ticker(Arc::downgrade(&world), options));
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
        Ok(Self { world, shared, base_url: format!("http://{address}"), stop: Some(stop), task, ticker })
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
            last_post_at: 0,
            last_root_post_at: 0,
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

    /// Every post of the channel (deleted ones too), oldest first.
    pub fn posts_in(&self, channel_id: &str) -> Vec<SimPost> {
        let world = self.world.lock().unwrap();
        let indexes = world.channel_posts.get(channel_id).map_or(&[][..], |v| &v[..]);
        indexes.iter().map(|&i| world.posts[i].clone()).collect()
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

    /// Make `user_id` a member of `team_id` (`team_members`).
    pub fn add_team_member(&self, team_id: &str, user_id: &str) {
        self.world.lock().unwrap().team_members.entry(team_id.into()).or_default().insert(user_id.into());
    }

    /// A user's mention keywords (whole words, case-insensitive), like the notify props'
    /// `mention_keys`.
    pub fn set_mention_keys(&self, user_id: &str, keys: &[&str]) {
        let keys = keys.iter().map(|k| k.to_lowercase()).filter(|k| !k.is_empty()).collect();
        self.world.lock().unwrap().mention_keys.insert(user_id.into(), keys);
    }

    /// Invalidate every token of `user_id`: REST answers 401, a header-authenticated upgrade
    /// stays unauthenticated, and the user's open sockets are closed (not resumable).
    pub fn revoke_token(&self, user_id: &str) {
        self.world.lock().unwrap().revoke_user(user_id);
    }

    /// A new token for `user_id` (older ones stay valid until revoked).
    pub fn issue_token(&self, user_id: &str) -> String {
        let token = new_id();
        let mut world = self.world.lock().unwrap();
        world.tokens.insert(token.clone(), user_id.into());
        if let Some(user) = world.users.get_mut(user_id) {
            user.token = token.clone();
        }
        token
    }

    /// A post of any kind by `user_id` (e.g. `kind = "me"`), broadcast as `posted`.
    pub fn post_with(&self, user_id: &str, channel_id: &str, spec: PostSpec) -> SimPost {
        self.world.lock().unwrap().create_post_with(user_id, channel_id, spec, "")
    }

    /// A post through an incoming webhook: by the webhook's creator, `props.from_webhook`,
    /// and `override_username` (the `posted` event's `sender_name` outside DMs) when given.
    pub fn post_webhook(&self, channel_id: &str, message: &str, override_username: Option<&str>) -> SimPost {
        let creator = self.internal_user(|w| &mut w.webhook_user, "webhook-creator");
        let mut props = serde_json::json!({"from_webhook": "true"});
        if let Some(name) = override_username {
            props["override_username"] = Value::String(name.into());
        }
        let spec = PostSpec { message: message.into(), root_id: String::new(), kind: String::new(), props };
        self.world.lock().unwrap().create_post_with(&creator, channel_id, spec, "")
    }

    /// A system message of type `kind` (`system_join_channel`, …), sent by "System".
    pub fn post_system(&self, channel_id: &str, kind: &str, message: &str) -> SimPost {
        let system = self.internal_user(|w| &mut w.system_user, "system");
        let spec = PostSpec { message: message.into(), root_id: String::new(), kind: kind.into(), props: Value::Null };
        self.world.lock().unwrap().create_post_with(&system, channel_id, spec, "")
    }

    fn internal_user(&self, slot: impl Fn(&mut World) -> &mut Option<String>, username: &str) -> String {
        if let Some(id) = slot(&mut self.world.lock().unwrap()).clone() {
            return id;
        }
        let user = self.add_user(username, false);
        self.world.lock().unwrap().tokens.retain(|_, u| *u != user.id);
        *slot(&mut self.world.lock().unwrap()) = Some(user.id.clone());
        user.id
    }

    /// Change a post's message: `edit_at = update_at = now`, `post_edited` to the channel.
    pub fn edit_post(&self, post_id: &str, message: &str) -> Option<SimPost> {
        self.world.lock().unwrap().edit_post(post_id, message).ok()
    }

    /// Delete a post (and its replies): `delete_at = update_at = now`, kept in the store,
    /// `post_deleted` to the channel.
    pub fn delete_post(&self, post_id: &str) -> Option<SimPost> {
        self.world.lock().unwrap().delete_post(post_id).ok()
    }

    /// `user_id` reacts with `emoji`: `has_reactions`, `update_at = now`, `reaction_added`.
    pub fn react(&self, user_id: &str, post_id: &str, emoji: &str) -> Option<SimPost> {
        let mut world = self.world.lock().unwrap();
        world.react(user_id, post_id, emoji).ok()?;
        world.post(post_id).cloned()
    }

    /// Pin a post: `is_pinned`, `update_at = now`, `post_edited`.
    pub fn pin_post(&self, post_id: &str) -> Option<SimPost> {
        self.world.lock().unwrap().pin_post(post_id, true).ok()
    }

    /// The post as the simulator keeps it (deleted ones too).
    pub fn post(&self, post_id: &str) -> Option<SimPost> {
        self.world.lock().unwrap().post(post_id).cloned()
    }

    /// Channel JSON as `GET /channels/{id}` answers it (with `last_post_at`).
    pub fn channel_json(&self, channel_id: &str) -> Option<Value> {
        self.world.lock().unwrap().channels.get(channel_id).map(|c| c.to_json())
    }

    /// `GET /channels/{channel_id}/posts` calls so far for that channel.
    pub fn posts_queries(&self, channel_id: &str) -> usize {
        self.world.lock().unwrap().posts_queries.get(channel_id).copied().unwrap_or(0)
    }

    /// `GET /channels/{id}/posts` calls so far, all channels.
    pub fn posts_queries_total(&self) -> usize {
        self.world.lock().unwrap().posts_queries.values().sum()
    }

    /// Switch `pending_post_id` de-duplication on or off (off: every POST makes a new post).
    pub fn set_dedup(&self, enabled: bool) {
        let mut world = self.world.lock().unwrap();
        world.dedup = enabled;
        if !enabled {
            world.pending_post_ids.clear();
        }
    }

    /// The next `count` `POST /posts` wait `delay` (without holding the world) before creating
    /// their post; meanwhile their `pending_post_id`s are in flight.
    pub fn delay_next_posts(&self, count: usize, delay: Duration) {
        self.world.lock().unwrap().delay_next_posts = (count > 0).then_some((count, delay));
    }

    /// Turn rate limiting of `/api/v4` on (`Some`) or off (`None`); buckets start full.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        self.shared.limiter.lock().unwrap().set(limit);
    }

    /// Requests answered 429 by the rate limiter.
    pub fn throttled_count(&self) -> u64 {
        self.shared.limiter.lock().unwrap().throttled
    }

    /// Cut every WebSocket without the server noticing: the connections stay active (events
    /// still numbered, lost on the wire) until `pong_timeout` after their last pong.
    pub fn half_open_drop(&self) {
        self.world.lock().unwrap().half_open_drop(self.shared.options.pong_timeout);
    }

    /// `hello` events sent (fresh connections; a resume sends none).
    pub fn hellos_sent(&self) -> u64 {
        self.world.lock().unwrap().hellos
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
        self.ticker.abort();
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
/// `office-general` and `protocol-evolution` with all three (all three in the team); a DM
/// alice↔bot.
pub fn demo_world(sim: &Simulator) -> DemoWorld {
    let team_id = sim.add_team("office");
    let bot = sim.add_user("switchboard-bot", true);
    let alice = sim.add_user("alice", false);
    let bob = sim.add_user("bob", false);
    let office_general = sim.add_channel(&team_id, "office-general", "Office General", ChannelType::Open);
    let protocol_evolution = sim.add_channel(&team_id, "protocol-evolution", "Protocol Evolution", ChannelType::Open);
    for user in [&bot, &alice, &bob] {
        sim.add_team_member(&team_id, &user.id);
    }
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
