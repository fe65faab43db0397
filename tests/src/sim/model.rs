//! The simulated server's world: users, teams, channels, posts and WebSocket connection state,
//! with the broadcast and resume rules of MATTERMOST.md (A1, A5).

use std::{
    collections::{HashMap, VecDeque},
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
}

impl Channel {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "type": self.kind, "display_name": self.display_name, "name": self.name,
            "team_id": self.team_id, "header": "", "purpose": "", "creator_id": "", "last_post_at": 0,
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
    pub pending_post_id: String,
    #[serde(default)]
    pub props: Value,
}

impl SimPost {
    /// The post object as the server serialises it (model.Post after PreparePostForClient).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "create_at": self.create_at, "update_at": self.create_at, "edit_at": 0,
            "delete_at": 0, "is_pinned": false, "user_id": self.user_id, "channel_id": self.channel_id,
            "root_id": self.root_id, "original_id": "", "message": self.message, "type": "",
            "props": if self.props.is_object() { self.props.clone() } else { json!({}) },
            "hashtags": "", "file_ids": [], "pending_post_id": self.pending_post_id,
            "reply_count": 0, "last_reply_at": 0, "participants": null, "metadata": {},
        })
    }
}

/// What a connection's socket task is told to do.
#[derive(Debug)]
pub enum Outgoing {
    Text(String),
    Close(u16),
    /// Vanish without a close frame, as a network failure would.
    Drop,
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
    pub live: Option<mpsc::UnboundedSender<Outgoing>>,
    pub disconnected_at: Option<Instant>,
}

#[derive(Default)]
pub struct World {
    pub users: HashMap<String, SimUser>,
    pub tokens: HashMap<String, String>,
    pub teams: HashMap<String, String>,
    pub channels: HashMap<String, Channel>,
    pub posts: Vec<SimPost>,
    pub connections: HashMap<String, Connection>,
    pub ws_opened: u64,
    pub resumed: u64,
    pub typing: Vec<(String, String, String)>,
    pub fail_next_posts: Option<(usize, u16)>,
    /// Until then, WebSocket upgrades are answered 503 (the server is unreachable).
    pub websockets_refused_until: Option<std::time::Instant>,
    /// Index into `posts` by `"<user>\0<pending_post_id>"` (the server's de-duplication cache).
    pub pending_post_ids: HashMap<String, usize>,
    /// Who wants a copy of every new post (benchmarks time replies with it).
    pub post_observers: Vec<mpsc::UnboundedSender<(SimPost, Instant)>>,
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
}

pub fn broadcast(user_id: &str, channel_id: &str, team_id: &str, omit: Option<&str>) -> Value {
    let omit_users = omit.map_or(Value::Null, |u| json!({ u: true }));
    json!({"omit_users": omit_users, "user_id": user_id, "channel_id": channel_id, "team_id": team_id,
           "connection_id": "", "omit_connection_id": ""})
}

impl World {
    pub fn user_by_token(&self, token: &str) -> Option<&SimUser> {
        self.tokens.get(token).and_then(|id| self.users.get(id))
    }

    /// Send `event` to one connection: numbered now if it is live, buffered if it is not.
    fn deliver(connection: &mut Connection, body: String) {
        match &connection.live {
            Some(socket) => {
                let seq = connection.next_seq;
                connection.next_seq += 1;
                let _ = socket.send(Outgoing::Text(Event::frame(&body, seq)));
                connection.dead_queue.push_back((seq, body));
                if connection.dead_queue.len() > DEAD_QUEUE {
                    connection.dead_queue.pop_front();
                }
            }
            None => {
                if connection.active_queue.len() >= ACTIVE_QUEUE {
                    connection.overflowed = true;
                } else {
                    connection.active_queue.push_back(body);
                }
            }
        }
    }

