//! The operator's commands against a running gateway: `status`, `reload`, `restart`,
//! `sessions`, `plugins` and `dead-letters`. Each reads the gateway's config file to find its
//! admin API — the Unix socket in the state directory (`gateway.admin_socket`), or, when that
//! is `"off"`, the TCP listener `gateway.admin_listen` with the bearer token of
//! `gateway.admin_token_env` — sends one request, and prints a table, or the gateway's JSON
//! with `--json`. The exit code says what happened ([`EXIT_CODES`]).

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Subcommand};
use serde_json::Value;
use switchboard::config::Config;

/// The exit codes of the commands, for `--help` (README: "Operating a running gateway").
pub const EXIT_CODES: &str = "Exit codes: 0 done; 1 the gateway refused or failed the action, or has nothing \
                              under that id; 2 a usage or config error; 3 no gateway is running for the config.";

/// How long a request may take: a reload probes every changed plugin file in a child process.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The answers to a request are small; a bigger one is not from the gateway.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

/// Which gateway, and how to print.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// The running gateway's config file (where its admin socket or listener is).
    #[arg(long, short, default_value = "switchboard.toml", global = true)]
    config: PathBuf,
    /// Print the gateway's answer as JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Show the running gateway: adapter generations, connections, problems, store counts.
    #[command(after_help = EXIT_CODES)]
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Reload the running gateway's config and plugins (as SIGUSR1 does) and show the outcome;
    /// exit code 1 when the config was rejected or a channel instance failed to reload.
    #[command(after_help = EXIT_CODES)]
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Restart the running gateway in place (as SIGUSR2 does): a graceful stop, then the binary
    /// at the start-up path once it accepted the config.
    #[command(after_help = EXIT_CODES)]
    Restart {
        #[command(flatten)]
        target: Target,
    },
    /// List sessions, the most recently active first.
    #[command(after_help = EXIT_CODES)]
    Sessions {
        #[command(flatten)]
        target: Target,
        /// Only the sessions of this channel instance (`[channels.<id>]`).
        #[arg(long)]
        channel: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
    },
    /// List the plugin files with their SHA-256, the adapter generations loaded from each, and
    /// how much of the generation budget is used.
    #[command(after_help = EXIT_CODES)]
    Plugins {
        #[command(flatten)]
        target: Target,
    },
    /// Events an adapter failed on twice: list, show, replay (once) or drop them.
    #[command(after_help = EXIT_CODES, subcommand_required = true)]
    DeadLetters {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand, Debug, Clone, Copy)]
pub enum DeadLetterAction {
    /// List every dead letter, oldest first.
    #[command(after_help = EXIT_CODES)]
    List,
    /// Show one dead letter with its whole payload.
    #[command(after_help = EXIT_CODES)]
    Show { id: i64 },
    /// Hand the event to the running adapter generation of its channel instance again, once:
    /// a dead letter replayed before is refused (exit code 1).
    #[command(after_help = EXIT_CODES)]
    Replay { id: i64 },
    /// Delete a dead letter.
    #[command(after_help = EXIT_CODES)]
    Drop { id: i64 },
}

/// Why a command did not do what it was asked, by exit code.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The gateway refused or failed the action, or has nothing under that id.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
    #[error("no gateway is running for {config}: cannot connect to {admin}: {reason}")]
    NotRunning { config: String, admin: String, reason: String },
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            Failure::Usage(_) => 2,
            Failure::NotRunning { .. } => 3,
        }
    }
}

