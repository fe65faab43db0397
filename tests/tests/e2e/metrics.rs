//! `/metrics` of the real gateway against the simulator: the per-instance connection, queue and
//! latency series move as the instance lives through a conversation, a drop past the grace and
//! a reconnect; the sample Grafana dashboard uses only names the gateway exports.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, Result};
use switchboard_tests::{assert_eventually, harness::Gateway};

use crate::rig::{tail, Rig, RigOptions};

/// The value of the sample `name{labels}` (labels in any order; all must match, no others).
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeSet<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let found: BTreeSet<String> = label_text.split(',').filter(|l| !l.is_empty()).map(str::to_string).collect();
        (series_name == name && found == wanted).then(|| value.parse().ok()).flatten()
    })
}

async fn scrape(gateway: &Gateway) -> String {
    gateway.admin_get("/metrics").await.map(|(_, body)| body).unwrap_or_default()
}

/// Whether the exposition exports `name`: as a sample, or as a family declared by a
/// `# TYPE` line whose samples would carry that name (a counter's `_total`, a histogram's
/// `_bucket`/`_sum`/`_count`) but has no labelled child yet.
fn exports(metrics: &str, name: &str) -> bool {
    let as_sample = metrics
        .lines()
        .any(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')));
    let as_family = metrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")).any(|declared| {
        let mut parts = declared.split(' ');
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else { return false };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        suffixes.iter().any(|suffix| format!("{family}{suffix}") == name)
    });
    as_sample || as_family
}

/// Every `switchboard_…` name in the dashboard's text (its queries and variables).
fn dashboard_metric_names() -> Result<BTreeSet<String>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana/switchboard.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let _: serde_json::Value = serde_json::from_str(&text).context("the dashboard is JSON")?;
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("switchboard_") {
        let name: String =
            text[start..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        names.insert(name);
    }
    Ok(names)
}

#[tokio::test]
async fn metrics_follow_a_channel_instance_through_replies_a_drop_past_the_grace_and_a_reconnect() -> Result<()> {
    let rig = Rig::with(RigOptions { gateway_keys: "disconnected_grace_ms = 1500", ..RigOptions::default() }).await?;
    let channel = rig.world.office_general.clone();
    let gateway = rig.start(&[]).await?;
    let mm = [("channel", "mattermost")];
    let turn_labels = [("channel", "mattermost"), ("agent", "main")];
    for i in 0..3 {
        rig.ask(&channel, &format!("metrics {i}"), &gateway).await;
    }
    assert_eventually!(
        sample(&scrape(&gateway).await, "switchboard_reply_latency_seconds_count", &mm) == Some(3.0),
        "three replies timed\n{}",
        scrape(&gateway).await
    );
    let metrics = scrape(&gateway).await;
    let value = |name: &str, labels: &[(&str, &str)]| sample(&metrics, name, labels);
    assert_eq!(value("switchboard_websockets_connected", &mm), Some(1.0), "{metrics}");
    assert_eq!(value("switchboard_websocket_reconnects_total", &mm), Some(0.0), "{metrics}");
    assert_eq!(value("switchboard_queue_depth", &mm), Some(0.0), "nothing waits when idle\n{metrics}");
    assert_eq!(value("switchboard_instance_halted", &mm), Some(0.0), "{metrics}");
    assert_eq!(value("switchboard_http_requests_in_flight", &mm), Some(0.0), "{metrics}");
    assert!(value("switchboard_http_requests_total", &mm) >= Some(3.0), "a post per reply at least\n{metrics}");
    assert_eq!(value("switchboard_agent_turn_seconds_count", &turn_labels), Some(3.0), "{metrics}");
    let reply_seconds = value("switchboard_reply_latency_seconds_sum", &mm).unwrap_or(-1.0);
    let turn_seconds = value("switchboard_agent_turn_seconds_sum", &turn_labels).unwrap_or(-1.0);
    assert!(reply_seconds > 0.0 && reply_seconds < 30.0, "three loopback replies: {reply_seconds} s\n{metrics}");
    assert!(
        (0.0..reply_seconds).contains(&turn_seconds),
        "an echo turn is part of its reply's latency: {turn_seconds} s of {reply_seconds} s"
    );
    // Every bucket series of the histogram is there, up to +Inf.
    assert_eq!(
        value("switchboard_reply_latency_seconds_bucket", &[("channel", "mattermost"), ("le", "+Inf")]),
        Some(3.0),
        "{metrics}"
    );

    // The dashboard asks only for what the gateway exports.
    let missing: Vec<String> = dashboard_metric_names()?.into_iter().filter(|name| !exports(&metrics, name)).collect();
    assert!(missing.is_empty(), "dashboard metrics the gateway does not export: {missing:?}\n{metrics}");

    // The server goes away past the grace: the gauge drops to 0 and /readyz fails; then the
    // socket comes back (a new connection id: the adapter catches up through REST).
    rig.sim.refuse_websockets_for(Duration::from_secs(4));
    rig.sim.drop_and_forget_connections();
    let connected = || async { sample(&scrape(&gateway).await, "switchboard_websockets_connected", &mm) };
    assert_eventually!(connected().await == Some(0.0), "disconnected\n{}", tail(&gateway, 20));
    assert_eventually!(
        gateway.admin_get("/readyz").await.is_ok_and(|(code, _)| code == 503),
        "not ready past the grace"
    );
    assert_eventually!(
        @within Duration::from_secs(30),
        connected().await == Some(1.0),
        "connected again\n{}",
        tail(&gateway, 20)
    );
    let metrics = scrape(&gateway).await;
    assert!(
        sample(&metrics, "switchboard_websocket_reconnects_total", &mm) >= Some(1.0),
        "the reconnect is counted\n{metrics}"
    );
    assert_eventually!(gateway.admin_get("/readyz").await.is_ok_and(|(code, _)| code == 200), "ready again");
    rig.ask(&channel, "after the reconnect", &gateway).await;
    assert_eventually!(
        sample(&scrape(&gateway).await, "switchboard_reply_latency_seconds_count", &mm) == Some(4.0),
        "the reply after the reconnect is timed too"
    );
    Ok(())
}
