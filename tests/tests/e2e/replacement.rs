//! Live adapter replacement: builds dropped into the plugin directory under load, broken
//! builds refused, an adapter panic contained, the generation budget's re-exec.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use switchboard_tests::{assert_eventually, harness::Gateway};

use crate::rig::{tail, Rig, RigOptions, BUILD_B_TAG};

/// Post unique tokens round-robin over `channels` at `per_second` until `stop` is set;
/// everything posted goes into `posted` as (channel, token).
async fn stream(
    rig: &Rig,
    channels: &[String],
    per_second: u64,
    prefix: &str,
    stop: &AtomicBool,
    posted: &Mutex<Vec<(String, String)>>,
) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let channel = &channels[i % channels.len()];
        let token = format!("{prefix}-{i:05}");
        rig.sim.post_as(&rig.world.alice.id, channel, &token, None);
        posted.lock().unwrap().push((channel.clone(), token));
        i += 1;
    }
}

/// Drop `build` in and wait until a question asked afterwards is answered by it.
/// Returns the time from the drop to that answer.
async fn swap_to(rig: &Rig, build_b: bool, probe_channel: &str, round: usize, gateway: &Gateway) -> Result<Duration> {
    let build = if build_b { rig.artifacts.fixture("build-b")? } else { rig.artifacts.mattermost_plugin() };
    let dropped = Instant::now();
    rig.drop_build(&build)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let answer = rig.ask(probe_channel, &format!("probe-{round}-{attempt}"), gateway).await;
        if answer.ends_with(BUILD_B_TAG) == build_b {
            return Ok(dropped.elapsed());
        }
        assert!(dropped.elapsed() < Duration::from_secs(30), "swap {round} never took effect\n{}", tail(gateway, 60));
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `pause_us` of every `generation started` line after the first `skip`.
fn swap_pauses(gateway: &Gateway, skip: usize) -> Vec<u64> {
    let mut pauses: Vec<u64> = gateway
        .lines_with(&["generation started"])
        .iter()
        .skip(skip)
        .filter_map(|line| line.split("pause_us=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    pauses.sort_unstable();
    pauses
}

#[tokio::test]
async fn fifty_builds_dropped_in_under_load_lose_duplicate_and_misroute_nothing() -> Result<()> {
    let rig = Rig::with_gateway_keys(
        "onmessage",
        "kind = \"echo\"",
        "durability = \"normal\"\nmax_concurrent_turns = 256\nio_threads = 3",
    )
    .await?;
    std::fs::write(
        &rig.config_path,
        std::fs::read_to_string(&rig.config_path)?.replace("[plugins]\n", "[plugins]\nsettle_ms = 50\n"),
    )?;
    let channels = rig.open_channels(21);
    let (probe_channel, channels) = channels.split_first().unwrap();
    let gateway = rig.start(&[]).await?;
    assert_eq!(
        gateway.count(&["async runtime started", "io_threads=3"]),
        1,
        "gateway.io_threads sets the runtime's threads:\n{}",
        gateway.log_text()
    );
    let connections_before = rig.sim.ws_connections_opened();
    let rss_before = gateway.rss_kib();
    let stop = AtomicBool::new(false);
    let posted = Mutex::new(Vec::new());
    let swaps = async {
        let mut to_answer = Vec::new();
        for round in 1..=50 {
            to_answer.push(swap_to(&rig, round % 2 == 1, probe_channel, round, &gateway).await?);
        }
        stop.store(true, Ordering::SeqCst);
        anyhow::Ok(to_answer)
    };
    let ((), to_answer) = tokio::join!(stream(&rig, channels, 300, "load", &stop, &posted), swaps);
    let mut to_answer: Vec<u64> = to_answer?.iter().map(|d| d.as_millis() as u64).collect();
    let expected = posted.into_inner().unwrap();
    rig.assert_answered_once(&expected, &gateway).await;

    let loaded = rig.bot_posts().keys().filter(|m| m.starts_with("echo: load-")).count();
    assert_eq!(loaded, expected.len(), "one reply per load message, no strays");
    assert_eq!(rig.sim.ws_connections_opened(), connections_before, "no swap opened a WebSocket");
    assert_eq!(gateway.count(&["generation started"]), 51, "one generation per swap, plus the first");
    assert_eventually!(
        {
            let status = gateway.status().await?;
            let generations = status["generations"].as_array().cloned().unwrap_or_default();
            generations.len() == 51
                && generations.iter().filter(|g| g["state"] == "running").count() == 1
                && generations.iter().filter(|g| g["state"] != "running").all(|g| g["mapped"] == false)
        },
        "every replaced generation is unloaded and unmapped: {}",
        gateway.status().await?
    );
    let rss_after = gateway.rss_kib();
    let pauses = swap_pauses(&gateway, 1);
    to_answer.sort_unstable();
    eprintln!(
        "replacement under load: {} messages at 300/s over 20 channels, 50 swaps; swap pause p50 {} us, p99 {} us, \
         max {} us; file dropped → new build answering p50 {} ms, p99 {} ms; RSS before {:?} KiB, after {:?} KiB",
        expected.len(),
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
        pauses.last().copied().unwrap_or(0),
        percentile(&to_answer, 0.5),
        percentile(&to_answer, 0.99),
        rss_before,
        rss_after
    );
    Ok(())
}

#[tokio::test]
async fn broken_builds_dropped_in_are_refused_while_the_running_build_keeps_answering() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    let cases = [
        ("panicking-constructor", "constructor failed"),
        ("abi-version", "speaks adapter ABI v2"),
        ("abi-skew", "layout check failed"),
    ];
    for (round, (fixture, reason)) in cases.iter().enumerate() {
        rig.drop_build(&rig.artifacts.fixture(fixture)?)?;
        assert_eventually!(
            gateway.count(&[reason]) > 0,
            "{fixture} is refused with {reason:?}\n{}",
            tail(&gateway, 40)
        );
        let answer = rig.ask(&channel, &format!("still here {round}"), &gateway).await;
        assert!(!answer.ends_with(BUILD_B_TAG), "the first build answers after {fixture}");
    }
    // Cut short in transit: the first 64 KiB of a good build.
    let truncated = rig.scratch.path().join("truncated.so");
    std::fs::write(&truncated, &std::fs::read(rig.artifacts.fixture("build-b")?)?[..64 * 1024])?;
    rig.drop_build(&truncated)?;
    assert_eventually!(
        gateway.count(&["is cut short (65536 bytes"]) > 0,
        "a truncated file is refused\n{}",
        tail(&gateway, 40)
    );
    rig.ask(&channel, "after the truncated file", &gateway).await;
    // A real library that is no adapter (no root module symbol).
    let system_library =
        ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6"]
            .into_iter()
            .map(std::path::Path::new)
            .find(|p| p.is_file());
    if let Some(library) = system_library {
        rig.drop_build(library)?;
        assert_eventually!(
            gateway.count(&["not a switchboard adapter"]) > 0,
            "a library without the root module is refused\n{}",
            tail(&gateway, 40)
        );
        rig.ask(&channel, "after the foreign library", &gateway).await;
    }
    // Writable by others: not loaded, whatever it contains.
    // (std::fs::copy carries the mode over, so the dropped file is 0666 too.)
    let writable = rig.scratch.path().join("writable.so");
    std::fs::copy(rig.artifacts.fixture("build-b")?, &writable)?;
    std::fs::set_permissions(&writable, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    rig.drop_build(&writable)?;
    assert_eventually!(
        gateway.count(&["writable by group or others"]) > 0,
        "a group/other-writable file is refused\n{}",
        tail(&gateway, 40)
    );
    let answer = rig.ask(&channel, "after the writable file", &gateway).await;
    assert!(!answer.ends_with(BUILD_B_TAG), "the first build still answers");
    // Owned by somebody else (only root can arrange that here).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Staged under a hidden name, chowned, then renamed in: never visible as root's.
        let staged = rig.plugin_dir().join(".foreign.partial");
        std::fs::copy(rig.artifacts.fixture("build-b")?, &staged)?;
        std::os::unix::fs::chown(&staged, Some(12345), None)?;
        std::fs::rename(&staged, rig.plugin_dir().join(switchboard_tests::harness::mattermost_file_name()))?;
        assert_eventually!(
            gateway.count(&["is owned by uid 12345"]) > 0,
            "a foreign-owned file is refused\n{}",
            tail(&gateway, 40)
        );
        let answer = rig.ask(&channel, "after the foreign file", &gateway).await;
        assert!(!answer.ends_with(BUILD_B_TAG), "the first build still answers");
    }
    // The watch still works: a good build goes in.
    let answered_by_b = swap_to(&rig, true, &channel, 99, &gateway).await;
    assert!(answered_by_b.is_ok(), "build b takes over");
    assert_eq!(rig.sim.ws_connections_opened(), 1, "refusals and the swap kept the one WebSocket");
    Ok(())
}

#[tokio::test]
async fn an_adapter_panic_dead_letters_that_message_after_one_retry_and_loses_nothing_else() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    rig.drop_build(&rig.artifacts.fixture("panic-on-message")?)?;
    let channels = rig.open_channels(3);
    let gateway = rig.start(&[]).await?;
    // A conversation under way in the channel the poisoned message goes to.
    rig.ask(&channels[1], "hello there", &gateway).await;
    let mut expected = Vec::new();
    for i in 0..30 {
        let channel = &channels[i % 3];
        if i == 13 {
            rig.sim.post_as(&rig.world.alice.id, channel, "PANIC-ON-THIS please", None);
        }
        let token = format!("calm-{i:02}");
        rig.sim.post_as(&rig.world.alice.id, channel, &token, None);
        expected.push((channel.clone(), token));
    }
    rig.assert_answered_once(&expected, &gateway).await;
    assert!(!rig.bot_posts().keys().any(|m| m.contains("PANIC-ON-THIS")), "the poisoned message is not answered");
    let dead = gateway.lines_with(&["dead-lettered an event the adapter failed on twice"]);
    assert_eq!(dead.len(), 1, "one dead letter\n{}", tail(&gateway, 60));
    let session = format!("session=agent:main:mattermost:channel:{}", channels[13 % 3]);
    assert!(dead[0].contains(&session), "the dead letter names the session ({session}): {}", dead[0]);
    assert_eq!(gateway.count(&["restarting it from its last good state to try once more"]), 1, "retried once");
    let status = gateway.status().await?;
    assert_eq!(status["store"]["dead_letters"], 1, "{status}");
    assert_eq!(rig.sim.ws_connections_opened(), 1, "restarts kept the WebSocket");
    let answer = rig.ask(&channels[1], "after the panic", &gateway).await;
    assert_eq!(answer, "echo: after the panic");
    Ok(())
}

#[tokio::test]
async fn crossing_the_generation_budget_re_executes_in_place_and_loses_nothing() -> Result<()> {
    // Budget 5: the start loads one generation, so every fourth swap crosses it.
    let rig = Rig::with_gateway_keys(
        "onmessage",
        "kind = \"echo\"",
        "generation_budget = 5\ndurability = \"normal\"\nmax_concurrent_turns = 256",
    )
    .await?;
    let channels = rig.open_channels(21);
    let (probe_channel, channels) = channels.split_first().unwrap();
    let gateway = rig.start(&[]).await?;
    let pid = gateway.pid();
    let stop = AtomicBool::new(false);
    let posted = Mutex::new(Vec::new());
    let swaps = async {
        for round in 1..=10 {
            swap_to(&rig, round % 2 == 1, probe_channel, round, &gateway).await?;
        }
        stop.store(true, Ordering::SeqCst);
        anyhow::Ok(())
    };
    let ((), swapped) = tokio::join!(stream(&rig, channels, 300, "budget", &stop, &posted), swaps);
    swapped?;
    let expected = posted.into_inner().unwrap();
    rig.assert_answered_once(&expected, &gateway).await;
    let loaded = rig.bot_posts().keys().filter(|m| m.starts_with("echo: budget-")).count();
    assert_eq!(loaded, expected.len(), "one reply per message, no strays");
    assert_eq!(gateway.count(&["80% of the generation budget used"]), 2, "{}", tail(&gateway, 80));
    assert_eq!(gateway.count(&["generation budget reached"]), 2, "{}", tail(&gateway, 80));
    assert_eq!(gateway.count(&["gateway running"]), 3, "the gateway re-executed twice");
    assert_eq!(gateway.pid(), pid, "in place: same process id");
    eprintln!("generation budget: {} messages at 300/s over 20 channels, 10 swaps, 2 re-execs", expected.len());
    Ok(())
}

#[tokio::test]
async fn a_slow_copy_in_place_is_loaded_once_whole_and_a_touch_loads_nothing() -> Result<()> {
    use std::io::Write;
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "before", &gateway).await;

    // Overwrite the running file in place, slowly: 8 pieces, 150 ms apart (longer than the
    // 100 ms debounce, shorter than the 200 ms settle time).
    let target = rig.plugin_dir().join(switchboard_tests::harness::mattermost_file_name());
    let bytes = std::fs::read(rig.artifacts.fixture("build-b")?)?;
    let mut file = std::fs::OpenOptions::new().write(true).truncate(true).open(&target)?;
    for piece in bytes.chunks(bytes.len().div_ceil(8)) {
        file.write_all(piece)?;
        file.flush()?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    drop(file);
    let mut round = 0;
    loop {
        round += 1;
        if rig.ask(&channel, &format!("during the copy {round}"), &gateway).await.ends_with(BUILD_B_TAG) {
            break;
        }
        assert!(round < 200, "build b never took over\n{}", tail(&gateway, 60));
    }
    assert_eq!(gateway.count(&["plugin file refused"]), 0, "no half-written file was probed\n{}", tail(&gateway, 60));
    assert_eq!(gateway.count(&["generation started"]), 2, "loaded once\n{}", tail(&gateway, 60));

    // Same bytes, new mtime: hashed, nothing loaded.
    std::fs::File::options().append(true).open(&target)?.set_modified(std::time::SystemTime::now())?;
    assert_eventually!(
        gateway.count(&["no adapter changed in content; nothing to do"]) > 0,
        "a touch is recognised as no change\n{}",
        tail(&gateway, 20)
    );
    assert_eq!(gateway.count(&["generation started"]), 2, "a touch loads nothing");
    assert_eq!(rig.sim.ws_connections_opened(), 1);
    Ok(())
}

#[tokio::test]
async fn a_spent_restart_budget_halts_the_instance_and_a_new_build_resumes_it_losing_nothing() -> Result<()> {
    let rig = Rig::with_gateway_keys("onmessage", "kind = \"echo\"", "adapter_restart_budget = 1").await?;
    rig.drop_build(&rig.artifacts.fixture("panic-on-message")?)?;
    let channel = rig.open_channels(1).remove(0);
    // With backtraces on, a plugin panic once kept the library mapped after dlclose (the
    // default hook symbolised the backtrace); the halted generation must still be unmapped.
    let gateway = rig.start(&[("RUST_BACKTRACE", "1")]).await?;
    rig.ask(&channel, "before", &gateway).await;
    rig.sim.post_as(&rig.world.alice.id, &channel, "PANIC-ON-THIS now", None);
    assert_eventually!(
        gateway.count(&["channel instance halted"]) == 1,
        "one restart is allowed, the second is not\n{}",
        tail(&gateway, 40)
    );
    // Halted: messages wait for the next build.
    rig.sim.post_as(&rig.world.alice.id, &channel, "while halted", None);
    assert_eventually!(
        gateway.status().await?["generations"][0]["state"] == "halted",
        "the generation is marked halted: {}",
        gateway.status().await?
    );
    // Halted is not ready, whatever the WebSocket does, and says so in /metrics.
    let (code, body) = gateway.admin_get("/readyz").await?;
    assert!(code == 503 && body.contains("no running adapter for mattermost"), "{code} {body}");
    let halted = "switchboard_instance_halted{channel=\"mattermost\"} ";
    assert!(gateway.admin_get("/metrics").await?.1.contains(&format!("{halted}1\n")), "halted gauge 1");
    rig.drop_build(&rig.artifacts.fixture("build-b")?)?;
    let answered = || rig.bot_posts().contains_key("echo: while halted");
    assert_eventually!(answered(), "the new build answers what waited\n{}", tail(&gateway, 40));
    assert_eventually!(gateway.admin_get("/readyz").await?.0 == 200, "ready again with the new build");
    assert!(gateway.admin_get("/metrics").await?.1.contains(&format!("{halted}0\n")), "halted gauge 0 again");
    assert!(!rig.bot_posts().keys().any(|m| m.contains("PANIC-ON-THIS")), "the poisoned message stays unanswered");
    assert_eq!(rig.ask(&channel, "after", &gateway).await, format!("echo: after{BUILD_B_TAG}"));
    assert_eq!(rig.bot_posts()["echo: while halted"].len(), 1, "answered once");
    assert_eq!(rig.sim.ws_connections_opened(), 1, "the WebSocket stayed up throughout");
    Ok(())
}

/// A new build with the same size and mtime as the running file (`cp -p`, `rsync -a`,
/// `install -p`, Nix) is still told apart: a new inode or ctime means the file is hashed again.
#[tokio::test]
async fn a_new_build_with_the_same_size_and_mtime_is_still_loaded() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channel = rig.open_channels(1).remove(0);
    // Two builds padded to one size (bytes after the ELF sections are never mapped) and
    // stamped with one mtime.
    let mut a = std::fs::read(rig.artifacts.mattermost_plugin())?;
    let mut b = std::fs::read(rig.artifacts.fixture("build-b")?)?;
    let size = a.len().max(b.len());
    a.resize(size, 0);
    b.resize(size, 0);
    let stamp = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1);
    let stage = |name: &str, bytes: &[u8]| -> Result<std::path::PathBuf> {
        let path = rig.scratch.path().join(name);
        std::fs::write(&path, bytes)?;
        std::fs::File::options().write(true).open(&path)?.set_modified(stamp)?;
        Ok(path)
    };
    let (a, b) = (stage("a.so", &a)?, stage("b.so", &b)?);
    let plugin = rig.plugin_dir().join(switchboard_tests::harness::mattermost_file_name());
    std::fs::copy(&a, &plugin)?;
    std::fs::File::options().write(true).open(&plugin)?.set_modified(stamp)?;
    let gateway = rig.start(&[]).await?;
    assert!(!rig.ask(&channel, "first build", &gateway).await.ends_with(BUILD_B_TAG));
    // Same size, same mtime, renamed into place.
    let staged = rig.plugin_dir().join(".staged");
    std::fs::copy(&b, &staged)?;
    std::fs::File::options().write(true).open(&staged)?.set_modified(stamp)?;
    assert_eq!(std::fs::metadata(&staged)?.len(), std::fs::metadata(&plugin)?.len());
    std::fs::rename(&staged, &plugin)?;
    gateway.signal(libc::SIGUSR1);
    assert_eventually!(
        gateway.count(&["generation started", "generation=2"]) == 1,
        "the new build is loaded\n{}",
        tail(&gateway, 30)
    );
    assert!(rig.ask(&channel, "second build", &gateway).await.ends_with(BUILD_B_TAG));
    Ok(())
}

