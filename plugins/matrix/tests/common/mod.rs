//! What the adapter's test files share: its config, a host with the token, the requests an
//! adapter makes, and `/sync` answers built from rooms and events.

#![allow(dead_code)]

use serde_json::{json, Value};
use switchboard_matrix::MatrixAdapter;
use switchboard_plugin_api::{
    conformance::{Harness, TestHost},
    Action, Event, Header, InboundMessage,
};

pub const TOKEN: &str = "syt_c2VjcmV0_never_logged";
pub const BOT: &str = "@switchboard:localhost";
pub const ALICE: &str = "@alice:localhost";

/// The adapter's config with `extra` keys set over the defaults.
pub fn config(extra: Value) -> String {
    let mut config = json!({
        "homeserver_url": "http://127.0.0.1:8008/", "user_id": BOT, "access_token_env": "MATRIX_ACCESS_TOKEN",
        "chatmode": "oncall", "onchar_prefixes": [">", "!"], "dm_policy": "open", "group_policy": "open",
        "allow_from": [], "rooms": [], "auto_join": true,
    });
    for (key, value) in extra.as_object().cloned().unwrap_or_default() {
        config[key] = value;
    }
    config.to_string()
}

pub fn host() -> TestHost {
    TestHost::new("matrix").with_secret("MATRIX_ACCESS_TOKEN", TOKEN)
}

/// An HTTP request an adapter asked for.
#[derive(Clone, Debug)]
pub struct Request {
    pub id: u64,
    pub method: String,
    pub url: String,
    pub headers: Vec<Header>,
    pub body: String,
    /// The adapter's response limit (`None`: a v1.0 `HttpRequest`; `Some(0)`: the host's).
    pub max_response_bytes: Option<u64>,
}

impl Request {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    /// A query parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        let (_, query) = self.url.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| decode(value))
        })
    }
}

fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&value[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

pub fn requests(actions: &[Action]) -> Vec<Request> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::HttpRequest { request, method, url, headers, body, .. } => Some(Request {
                id: *request,
                method: method.to_string(),
                url: url.to_string(),
                headers: headers.to_vec(),
                body: body.to_string(),
                max_response_bytes: None,
            }),
            // What the adapter sends a host of ABI v1.1 (the test host is one).
            Action::HttpCall(call) => Some(Request {
                id: call.request,
                method: call.method.to_string(),
                url: call.url.to_string(),
                headers: call.headers.to_vec(),
                body: String::from_utf8(call.body.to_vec()).unwrap(),
                max_response_bytes: Some(call.max_response_bytes),
            }),
            _ => None,
        })
        .collect()
}

/// The one request whose URL contains `part`.
pub fn request_to(actions: &[Action], part: &str) -> Request {
    let found: Vec<Request> = requests(actions).into_iter().filter(|r| r.url.contains(part)).collect();
    assert_eq!(found.len(), 1, "one request to {part} in {actions:#?}");
    found[0].clone()
}

pub fn syncs(actions: &[Action]) -> Vec<Request> {
    requests(actions).into_iter().filter(|r| r.url.contains("/_matrix/client/v3/sync?")).collect()
}

pub fn inbound(actions: &[Action]) -> Vec<InboundMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Inbound(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

pub fn answer(request: &Request, status: u16, body: Value) -> Event {
    Event::HttpResponse { request: request.id, status, headers: Default::default(), body: body.to_string().into() }
}

/// A text message event.
pub fn text(event_id: &str, sender: &str, body: &str) -> Value {
    json!({"type": "m.room.message", "event_id": event_id, "sender": sender, "origin_server_ts": 1_700_000_000_123u64,
           "content": {"msgtype": "m.text", "body": body}})
}

/// A joined room's section: `members` joined (0: no summary), public or not, with `timeline`.
pub fn room(members: u64, public: bool, timeline: Vec<Value>) -> Value {
    let join_rule = if public { "public" } else { "invite" };
    let mut room = json!({
        "state": {"events": [{"type": "m.room.join_rules", "state_key": "", "event_id": "$jr", "sender": ALICE,
                              "content": {"join_rule": join_rule}}]},
        "timeline": {"events": timeline, "limited": false, "prev_batch": "p0"},
    });
    if members > 0 {
        room["summary"] = json!({"m.joined_member_count": members});
    }
    room
}

/// A `/sync` answer with these joined rooms.
pub fn sync_answer(next_batch: &str, joined: Value) -> Value {
    json!({"next_batch": next_batch, "rooms": {"join": joined}})
}

/// Start, answer `whoami`, and return the harness with the first `/sync` request.
pub fn signed_in(config: &str) -> (Harness, Request) {
    let (mut harness, actions) = Harness::start::<MatrixAdapter>(host(), config).unwrap();
    let whoami = request_to(&actions, "/account/whoami");
    let actions = harness.feed(answer(&whoami, 200, json!({"user_id": BOT, "device_id": "GW"}))).unwrap();
    let sync = syncs(&actions).pop().expect("the first sync after whoami");
    (harness, sync)
}

/// Signed in and past the first sync (which knew `rooms`): returns the long-poll request.
pub fn syncing(config: &str, rooms: Value) -> (Harness, Request) {
    let (mut harness, first) = signed_in(config);
    let actions = harness.feed(answer(&first, 200, sync_answer("s1", rooms))).unwrap();
    assert!(inbound(&actions).is_empty(), "the first sync answers nothing");
    let poll = syncs(&actions).pop().expect("the long-poll after the first sync");
    (harness, poll)
}

/// The next `/sync` in `actions`, which must be the only one.
pub fn next_sync(actions: &[Action]) -> Request {
    let found = syncs(actions);
    assert_eq!(found.len(), 1, "one next sync in {actions:#?}");
    found[0].clone()
}
