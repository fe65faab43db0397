//! Agents: what answers a turn.
//! - `echo` replies `echo: <text>`;
//! - `command` runs a configured program with the JSON request on stdin, replies with stdout;
//! - `openai` calls an OpenAI-compatible chat completions API (streaming or not) with the
//!   session's transcript as history;
//! - `http` POSTs the JSON request to a webhook and replies with the response's `text`.

use std::{process::Stdio, time::Duration};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::Command,
};

use crate::config::{AgentConfig, AgentKind, OpenAiAgent};

/// One turn's input.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRequest {
    pub session_key: String,
    pub agent_id: String,
    pub channel: String,
    pub conversation_id: String,
    pub thread_root_id: String,
    pub message_id: String,
    pub sender: Sender,
    pub text: String,
    /// Earlier turns of this session, oldest first (`role` is `user` or `assistant`).
    pub history: Vec<HistoryTurn>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sender {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryTurn {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("{program} did not answer within {timeout:?}")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} exited with {status}: {stderr}")]
    Failed { program: String, status: std::process::ExitStatus, stderr: String },
    #[error("{program}: {source}")]
    Io { program: String, source: std::io::Error },
    #[error("the environment variable {0} (the API key) is not set")]
    MissingKey(String),
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url} answered {status}: {message}")]
    Status { url: String, status: u16, message: String },
    #[error("{url} gave an answer that cannot be read: {reason}")]
    BadAnswer { url: String, reason: String },
    #[error("{source_name} answered more than max_output_bytes ({limit} bytes); the rest was not read")]
    TooLong { source_name: String, limit: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub id: String,
    pub config: AgentConfig,
}

impl Agent {
    /// Whether the agent is shown the session's transcript (the echo agent is not: reading it
    /// would cost a store read per message for nothing).
    pub fn reads_history(&self) -> bool {
        self.config.history_limit > 0 && !matches!(self.config.kind, AgentKind::Echo)
    }

    /// The reply text, or `None` when the agent chose not to answer.
    pub async fn respond(&self, http: &reqwest::Client, request: &AgentRequest) -> Result<Option<String>, AgentError> {
        let limit = self.config.max_output_bytes;
        match &self.config.kind {
            AgentKind::Echo => Ok(Some(format!("echo: {}", request.text))),
            AgentKind::Command { argv, timeout, env } => run_command(argv, *timeout, env, limit, request).await,
            AgentKind::OpenAi(model) => chat_completion(http, model, limit, request).await,
            AgentKind::Http { url, timeout, token_env } => {
                webhook(http, url, *timeout, token_env.as_deref(), limit, request).await
            }
        }
    }
}

async fn run_command(
    argv: &[String],
    timeout: Duration,
    env: &[String],
    limit: usize,
    request: &AgentRequest,
) -> Result<Option<String>, AgentError> {
    let program = argv[0].clone();
    // A cleared environment: the gateway's holds the bot token and the model keys.
    let allowed = env.iter().filter_map(|name| std::env::var_os(name).map(|value| (name, value)));
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(allowed)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| AgentError::Spawn { program: program.clone(), source })?;
    let input = serde_json::to_vec(request).unwrap_or_default();
    let mut stdin = child.stdin.take();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let exchange = async {
        if let Some(stdin) = stdin.as_mut() {
            // A program that does not read its input is allowed; a broken pipe is not an error.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
        drop(stdin);
        // Read at most one byte past the limit: enough to tell it was passed.
        let mut out = Vec::new();
        let mut err = Vec::new();
        let reading = async {
            if let Some(stdout) = stdout {
                stdout.take(limit as u64 + 1).read_to_end(&mut out).await?;
            }
            std::io::Result::Ok(())
        };
        let reading_err = async {
            if let Some(mut stderr) = stderr {
                // The first 64 KiB are kept for the error message; the rest is read and let go,
                // so a chatty program never blocks on a full pipe.
                (&mut stderr).take(64 * 1024).read_to_end(&mut err).await?;
                tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await?;
            }
            std::io::Result::Ok(())
        };
        let (read, read_err) = tokio::join!(reading, reading_err);
        read?;
        read_err?;
        if out.len() > limit {
            return Ok(Err(AgentError::TooLong { source_name: program.clone(), limit }));
        }
        let status = child.wait().await?;
        std::io::Result::Ok(Ok(std::process::Output { status, stdout: out, stderr: err }))
    };
    let output = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| AgentError::Timeout { program: program.clone(), timeout })?
        .map_err(|source| AgentError::Io { program: program.clone(), source })??;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim().chars().take(500).collect();
        return Err(AgentError::Failed { program, status: output.status, stderr });
    }
    let reply = String::from_utf8_lossy(&output.stdout).trim_end().to_string();
    Ok((!reply.trim().is_empty()).then_some(reply))
}

