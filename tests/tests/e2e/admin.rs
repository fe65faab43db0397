//! The admin API locked down: a Unix socket (0600) with every route; over TCP a Host check,
//! no mutating route without the bearer token, and no binding beyond loopback without one.

use std::{os::unix::fs::PermissionsExt, path::Path};

use anyhow::{Context, Result};
use switchboard_tests::assert_eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::rig::{Rig, RigOptions};

/// One HTTP/1.1 request over a Unix socket: (status, body).
async fn over_socket(socket: &Path, method: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::UnixStream::connect(socket).await.context("connect to the admin socket")?;
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

async fn over_tcp(
    addr: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    host: Option<&str>,
    token: Option<&str>,
) -> Result<u16> {
    let mut request = reqwest::Client::new().request(method, format!("http://{addr}{path}"));
    if let Some(host) = host {
        request = request.header("Host", host);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Ok(request.send().await?.status().as_u16())
}

#[tokio::test]
async fn the_admin_socket_is_private_and_tcp_needs_a_token_for_changes() -> Result<()> {
    let rig = Rig::with(RigOptions::default()).await?;
    let gateway = rig.start(&[]).await?;
    let socket = rig.scratch.path().join("state").join("admin.sock");
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the gateway's user may connect");
    let (status, body) = over_socket(&socket, "GET", "/status").await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = over_socket(&socket, "POST", "/reload").await?;
    assert_eq!(status, 200, "the socket may reload: {body}");

    let tcp = gateway.latest_admin();
    use reqwest::Method;
    assert_eq!(over_tcp(tcp, Method::GET, "/status", None, None).await?, 200, "reads over loopback TCP");
    assert_eq!(over_tcp(tcp, Method::POST, "/reload", None, None).await?, 403, "no change without a token");
    assert_eq!(over_tcp(tcp, Method::POST, "/restart", None, None).await?, 403);
    assert_eq!(over_tcp(tcp, Method::GET, "/reload", None, None).await?, 405, "mutating routes are POST-only");
    assert_eq!(
        over_tcp(tcp, Method::GET, "/status", Some("rebound.attacker.example"), None).await?,
        403,
        "a DNS-rebinding page's Host is refused"
    );
    assert_eq!(
        gateway.count(&["reload requested"]) + gateway.count(&["restart requested"]),
        1,
        "only the socket's reload"
    );
    Ok(())
}

#[tokio::test]
async fn with_a_token_tcp_needs_it_for_everything_but_the_probes() -> Result<()> {
    let rig =
        Rig::with(RigOptions { gateway_keys: "admin_token_env = \"ADMIN_TOKEN\"", ..RigOptions::default() }).await?;
    let token = "admin-secret-4711";
    let gateway = rig.start(&[("ADMIN_TOKEN", token)]).await?;
    let tcp = gateway.latest_admin();
    use reqwest::Method;
    assert_eq!(over_tcp(tcp, Method::GET, "/livez", None, None).await?, 200);
    assert_eq!(over_tcp(tcp, Method::GET, "/status", None, None).await?, 401);
    assert_eq!(over_tcp(tcp, Method::GET, "/status", None, Some("wrong")).await?, 401);
    assert_eq!(over_tcp(tcp, Method::GET, "/status", None, Some(token)).await?, 200);
    assert_eq!(over_tcp(tcp, Method::POST, "/reload", None, None).await?, 401);
    assert_eq!(over_tcp(tcp, Method::POST, "/reload", None, Some(token)).await?, 200);
    assert_eventually!(gateway.count(&["reload requested"]) == 1, "one reload");
    assert!(!gateway.log_text().contains(token), "the admin token is never logged");
    Ok(())
}

#[tokio::test]
async fn listening_beyond_loopback_without_a_token_is_refused_at_start() -> Result<()> {
    let rig = Rig::with(RigOptions::default()).await?;
    let config = std::fs::read_to_string(&rig.config_path)?
        .replace("admin_listen = \"127.0.0.1:0\"", "admin_listen = \"0.0.0.0:0\"");
    std::fs::write(&rig.config_path, config)?;
    let output =
        std::process::Command::new(&rig.artifacts.switchboard).arg("check-config").arg(&rig.config_path).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("gateway.admin_listen") && stdout.contains("admin_token_env"), "{stdout}");
    let run = std::process::Command::new(&rig.artifacts.switchboard)
        .arg("run")
        .arg("--config")
        .arg(&rig.config_path)
        .current_dir(rig.scratch.path())
        .env("MM_BOT_TOKEN", &rig.world.bot.token)
        .output()?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "the gateway started listening on 0.0.0.0 without a token");
    assert!(stderr.contains("gateway.admin_listen"), "{stderr}");
    Ok(())
}
