//! A real Synapse (Matrix homeserver) for tests, one per [`Synapse::start`], and a small
//! Matrix client to drive it.
//!
//! [`Synapse::start`] writes a homeserver config into a fresh temporary directory
//! (`server_name: localhost`, SQLite, no federation and no outbound connection, every rate
//! limiter raised, the `/sync` response cache off, `synapse.access` logged), a signing key,
//! picks a free loopback port, runs `python -m synapse.app.homeserver` from the venv that
//! `cargo xtask real-servers synapse` installs (`<target>/real-servers/synapse-venv`, or
//! `SWITCHBOARD_SYNAPSE_VENV`) with its output in `synapse.log` in that directory, and waits
//! for `GET /health`. Dropping it stops the server: SIGTERM, SIGKILL after
//! [`STOP_PATIENCE`]; [`Synapse::stop`] does the same and reports how it ended.
//!
//! The client side is plain `reqwest` over loopback with bounded timeouts: users through the
//! shared-secret admin registration API ([`Synapse::register`]) or a password login with a
//! fixed device id ([`Synapse::login`]), rooms, joins, text messages (each `PUT …/send` with a
//! transaction id, so a repeat is idempotent), `/messages` and `/sync`. [`Synapse::api`] makes
//! any other call.
//!
//! Facts the config relies on are in `shared/design/REAL-SERVERS.md` §1 and §3 (Synapse 1.163).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::Rng;
use reqwest::{Method, Url};
use serde_json::{json, Value};
use sha1::Sha1;

/// The homeserver's `server_name`: users are `@name:localhost`.
pub const SERVER_NAME: &str = "localhost";

/// How long [`Synapse::start`] waits for `/health` before giving up.
pub const START_PATIENCE: Duration = Duration::from_secs(60);

/// How long a stop waits after SIGTERM before SIGKILL.
pub const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// Every client call's timeout, except a long-polling `/sync` (its own timeout plus this).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Attempts at a port: another process may take the one picked before Synapse binds it.
const PORT_ATTEMPTS: usize = 5;

/// A user on the homeserver with an access token.
#[derive(Clone, Debug)]
pub struct MatrixUser {
    /// `@name:localhost`.
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
    /// The localpart (`name`), for a password login.
    pub username: String,
    pub password: String,
}

/// A text message read back from a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextMessage {
    pub sender: String,
    pub body: String,
    pub event_id: String,
}

/// `createRoom`'s `preset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Anyone on the server can join; history shared.
    PublicChat,
    /// Invite only.
    PrivateChat,
    /// Invite only, invitees get the creator's power level (what DMs use).
    TrustedPrivateChat,
}

impl Preset {
    fn as_str(self) -> &'static str {
        match self {
            Preset::PublicChat => "public_chat",
            Preset::PrivateChat => "private_chat",
            Preset::TrustedPrivateChat => "trusted_private_chat",
        }
    }
}

/// One `/sync` answer.
#[derive(Clone, Debug)]
pub struct SyncResponse {
    pub next_batch: String,
    /// The whole response body.
    pub body: Value,
}

impl SyncResponse {
    /// `rooms.join[room_id].timeline.events`.
    pub fn timeline(&self, room_id: &str) -> Vec<Value> {
        self.body["rooms"]["join"][room_id]["timeline"]["events"].as_array().cloned().unwrap_or_default()
    }

    /// The text messages in `room_id`'s timeline, in order.
    pub fn texts(&self, room_id: &str) -> Vec<TextMessage> {
        self.timeline(room_id).iter().filter_map(text_message).collect()
    }

    /// Room ids under `rooms.invite`.
    pub fn invited_rooms(&self) -> Vec<String> {
        self.body["rooms"]["invite"].as_object().map(|rooms| rooms.keys().cloned().collect()).unwrap_or_default()
    }

    /// Room ids under `rooms.join`.
    pub fn joined_rooms(&self) -> Vec<String> {
        self.body["rooms"]["join"].as_object().map(|rooms| rooms.keys().cloned().collect()).unwrap_or_default()
    }
}