/// Run one of the commands; what it printed went to stdout, a failure to stderr.
pub fn run(command: AdminCommand) -> ExitCode {
    match execute(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

fn execute(command: AdminCommand) -> Result<(), Failure> {
    match command {
        AdminCommand::Status { target } => {
            let status = Admin::of(&target)?.expect_ok("GET", "/status")?;
            target.print(&status, render_status)
        }
        AdminCommand::Reload { target } => {
            let (code, outcome) = Admin::of(&target)?.request("POST", "/reload")?;
            let failed = outcome["failed"].as_array().is_some_and(|failed| !failed.is_empty());
            match code {
                200 => target.print(&outcome, render_reload)?,
                422 => target.print(&outcome, render_reload)?,
                _ => return Err(refusal(code, &outcome)),
            }
            if code != 200 || failed {
                return Err(Failure::Refused(match code {
                    200 => "the reload left a channel instance on its previous generation".into(),
                    _ => "the gateway rejected the config; it keeps running the previous one".into(),
                }));
            }
            Ok(())
        }
        AdminCommand::Restart { target } => {
            let answer = Admin::of(&target)?.expect_ok("POST", "/restart")?;
            target.print(&answer, |_| {
                "restart requested: the gateway stops gracefully and starts the binary again\n".into()
            })
        }
        AdminCommand::Sessions { target, channel, limit } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(channel.map(|channel| ("channel", channel)));
            let query = serde_urlencoded::to_string(&query).unwrap_or_default();
            let path = format!("/sessions?{query}");
            let sessions = Admin::of(&target)?.expect_ok("GET", &path)?;
            target.print(&sessions, render_sessions)
        }
        AdminCommand::Plugins { target } => {
            let plugins = Admin::of(&target)?.expect_ok("GET", "/plugins")?;
            target.print(&plugins, render_plugins)
        }
        AdminCommand::DeadLetters { target, action } => {
            let admin = Admin::of(&target)?;
            match action {
                DeadLetterAction::List => target.print(&admin.expect_ok("GET", "/dead-letters")?, render_dead_letters),
                DeadLetterAction::Show { id } => {
                    target.print(&admin.expect_ok("GET", &format!("/dead-letters/{id}"))?, render_dead_letter)
                }
                DeadLetterAction::Replay { id } => {
                    let answer = admin.expect_ok("POST", &format!("/dead-letters/{id}/replay"))?;
                    target.print(&answer, |a| {
                        format!(
                            "dead letter {id} handed to channel instance {} (generation {}) again\n",
                            text(&a["channel"]),
                            a["generation"]
                        )
                    })
                }
                DeadLetterAction::Drop { id } => {
                    let answer = admin.expect_ok("DELETE", &format!("/dead-letters/{id}"))?;
                    target.print(&answer, |_| format!("dead letter {id} dropped\n"))
                }
            }
        }
    }
}

impl Target {
    /// Print `answer` as JSON or as `render` makes it for people.
    fn print(&self, answer: &Value, render: impl FnOnce(&Value) -> String) -> Result<(), Failure> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(answer).unwrap_or_default());
        } else {
            print!("{}", render(answer));
        }
        Ok(())
    }
}

/// Where the admin API of the gateway of a config file is.
enum Endpoint {
    Socket(PathBuf),
    Tcp { addr: SocketAddr, token: Option<String> },
}

struct Admin {
    config: PathBuf,
    endpoint: Endpoint,
}

impl Admin {
    fn of(target: &Target) -> Result<Admin, Failure> {
        let config_path = &target.config;
        // As far as it reads: a problem elsewhere in the file must not hide the gateway.
        let (config, problems) = Config::load_best_effort(config_path);
        let Some(config) = config else {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(Failure::Usage(format!("{}: {}", config_path.display(), problems.join("; "))));
        };
        let gateway = &config.gateway;
        let endpoint = match (&gateway.admin_socket, gateway.admin_listen) {
            (Some(socket), _) => Endpoint::Socket(socket.clone()),
            (None, Some(addr)) if addr.port() != 0 => {
                let token = match &gateway.admin_token_env {
                    Some(name) => Some(std::env::var(name).ok().filter(|t| !t.trim().is_empty()).ok_or_else(|| {
                        Failure::Usage(format!(
                            "{}: the admin listener needs the bearer token of gateway.admin_token_env, and {name} is \
                             not set",
                            config_path.display()
                        ))
                    })?),
                    None => None,
                };
                Endpoint::Tcp { addr, token }
            }
            _ => {
                return Err(Failure::Usage(format!(
                    "{}: gateway.admin_socket is \"off\" and gateway.admin_listen has no fixed port: there is no admin \
                     API to connect to",
                    config_path.display()
                )))
            }
        };
        Ok(Admin { config: config_path.clone(), endpoint })
    }

    /// `method path`, expecting a 2xx answer.
    fn expect_ok(&self, method: &str, path: &str) -> Result<Value, Failure> {
        match self.request(method, path)? {
            (200..=299, answer) => Ok(answer),
            (code, answer) => Err(refusal(code, &answer)),
        }
    }

