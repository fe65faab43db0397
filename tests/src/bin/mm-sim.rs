//! `mm-sim [--port N]`: the Mattermost simulator on its own. Prints one JSON line with its
//! base URL and the demo world (users with tokens, channel ids), then serves until SIGTERM or
//! Ctrl-C. Drive it with the `/_sim/*` control API.

use std::io::Write;

use anyhow::{bail, Context, Result};
use switchboard_tests::sim::{demo_world, SimOptions, Simulator};

#[tokio::main]
async fn main() -> Result<()> {
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                port = args.next().context("--port needs a number")?.parse().context("--port needs a number")?
            }
            other => bail!("unknown argument {other:?}; usage: mm-sim [--port N]"),
        }
    }
    let sim = Simulator::start_on(SimOptions::default(), port).await?;
    let world = demo_world(&sim);
    let line = serde_json::json!({"base_url": sim.base_url(), "world": world.to_json()});
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    sim.shutdown().await;
    Ok(())
}