    /// Send a per-recipient event to every connection of `user_id`.
    pub fn send_to_user(&mut self, user_id: &str, event: &Event) {
        let body = event.body();
        for connection in self.connections.values_mut().filter(|c| c.user_id == user_id) {
            Self::deliver(connection, body.clone());
        }
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
        let post = SimPost {
            id: new_id(),
            channel_id: channel_id.into(),
            user_id: user_id.into(),
            root_id: root_id.into(),
            message: message.into(),
            create_at: now_ms(),
            pending_post_id: pending_post_id.into(),
            props,
        };
        if !pending_post_id.is_empty() {
            self.pending_post_ids.insert(format!("{user_id}\0{pending_post_id}"), self.posts.len());
        }
        self.posts.push(post.clone());
        if !self.post_observers.is_empty() {
            let now = Instant::now();
            self.post_observers.retain(|observer| observer.send((post.clone(), now)).is_ok());
        }
        let Some(channel) = self.channels.get(channel_id).cloned() else { return post };
        let author = self.users.get(user_id).cloned();
        let author_name = author.as_ref().map_or_else(String::new, |u| u.username.clone());
        let display_name = match channel.kind {
            "D" => format!("@{author_name}"),
            "G" => {
                let mut names: Vec<String> =
                    channel.members.iter().filter_map(|m| self.users.get(m).map(|u| u.username.clone())).collect();
                names.sort();
                names.join(", ")
            }
            _ => channel.display_name.clone(),
        };
        let post_json = post.to_json().to_string();
        for member in &channel.members {
            let Some(recipient) = self.users.get(member) else { continue };
            let mentioned = match channel.kind {
                "D" | "G" => *member != post.user_id,
                _ => mentions_username(message, &recipient.username),
            };
            let mut data = json!({
                "post": post_json,
                "channel_type": channel.kind,
                "channel_display_name": display_name,
                "channel_name": channel.name,
                "sender_name": format!("@{author_name}"),
                "team_id": channel.team_id,
                "set_online": true,
            });
            if mentioned {
                data["mentions"] = Value::String(json!([member]).to_string());
            }
            let event = Event { name: "posted", data, broadcast: broadcast("", channel_id, "", None) };
            let member = member.clone();
            self.send_to_user(&member, &event);
        }
        post
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
    /// expects) when the server still can, else start a fresh connection with `hello`.
    /// Returns the connection id. Frames go out through `socket` in order.
    pub fn attach(
        &mut self,
        user_id: &str,
        requested: Option<(String, i64)>,
        socket: mpsc::UnboundedSender<Outgoing>,
        reap_after: Duration,
    ) -> String {
        self.ws_opened += 1;
        self.reap(reap_after);
        if let Some((connection_id, wanted)) = requested {
            if let Some(connection) = self.connections.get_mut(&connection_id) {
                if connection.user_id == user_id && connection.live.is_none() && !connection.overflowed {
                    let replay_from = connection.dead_queue.iter().position(|(seq, _)| *seq == wanted);
                    if replay_from.is_some() || connection.next_seq == wanted {
                        for (seq, body) in connection.dead_queue.iter().skip(replay_from.unwrap_or(usize::MAX)) {
                            let _ = socket.send(Outgoing::Text(Event::frame(body, *seq)));
                        }
                        connection.live = Some(socket);
                        connection.disconnected_at = None;
                        for body in std::mem::take(&mut connection.active_queue) {
                            Self::deliver(connection, body);
                        }
                        self.resumed += 1;
                        return connection_id;
                    }
                }
                if connection.user_id == user_id && connection.live.is_none() {
                    // Loss: the server cannot fill the gap; the client must resync via REST.
                    self.connections.remove(&connection_id);
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
            live: Some(socket),
            disconnected_at: None,
        };
        let hello = Event {
            name: "hello",
            data: json!({"server_version": "10.11.0.0.sim.false", "connection_id": connection_id, "server_hostname": "mm-sim"}),
            broadcast: broadcast(user_id, "", "", None),
        };
        Self::deliver(&mut connection, hello.body());
        self.connections.insert(connection_id.clone(), connection);
        connection_id
    }

    pub fn detach(&mut self, connection_id: &str) {
        if let Some(connection) = self.connections.get_mut(connection_id) {
            connection.live = None;
            connection.disconnected_at = Some(Instant::now());
        }
    }

    fn reap(&mut self, reap_after: Duration) {
        self.connections.retain(|_, c| c.disconnected_at.is_none_or(|at| at.elapsed() < reap_after));
    }

    /// Cut every socket and forget the connections, as a server restart does: the next
    /// connect gets a new connection id and the client must catch up through REST.
    pub fn drop_and_forget_connections(&mut self) {
        self.drop_connections();
        self.connections.clear();
    }

    pub fn drop_connections(&mut self) {
        for connection in self.connections.values_mut() {
            if let Some(socket) = connection.live.take() {
                let _ = socket.send(Outgoing::Drop);
                connection.disconnected_at = Some(Instant::now());
            }
        }
    }

    pub fn active_connections(&self) -> usize {
        self.connections.values().filter(|c| c.live.is_some()).count()
    }
}

/// Whether `message` mentions `@username` as a whole word.
pub fn mentions_username(message: &str, username: &str) -> bool {
    let needle = format!("@{}", username.to_lowercase());
    let lower = message.to_lowercase();
    lower.match_indices(&needle).any(|(at, _)| {
        let before_ok = lower[..at].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let after = lower[at + needle.len()..].chars().next();
        let after_ok = after.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-'))
            || (after == Some('.')
                && lower[at + needle.len() + 1..].chars().next().is_none_or(|c| !c.is_alphanumeric()));
        before_ok && after_ok
    })
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
    }

    #[test]
    fn ids_look_like_mattermost_ids() {
        let id = new_id();
        assert!(is_valid_id(&id), "{id}");
    }
}