    /// `method path`: the status code and the answer (JSON, or a text answer as a string).
    fn request(&self, method: &str, path: &str) -> Result<(u16, Value), Failure> {
        let not_running = |admin: String, reason: std::io::Error| Failure::NotRunning {
            config: self.config.display().to_string(),
            admin,
            reason: reason.to_string(),
        };
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        let raw = match &self.endpoint {
            Endpoint::Socket(path) => {
                let stream = std::os::unix::net::UnixStream::connect(path)
                    .map_err(|e| not_running(path.display().to_string(), e))?;
                stream.set_read_timeout(Some(REQUEST_TIMEOUT)).ok();
                stream.set_write_timeout(Some(REQUEST_TIMEOUT)).ok();
                exchange(stream, request)
            }
            Endpoint::Tcp { addr, token } => {
                let stream = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(5))
                    .map_err(|e| not_running(addr.to_string(), e))?;
                stream.set_read_timeout(Some(REQUEST_TIMEOUT)).ok();
                stream.set_write_timeout(Some(REQUEST_TIMEOUT)).ok();
                if let Some(token) = token {
                    request.push_str(&format!("Authorization: Bearer {token}\r\n"));
                }
                exchange(stream, request)
            }
        };
        let raw = raw.map_err(|e| Failure::Refused(format!("the gateway did not answer {method} {path}: {e}")))?;
        parse_response(&raw).map_err(|e| Failure::Refused(format!("cannot read the gateway's answer: {e}")))
    }
}

/// Send `request` (its headers, no body) and read the whole answer (the gateway closes the
/// connection after it: `Connection: close`).
fn exchange(mut stream: impl Read + Write, mut request: String) -> std::io::Result<Vec<u8>> {
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw)?;
    Ok(raw)
}

/// An HTTP/1.1 answer: its status code and its body, as JSON where it is.
fn parse_response(raw: &[u8]) -> Result<(u16, Value), String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of the headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let code: u16 = lines
        .next()
        .and_then(|status| status.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or("no status line")?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = &raw[split + 4..];
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    let text = String::from_utf8_lossy(&body);
    let value = serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.trim().to_string()));
    Ok((code, value))
}

/// The body of a `Transfer-Encoding: chunked` answer.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").ok_or("a chunk without its size line")?;
        let size_text = std::str::from_utf8(&body[..line_end]).map_err(|_| "a chunk size that is not text")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("a chunk size that is not hexadecimal: {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or("a chunk cut short")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).ok_or("a chunk without its line end")?;
    }
}