fn secret(name: &str) -> Result<String, AgentError> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty()).ok_or_else(|| AgentError::MissingKey(name.to_string()))
}

/// The chat completions request body for this turn.
pub fn completion_body(model: &OpenAiAgent, request: &AgentRequest) -> Value {
    let mut messages = Vec::with_capacity(request.history.len() + 2);
    if let Some(prompt) = &model.system_prompt {
        messages.push(json!({"role": "system", "content": prompt}));
    }
    for turn in &request.history {
        messages.push(json!({"role": turn.role, "content": turn.content}));
    }
    messages.push(json!({"role": "user", "content": request.text}));
    let mut body = json!({"model": model.model, "messages": messages, "stream": model.stream});
    if let Some(temperature) = model.temperature {
        body["temperature"] = json!(temperature);
    }
    if let Some(max_tokens) = model.max_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    body
}

async fn chat_completion(
    http: &reqwest::Client,
    model: &OpenAiAgent,
    limit: usize,
    request: &AgentRequest,
) -> Result<Option<String>, AgentError> {
    let url = format!("{}/chat/completions", model.base_url);
    let mut call = http.post(&url).timeout(model.timeout).json(&completion_body(model, request));
    if let Some(name) = &model.api_key_env {
        call = call.bearer_auth(secret(name)?);
    }
    let failed = |reason: String| AgentError::Request { url: url.clone(), reason };
    // reqwest's own error text names the URL only; it never carries the request's headers.
    let mut response = call.send().await.map_err(|e| failed(without_url(&e)))?;
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return Err(AgentError::Status { url, status, message: error_message(&body) });
    }
    let is_stream = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = if is_stream {
        let mut reader = SseReader::default();
        let deadline = tokio::time::Instant::now() + model.timeout;
        loop {
            let chunk = tokio::time::timeout_at(deadline, response.chunk())
                .await
                .map_err(|_| failed(format!("the stream did not finish within {:?}", model.timeout)))?
                .map_err(|e| failed(without_url(&e)))?;
            let Some(chunk) = chunk else { break };
            if reader.feed(&chunk).map_err(|reason| AgentError::BadAnswer { url: url.clone(), reason })? {
                break;
            }
            if reader.text.len() + reader.pending.len() > limit {
                return Err(AgentError::TooLong { source_name: url, limit });
            }
        }
        if !reader.finished {
            return Err(failed("the stream ended before [DONE]".into()));
        }
        reader.text
    } else {
        let body = read_capped(&mut response, &url, limit).await?;
        let body: Value = serde_json::from_slice(&body)
            .map_err(|e| AgentError::BadAnswer { url: url.clone(), reason: e.to_string() })?;
        match body["choices"][0]["message"]["content"].as_str() {
            Some(content) => content.to_string(),
            None => {
                return Err(AgentError::BadAnswer { url, reason: "no choices[0].message.content".into() });
            }
        }
    };
    let text = text.trim().to_string();
    Ok((!text.is_empty()).then_some(text))
}