fn text_message(event: &Value) -> Option<TextMessage> {
    if event["type"] != "m.room.message" {
        return None;
    }
    Some(TextMessage {
        sender: event["sender"].as_str()?.to_string(),
        body: event["content"]["body"].as_str()?.to_string(),
        event_id: event["event_id"].as_str()?.to_string(),
    })
}

/// A running Synapse in a temporary directory; stopped on drop.
pub struct Synapse {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    shared_secret: String,
    started_in: Duration,
    http: reqwest::Client,
    next_txn: AtomicU64,
}

/// How a stop went.
#[derive(Clone, Copy, Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// From SIGTERM to exit.
    pub took: Duration,
    /// SIGTERM was not enough within [`STOP_PATIENCE`].
    pub killed: bool,
}

impl Synapse {
    /// Write a config, start the server on a free loopback port and wait for `/health`.
    pub async fn start() -> Result<Self> {
        let python = venv_python()?;
        let dir = tempfile::Builder::new().prefix("synapse-").tempdir().context("cannot make a temp dir")?;
        let shared_secret = random_hex(16);
        write_signing_key(&dir.path().join("signing.key"))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            std::fs::write(dir.path().join("homeserver.yaml"), homeserver_yaml(dir.path(), port, &shared_secret))?;
            std::fs::write(dir.path().join("log.config"), LOG_CONFIG)?;
            let started = Instant::now();
            let mut child = spawn(&python, dir.path())?;
            match wait_healthy(&http, port, &mut child, &dir.path().join("synapse.log")).await {
                Ok(()) => {
                    return Ok(Self {
                        child: Some(child),
                        port,
                        dir,
                        shared_secret,
                        started_in: started.elapsed(),
                        http,
                        next_txn: AtomicU64::new(1),
                    });
                }
                Err(StartError::PortTaken(error)) => {
                    let _ = stop_child(&mut child);
                    last_error = Some(error);
                }
                Err(StartError::Failed(error)) => {
                    let _ = stop_child(&mut child);
                    return Err(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("no free port")))
            .with_context(|| format!("Synapse found no free port in {PORT_ATTEMPTS} attempts"))
    }

    /// `http://127.0.0.1:<port>`, what a Matrix client's `homeserver` setting takes.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory with the config, the SQLite database and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// From spawning the server to the first `/health` = `OK`.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("synapse.log")
    }

