//! The simulator's own checks against MATTERMOST.md, over real loopback sockets.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, Message},
    MaybeTlsStream, WebSocketStream,
};

use super::*;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn ws_url(sim: &Simulator, query: &str) -> String {
    format!("{}/api/v4/websocket{query}", sim.base_url().replace("http://", "ws://"))
}

async fn connect(sim: &Simulator, token: Option<&str>, query: &str) -> Socket {
    let mut request = ws_url(sim, query).into_client_request().unwrap();
    if let Some(token) = token {
        request.headers_mut().insert("Authorization", format!("BEARER {token}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The next JSON text frame, or `None` if the socket closed or stayed silent for 2 s.
async fn next_json(socket: &mut Socket) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(2), socket.next()).await.ok()?? {
            Ok(Message::Text(text)) => return serde_json::from_str(text.as_str()).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn challenge_auth_gets_hello_before_the_ok_reply_and_replies_do_not_consume_seq() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let mut socket = connect(&sim, None, "").await;
    let challenge = json!({"seq": 1, "action": "authentication_challenge", "data": {"token": world.alice.token}});
    socket.send(Message::Text(challenge.to_string().into())).await.unwrap();
    let hello = next_json(&mut socket).await.unwrap();
    assert_eq!(hello["event"], "hello");
    assert_eq!(hello["seq"], 0);
    assert_eq!(hello["broadcast"]["user_id"], world.alice.id.as_str());
    assert_eq!(next_json(&mut socket).await.unwrap(), json!({"status": "OK", "seq_reply": 1}));
    socket.send(Message::Text(json!({"seq": 2, "action": "ping"}).to_string().into())).await.unwrap();
    let pong = next_json(&mut socket).await.unwrap();
    assert_eq!(pong["seq_reply"], 2);
    assert_eq!(pong["data"]["text"], "pong");
    sim.post_as(&world.bob.id, &world.office_general, "hi", None);
    assert_eq!(next_json(&mut socket).await.unwrap()["seq"], 1, "the ping reply did not consume a seq");
}

#[tokio::test]
async fn a_bad_challenge_token_closes_the_socket() {
    let sim = Simulator::start().await.unwrap();
    let mut socket = connect(&sim, None, "").await;
    let challenge = json!({"seq": 1, "action": "authentication_challenge", "data": {"token": "nope"}});
    socket.send(Message::Text(challenge.to_string().into())).await.unwrap();
    assert_eq!(next_json(&mut socket).await, None);
}

#[tokio::test]
async fn posted_reaches_the_author_and_mentions_only_the_mentioned_recipient() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let mut bot = connect(&sim, Some(&world.bot.token), "").await;
    let mut alice = connect(&sim, Some(&world.alice.token), "").await;
    assert_eq!(next_json(&mut bot).await.unwrap()["event"], "hello");
    assert_eq!(next_json(&mut alice).await.unwrap()["event"], "hello");
    sim.post_as(&world.alice.id, &world.office_general, "hey @switchboard-bot", None);
    let to_bot = next_json(&mut bot).await.unwrap();
    let to_alice = next_json(&mut alice).await.unwrap();
    assert_eq!(to_bot["event"], "posted");
    assert_eq!(to_alice["event"], "posted", "the author gets her own post");
    let post: Value = serde_json::from_str(to_bot["data"]["post"].as_str().unwrap()).unwrap();
    assert_eq!(post["message"], "hey @switchboard-bot");
    assert_eq!(to_bot["data"]["mentions"], json!([world.bot.id]).to_string());
    assert!(to_alice["data"].get("mentions").is_none());
    assert_eq!(to_bot["data"]["channel_type"], "O");
    assert_eq!(to_bot["broadcast"]["channel_id"], world.office_general.as_str());

    sim.post_as(&world.alice.id, &world.alice_dm, "psst", None);
    let dm = next_json(&mut bot).await.unwrap();
    assert_eq!(dm["data"]["channel_type"], "D");
    assert_eq!(dm["data"]["channel_display_name"], "@alice");
    assert_eq!(dm["data"]["team_id"], "");
    assert_eq!(dm["data"]["mentions"], json!([world.bot.id]).to_string());
}

#[tokio::test]
async fn rest_posts_follow_the_server_rules() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let client = reqwest::Client::new();
    let url = format!("{}/api/v4/posts", sim.base_url());
    let post = |body: Value| {
        client.post(&url).header("Authorization", format!("Bearer {}", world.bot.token)).json(&body).send()
    };

    let created =
        post(json!({"channel_id": world.office_general, "message": "hello", "pending_post_id": "p1"})).await.unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["content-type"], "application/json");
    let created: Value = created.json().await.unwrap();
    let again: Value = post(json!({"channel_id": world.office_general, "message": "hello", "pending_post_id": "p1"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["id"], created["id"], "a repeated pending_post_id is not posted twice");
    assert_eq!(sim.posts_by(&world.bot.id).len(), 1);

    let too_long = post(json!({"channel_id": world.office_general, "message": "x".repeat(16384)})).await.unwrap();
    assert_eq!(too_long.status(), 400);
    let body: Value = too_long.json().await.unwrap();
    assert_eq!(body["id"], "model.post.is_valid.message_length.app_error");

    sim.fail_next_posts(1, 429);
    let limited = post(json!({"channel_id": world.office_general, "message": "later"})).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(limited.text().await.unwrap(), "limit exceeded\n");

    let anonymous = client.get(format!("{}/api/v4/users/me", sim.base_url())).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["id"], "api.context.session_expired.app_error");
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_its_id_and_gets_the_missed_events() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let mut bot = connect(&sim, Some(&world.bot.token), "").await;
    let hello = next_json(&mut bot).await.unwrap();
    let connection_id = hello["data"]["connection_id"].as_str().unwrap().to_string();
    sim.post_as(&world.alice.id, &world.office_general, "one", None);
    assert_eq!(next_json(&mut bot).await.unwrap()["seq"], 1);

    sim.drop_connections();
    sim.post_as(&world.alice.id, &world.office_general, "two (while away)", None);
    let mut resumed =
        connect(&sim, Some(&world.bot.token), &format!("?connection_id={connection_id}&sequence_number=2")).await;
    let missed = next_json(&mut resumed).await.unwrap();
    assert_eq!(missed["event"], "posted", "no hello on a resume");
    assert_eq!(missed["seq"], 2);
    assert_eq!(sim.resumed_connections(), 1);

    // Asking for a seq the server no longer has: a new connection id and a hello.
    sim.drop_connections();
    let mut fresh =
        connect(&sim, Some(&world.bot.token), &format!("?connection_id={connection_id}&sequence_number=99")).await;
    let hello = next_json(&mut fresh).await.unwrap();
    assert_eq!(hello["event"], "hello");
    assert_ne!(hello["data"]["connection_id"], connection_id.as_str());
    assert_eq!(sim.ws_connections_opened(), 3);
}
