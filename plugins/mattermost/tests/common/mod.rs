//! What the adapter's test files share: its config, a host with the token, and an adapter
//! that is connected and signed in.

use serde_json::json;
use switchboard_mattermost::MattermostAdapter;
use switchboard_plugin_api::{
    conformance::{Harness, TestHost},
    Action, Event,
};

pub const TOKEN: &str = "tok3n-value-never-logged";
pub const BOT: &str = "botid0000000000000000000000";

pub fn config(chatmode: &str) -> String {
    json!({"base_url": "http://127.0.0.1:8065/", "bot_token_env": "MM_BOT_TOKEN", "chatmode": chatmode,
           "dm_policy": "open", "group_policy": "open", "allow_from": []})
    .to_string()
}

pub fn host() -> TestHost {
    TestHost::new("mattermost").with_secret("MM_BOT_TOKEN", TOKEN)
}

/// Start, connect, say hello, and answer /users/me.
pub fn signed_in(chatmode: &str) -> Harness {
    let (mut harness, actions) = Harness::start::<MattermostAdapter>(host(), &config(chatmode)).unwrap();
    let me = actions
        .iter()
        .find_map(|a| match a {
            Action::HttpRequest { request, url, .. } if url.ends_with("/api/v4/users/me") => Some(*request),
            _ => None,
        })
        .expect("GET /users/me");
    harness.feed(Event::WsOpened { conn: 1 }).unwrap();
    let hello = json!({"event": "hello", "data": {"connection_id": "conn1"}, "broadcast": {"user_id": BOT}, "seq": 0});
    harness.feed(Event::WsFrame { conn: 1, text: hello.to_string().into() }).unwrap();
    let user = json!({"id": BOT, "username": "switchboard-bot"});
    harness
        .feed(Event::HttpResponse {
            request: me,
            status: 200,
            headers: Default::default(),
            body: user.to_string().into(),
        })
        .unwrap();
    harness
}