    /// Everything the server wrote (its stdout and stderr; warnings and the access log).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// Access-log lines (`Processed request: … "GET /_matrix/…"`) containing every one of `needles`.
    pub fn access_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|line| line.contains("Processed request") && needles.iter().all(|n| line.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// SIGTERM, wait up to [`STOP_PATIENCE`], then SIGKILL.
    pub async fn stop(mut self) -> Result<Stopped> {
        let mut child = self.child.take().context("the server was stopped already")?;
        let started = Instant::now();
        signal(&child, libc::SIGTERM);
        while started.elapsed() < STOP_PATIENCE {
            if let Some(status) = child.try_wait()? {
                return Ok(Stopped { status, took: started.elapsed(), killed: false });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill()?;
        let status = child.wait()?;
        Ok(Stopped { status, took: started.elapsed(), killed: true })
    }

    /// Any client-server or admin API call: `path` is the URL's path segments (each is
    /// percent-encoded: pass room and event ids as they are), `query` its parameters. Returns
    /// the status and the JSON body (`Null` if the body is not JSON).
    pub async fn api(
        &self,
        method: Method,
        user: Option<&MatrixUser>,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        self.api_with_timeout(method, user, path, query, body, REQUEST_TIMEOUT).await
    }

    async fn api_with_timeout(
        &self,
        method: Method,
        user: Option<&MatrixUser>,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Value)> {
        let mut url = Url::parse(&self.base_url())?;
        url.path_segments_mut().map_err(|()| anyhow!("the base URL cannot take a path"))?.extend(path);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self.http.request(method.clone(), url.clone()).timeout(timeout);
        if let Some(user) = user {
            request = request.bearer_auth(&user.access_token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| format!("{method} {}", url.path()))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.with_context(|| format!("{method} {}: reading the body", url.path()))?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// [`Synapse::api`], and an error (with the status and Matrix `errcode`) unless 2xx.
    pub async fn api_ok(
        &self,
        method: Method,
        user: Option<&MatrixUser>,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let (status, value) = self.api(method.clone(), user, path, query, body).await?;
        ensure_ok(&method, path, status, value)
    }

    /// Register `username` through the shared-secret admin API (password `<username>-password`).
    pub async fn register(&self, username: &str, admin: bool) -> Result<MatrixUser> {
        let path = ["_synapse", "admin", "v1", "register"];
        let nonce = self.api_ok(Method::GET, None, &path, &[], None).await?;
        let nonce = nonce["nonce"].as_str().context("no nonce in the registration answer")?.to_string();
        let password = format!("{username}-password");
        let mac = registration_mac(&self.shared_secret, &nonce, username, &password, admin);
        let body = json!({
            "nonce": nonce, "username": username, "password": password, "admin": admin, "mac": mac,
        });
        let answer = self
            .api_ok(Method::POST, None, &path, &[], Some(&body))
            .await
            .with_context(|| format!("registering {username}"))?;
        user_from(&answer, username, &password)
    }

    /// A password login with a fixed `device_id` (a new access token for that device).
    pub async fn login(&self, username: &str, password: &str, device_id: &str) -> Result<MatrixUser> {
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
            "device_id": device_id,
        });
        let answer = self.api_ok(Method::POST, None, &["_matrix", "client", "v3", "login"], &[], Some(&body)).await?;
        user_from(&answer, username, password)
    }

    /// `createRoom` with `preset`, inviting `invite` (user ids); returns the room id.
    pub async fn create_room(&self, user: &MatrixUser, preset: Preset, invite: &[&str]) -> Result<String> {
        let body = json!({"preset": preset.as_str(), "invite": invite});
        let answer =
            self.api_ok(Method::POST, Some(user), &["_matrix", "client", "v3", "createRoom"], &[], Some(&body)).await?;
        Ok(answer["room_id"].as_str().context("no room_id in the createRoom answer")?.to_string())
    }

    /// Invite `user_id` into `room_id`.
    pub async fn invite(&self, user: &MatrixUser, room_id: &str, user_id: &str) -> Result<()> {
        let path = ["_matrix", "client", "v3", "rooms", room_id, "invite"];
        self.api_ok(Method::POST, Some(user), &path, &[], Some(&json!({"user_id": user_id}))).await?;
        Ok(())
    }

    /// Join a room by id or alias; returns the room id.
    pub async fn join(&self, user: &MatrixUser, room: &str) -> Result<String> {
        let path = ["_matrix", "client", "v3", "join", room];
        let answer = self.api_ok(Method::POST, Some(user), &path, &[], Some(&json!({}))).await?;
        Ok(answer["room_id"].as_str().context("no room_id in the join answer")?.to_string())
    }

    /// Send an `m.text` message with a fresh transaction id; returns its event id.
    pub async fn send_text(&self, user: &MatrixUser, room_id: &str, body: &str) -> Result<String> {
        let txn_id = format!("sbtest-{}", self.next_txn.fetch_add(1, Ordering::Relaxed));
        self.send_text_txn(user, room_id, &txn_id, body).await
    }

    /// Send an `m.text` message with the transaction id `txn_id`: the same id again from the
    /// same access token returns the first event's id and posts nothing.
    pub async fn send_text_txn(&self, user: &MatrixUser, room_id: &str, txn_id: &str, body: &str) -> Result<String> {
        let path = ["_matrix", "client", "v3", "rooms", room_id, "send", "m.room.message", txn_id];
        let content = json!({"msgtype": "m.text", "body": body});
        let answer = self.api_ok(Method::PUT, Some(user), &path, &[], Some(&content)).await?;
        Ok(answer["event_id"].as_str().context("no event_id in the send answer")?.to_string())
    }

    /// Every text message in the room `user` can see, oldest first.
    pub async fn messages(&self, user: &MatrixUser, room_id: &str) -> Result<Vec<TextMessage>> {
        Ok(self.room_events(user, room_id).await?.iter().filter_map(text_message).collect())
    }

    /// Every event in the room `user` can see, whole, oldest first (`/messages` backwards from
    /// the end, page by page).
    pub async fn room_events(&self, user: &MatrixUser, room_id: &str) -> Result<Vec<Value>> {
        let path = ["_matrix", "client", "v3", "rooms", room_id, "messages"];
        let mut newest_first = Vec::new();
        let mut from: Option<String> = None;
        loop {
            let mut query = vec![("dir", "b"), ("limit", "100")];
            if let Some(from) = &from {
                query.push(("from", from));
            }
            let page = self.api_ok(Method::GET, Some(user), &path, &query, None).await?;
            let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
            let done = chunk.is_empty();
            newest_first.extend(chunk);
            match page["end"].as_str() {
                Some(end) if !done => from = Some(end.to_string()),
                _ => break,
            }
        }
        newest_first.reverse();
        Ok(newest_first)
    }

    /// `/sync` without waiting (`timeout=0`), from `since` (`None`: an initial sync).
    pub async fn sync(&self, user: &MatrixUser, since: Option<&str>) -> Result<SyncResponse> {
        self.sync_wait(user, since, Duration::ZERO).await
    }

    /// A long-polling `/sync`: answers when something new arrives or after `wait`.
    pub async fn sync_wait(&self, user: &MatrixUser, since: Option<&str>, wait: Duration) -> Result<SyncResponse> {
        let path = ["_matrix", "client", "v3", "sync"];
        let wait_ms = wait.as_millis().to_string();
        let mut query = vec![("timeout", wait_ms.as_str())];
        if let Some(since) = since {
            query.push(("since", since));
        }
        let (status, body) =
            self.api_with_timeout(Method::GET, Some(user), &path, &query, None, wait + REQUEST_TIMEOUT).await?;
        let body = ensure_ok(&Method::GET, &path, status, body)?;
        let next_batch = body["next_batch"].as_str().context("no next_batch in the sync answer")?.to_string();
        Ok(SyncResponse { next_batch, body })
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = stop_child(&mut child);
        }
    }
}

fn ensure_ok(method: &Method, path: &[&str], status: u16, value: Value) -> Result<Value> {
    if (200..300).contains(&status) {
        return Ok(value);
    }
    bail!(
        "{method} /{}: {status} {} {}",
        path.join("/"),
        value["errcode"].as_str().unwrap_or(""),
        if value.is_null() { String::new() } else { value.to_string() }
    )
}

fn user_from(answer: &Value, username: &str, password: &str) -> Result<MatrixUser> {
    let field = |name: &str| -> Result<String> {
        Ok(answer[name].as_str().with_context(|| format!("no {name} in {answer}"))?.to_string())
    };
    Ok(MatrixUser {
        user_id: field("user_id")?,
        access_token: field("access_token")?,
        device_id: field("device_id")?,
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// `hex(HMAC-SHA1(shared_secret, nonce \0 user \0 password \0 "admin"|"notadmin"))`, as
/// Synapse's admin registration API wants it.
fn registration_mac(shared_secret: &str, nonce: &str, username: &str, password: &str, admin: bool) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(shared_secret.as_bytes()).expect("HMAC takes a key of any length");
    for (i, part) in [nonce, username, password, if admin { "admin" } else { "notadmin" }].iter().enumerate() {
        if i > 0 {
            mac.update(b"\0");
        }
        mac.update(part.as_bytes());
    }
    hex(&mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(len: usize) -> String {
    let bytes: Vec<u8> = (0..len).map(|_| rand::rng().random()).collect();
    hex(&bytes)
}

/// The venv's interpreter: `SWITCHBOARD_SYNAPSE_VENV`, or `<target>/real-servers/synapse-venv`.
fn venv_python() -> Result<PathBuf> {
    let venv = match std::env::var_os("SWITCHBOARD_SYNAPSE_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => crate::harness::target_dir()?.join("real-servers").join("synapse-venv"),
    };
    let python = venv.join("bin").join("python");
    if !python.exists() {
        bail!(
            "no Synapse venv at {} ({} is missing): run `cargo xtask real-servers synapse` \
             (`cargo xtask test` does), or point SWITCHBOARD_SYNAPSE_VENV at one",
            venv.display(),
            python.display()
        );
    }
    Ok(python)
}

/// A port that was free a moment ago: bind 127.0.0.1:0, read it, let it go.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// A fresh ed25519 signing key in Synapse's file format (`ed25519 <key id> <unpadded base64
/// seed>`), so no `--generate-keys` run (a second interpreter start, ~1 s) is needed.
fn write_signing_key(path: &Path) -> Result<()> {
    let seed: [u8; 32] = rand::rng().random();
    let line = format!("ed25519 a_test {}\n", base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed));
    std::fs::write(path, line).with_context(|| format!("cannot write {}", path.display()))
}

fn spawn(python: &Path, dir: &Path) -> Result<Child> {
    let log = File::create(dir.join("synapse.log")).context("cannot create the Synapse log")?;
    let stderr = log.try_clone()?;
    Command::new(python)
        .args(["-m", "synapse.app.homeserver", "--config-path"])
        .arg(dir.join("homeserver.yaml"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {}", python.display()))
}

enum StartError {
    /// Another process took the port first: try another one.
    PortTaken(anyhow::Error),
    Failed(anyhow::Error),
}

async fn wait_healthy(http: &reqwest::Client, port: u16, child: &mut Child, log: &Path) -> Result<(), StartError> {
    let url = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + START_PATIENCE;
    loop {
        let answer = http.get(&url).timeout(Duration::from_secs(2)).send().await;
        if let Ok(response) = answer {
            if response.status().is_success() && response.text().await.is_ok_and(|text| text == "OK") {
                return Ok(());
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                let tail = log_tail(log, 40);
                let error = anyhow!("Synapse exited during start-up ({status}); end of its log:\n{tail}");
                return Err(if tail.contains("Address already in use") {
                    StartError::PortTaken(error)
                } else {
                    StartError::Failed(error)
                });
            }
            Ok(None) => {}
            Err(error) => return Err(StartError::Failed(error.into())),
        }
        if Instant::now() >= deadline {
            return Err(StartError::Failed(anyhow!(
                "Synapse did not answer /health on port {port} within {START_PATIENCE:?}; end of its log:\n{}",
                log_tail(log, 40)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid, which has not been reaped (we hold the Child and
    // have not seen it exit); no memory is involved.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Blocking stop (for drop): SIGTERM, wait up to [`STOP_PATIENCE`], then SIGKILL.
fn stop_child(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    signal(child, libc::SIGTERM);
    let deadline = Instant::now() + STOP_PATIENCE;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    Ok(child.wait()?)
}

/// The last `lines` lines of the file at `path` (reads at most its last 64 KiB).
fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else { return format!("({} cannot be read)", path.display()) };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_ok() {
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The homeserver config: loopback only, SQLite, no federation and no outbound connection,
/// every rate limiter of Synapse 1.163 raised far past what a test sends, `/sync` responses
/// not cached (an identical `/sync` would otherwise get a 2-minute-old answer back).
fn homeserver_yaml(dir: &Path, port: u16, shared_secret: &str) -> String {
    let dir = dir.display();
    let unlimited = "{per_second: 100000, burst_count: 100000}";
    format!(
        r#"server_name: "{SERVER_NAME}"
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {dir}/homeserver.db
log_config: {dir}/log.config
media_store_path: {dir}/media_store
signing_key_path: {dir}/signing.key
report_stats: false
registration_shared_secret: "{shared_secret}"
macaroon_secret_key: "{macaroon}"
form_secret: "{form}"
enable_registration: false
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
presence:
  enabled: false
url_preview_enabled: false
enable_metrics: false
caches:
  sync_response_cache_duration: 0
rc_message: {unlimited}
rc_registration: {unlimited}
rc_login:
  address: {unlimited}
  account: {unlimited}
  failed_attempts: {unlimited}
rc_joins:
  local: {unlimited}
  remote: {unlimited}
rc_joins_per_room: {unlimited}
rc_invites:
  per_room: {unlimited}
  per_user: {unlimited}
  per_issuer: {unlimited}
rc_room_creation: {unlimited}
rc_admin_redaction: {unlimited}
rc_media_create: {unlimited}
rc_delayed_event_mgmt: {unlimited}
rc_presence:
  per_user: {unlimited}
rc_profile: {unlimited}
rc_reports: {unlimited}
rc_user_directory: {unlimited}
"#,
        macaroon = random_hex(16),
        form = random_hex(16),
    )
}

/// Python logging: warnings from everything, plus one line per request from `synapse.access`,
/// all to stderr (which goes to `synapse.log`).
const LOG_CONFIG: &str = r#"version: 1
formatters:
  precise:
    format: '%(asctime)s %(name)s %(levelname)s %(request)s %(message)s'
handlers:
  stderr:
    class: logging.StreamHandler
    formatter: precise
    stream: ext://sys.stderr
loggers:
  synapse.access:
    level: INFO
root:
  level: WARNING
  handlers: [stderr]
disable_existing_loggers: false
"#;

/// The gateway config of the Matrix demo and bench: one `matrix` channel instance on the
/// homeserver at `homeserver_url` as `user_id` (token in `MATRIX_ACCESS_TOKEN`), bound to agent
/// `main` whose table body is `agent`; every room and DM open, invites accepted.
pub fn matrix_seed_config(
    homeserver_url: &str,
    user_id: &str,
    plugin_dir: &Path,
    chatmode: &str,
    agent: &str,
) -> String {
    format!(
        r#"[gateway]
state_dir = "state"
admin_listen = "127.0.0.1:0"
max_concurrent_turns = 64

[plugins]
dir = "{plugins}"

[channels.matrix]
plugin = "matrix"
thread_sessions = true
homeserver_url = "{homeserver_url}"
user_id = "{user_id}"
access_token_env = "MATRIX_ACCESS_TOKEN"
chatmode = "{chatmode}"
onchar_prefixes = [">", "!"]
dm_policy = "open"
group_policy = "open"
allow_from = []
rooms = []
auto_join = true

[agents.main]
{agent}

[[bindings]]
channel = "matrix"
agent = "main"
"#,
        plugins = plugin_dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha1_matches_the_published_vector() {
        // The HMAC-SHA1 example found in most references (key "key").
        let mut mac = Hmac::<Sha1>::new_from_slice(b"key").unwrap();
        mac.update(b"The quick brown fox jumps over the lazy dog");
        assert_eq!(hex(&mac.finalize().into_bytes()), "de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9");
    }

    #[test]
    fn the_registration_mac_joins_its_parts_with_nul_bytes() {
        let mut mac = Hmac::<Sha1>::new_from_slice(b"secret").unwrap();
        mac.update(b"nonce\0bob\0pw\0notadmin");
        assert_eq!(registration_mac("secret", "nonce", "bob", "pw", false), hex(&mac.finalize().into_bytes()));
        assert_ne!(
            registration_mac("secret", "nonce", "bob", "pw", true),
            registration_mac("secret", "nonce", "bob", "pw", false)
        );
    }

    #[test]
    fn a_signing_key_line_has_an_unpadded_32_byte_seed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        write_signing_key(&path).unwrap();
        let line = std::fs::read_to_string(&path).unwrap();
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts[..2], ["ed25519", "a_test"]);
        assert_eq!(parts[2].len(), 43, "32 bytes, unpadded base64");
        assert_eq!(base64::engine::general_purpose::STANDARD_NO_PAD.decode(parts[2]).unwrap().len(), 32);
    }
}
