//! A self-hosted Mattermost behind TLS with a certificate from an internal CA: the simulator
//! behind a [`TlsFront`] (like nginx), the gateway pointed at `https://localhost:<port>`.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use switchboard_tests::{
    assert_eventually,
    harness::{install_plugin, mattermost_file_name, seed_config, Artifacts, Gateway},
    sim::{demo_world, DemoWorld, Simulator},
    tls::{backend_addr, TlsFront},
};

struct TlsRig {
    sim: Simulator,
    world: DemoWorld,
    front: TlsFront,
    artifacts: Artifacts,
    config_path: PathBuf,
    scratch: tempfile::TempDir,
}

impl TlsRig {
    async fn new() -> Result<Self> {
        let artifacts = Artifacts::discover()?;
        let sim = Simulator::start().await?;
        let world = demo_world(&sim);
        let front = TlsFront::start(backend_addr(&sim.base_url())?).await?;
        let scratch = tempfile::tempdir()?;
        install_plugin(&artifacts.mattermost_plugin(), &scratch.path().join("plugins"), &mattermost_file_name())?;
        front.write_ca(&scratch.path().join("internal-ca.pem"))?;
        let config_path = scratch.path().join("switchboard.toml");
        Ok(Self { sim, world, front, artifacts, config_path, scratch })
    }

    /// The seed config against the front; `ca_file` (relative to the config file) when given.
    fn config(&self, ca_file: Option<&str>) -> String {
        let config =
            seed_config(&self.front.base_url(), &self.scratch.path().join("plugins"), "oncall", "kind = \"echo\"");
        assert!(config.contains("base_url = \"https://localhost:"));
        match ca_file {
            Some(path) => config.replacen(
                "plugin = \"mattermost\"\n",
                &format!("plugin = \"mattermost\"\nca_file = \"{path}\"\n"),
                1,
            ),
            None => config,
        }
    }

    async fn start(&self, config: &str) -> Result<Gateway> {
        std::fs::write(&self.config_path, config)?;
        Gateway::start(
            &self.artifacts.switchboard,
            self.scratch.path(),
            &self.config_path,
            &[("MM_BOT_TOKEN", self.world.bot.token.as_str())],
        )
        .await
    }

    fn dm_answered(&self, text: &str) -> bool {
        let wanted = format!("echo: {text}");
        self.sim.posts_in(&self.world.alice_dm).iter().any(|p| p.user_id == self.world.bot.id && p.message == wanted)
    }