/// A new build that constructs fine and then panics on `Started`: the generation it replaced
/// takes over again with the events held meanwhile; nothing is lost or answered twice.
#[tokio::test]
async fn a_build_that_fails_its_first_batch_is_rolled_back_to_the_running_one() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "before the bad build", &gateway).await;
    rig.drop_build(&rig.artifacts.fixture("panic-on-started")?)?;
    // Messages during the swap: held for the new generation, then handed back to the old one.
    let mut expected = vec![(channel.clone(), "before the bad build".to_string())];
    for i in 0..20 {
        let token = format!("during-{i}");
        rig.sim.post_as(&rig.world.alice.id, &channel, &token, None);
        expected.push((channel.clone(), token));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eventually!(
        gateway.count(&["failed its first batch, rolled back", "still_serving=Some(1)"]) == 1,
        "rolled back to generation 1\n{}",
        tail(&gateway, 30)
    );
    assert!(!rig.ask(&channel, "after the rollback", &gateway).await.ends_with(BUILD_B_TAG));
    expected.push((channel.clone(), "after the rollback".into()));
    rig.assert_answered_once(&expected, &gateway).await;
    let status = gateway.status().await?;
    let states: Vec<(u64, String)> = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["generation"].as_u64().unwrap_or(0), g["state"].as_str().unwrap_or("").to_string()))
        .collect();
    assert!(states.contains(&(1, "running".into())), "{states:?}");
    assert!(states.iter().any(|(n, s)| *n == 2 && s == "refused"), "{states:?}");
    assert_eq!(rig.sim.ws_connections_opened(), 1, "the connection was kept throughout");
    Ok(())
}