/// A response body of at most `limit` bytes (no more is read).
async fn read_capped(response: &mut reqwest::Response, url: &str, limit: usize) -> Result<Vec<u8>, AgentError> {
    let mut body = Vec::new();
    while let Some(chunk) =
        response.chunk().await.map_err(|e| AgentError::Request { url: url.to_string(), reason: without_url(&e) })?
    {
        if body.len() + chunk.len() > limit {
            return Err(AgentError::TooLong { source_name: url.to_string(), limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Server-sent events of a streamed chat completion: `data: {json}` lines, ended by
/// `data: [DONE]`; the reply is the concatenation of `choices[0].delta.content`.
#[derive(Default)]
pub struct SseReader {
    pending: Vec<u8>,
    pub text: String,
    pub finished: bool,
}

impl SseReader {
    /// Take a chunk; true once the stream is done.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<bool, String> {
        self.pending.extend_from_slice(chunk);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim_start();
            if data == "[DONE]" {
                self.finished = true;
                return Ok(true);
            }
            let event: Value = serde_json::from_str(data).map_err(|e| format!("a stream event is not JSON: {e}"))?;
            if let Some(error) = event.get("error") {
                return Err(format!("the stream reported an error: {}", error_text(error)));
            }
            if let Some(piece) = event["choices"][0]["delta"]["content"].as_str() {
                self.text.push_str(piece);
            }
        }
        Ok(false)
    }
}

async fn webhook(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
    token_env: Option<&str>,
    limit: usize,
    request: &AgentRequest,
) -> Result<Option<String>, AgentError> {
    let mut call = http.post(url).timeout(timeout).json(request);
    if let Some(name) = token_env {
        call = call.bearer_auth(secret(name)?);
    }
    let mut response =
        call.send().await.map_err(|e| AgentError::Request { url: url.to_string(), reason: without_url(&e) })?;
    let status = response.status().as_u16();
    if status == 204 {
        return Ok(None);
    }
    let body = read_capped(&mut response, url, limit).await?;
    let body = String::from_utf8_lossy(&body).into_owned();
    if !(200..300).contains(&status) {
        return Err(AgentError::Status { url: url.to_string(), status, message: error_message(&body) });
    }
    let answer: Value = serde_json::from_str(&body)
        .map_err(|e| AgentError::BadAnswer { url: url.to_string(), reason: format!("not JSON: {e}") })?;
    match &answer["text"] {
        Value::String(text) if !text.trim().is_empty() => Ok(Some(text.clone())),
        Value::String(_) | Value::Null => Ok(None),
        other => {
            Err(AgentError::BadAnswer { url: url.to_string(), reason: format!("`text` is {other}, not a string") })
        }
    }
}

fn without_url(error: &reqwest::Error) -> String {
    let error = error.to_string();
    // "error sending request for url (...)": the URL is already in our own message.
    match error.split_once(" for url (") {
        Some((head, _)) => head.to_string(),
        None => error,
    }
}

/// The readable part of an error body (OpenAI's `{"error": {"message": ...}}` or text).
fn error_message(body: &str) -> String {
    let message = match serde_json::from_str::<Value>(body) {
        Ok(json) if json.get("error").is_some() => error_text(&json["error"]),
        _ => body.trim().to_string(),
    };
    message.chars().take(300).collect()
}

fn error_text(error: &Value) -> String {
    error["message"].as_str().map(str::to_string).unwrap_or_else(|| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_split_anywhere_reads_the_same() {
        let stream = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
                      data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
                      : keep-alive\n\n\
                      data: {\"choices\":[{\"delta\":{\"content\":\"lo ✓\"}}]}\r\n\r\n\
                      data: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut reader = SseReader::default();
            let bytes = stream.as_bytes();
            let first = reader.feed(&bytes[..split]).unwrap();
            let done = first || reader.feed(&bytes[split..]).unwrap();
            assert!(done && reader.finished);
            assert_eq!(reader.text, "Hello ✓");
        }
    }

    #[test]
    fn history_goes_between_the_system_prompt_and_the_new_message() {
        let model = OpenAiAgent {
            base_url: "http://x/v1".into(),
            model: "m".into(),
            api_key_env: None,
            system_prompt: Some("be brief".into()),
            temperature: Some(0.2),
            max_tokens: None,
            timeout: Duration::from_secs(1),
            stream: false,
        };
        let request = AgentRequest {
            session_key: "k".into(),
            agent_id: "main".into(),
            channel: "mm".into(),
            conversation_id: "c".into(),
            thread_root_id: String::new(),
            message_id: "p".into(),
            sender: Sender { id: "u".into(), name: "alice".into() },
            text: "and now?".into(),
            history: vec![
                HistoryTurn { role: "user".into(), content: "hi".into() },
                HistoryTurn { role: "assistant".into(), content: "hello".into() },
            ],
        };
        let body = completion_body(&model, &request);
        let roles: Vec<&str> =
            body["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(body["messages"][3]["content"], "and now?");
        assert_eq!(body["temperature"], 0.2);
    }
}
