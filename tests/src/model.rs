//! A fake OpenAI-compatible model server on `127.0.0.1:0`: `POST /v1/chat/completions`,
//! streaming (server-sent events, ended by `data: [DONE]`) or not, as the request asks.
//!
//! Its answer is deterministic and shows what it was given:
//! `model heard "<last user message>" after <n> earlier messages` (system prompt not counted),
//! so a test can tell from the chat alone whether the history reached the model. Every request
//! body and `Authorization` header is recorded; failures can be injected.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use axum::{
    body::Body,
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub body: Value,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Shared {
    requests: Vec<ModelRequest>,
    fail_next: Option<(usize, u16)>,
}

pub struct FakeModel {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeModel {
    pub async fn start() -> Result<Self> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let app = Router::new().route("/v1/chat/completions", post(completions)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// What goes in `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<ModelRequest> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// Answer the next `count` requests with `status` and an OpenAI-style error body.
    pub fn fail_next(&self, count: usize, status: u16) {
        self.shared.lock().unwrap().fail_next = (count > 0).then_some((count, status));
    }
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer for a request body (see the module docs).
pub fn answer_for(body: &Value) -> String {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let dialogue: Vec<&Value> = messages.iter().filter(|m| m["role"] != "system").collect();
    let last = dialogue.last().and_then(|m| m["content"].as_str()).unwrap_or_default();
    format!("model heard \"{last}\" after {} earlier messages", dialogue.len().saturating_sub(1))
}

async fn completions(State(shared): State<Arc<Mutex<Shared>>>, headers: HeaderMap, body: String) -> Response {
    let body: Value = match serde_json::from_str(&body) {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body is not JSON: {e}")),
    };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let failure = {
        let mut shared = shared.lock().unwrap();
        shared.requests.push(ModelRequest { body: body.clone(), authorization });
        match shared.fail_next.take() {
            Some((count, status)) => {
                if count > 1 {
                    shared.fail_next = Some((count - 1, status));
                }
                Some(status)
            }
            None => None,
        }
    };
    if let Some(status) = failure {
        return error(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), "injected failure");
    }
    if body["model"].as_str().unwrap_or_default().is_empty() || !body["messages"].is_array() {
        return error(StatusCode::BAD_REQUEST, "model and messages are required");
    }
    let answer = answer_for(&body);
    let model = body["model"].clone();
    if body["stream"] == true {
        // Several deltas, split mid-word, the way real servers stream.
        let chars: Vec<char> = answer.chars().collect();
        let mut events = vec![json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]})];
        for piece in chars.chunks(7) {
            let piece: String = piece.iter().collect();
            events.push(json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]}));
        }
        events.push(json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}));
        let chunks: Vec<Result<String, std::convert::Infallible>> = events
            .into_iter()
            .map(|e| Ok(format!("data: {e}\n\n")))
            .chain(std::iter::once(Ok("data: [DONE]\n\n".to_string())))
            .collect();
        return (
            [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
            .into_response();
    }
    Json(json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }))
    .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": "server_error", "code": null}}))).into_response()
}