/// A plugin directory others may write is refused as a whole (anyone who can write it can
/// swap a build in); adapter configs reach the probe on stdin, not on a command line.
#[tokio::test]
async fn a_plugin_directory_others_may_write_is_refused_and_configs_go_to_the_probe_on_stdin() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    std::fs::set_permissions(rig.plugin_dir(), std::fs::Permissions::from_mode(0o777))?;
    let output =
        std::process::Command::new(&rig.artifacts.switchboard).arg("check-config").arg(&rig.config_path).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("writable by group or others"), "{stdout}");
    std::fs::set_permissions(rig.plugin_dir(), std::fs::Permissions::from_mode(0o755))?;

    let mut probe = std::process::Command::new(&rig.artifacts.switchboard)
        .arg("check-plugin")
        .arg(rig.artifacts.mattermost_plugin())
        .arg("--validate-stdin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let configs = serde_json::json!([r#"{"base_url": "http://x", "bot_token_env": "T", "chatmode": "sometimes"}"#]);
    std::io::Write::write_all(probe.stdin.as_mut().unwrap(), configs.to_string().as_bytes())?;
    drop(probe.stdin.take());
    let report: serde_json::Value = serde_json::from_slice(&probe.wait_with_output()?.stdout)?;
    assert_eq!(report["validations"][0][0]["key_path"], "chatmode", "{report}");
    Ok(())
}