    fn assert_token_never_logged(&self, gateway: &Gateway) {
        assert!(self.world.bot.token.len() >= 8, "a real token to look for");
        assert!(!gateway.log_text().contains(&self.world.bot.token), "the bot token appears in the gateway log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ca_file_the_adapter_connects_over_wss_and_answers_over_https() -> Result<()> {
    let rig = TlsRig::new().await?;
    let gateway = rig.start(&rig.config(Some("internal-ca.pem"))).await?;
    assert_eventually!(
        rig.sim.ws_connections_active() == 1 && gateway.count(&["WebSocket open"]) > 0,
        "the adapter opens its WebSocket through the TLS front:\n{}",
        gateway.log_text()
    );
    // The simulator listens on plain HTTP only: a WebSocket there came through the front, so
    // it was `wss://` to the gateway.
    assert!(rig.front.handshakes() >= 1);

    rig.sim.post_as(&rig.world.alice.id, &rig.world.alice_dm, "hello over tls", None);
    assert_eventually!(rig.dm_answered("hello over tls"), "the DM is answered over HTTPS:\n{}", gateway.log_text());
    // The WebSocket and every REST request went through the front.
    assert!(rig.front.handshakes() >= 2, "HTTPS requests went through the front too");
    assert_eq!(gateway.count(&["TLS handshake failed"]), 0, "{}", gateway.log_text());
    rig.assert_token_never_logged(&gateway);
    let status = gateway.stop().await?;
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    Ok(())
}

/// Without `ca_file` the internal CA is unknown: nothing gets through, the log says why (and
/// never the token); a reload that adds `ca_file` rebuilds the instance and it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ca_file_the_certificate_is_refused_clearly_until_a_reload_adds_it() -> Result<()> {
    let rig = TlsRig::new().await?;
    let gateway = rig.start(&rig.config(None)).await?;
    assert_eventually!(
        gateway.count(&["WebSocket TLS handshake failed", "invalid peer certificate: UnknownIssuer", "ca_file"]) > 0
            && gateway.count(&["HTTPS TLS handshake failed", "invalid peer certificate: UnknownIssuer"]) > 0,
        "the gateway logs the refused certificate for wss:// and https://:\n{}",
        gateway.log_text()
    );
    // The adapter is told why too (WsClosed / HttpFailed reasons).
    assert_eventually!(
        gateway.count(&["WebSocket closed (1006 connect failed", "invalid peer certificate: UnknownIssuer"]) > 0
            && gateway.count(&["GET /users/me failed", "invalid peer certificate: UnknownIssuer"]) > 0,
        "the adapter logs the reasons it was given:\n{}",
        gateway.log_text()
    );

    rig.sim.post_as(&rig.world.alice.id, &rig.world.alice_dm, "anyone there?", None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!rig.dm_answered("anyone there?"), "answered without trusting the server");
    assert_eq!(rig.sim.ws_connections_opened(), 0, "no WebSocket reached the simulator");
    assert_eq!(rig.front.handshakes(), 0, "no TLS handshake completed");
    for over in ["HTTPS", "WebSocket"] {
        let warned = format!("{over} TLS handshake failed:");
        assert_eq!(gateway.count(&["WARN", &warned]), 1, "one warning, retries at debug:\n{}", gateway.log_text());
    }
    rig.assert_token_never_logged(&gateway);

    // The same instance, now with ca_file: a changed instance, rebuilt by the reload.
    gateway.reload_with(&rig.config(Some("internal-ca.pem")))?;
    assert_eventually!(
        gateway.count(&["reload applied", "changed=[\"mattermost\"]"]) == 1,
        "the reload rebuilds the instance:\n{}",
        gateway.log_text()
    );
    assert_eventually!(
        rig.sim.ws_connections_active() == 1,
        "the adapter connects once ca_file is set:\n{}",
        gateway.log_text()
    );
    rig.sim.post_as(&rig.world.alice.id, &rig.world.alice_dm, "and now?", None);
    assert_eventually!(rig.dm_answered("and now?"), "answered after the reload:\n{}", gateway.log_text());
    rig.assert_token_never_logged(&gateway);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_a_ca_file_that_is_missing_or_holds_no_certificate() -> Result<()> {
    let rig = TlsRig::new().await?;
    std::fs::write(rig.scratch.path().join("not-a-ca.pem"), "just some text, no PEM block\n")?;
    for (ca_file, wanted) in [("missing-ca.pem", "cannot read"), ("not-a-ca.pem", "holds no certificate")] {
        std::fs::write(&rig.config_path, rig.config(Some(ca_file)))?;
        let output = std::process::Command::new(&rig.artifacts.switchboard)
            .arg("check-config")
            .arg(&rig.config_path)
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "check-config exits non-zero for {ca_file}:\n{stdout}\n{stderr}");
        let line = stdout.lines().find(|l| l.contains("channels.mattermost.ca_file"));
        assert!(
            line.is_some_and(|l| l.contains(wanted) && l.contains(ca_file)),
            "check-config names channels.mattermost.ca_file ({wanted}) for {ca_file}:\n{stdout}\n{stderr}"
        );
    }
    // The good one passes.
    std::fs::write(&rig.config_path, rig.config(Some("internal-ca.pem")))?;
    let output =
        std::process::Command::new(&rig.artifacts.switchboard).arg("check-config").arg(&rig.config_path).output()?;
    assert!(
        output.status.success(),
        "check-config accepts the front's CA:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
