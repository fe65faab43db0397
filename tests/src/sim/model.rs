//! The simulated server's world: users, teams, channels, posts and WebSocket connection state,
//! with the broadcast, mention and resume rules of MATTERMOST.md (A1, A5, A6).
//!
//! Real-server behaviour followed here (paths under `server/channels/` of mattermost/mattermost):
//! - Posts keep `update_at`, `edit_at`, `delete_at`, `is_pinned`, `type`, `has_reactions`,
//!   `reply_count`, `last_reply_at` (`public/model/post.go` `Post`). An edit, a delete, a
//!   reaction, a pin or a reply in the thread moves `update_at` forward
//!   (`store/sqlstore/post_store.go` `Update`/`Delete`, `reaction_store.go` `Save`,
//!   `app/post.go` `CreatePost` for the root of a reply). [`World::tick`] is a clock that never
//!   returns the same millisecond twice, so `update_at` strictly increases.
//! - A delete also deletes the thread's replies (`post_store.go` `Delete`: `Id = ? OR RootId = ?`)
//!   and is broadcast as `post_deleted` with `contains_sanitized_data` (`app/post.go` `DeletePost`).
//! - Bot authors get `props.from_bot = "true"` (`app/post.go` `CreatePost`); webhook posts carry
//!   `from_webhook` and `override_username`, whose value becomes `sender_name` outside DMs
//!   (`app/notification.go` `SendNotifications`); `system_*` posts are sent by "System".
//! - `mentions` per recipient (`app/notification.go` `getExplicitMentions`,
//!   `app/mention_keywords.go`): `@username`, `@channel`/`@all` (every member), `@here`
//!   (members with an active connection) and the recipient's mention keys, whole words,
//!   case-insensitive; in DMs and GMs every other member; never the author; none for `system_*`.
//! - Connections (`app/platform/web_hub.go`, `web_conn.go`): a live connection has a bounded
//!   send queue (`sendQueueSize` 256, configurable); when an event does not fit the connection is
//!   closed and removed (no resume). `typing`/`status_change` events are dropped first when the
//!   queue is half full (`web_conn.go` `ShouldSendEvent`). A half-open connection stays *active*
//!   until its read deadline (`pongWaitTime`) passes; only an *inactive* connection can be
//!   resumed (`web_hub.go` `CheckConn`, the reuse path). Inactive connections are reaped on a
//!   tick by last activity (`inactiveConnReaperInterval`). A lossy resume gets a new connection
//!   id and `hello`, then the events queued meanwhile (`web_conn.go`).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Events a disconnected connection buffers for a resume (the server's active queue).
const ACTIVE_QUEUE: usize = 256;
/// Events already sent that a resume can replay (the server's dead queue).
const DEAD_QUEUE: usize = 128;
pub const MAX_POST_RUNES: usize = 16383;

const ID_ALPHABET: &[u8] = b"ybndrfg8ejkmcpqxot1uwisza345h769";

/// A Mattermost id: 26 characters of its base32 alphabet.
pub fn new_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..26).map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char).collect()
}