/// A flood while the instance is halted: the gateway holds at most a bounded number of
/// unhandled frames (then it stops reading its socket; the server may drop the connection)
/// and loses nothing — a new build answers every message once, what the socket did not take
/// through a resume or a catch-up.
#[tokio::test]
async fn a_flood_while_halted_is_held_bounded_and_every_message_is_answered_once() -> Result<()> {
    let rig = Rig::with(RigOptions {
        gateway_keys: "adapter_restart_budget = 1\nlane_capacity = 64",
        ..RigOptions::default()
    })
    .await?;
    rig.drop_build(&rig.artifacts.fixture("panic-on-message")?)?;
    let channels = rig.open_channels(4);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channels[0], "before", &gateway).await;
    rig.sim.post_as(&rig.world.alice.id, &channels[0], "PANIC-ON-THIS now", None);
    assert_eventually!(gateway.count(&["channel instance halted"]) == 1, "halted\n{}", tail(&gateway, 40));
    let rss_halted = gateway.rss_kib().unwrap_or(0);
    let mut expected = vec![(channels[0].clone(), "before".to_string())];
    for i in 0..6000 {
        let channel = &channels[i % channels.len()];
        let token = format!("flood-{i:04}");
        rig.sim.post_as(&rig.world.alice.id, channel, &token, None);
        expected.push((channel.clone(), token));
        if i % 500 == 0 {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_flooded = gateway.rss_kib().unwrap_or(0);
    rig.drop_build(&rig.artifacts.mattermost_plugin())?;
    rig.assert_answered_once(&expected, &gateway).await;
    println!(
        "flood of 6000 while halted: RSS {rss_halted} → {rss_flooded} KiB; {} WebSocket(s) opened; all answered once",
        rig.sim.ws_connections_opened()
    );
    Ok(())
}

/// The instance task itself dies (a fault injected into host code, test builds only): it is
/// started again from the store and loses nothing; dying again and again past the restart
/// budget stops the gateway with a non-zero status for its supervisor.
#[tokio::test]
async fn a_dead_instance_task_is_restarted_from_the_store_and_past_its_budget_the_gateway_exits() -> Result<()> {
    let rig = Rig::with_gateway_keys("onmessage", "kind = \"echo\"", "adapter_restart_budget = 2").await?;
    let channel = rig.open_channels(1).remove(0);
    let once = rig.scratch.path().join("fault-once");
    std::fs::write(&once, "")?;
    let once_path = once.to_string_lossy().to_string();
    let env =
        [("SWITCHBOARD_FAULT_TASK_PANIC", "TASK-DIES"), ("SWITCHBOARD_FAULT_TASK_PANIC_ONCE", once_path.as_str())];
    let gateway = rig.start(&env).await?;
    rig.ask(&channel, "before", &gateway).await;
    rig.sim.post_as(&rig.world.alice.id, &channel, "TASK-DIES once", None);
    assert_eventually!(
        gateway.count(&["channel instance started again after its task died"]) == 1,
        "restarted from the store\n{}",
        tail(&gateway, 30)
    );
    rig.ask(&channel, "after", &gateway).await;
    rig.assert_answered_once(
        &[
            (channel.clone(), "before".into()),
            (channel.clone(), "TASK-DIES once".into()),
            (channel.clone(), "after".into()),
        ],
        &gateway,
    )
    .await;
    let (_, metrics) = gateway.admin_get("/metrics").await?;
    assert!(metrics.contains("switchboard_instance_restarts_total{channel=\"mattermost\"} 1"), "{metrics}");
    gateway.stop().await?;

    // Without the once-file the fault repeats on every replay: past the budget, exit 3.
    let mut gateway = rig.start(&[("SWITCHBOARD_FAULT_TASK_PANIC", "TASK-DIES")]).await?;
    rig.sim.post_as(&rig.world.alice.id, &channel, "TASK-DIES always", None);
    assert_eventually!(
        @within Duration::from_secs(30),
        !gateway.is_running(),
        "the gateway stops past the budget\n{}",
        tail(&gateway, 30)
    );
    assert!(gateway.count(&["stopping the gateway for its supervisor"]) == 1, "{}", tail(&gateway, 30));
    assert_eq!(gateway.exit_code(), Some(3));
    Ok(())
}
