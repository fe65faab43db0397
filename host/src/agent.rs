//! Agents: what answers a turn. `echo` replies `echo: <text>`; `command` runs a configured
//! program with a JSON request on stdin and replies with its stdout.

use std::{process::Stdio, time::Duration};

use serde::Serialize;
use tokio::{io::AsyncWriteExt, process::Command};

use crate::config::AgentKind;

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
}

#[derive(Debug, Clone, Serialize)]
pub struct Sender {
    pub id: String,
    pub name: String,
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub id: String,
    pub kind: AgentKind,
}

impl Agent {
    /// The reply text, or `None` when the agent chose not to answer.
    pub async fn respond(&self, request: &AgentRequest) -> Result<Option<String>, AgentError> {
        match &self.kind {
            AgentKind::Echo => Ok(Some(format!("echo: {}", request.text))),
            AgentKind::Command { argv, timeout } => run_command(argv, *timeout, request).await,
        }
    }
}

async fn run_command(argv: &[String], timeout: Duration, request: &AgentRequest) -> Result<Option<String>, AgentError> {
    let program = argv[0].clone();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| AgentError::Spawn { program: program.clone(), source })?;
    let input = serde_json::to_vec(request).unwrap_or_default();
    let mut stdin = child.stdin.take();
    let exchange = async {
        if let Some(stdin) = stdin.as_mut() {
            // A program that does not read its input is allowed; a broken pipe is not an error.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
        drop(stdin);
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| AgentError::Timeout { program: program.clone(), timeout })?
        .map_err(|source| AgentError::Io { program: program.clone(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim().chars().take(500).collect();
        return Err(AgentError::Failed { program, status: output.status, stderr });
    }
    let reply = String::from_utf8_lossy(&output.stdout).trim_end().to_string();
    Ok((!reply.trim().is_empty()).then_some(reply))
}
