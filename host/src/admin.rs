//! The admin API: `/livez`, `/readyz`, `/metrics`, `/status` (every adapter generation,
//! mapped or not, and the store's counts), `POST /reload` (the admin reload trigger) and
//! `POST /restart` (graceful stop, then the binary at the start-up path); for the operator's
//! commands (`switchboard sessions`, `plugins`, `dead-letters`, see `admin/operations.rs`):
//! `GET /sessions?channel=&limit=`, `GET /plugins`, `GET /dead-letters`,
//! `GET /dead-letters/{id}`, `POST /dead-letters/{id}/replay`, `DELETE /dead-letters/{id}`.
//!
//! Locked down by default: it is served on a Unix socket in the state dir (`admin.sock`,
//! mode 0600, so only the gateway's user — and root — can reach it), with every route. A TCP
//! listener (`gateway.admin_listen`, off by default) is for scrapers and probes: the `Host`
//! header must name an IP address or `localhost` (a DNS-rebinding page names its own domain),
//! mutating routes need the bearer token of `gateway.admin_token_env` (which a cross-origin
//! form post cannot send), and so does every route but `/livez` and `/readyz` when a token is
//! set. Binding beyond loopback without a token is refused at start.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use axum::{
    extract::{Request, State},
    http::{header, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

mod operations;

pub use operations::PluginSettings;

use crate::{
    channel::Shared,
    config::GatewayConfig,
    gateway::{ControlMessage, ReloadOutcome},
};

#[derive(Clone)]
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub control: mpsc::Sender<ControlMessage>,
    pub expected_channels: Arc<RwLock<BTreeSet<String>>>,
    pub plugin_settings: Arc<RwLock<PluginSettings>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("gateway.admin_listen: cannot listen on {addr}: {source}")]
    Tcp { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("gateway.admin_socket: cannot listen on {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("gateway.admin_token_env: the environment variable {0} is not set")]
    MissingToken(String),
}

/// The admin API's listeners, bound before the gateway starts (tests use port 0).
#[derive(Default)]
pub struct Listeners {
    pub tcp: Option<tokio::net::TcpListener>,
    pub unix: Option<(tokio::net::UnixListener, PathBuf)>,
    /// The bearer token TCP clients must present (never logged).
    pub token: Option<String>,
}

impl Listeners {
    pub async fn bind(config: &GatewayConfig) -> Result<Self, AdminError> {
        let token = match &config.admin_token_env {
            Some(name) => Some(
                std::env::var(name)
                    .ok()
                    .filter(|t| !t.trim().is_empty())
                    .ok_or_else(|| AdminError::MissingToken(name.clone()))?,
            ),
            None => None,
        };
        let tcp = match config.admin_listen {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| AdminError::Tcp { addr, source })?)
            }
            None => None,
        };
        let unix = match &config.admin_socket {
            Some(path) => Some((
                bind_socket(path).map_err(|source| AdminError::Socket { path: path.clone(), source })?,
                path.clone(),
            )),
            None => None,
        };
        Ok(Self { tcp, unix, token })
    }
}

/// Bind the socket with mode 0600 from the start (no window where others could connect).
fn bind_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a gateway that did not stop cleanly: nothing listens on it any more.
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    // SAFETY: umask only changes this process's file creation mask; it is restored at once.
    let previous = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    unsafe { libc::umask(previous) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn routes(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/reload", post(reload))
        .route("/restart", post(restart))
        .route("/sessions", get(operations::sessions))
        .route("/plugins", get(operations::plugins))
        .route("/dead-letters", get(operations::dead_letters))
        .route("/dead-letters/{id}", get(operations::dead_letter).delete(operations::drop_dead_letter))
        .route("/dead-letters/{id}/replay", post(operations::replay))
        .with_state(state)
}

/// Serve the admin API on whatever listeners there are (the gateway logs where).
pub fn serve(listeners: Listeners, state: AdminState) {
    let Listeners { tcp, unix, token } = listeners;
    if let Some((listener, _)) = unix {
        let app = routes(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("admin socket stopped: {e}");
            }
        });
    }
    if let Some(listener) = tcp {
        let guard = Arc::new(TcpGuard { token });
        let app = routes(state).layer(middleware::from_fn_with_state(guard, guard_tcp));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("admin listener stopped: {e}");
            }
        });
    }
}

struct TcpGuard {
    token: Option<String>,
}

/// The checks of a request over TCP (see the module docs).
async fn guard_tcp(State(guard): State<Arc<TcpGuard>>, request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    if !names_this_machine(host) {
        return (StatusCode::FORBIDDEN, "the Host header must name an IP address or localhost\n").into_response();
    }
    let probe = matches!(request.uri().path(), "/livez" | "/readyz");
    let mutating = request.method() != Method::GET && request.method() != Method::HEAD;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    match (&guard.token, presented) {
        (None, _) if mutating => {
            (StatusCode::FORBIDDEN, "mutating routes over TCP need gateway.admin_token_env; use the admin socket\n")
                .into_response()
        }
        (None, _) => next.run(request).await,
        (Some(_), _) if probe && !mutating => next.run(request).await,
        (Some(token), Some(presented)) if same_secret(token, presented) => next.run(request).await,
        (Some(_), _) => {
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "a bearer token is needed\n")
                .into_response()
        }
    }
}

/// `Host` values a browser only sends when it was pointed at this machine by address.
fn names_this_machine(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host
            .rsplit_once(':')
            .map_or(host, |(name, port)| if port.chars().all(|c| c.is_ascii_digit()) { name } else { host }),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Compared without an early exit, so timing does not tell how much of a guess was right.
fn same_secret(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Ready when every configured channel instance has a running adapter generation whose adapter
/// reports no problem (a refused token, a connection that never works).
async fn readyz(State(state): State<AdminState>) -> Response {
    let expected = state.expected_channels.read().unwrap().clone();
    let not_ready = state.shared.ledger.not_ready(&expected, state.shared.disconnected_grace, crate::session::now_ms());
    if not_ready.is_empty() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", not_ready.reasons())).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.shared.metrics.encode(),
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let store = match state.shared.router.counts_async().await {
        Ok(counts) => json!(counts),
        Err(e) => json!({"error": e.to_string()}),
    };
    let generations = state.shared.ledger.snapshot();
    let abandoned = generations.iter().filter(|r| r.state == crate::ledger::GenerationState::Abandoned).count();
    Json(json!({
        "generations": generations,
        // Left loaded because a call into them did not return in time (counted in
        // `libraries_opened`, against gateway.generation_budget).
        "generations_abandoned": abandoned,
        // Channel instances whose adapter says it cannot work (`/readyz` fails meanwhile).
        "problems": state.shared.ledger.problems(),
        // Per channel instance: WebSockets up, and since when (ms since the epoch).
        "connections": state.shared.ledger.connections(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_and_localhost_pass_the_host_check() {
        for host in ["127.0.0.1:9464", "localhost", "LOCALHOST:80", "[::1]:9464", "10.0.0.5", "::1"] {
            assert!(names_this_machine(host), "{host}");
        }
        for host in ["evil.example", "evil.example:9464", "", "localhost.evil.example"] {
            assert!(!names_this_machine(host), "{host}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cret", "s3cre"));
        assert!(!same_secret("s3cret", "s3cres"));
    }
}
