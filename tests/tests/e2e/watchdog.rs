//! The watchdog on adapter calls, end to end: a build that never returns from one message
//! (`hang-on-message`, it sleeps forever inside `handle`) is abandoned, the other messages
//! are answered, a fixed build swaps in, and SIGTERM ends within `stop_deadline_ms` — also
//! while a call is still hanging.

use std::time::{Duration, Instant};

use anyhow::Result;
use switchboard_tests::{assert_eventually, harness::Gateway};

use crate::rig::{tail, Rig, BUILD_B_TAG};

/// What the fixture hangs on, and what it prints (to the gateway's stderr) as it starts to.
const HANG_TRIGGER: &str = "HANG-ON-THIS";
const HANGING: &str = "fixture: hanging on a post containing";

#[tokio::test]
async fn an_adapter_that_hangs_on_one_message_is_abandoned_and_the_others_are_answered() -> Result<()> {
    let rig = Rig::with_gateway_keys(
        "onmessage",
        "kind = \"echo\"",
        "adapter_call_timeout_ms = 2000\nstop_deadline_ms = 3000",
    )
    .await?;
    rig.drop_build(&rig.artifacts.fixture("hang-on-message")?)?;
    let channels = rig.open_channels(3);
    let mut gateway = rig.start(&[]).await?;
    rig.ask(&channels[0], "before", &gateway).await;
    let mut expected = Vec::new();
    for i in 0..30 {
        let channel = &channels[i % 3];
        if i == 10 {
            rig.sim.post_as(&rig.world.alice.id, channel, &format!("{HANG_TRIGGER} please"), None);
        }
        let token = format!("calm-{i:02}");
        rig.sim.post_as(&rig.world.alice.id, channel, &token, None);
        expected.push((channel.clone(), token));
    }
    rig.assert_answered_once(&expected, &gateway).await;
    assert!(!rig.bot_posts().keys().any(|m| m.contains(HANG_TRIGGER)), "the message it hung on is not answered");
    assert_eq!(
        gateway.count(&["generation abandoned: its thread and library stay loaded"]),
        1,
        "{}",
        tail(&gateway, 60)
    );
    assert_eq!(
        gateway.count(&["new generation started after the last one was abandoned"]),
        1,
        "{}",
        tail(&gateway, 60)
    );
    let status = gateway.status().await?;
    assert_eq!(status["generations_abandoned"], 1, "{status}");
    // The abandoned library stays loaded and counts against gateway.generation_budget.
    assert_eq!(status["libraries_opened"], 2, "the first build and its restart: {status}");
    assert_eq!(status["store"]["dead_letters"], 1, "the message it hung on is dead-lettered: {status}");
    assert_eq!(rig.sim.ws_connections_opened(), 1, "the WebSocket stayed up: the host owns it");

    // A fixed build swaps in as usual, while the abandoned thread still sleeps in the old one.
    rig.drop_build(&rig.artifacts.fixture("build-b")?)?;
    assert_eventually!(
        gateway.count(&["generation started", "build=b"]) == 1,
        "the fixed build is loaded\n{}",
        tail(&gateway, 40)
    );
    assert_eq!(rig.ask(&channels[1], "fixed?", &gateway).await, format!("echo: fixed?{BUILD_B_TAG}"));
    let took = sigterm(&mut gateway).await;
    assert!(
        took < Duration::from_millis(3000),
        "SIGTERM took {took:?} (stop_deadline_ms = 3000)\n{}",
        tail(&gateway, 30)
    );
    eprintln!("SIGTERM with an abandoned generation still hanging: {took:?}");
    Ok(())
}

#[tokio::test]
async fn sigterm_ends_within_the_stop_deadline_while_an_adapter_call_hangs() -> Result<()> {
    // The call timeout is far beyond the stop deadline: the deadline must win.
    let rig = Rig::with_gateway_keys(
        "onmessage",
        "kind = \"echo\"",
        "adapter_call_timeout_ms = 60000\nstop_deadline_ms = 2000",
    )
    .await?;
    rig.drop_build(&rig.artifacts.fixture("hang-on-message")?)?;
    let channel = rig.open_channels(1).remove(0);
    let mut gateway = rig.start(&[]).await?;
    rig.ask(&channel, "before", &gateway).await;
    rig.sim.post_as(&rig.world.alice.id, &channel, &format!("{HANG_TRIGGER} now"), None);
    assert_eventually!(gateway.count(&[HANGING]) == 1, "the adapter hangs\n{}", tail(&gateway, 20));
    let took = sigterm(&mut gateway).await;
    assert!(
        took < Duration::from_millis(2000),
        "SIGTERM took {took:?} (stop_deadline_ms = 2000)\n{}",
        tail(&gateway, 30)
    );
    eprintln!("SIGTERM while an adapter call hangs: {took:?}");
    Ok(())
}

/// SIGTERM, and how long until the process is gone; it must exit cleanly.
async fn sigterm(gateway: &mut Gateway) -> Duration {
    gateway.signal(libc::SIGTERM);
    let asked_at = Instant::now();
    while gateway.is_running() {
        assert!(asked_at.elapsed() < Duration::from_secs(15), "the gateway ignored SIGTERM\n{}", tail(gateway, 30));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = asked_at.elapsed();
    assert_eq!(gateway.exit_code(), Some(0), "a clean exit\n{}", tail(gateway, 30));
    took
}
