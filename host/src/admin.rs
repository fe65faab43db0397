//! The admin listener: `/livez`, `/readyz`, `/metrics`, `/status` (every adapter generation,
//! mapped or not, and the store's counts), `POST /reload` (the admin reload trigger) and
//! `POST /restart` (graceful stop, then the same binary is started again in this process).

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::{
    channel::Shared,
    gateway::{ControlMessage, ReloadOutcome},
};

#[derive(Clone)]
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub control: mpsc::Sender<ControlMessage>,
    pub expected_channels: Arc<RwLock<BTreeSet<String>>>,
}

pub async fn serve(listener: tokio::net::TcpListener, state: AdminState) {
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/reload", post(reload))
        .route("/restart", post(restart))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("admin listener stopped: {e}");
    }
}

/// Ready when every configured channel instance has a running adapter generation whose adapter
/// reports no problem (a refused token, a connection that never works).
async fn readyz(State(state): State<AdminState>) -> Response {
    let running: BTreeSet<String> = state.shared.ledger.running().into_iter().map(|r| r.channel).collect();
    let missing: Vec<String> =
        state.expected_channels.read().unwrap().iter().filter(|c| !running.contains(*c)).cloned().collect();
    let expected = state.expected_channels.read().unwrap().clone();
    let mut problems = state.shared.ledger.problems();
    problems.retain(|channel, _| expected.contains(channel));
    if missing.is_empty() && problems.is_empty() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let mut reasons: Vec<String> = Vec::new();
    if !missing.is_empty() {
        reasons.push(format!("no running adapter for {}", missing.join(", ")));
    }
    reasons.extend(problems.iter().map(|(channel, problem)| format!("{channel}: {problem}")));
    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; "))).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.shared.metrics.encode(),
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let store = state.shared.router.store();
    let counts = tokio::task::spawn_blocking(move || store.counts()).await;
    let store = match counts {
        Ok(Ok(counts)) => json!(counts),
        Ok(Err(e)) => json!({"error": e.to_string()}),
        Err(e) => json!({"error": e.to_string()}),
    };
    Json(json!({
        "generations": state.shared.ledger.snapshot(),
        // Channel instances whose adapter says it cannot work (`/readyz` fails meanwhile).
        "problems": state.shared.ledger.problems(),
        // Each costs a TLS key until the process exits (gateway.generation_budget).
        "libraries_opened": crate::loader::libraries_opened(),
        "sessions": state.shared.router.sessions().len(),
        "store": store,
    }))
}

async fn restart(State(state): State<AdminState>) -> Response {
    match state.control.send(ControlMessage::Restart { trigger: "admin" }).await {
        Ok(()) => (StatusCode::ACCEPTED, "restarting\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n").into_response(),
    }
}

async fn reload(State(state): State<AdminState>) -> Response {
    let (done, outcome) = oneshot::channel();
    if state.control.send(ControlMessage::Reload { trigger: "admin", done: Some(done) }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n").into_response();
    }
    match outcome.await {
        Ok(outcome @ ReloadOutcome::Applied { .. }) => (StatusCode::OK, Json(outcome)).into_response(),
        Ok(outcome @ ReloadOutcome::Rejected { .. }) => {
            (StatusCode::UNPROCESSABLE_ENTITY, Json(outcome)).into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n").into_response(),
    }
}