/// The failure an answer that is not a 2xx stands for: the gateway's own words.
fn refusal(code: u16, answer: &Value) -> Failure {
    let message = match answer {
        Value::String(text) => text.clone(),
        answer => answer["error"].as_str().map_or_else(|| answer.to_string(), str::to_string),
    };
    Failure::Refused(format!("the gateway answered {code}: {message}"))
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// How long ago `ms` (since the epoch) was, roughly.
fn age(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else { return "-".into() };
    let seconds = (switchboard::session::now_ms() - ms).max(0) / 1000;
    match seconds {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// Cut `text` to `width` characters for a table cell (the JSON has it whole).
fn cell(text: &str, width: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= width {
        one_line
    } else {
        let cut: String = one_line.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// Rows under a header, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(value, width)| format!("{value:<width$}", width = *width)).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn items(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn render_status(status: &Value) -> String {
    let rows: Vec<Vec<String>> = items(&status["generations"])
        .iter()
        .map(|g| {
            vec![
                text(&g["channel"]),
                text(&g["generation"]),
                text(&g["state"]),
                format!("{} {}", text(&g["adapter_name"]), text(&g["adapter_version"])),
                text(&g["build"]),
                text(&g["abi_minor"]),
                text(&g["events_handled"]),
                text(&g["mapped"]),
            ]
        })
        .collect();
    let mut out =
        table(&["CHANNEL", "GENERATION", "STATE", "ADAPTER", "BUILD", "ABI MINOR", "EVENTS", "MAPPED"], &rows);
    out.push('\n');
    if let Some(connections) = status["connections"].as_object() {
        for (channel, c) in connections {
            out.push_str(&format!(
                "connections  {channel}: {} WebSocket(s) up since {}\n",
                text(&c["websockets_up"]),
                age(&c["since_ms"])
            ));
        }
    }
    match status["problems"].as_object() {
        Some(problems) if !problems.is_empty() => {
            for (channel, problem) in problems {
                out.push_str(&format!("problem      {channel}: {}\n", text(problem)));
            }
        }
        _ => out.push_str("problems     none\n"),
    }
    out.push_str(&format!(
        "libraries    {} opened, {} generation(s) abandoned\n",
        text(&status["libraries_opened"]),
        text(&status["generations_abandoned"])
    ));
    let store = &status["store"];
    out.push_str(&format!(
        "store        sessions {}, turns {}, inbound pending {}, replies queued {}, delivered {}, failed {}, dead \
         letters {}\n",
        text(&store["sessions"]),
        text(&store["turns"]),
        text(&store["inbound_pending"]),
        text(&store["outbound_queued"]),
        text(&store["outbound_delivered"]),
        text(&store["outbound_failed"]),
        text(&store["dead_letters"]),
    ));
    out
}

fn render_reload(outcome: &Value) -> String {
    if outcome["outcome"] == "rejected" {
        let mut out = String::from("reload rejected; the gateway keeps running the previous config:\n");
        for error in items(&outcome["errors"]) {
            out.push_str(&format!("  {}\n", text(error)));
        }
        return out;
    }
    let names = |key: &str| {
        let names: Vec<String> = items(&outcome[key]).iter().map(text).collect();
        if names.is_empty() {
            "-".to_string()
        } else {
            names.join(", ")
        }
    };
    format!(
        "reload applied\n  changed    {}\n  added      {}\n  removed    {}\n  unchanged  {}\n  failed     {}\n",
        names("changed"),
        names("added"),
        names("removed"),
        names("unchanged"),
        names("failed")
    )
}

fn render_sessions(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(&answer["sessions"])
        .iter()
        .map(|s| vec![text(&s["key"]), text(&s["channel_instance"]), text(&s["agent_id"]), age(&s["last_active_ms"])])
        .collect();
    if rows.is_empty() {
        return "no sessions\n".into();
    }
    table(&["SESSION", "CHANNEL", "AGENT", "LAST ACTIVE"], &rows)
}

fn render_plugins(answer: &Value) -> String {
    let generation_line = |g: &Value| {
        format!(
            "    {}#{}  {}  {} {} ({})  sha256 {}  loaded {}\n",
            text(&g["channel"]),
            text(&g["generation"]),
            text(&g["state"]),
            text(&g["adapter_name"]),
            text(&g["adapter_version"]),
            text(&g["build"]),
            text(&g["sha256"]),
            age(&g["loaded_at_ms"])
        )
    };
    let mut out = format!("plugin directory {}\n", text(&answer["dir"]));
    for file in items(&answer["files"]) {
        out.push_str(&format!(
            "  {}  {} bytes  sha256 {}\n",
            text(&file["file"]),
            text(&file["size"]),
            text(&file["sha256"])
        ));
        for generation in items(&file["generations"]) {
            out.push_str(&generation_line(generation));
        }
    }
    let others = items(&answer["generations_of_other_files"]);
    if !others.is_empty() {
        out.push_str("  generations of files no longer in the directory:\n");
        for generation in others {
            out.push_str(&generation_line(generation));
        }
    }
    let budget = &answer["budget"];
    out.push_str(&format!(
        "generation budget: {} of {} libraries opened, {} left\n",
        text(&budget["libraries_opened"]),
        text(&budget["generation_budget"]),
        text(&budget["left"])
    ));
    out
}

fn render_dead_letters(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(&answer["dead_letters"])
        .iter()
        .map(|d| {
            vec![
                text(&d["id"]),
                text(&d["channel_instance"]),
                text(&d["event_kind"]),
                text(&d["session_key"]),
                age(&d["at_ms"]),
                if d["replayed_at_ms"].is_null() { "no".into() } else { age(&d["replayed_at_ms"]) },
                cell(&text(&d["error"]), 60),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no dead letters\n".into();
    }
    table(&["ID", "CHANNEL", "KIND", "SESSION", "AT", "REPLAYED", "ERROR"], &rows)
}

fn render_dead_letter(d: &Value) -> String {
    let replayed = if d["replayed_at_ms"].is_null() { "no".into() } else { age(&d["replayed_at_ms"]) };
    format!(
        "id            {}\nchannel       {}\ngeneration    {}\nkind          {}\nconversation  {}\nsession       \
         {}\nat            {}\nreplayed      {}\nerror         {}\npayload\n{}\n",
        text(&d["id"]),
        text(&d["channel_instance"]),
        text(&d["generation"]),
        text(&d["event_kind"]),
        text(&d["conversation_id"]),
        text(&d["session_key"]),
        age(&d["at_ms"]),
        replayed,
        text(&d["error"]),
        text(&d["payload"]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_plain_and_chunked() {
        let plain =
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"error\":\"x\"}";
        assert_eq!(parse_response(plain).unwrap(), (404, serde_json::json!({"error": "x"})));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nread\r\n2;x=y\r\ny\n\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, Value::String("ready".into())));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