pub fn is_valid_id(id: &str) -> bool {
    id.len() == 26 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[derive(Clone, Debug)]
pub struct SimUser {
    pub id: String,
    pub username: String,
    pub token: String,
    pub is_bot: bool,
}

impl SimUser {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "username": self.username, "is_bot": self.is_bot, "bot_description": "",
            "first_name": "", "last_name": "", "nickname": "", "email": format!("{}@example.invalid", self.username),
            "roles": if self.is_bot { "system_user system_post_all" } else { "system_user" },
            "create_at": 0, "update_at": 0, "delete_at": 0, "locale": "en",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelType {
    Open,
    Private,
}

#[derive(Clone, Debug)]
pub struct Channel {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub display_name: String,
    /// "O", "P", "D" or "G".
    pub kind: &'static str,
    pub members: Vec<String>,
    /// `create_at` of the newest post (`Channel.LastPostAt`).
    pub last_post_at: i64,
    /// `create_at` of the newest root post (`Channel.LastRootPostAt`).
    pub last_root_post_at: i64,
}

impl Channel {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "type": self.kind, "display_name": self.display_name, "name": self.name,
            "team_id": self.team_id, "header": "", "purpose": "", "creator_id": "",
            "last_post_at": self.last_post_at, "last_root_post_at": self.last_root_post_at,
            "create_at": 0, "update_at": 0, "delete_at": 0,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SimPost {
    pub id: String,
    pub channel_id: String,
    pub user_id: String,
    pub root_id: String,
    pub message: String,
    pub create_at: i64,
    #[serde(default)]
    pub update_at: i64,
    #[serde(default)]
    pub edit_at: i64,
    #[serde(default)]
    pub delete_at: i64,
    #[serde(default)]
    pub is_pinned: bool,
    /// The post `type`: "" for user posts, `me`, `system_join_channel`, …
    #[serde(default, alias = "type")]
    pub kind: String,
    #[serde(default)]
    pub has_reactions: bool,
    #[serde(default)]
    pub reply_count: i64,
    #[serde(default)]
    pub last_reply_at: i64,
    #[serde(default)]
    pub pending_post_id: String,
    #[serde(default)]
    pub props: Value,
}

impl SimPost {
    /// The post object as the server serialises it (model.Post after PreparePostForClient).
    pub fn to_json(&self) -> Value {
        let mut json = json!({
            "id": self.id, "create_at": self.create_at, "update_at": self.update_at, "edit_at": self.edit_at,
            "delete_at": self.delete_at, "is_pinned": self.is_pinned, "user_id": self.user_id,
            "channel_id": self.channel_id, "root_id": self.root_id, "original_id": "", "message": self.message,
            "type": self.kind, "props": if self.props.is_object() { self.props.clone() } else { json!({}) },
            "hashtags": "", "file_ids": [], "pending_post_id": self.pending_post_id,
            "reply_count": self.reply_count, "last_reply_at": self.last_reply_at, "participants": null,
            "metadata": {},
        });
        if self.has_reactions {
            // `has_reactions` is omitempty in model.Post.
            json["has_reactions"] = json!(true);
        }
        json
    }

    pub fn is_deleted(&self) -> bool {
        self.delete_at != 0
    }
}

/// What a post is made of, for [`World::create_post_with`] and `Simulator::post_with`.
#[derive(Clone, Debug, Default)]
pub struct PostSpec {
    pub message: String,
    pub root_id: String,
    /// The post `type` ("" for a plain user post, "me" for `/me`, `system_*`, …).
    pub kind: String,
    /// `props`; `Value::Null` for none.
    pub props: Value,
}

/// What a connection's socket task is told to do besides sending events.
#[derive(Debug)]
pub enum Control {
    /// Send what is queued, then a close frame (with this code, or none).
    Close(Option<u16>),
    /// Send what is queued, then vanish without a close frame, as a network failure would.
    Drop,
    /// Vanish at once and leave the connection to the server's read deadline (half-open).
    Vanish,
}

/// The sending side of one live socket.
#[derive(Clone, Debug)]
pub struct LiveSocket {
    /// Text frames, in order. Its capacity is larger than `limit` so a resume can replay; the
    /// queue counts as full at `limit` frames.
    pub tx: mpsc::Sender<String>,
    pub control: mpsc::UnboundedSender<Control>,
    /// Which socket task this is (a resumed connection gets a new one).
    pub id: u64,
    /// The server's `sendQueueSize`.
    pub limit: usize,
}

impl LiveSocket {
    /// The physical capacity of `tx` for a `limit`: room for a full replay on top.
    pub fn capacity_for(limit: usize) -> usize {
        limit + DEAD_QUEUE + ACTIVE_QUEUE + 64
    }

    fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Whether the server considers a connection active, and how it is linked to a socket.
#[derive(Debug)]
pub enum Link {
    Live(LiveSocket),
    /// The socket is gone but the server has not noticed: active until `deadline`.
    HalfOpen {
        deadline: Instant,
    },
    /// Disconnected (resumable until reaped) since then.
    Inactive {
        since: Instant,
    },
}

/// Server-side state of one connection id; outlives the socket for resumes.
pub struct Connection {
    pub user_id: String,
    /// The seq the next event will carry.
    pub next_seq: i64,
    /// Sent events (seq, frame without seq) for replay.
    pub dead_queue: VecDeque<(i64, String)>,
    /// Events published while disconnected, not yet numbered.
    pub active_queue: VecDeque<String>,
    pub overflowed: bool,
    pub link: Link,
    /// The last WebSocket pong (the only thing that resets the server's read deadline).
    pub last_pong: Instant,
}

impl Connection {
    pub fn is_active(&self) -> bool {
        !matches!(self.link, Link::Inactive { .. })
    }
}

/// One entry of the server's `seenPendingPostIdsCache`.
#[derive(Clone, Copy, Debug)]
pub struct PendingId {
    /// Index into `posts`; `None` while the first request is still being handled.
    pub post: Option<usize>,
    pub seen_at_ms: i64,
}

#[derive(Default)]
pub struct World {
    pub users: HashMap<String, SimUser>,
    pub tokens: HashMap<String, String>,
    pub teams: HashMap<String, String>,
    /// team id → member user ids.
    pub team_members: HashMap<String, HashSet<String>>,
    pub channels: HashMap<String, Channel>,
    pub posts: Vec<SimPost>,
    /// post id → index into `posts`.
    pub post_index: HashMap<String, usize>,
    /// channel id → indexes into `posts`, oldest first.
    pub channel_posts: HashMap<String, Vec<usize>>,
    /// user id → mention keywords (lower case).
    pub mention_keys: HashMap<String, Vec<String>>,
    pub connections: HashMap<String, Connection>,
    pub ws_opened: u64,
    pub resumed: u64,
    pub hellos: u64,
    pub typing: Vec<(String, String, String)>,
    pub fail_next_posts: Option<(usize, u16)>,
    /// The next `count` `POST /posts` wait this long before creating their post.
    pub delay_next_posts: Option<(usize, Duration)>,
    /// Until then, WebSocket upgrades are answered 503 (the server is unreachable).
    pub websockets_refused_until: Option<std::time::Instant>,
    /// Whether `pending_post_id` de-duplication is on.
    pub dedup: bool,
    /// The server's de-duplication cache, keyed by the pending post id alone.
    pub pending_post_ids: HashMap<String, PendingId>,
    /// `GET /channels/{id}/posts` calls per channel.
    pub posts_queries: HashMap<String, usize>,
    /// Who wants a copy of every new post (benchmarks time replies with it).
    pub post_observers: Vec<mpsc::UnboundedSender<(SimPost, Instant)>>,
    /// The last millisecond [`World::tick`] returned.
    pub clock: i64,
    /// The user webhook posts are made by (created on the first one).
    pub webhook_user: Option<String>,
    /// The user system posts are made by (created on the first one).
    pub system_user: Option<String>,
}

/// An event before it is numbered for one connection: `{"event","data","broadcast"}`.
pub struct Event {
    pub name: &'static str,
    pub data: Value,
    pub broadcast: Value,
}

impl Event {
    /// The wire form of a broadcast event with `seq` (pre-serialised like the server's).
    fn frame(body: &str, seq: i64) -> String {
        // `body` is `{"event":…,"data":…,"broadcast":…}`; append the seq before the brace.
        format!("{}, \"seq\": {seq}}}", &body[..body.len() - 1])
    }

    fn body(&self) -> String {
        json!({"event": self.name, "data": self.data, "broadcast": self.broadcast}).to_string()
    }

    /// Events the server drops first when a connection's queue is half full.
    fn droppable(&self) -> bool {
        matches!(self.name, "typing" | "status_change" | "channel_viewed" | "multiple_channels_viewed")
    }
}

pub fn broadcast(user_id: &str, channel_id: &str, team_id: &str, omit: Option<&str>) -> Value {
    let omit_users = omit.map_or(Value::Null, |u| json!({ u: true }));
    json!({"omit_users": omit_users, "user_id": user_id, "channel_id": channel_id, "team_id": team_id,
           "connection_id": "", "omit_connection_id": ""})
}

/// Why a post could not be changed.
#[derive(Debug, PartialEq, Eq)]
pub enum PostError {
    NotFound,
}

impl World {
    pub fn new(dedup: bool) -> Self {
        Self { dedup, ..Self::default() }
    }

    pub fn user_by_token(&self, token: &str) -> Option<&SimUser> {
        self.tokens.get(token).and_then(|id| self.users.get(id))
    }

    /// The world clock in ms: the wall clock, but never the same value twice.
    pub fn tick(&mut self) -> i64 {
        self.clock = now_ms().max(self.clock + 1);
        self.clock
    }

    pub fn post(&self, post_id: &str) -> Option<&SimPost> {
        self.post_index.get(post_id).map(|&i| &self.posts[i])
    }

    /// Send an event body to one connection: numbered now if the server considers it active
    /// (lost on the wire if half-open), buffered if it is inactive. `false` when the live
    /// queue is full: the server then closes and removes the connection.
    fn deliver(connection: &mut Connection, body: String, droppable: bool, enforce_limit: bool) -> bool {
        match &connection.link {
            Link::Live(socket) => {
                let queued = socket.queued();
                if droppable && queued * 2 >= socket.limit {
                    return true;
                }
                if enforce_limit && queued >= socket.limit {
                    return false;
                }
                let seq = connection.next_seq;
                connection.next_seq += 1;
                if let Err(mpsc::error::TrySendError::Full(_)) = socket.tx.try_send(Event::frame(&body, seq)) {
                    return false;
                }
                connection.dead_queue.push_back((seq, body));
            }
            Link::HalfOpen { .. } => {
                if droppable {
                    return true;
                }
                connection.dead_queue.push_back((connection.next_seq, body));
                connection.next_seq += 1;
            }
            Link::Inactive { .. } => {
                if connection.active_queue.len() >= ACTIVE_QUEUE {
                    connection.overflowed = true;
                } else {
                    connection.active_queue.push_back(body);
                }
                return true;
            }
        }
        if connection.dead_queue.len() > DEAD_QUEUE {
            connection.dead_queue.pop_front();
        }
        true
    }

    /// Send a per-recipient event to every connection of `user_id`.
    pub fn send_to_user(&mut self, user_id: &str, event: &Event) {
        let body = event.body();
        let droppable = event.droppable();
        let mut overflowed = Vec::new();
        for (id, connection) in self.connections.iter_mut().filter(|(_, c)| c.user_id == user_id) {
            if !Self::deliver(connection, body.clone(), droppable, true) {
                overflowed.push(id.clone());
            }
        }
        for id in overflowed {
            if let Some(Connection { link: Link::Live(socket), .. }) = self.connections.remove(&id) {
                let _ = socket.control.send(Control::Close(None));
            }
        }
    }

    /// Send an event to every connection of every member of `channel_id`.
    fn send_to_channel(&mut self, channel_id: &str, event: &Event) {
        let members = self.channels.get(channel_id).map(|c| c.members.clone()).unwrap_or_default();
        for member in &members {
            self.send_to_user(member, event);
        }
    }

    /// Whether `user_id` has a connection the server considers active (online, for `@here`).
    pub fn is_online(&self, user_id: &str) -> bool {
        self.connections.values().any(|c| c.user_id == user_id && c.is_active())
    }

    /// Store a post and broadcast `posted` to every member, the author included.
    pub fn create_post(
        &mut self,
        user_id: &str,
        channel_id: &str,
        message: &str,
        root_id: &str,
        pending_post_id: &str,
        props: Value,
    ) -> SimPost {
        let spec = PostSpec { message: message.into(), root_id: root_id.into(), kind: String::new(), props };
        self.create_post_with(user_id, channel_id, spec, pending_post_id)
    }

    /// Store a post of any kind and broadcast `posted` like `app/post.go` `CreatePost` and
    /// `app/notification.go` `SendNotifications` do.
    pub fn create_post_with(
        &mut self,
        user_id: &str,
        channel_id: &str,
        spec: PostSpec,
        pending_post_id: &str,
    ) -> SimPost {
        let now = self.tick();
        let author = self.users.get(user_id);
        let author_name = author.map_or_else(String::new, |u| u.username.clone());
        let mut props = spec.props;
        if author.is_some_and(|u| u.is_bot) {
            if !props.is_object() {
                props = json!({});
            }
            props["from_bot"] = json!("true");
        }
        let post = SimPost {
            id: new_id(),
            channel_id: channel_id.into(),
            user_id: user_id.into(),
            root_id: spec.root_id,
            message: spec.message,
            create_at: now,
            update_at: now,
            edit_at: 0,
            delete_at: 0,
            is_pinned: false,
            kind: spec.kind,
            has_reactions: false,
            reply_count: 0,
            last_reply_at: 0,
            pending_post_id: pending_post_id.into(),
            props,
        };
        let index = self.posts.len();
        if !pending_post_id.is_empty() && self.dedup {
            self.pending_post_ids.insert(pending_post_id.into(), PendingId { post: Some(index), seen_at_ms: now });
        }
        if let Some(&root) = self.post_index.get(&post.root_id) {
            let root = &mut self.posts[root];
            root.update_at = now;
            root.reply_count += 1;
            root.last_reply_at = now;
        }
        self.post_index.insert(post.id.clone(), index);
        self.channel_posts.entry(channel_id.into()).or_default().push(index);
        self.posts.push(post.clone());
        if !self.post_observers.is_empty() {
            let now = Instant::now();
            self.post_observers.retain(|observer| observer.send((post.clone(), now)).is_ok());
        }
        let Some(channel) = self.channels.get_mut(channel_id) else { return post };
        channel.last_post_at = now;
        if post.root_id.is_empty() {
            channel.last_root_post_at = now;
        }
        let (kind, name, team_id, members) =
            (channel.kind, channel.name.clone(), channel.team_id.clone(), channel.members.clone());
        let display_name = match kind {
            "D" => format!("@{author_name}"),
            "G" => {
                let mut names: Vec<String> =
                    members.iter().filter_map(|m| self.users.get(m).map(|u| u.username.clone())).collect();
                names.sort();
                names.join(", ")
            }
            _ => channel.display_name.clone(),
        };
        let is_system = post.kind.starts_with("system_");
        let override_name = (post.props["from_webhook"] == "true" && kind != "D")
            .then(|| post.props["override_username"].as_str().map(str::to_string))
            .flatten();
        let sender_name =
            if is_system { "System".to_string() } else { override_name.unwrap_or_else(|| format!("@{author_name}")) };
        let lower = post.message.to_lowercase();
        let everyone = contains_word(&lower, "@channel") || contains_word(&lower, "@all");
        let here = contains_word(&lower, "@here");
        let post_json = post.to_json().to_string();
        for member in &members {
            let Some(recipient) = self.users.get(member) else { continue };
            let mentioned = *member != post.user_id
                && !is_system
                && match kind {
                    "D" | "G" => true,
                    _ => {
                        everyone
                            || contains_word(&lower, &format!("@{}", recipient.username.to_lowercase()))
                            || (here && self.is_online(member))
                            || self
                                .mention_keys
                                .get(member)
                                .is_some_and(|keys| keys.iter().any(|key| contains_word(&lower, key)))
                    }
                };
            let mut data = json!({
                "post": post_json,
                "channel_type": kind,
                "channel_display_name": display_name,
                "channel_name": name,
                "sender_name": sender_name,
                "team_id": team_id,
                "set_online": true,
            });
            if mentioned {
                data["mentions"] = Value::String(json!([member]).to_string());
            }
            let event = Event { name: "posted", data, broadcast: broadcast("", channel_id, "", None) };
            self.send_to_user(member, &event);
        }
        post
    }

    /// Broadcast `post_edited` for the post at `index` to its channel.
    fn broadcast_edited(&mut self, index: usize) {
        let post = &self.posts[index];
        let channel_id = post.channel_id.clone();
        let event = Event {
            name: "post_edited",
            data: json!({"post": post.to_json().to_string()}),
            broadcast: broadcast("", &channel_id, "", None),
        };
        self.send_to_channel(&channel_id, &event);
    }

    fn live_index(&self, post_id: &str) -> Result<usize, PostError> {
        match self.post_index.get(post_id) {
            Some(&i) if !self.posts[i].is_deleted() => Ok(i),
            _ => Err(PostError::NotFound),
        }
    }

    /// Change a post's message (`app/post.go` `PatchPost`/`UpdatePost`).
    pub fn edit_post(&mut self, post_id: &str, message: &str) -> Result<SimPost, PostError> {
        let index = self.live_index(post_id)?;
        let now = self.tick();
        let post = &mut self.posts[index];
        post.message = message.into();
        post.edit_at = now;
        post.update_at = now;
        self.broadcast_edited(index);
        Ok(self.posts[index].clone())
    }

    pub fn pin_post(&mut self, post_id: &str, pinned: bool) -> Result<SimPost, PostError> {
        let index = self.live_index(post_id)?;
        let now = self.tick();
        let post = &mut self.posts[index];
        post.is_pinned = pinned;
        post.update_at = now;
        self.broadcast_edited(index);
        Ok(self.posts[index].clone())
    }

    /// Delete a post and its replies (kept in the store with `delete_at`), broadcast
    /// `post_deleted` (sanitized, as a non-admin receives it).
    pub fn delete_post(&mut self, post_id: &str) -> Result<SimPost, PostError> {
        let index = self.live_index(post_id)?;
        let now = self.tick();
        let post = &mut self.posts[index];
        post.delete_at = now;
        post.update_at = now;
        let (channel_id, root_id) = (post.channel_id.clone(), post.root_id.clone());
        if root_id.is_empty() {
            let replies: Vec<usize> = self.channel_posts.get(&channel_id).map_or_else(Vec::new, |all| {
                all.iter()
                    .copied()
                    .filter(|&i| self.posts[i].root_id == post_id && !self.posts[i].is_deleted())
                    .collect()
            });
            for reply in replies {
                self.posts[reply].delete_at = now;
                self.posts[reply].update_at = now;
            }
        } else if let Some(&root) = self.post_index.get(&root_id) {
            let root = &mut self.posts[root];
            root.reply_count = (root.reply_count - 1).max(0);
            root.update_at = now;
        }
        let mut event_broadcast = broadcast("", &channel_id, "", None);
        event_broadcast["contains_sanitized_data"] = json!(true);
        let event = Event {
            name: "post_deleted",
            data: json!({"post": self.posts[index].to_json().to_string()}),
            broadcast: event_broadcast,
        };
        self.send_to_channel(&channel_id, &event);
        Ok(self.posts[index].clone())
    }

    /// Add a reaction (`store/sqlstore/reaction_store.go` `Save` bumps the post's UpdateAt).
    /// Returns the reaction object.
    pub fn react(&mut self, user_id: &str, post_id: &str, emoji: &str) -> Result<Value, PostError> {
        let index = self.live_index(post_id)?;
        let now = self.tick();
        let post = &mut self.posts[index];
        post.has_reactions = true;
        post.update_at = now;
        let channel_id = post.channel_id.clone();
        let reaction = json!({"user_id": user_id, "post_id": post_id, "emoji_name": emoji, "create_at": now,
                              "update_at": now, "delete_at": 0, "remote_id": "", "channel_id": channel_id});
        let event = Event {
            name: "reaction_added",
            data: json!({"reaction": reaction.to_string()}),
            broadcast: broadcast("", &channel_id, "", None),
        };
        self.send_to_channel(&channel_id, &event);
        Ok(reaction)
    }

    pub fn typing(&mut self, user_id: &str, channel_id: &str, parent_id: &str) {
        self.typing.push((user_id.into(), channel_id.into(), parent_id.into()));
        let members = self.channels.get(channel_id).map(|c| c.members.clone()).unwrap_or_default();
        let event = Event {
            name: "typing",
            data: json!({"parent_id": parent_id, "user_id": user_id}),
            broadcast: broadcast("", channel_id, "", Some(user_id)),
        };
        for member in members.iter().filter(|m| *m != user_id) {
            self.send_to_user(member, &event);
        }
    }

    /// Attach a socket for `user_id`: resume `requested` (connection id, next seq the client
    /// expects) when the server still can — only for a connection it considers inactive —
    /// else start a fresh connection with `hello`. Returns the connection id.
    pub fn attach(&mut self, user_id: &str, requested: Option<(String, i64)>, socket: LiveSocket) -> String {
        self.ws_opened += 1;
        let now = Instant::now();
        self.expire_half_open(now);
        let mut carried = VecDeque::new();
        if let Some((connection_id, wanted)) = requested {
            let resumable = self
                .connections
                .get(&connection_id)
                .is_some_and(|c| c.user_id == user_id && matches!(c.link, Link::Inactive { .. }));
            if resumable {
                let mut connection = self.connections.remove(&connection_id).expect("checked above");
                if !connection.overflowed {
                    let replay_from = connection.dead_queue.iter().position(|(seq, _)| *seq == wanted);
                    if replay_from.is_some() || connection.next_seq == wanted {
                        for (seq, body) in connection.dead_queue.iter().skip(replay_from.unwrap_or(usize::MAX)) {
                            let _ = socket.tx.try_send(Event::frame(body, *seq));
                        }
                        connection.link = Link::Live(socket);
                        connection.last_pong = now;
                        for body in std::mem::take(&mut connection.active_queue) {
                            Self::deliver(&mut connection, body, false, false);
                        }
                        self.connections.insert(connection_id.clone(), connection);
                        self.resumed += 1;
                        return connection_id;
                    }
                    // Loss: a new connection id and hello, then what was queued meanwhile.
                    carried = std::mem::take(&mut connection.active_queue);
                }
            }
        }
        let connection_id = new_id();
        let mut connection = Connection {
            user_id: user_id.into(),
            next_seq: 0,
            dead_queue: VecDeque::new(),
            active_queue: VecDeque::new(),
            overflowed: false,
            link: Link::Live(socket),
            last_pong: now,
        };
        let hello = Event {
            name: "hello",
            data: json!({"server_version": "10.11.0.0.sim.false", "connection_id": connection_id, "server_hostname": "mm-sim"}),
            broadcast: broadcast(user_id, "", "", None),
        };
        Self::deliver(&mut connection, hello.body(), false, false);
        self.hellos += 1;
        for body in carried {
            Self::deliver(&mut connection, body, false, false);
        }
        self.connections.insert(connection_id.clone(), connection);
        connection_id
    }

    /// The socket task `socket_id` of `connection_id` ended: the connection becomes inactive
    /// (if it still belongs to that socket).
    pub fn detach(&mut self, connection_id: &str, socket_id: u64) {
        if let Some(connection) = self.connections.get_mut(connection_id) {
            if matches!(&connection.link, Link::Live(s) if s.id == socket_id) {
                connection.link = Link::Inactive { since: Instant::now() };
            }
        }
    }

    /// Invalidate every token of `user_id`. Its connections lose their session: the server
    /// stops sending to them and its auth check closes them (`web_conn.go` `IsAuthenticated`,
    /// the write pump's auth ticker); they cannot be resumed.
    pub fn revoke_user(&mut self, user_id: &str) {
        self.tokens.retain(|_, user| user != user_id);
        self.connections.retain(|_, connection| {
            if connection.user_id != user_id {
                return true;
            }
            if let Link::Live(socket) = &connection.link {
                let _ = socket.control.send(Control::Close(None));
            }
            false
        });
    }

    /// A WebSocket pong arrived on `connection_id`.
    pub fn pong(&mut self, connection_id: &str) {
        if let Some(connection) = self.connections.get_mut(connection_id) {
            connection.last_pong = Instant::now();
        }
    }

    /// Half-open connections whose read deadline passed become inactive.
    pub fn expire_half_open(&mut self, now: Instant) {
        for connection in self.connections.values_mut() {
            if matches!(connection.link, Link::HalfOpen { deadline } if deadline <= now) {
                connection.link = Link::Inactive { since: now };
            }
        }
    }

    /// Remove inactive connections idle for longer than `reap_after`.
    pub fn reap(&mut self, reap_after: Duration) {
        self.connections.retain(|_, c| match c.link {
            Link::Inactive { since } => since.elapsed() <= reap_after,
            _ => true,
        });
    }

    /// Forget pending post ids older than the cache TTL.
    pub fn prune_pending_ids(&mut self, ttl_ms: i64) {
        let now = now_ms();
        self.pending_post_ids.retain(|_, p| now - p.seen_at_ms < ttl_ms);
    }

    /// Cut every socket and forget the connections, as a server restart does: the next
    /// connect gets a new connection id and the client must catch up through REST.
    pub fn drop_and_forget_connections(&mut self) {
        self.drop_connections();
        self.connections.clear();
    }

    /// Cut every socket; the server notices at once (the connections become inactive).
    pub fn drop_connections(&mut self) {
        let now = Instant::now();
        for connection in self.connections.values_mut() {
            if let Link::Live(socket) = &connection.link {
                let _ = socket.control.send(Control::Drop);
                connection.link = Link::Inactive { since: now };
            }
        }
    }

    /// Cut every socket without the server noticing: each connection stays active until its
    /// read deadline (`pong_timeout` after its last pong).
    pub fn half_open_drop(&mut self, pong_timeout: Duration) {
        for connection in self.connections.values_mut() {
            if let Link::Live(socket) = &connection.link {
                let _ = socket.control.send(Control::Vanish);
                connection.link = Link::HalfOpen { deadline: connection.last_pong + pong_timeout };
            }
        }
    }

    pub fn active_connections(&self) -> usize {
        self.connections.values().filter(|c| c.is_active()).count()
    }
}

/// Whether `lower` (a lower-cased message) contains `needle` (lower case) as a whole word: not
/// preceded by a letter or digit, not followed by one (nor `_`, `-`), a trailing `.` allowed.
pub fn contains_word(lower: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    lower.match_indices(needle).any(|(at, _)| {
        let before_ok = lower[..at].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let after = lower[at + needle.len()..].chars().next();
        let after_ok = after.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-'))
            || (after == Some('.')
                && lower[at + needle.len() + 1..].chars().next().is_none_or(|c| !c.is_alphanumeric()));
        before_ok && after_ok
    })
}

/// Whether `message` mentions `@username` as a whole word.
pub fn mentions_username(message: &str, username: &str) -> bool {
    contains_word(&message.to_lowercase(), &format!("@{}", username.to_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_whole_words() {
        assert!(mentions_username("@bot hi", "bot"));
        assert!(mentions_username("hi @Bot.", "bot"));
        assert!(!mentions_username("hi @bots", "bot"));
        assert!(!mentions_username("mail@bot", "bot"));
        assert!(!mentions_username("hi @bot-two", "bot"));
        assert!(contains_word("ping @channel.", "@channel"));
        assert!(!contains_word("ping @channels", "@channel"));
        assert!(contains_word("the release is out", "release"));
        assert!(!contains_word("the prerelease is out", "release"));
    }

    #[test]
    fn ids_look_like_mattermost_ids() {
        let id = new_id();
        assert!(is_valid_id(&id), "{id}");
    }

    #[test]
    fn the_world_clock_never_repeats() {
        let mut world = World::default();
        let ticks: Vec<i64> = (0..1000).map(|_| world.tick()).collect();
        assert!(ticks.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn a_reply_moves_its_root_forward() {
        let mut world = World::default();
        let root = world.create_post("u", "c", "root", "", "", Value::Null);
        let reply = world.create_post("u", "c", "reply", &root.id, "", Value::Null);
        let root = world.post(&root.id).unwrap();
        assert_eq!(root.update_at, reply.create_at);
        assert!(root.update_at > root.create_at);
        assert_eq!((root.reply_count, root.last_reply_at), (1, reply.create_at));
    }
}
