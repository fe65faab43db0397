//! Durability: restart (SIGTERM), crash (`kill -9`) under a stream, WebSocket gaps with and
//! without resume, the `openai` agent against the fake model server, a damaged state dir.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::Result;
use switchboard_tests::{assert_eventually, model::FakeModel};

use crate::rig::Rig;

#[tokio::test]
async fn a_restart_keeps_sessions_transcripts_and_agent_history() -> Result<()> {
    let model = FakeModel::start().await?;
    let agent = format!(
        "kind = \"openai\"\nbase_url = \"{}\"\nmodel = \"fake-1\"\napi_key_env = \"MODEL_KEY\"\nsystem_prompt = \"Be brief.\"\nstream = true\nhistory_limit = 10",
        model.base_url()
    );
    let rig = Rig::new("onmessage", &agent).await?;
    let env = [("MODEL_KEY", "sk-test-secret-4711")];
    let world = &rig.world;
    let conversations = [&world.office_general, &world.protocol_evolution, &world.alice_dm];
    let gateway = rig.start(&env).await?;
    for (i, channel) in conversations.iter().enumerate() {
        rig.sim.post_as(&world.alice.id, channel, &format!("first words {i}"), None);
        let wanted = format!("model heard \"first words {i}\" after 0 earlier messages");
        assert_eventually!(
            rig.sim.posts_in(channel).iter().any(|p| p.message == wanted),
            "the streamed model reply in {channel}\n{}",
            gateway.log_text()
        );
    }
    assert!(model.requests().iter().all(|r| r.authorization.as_deref() == Some("Bearer sk-test-secret-4711")));
    assert_eq!(model.requests()[0].body["stream"], true);
    // A delivery confirmation waits to go with the next stored batch; with no more traffic it
    // is stored on its own soon after.
    assert_eventually!(
        {
            let store = &gateway.status().await?["store"];
            store["outbound_queued"] == 0 && store["outbound_delivered"] == 3
        },
        "the three replies are marked delivered in the store: {}",
        gateway.status().await?
    );
    // Under durability=full (the default) each reply waited for a sync of the WAL, timed.
    let (code, metrics) = gateway.admin_get("/metrics").await?;
    assert_eq!(code, 200);
    let syncs: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("switchboard_store_wal_sync_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(syncs >= 1, "WAL syncs are timed in /metrics:\n{metrics}");

    let status = gateway.stop().await?;
    assert!(status.success(), "SIGTERM stops the gateway with exit 0, got {status}");

    let gateway = rig.start(&env).await?;
    let status = gateway.status().await?;
    assert_eq!(status["sessions"], 3, "the three sessions are back: {status}");
    assert_eq!(status["store"]["turns"], 6, "three user and three assistant turns are stored: {status}");
    for (i, channel) in conversations.iter().enumerate() {
        rig.sim.post_as(&world.alice.id, channel, &format!("second words {i}"), None);
        let wanted = format!("model heard \"second words {i}\" after 2 earlier messages");
        assert_eventually!(
            rig.sim.posts_in(channel).iter().any(|p| p.message == wanted),
            "a reply that used the history in {channel}\n{}",
            gateway.log_text()
        );
    }
    let last = model.requests().last().cloned().unwrap();
    let contents: Vec<&str> =
        last.body["messages"].as_array().unwrap().iter().filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(
        contents,
        ["Be brief.", "first words 2", "model heard \"first words 2\" after 0 earlier messages", "second words 2"],
        "the DM's history went to the model in order"
    );
    assert!(!gateway.log_text().contains("sk-test-secret-4711"), "the API key never reaches the log");
    assert!(!gateway.log_text().contains(&world.bot.token), "the bot token never reaches the log");
    Ok(())
}

#[tokio::test]
async fn kill_9_mid_stream_loses_and_duplicates_nothing() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channels = rig.open_channels(10);
    let gateway = rig.start(&[]).await?;
    let posted = AtomicUsize::new(0);
    let expected: Vec<(String, String)> =
        (0..200).map(|i| (channels[i % channels.len()].clone(), format!("tok-{i:03}-{}", i * 7919 % 1000))).collect();
    let stream = async {
        for (channel, token) in &expected {
            rig.sim.post_as(&rig.world.alice.id, channel, token, None);
            posted.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(8)).await;
        }
    };
    let crash = async {
        while posted.load(Ordering::SeqCst) < 70 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let answered_before = rig.sim.posts_by(&rig.world.bot.id).len();
        gateway.kill_hard()?;
        let gateway = rig.start(&[]).await?;
        anyhow::Ok((answered_before, gateway))
    };
    let ((), crashed) = tokio::join!(stream, crash);
    let (answered_before, gateway) = crashed?;
    assert!(answered_before > 0 && answered_before < 200, "killed mid-stream ({answered_before} answered before)");
    rig.assert_answered_once(&expected, &gateway).await;
    assert_eq!(rig.bot_posts().values().map(Vec::len).sum::<usize>(), 200, "200 messages, 200 replies");
    Ok(())
}

#[tokio::test]
async fn websocket_gaps_with_and_without_resume_lose_and_duplicate_nothing() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let gateway = rig.start(&[]).await?;
    let world = &rig.world;
    let channels = [world.office_general.clone(), world.protocol_evolution.clone(), world.alice_dm.clone()];
    let mut expected = Vec::new();
    for channel in &channels {
        let token = format!("warm-up-{}", &channel[..6]);
        rig.sim.post_as(&world.alice.id, channel, &token, None);
        expected.push((channel.clone(), token));
    }
    rig.assert_answered_once(&expected, &gateway).await;

    for (round, forget) in [("resume", false), ("new-id", true)] {
        let resumed_before = rig.sim.resumed_connections();
        rig.sim.refuse_websockets_for(Duration::from_secs(2));
        if forget {
            rig.sim.drop_and_forget_connections();
        } else {
            rig.sim.drop_connections();
        }
        let mut this_round = Vec::new();
        for i in 0..30 {
            let channel = &channels[i % channels.len()];
            let token = format!("{round}-{i}");
            rig.sim.post_as(&world.alice.id, channel, &token, None);
            this_round.push((channel.clone(), token));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        rig.assert_answered_once(&this_round, &gateway).await;
        if forget {
            assert!(gateway.count(&["fetching what was posted meanwhile"]) > 0, "catch-up ran");
        } else {
            assert!(rig.sim.resumed_connections() > resumed_before, "the connection was resumed");
        }
        expected.extend(this_round);
    }
    rig.assert_answered_once(&expected, &gateway).await;
    Ok(())
}

#[tokio::test]
async fn the_openai_agent_reports_a_model_failure_as_configured_and_loses_nothing_else() -> Result<()> {
    let model = FakeModel::start().await?;
    let agent = format!(
        "kind = \"openai\"\nbase_url = \"{}\"\nmodel = \"fake-1\"\nstream = false\non_error = \"reply\"\nerror_reply = \"The model is unavailable; please ask again.\"",
        model.base_url()
    );
    let rig = Rig::new("onmessage", &agent).await?;
    let gateway = rig.start(&[]).await?;
    let channel = &rig.world.office_general;
    model.fail_next(1, 503);
    rig.sim.post_as(&rig.world.alice.id, channel, "question one", None);
    assert_eventually!(
        rig.sim.posts_in(channel).iter().any(|p| p.message == "The model is unavailable; please ask again."),
        "the configured error reply\n{}",
        gateway.log_text()
    );
    assert!(gateway.count(&["agent failed", "503"]) == 1, "the failure is logged once with its status");
    rig.sim.post_as(&rig.world.alice.id, channel, "question two", None);
    // The failed turn's question stays in the history; the error text does not.
    assert_eventually!(
        rig.sim.posts_in(channel).iter().any(|p| p.message == "model heard \"question two\" after 1 earlier messages"),
        "the next question is answered with the first one as history\n{}",
        gateway.log_text()
    );
    assert_eq!(model.requests().last().unwrap().body["stream"], false);

    // Silent mode: nothing is posted for the failure, and the next message is answered.
    let silent = std::fs::read_to_string(&rig.config_path)?.replace("on_error = \"reply\"", "on_error = \"silent\"");
    gateway.reload_with(&silent)?;
    assert_eventually!(gateway.count(&["reload applied"]) == 1, "the reload applies\n{}", gateway.log_text());
    model.fail_next(1, 500);
    let before = rig.sim.posts_in(channel).len();
    rig.sim.post_as(&rig.world.alice.id, channel, "question three", None);
    assert_eventually!(gateway.count(&["agent failed", "500"]) == 1, "the failure is logged\n{}", gateway.log_text());
    rig.sim.post_as(&rig.world.alice.id, channel, "question four", None);
    assert_eventually!(
        rig.sim.posts_in(channel).iter().any(|p| p.message.starts_with("model heard \"question four\"")),
        "the next question is answered\n{}",
        gateway.log_text()
    );
    assert_eq!(
        rig.sim.posts_in(channel).len(),
        before + 3,
        "questions three and four, one reply: nothing for the failure"
    );
    Ok(())
}

#[tokio::test]
async fn a_damaged_or_unwritable_state_dir_is_a_clear_error_at_start() -> Result<()> {
    let rig = Rig::new("oncall", "kind = \"echo\"").await?;
    let state = rig.scratch.path().join("state");
    std::fs::create_dir_all(&state)?;
    std::fs::write(state.join("switchboard.db"), "this is not a database, it is a shopping list\n".repeat(200))?;
    let error = match rig.start(&[]).await {
        Ok(_) => panic!("the gateway started on a damaged database"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("damaged or not a switchboard database"), "{error}");
    assert!(!error.contains("panicked"), "{error}");

    std::fs::remove_dir_all(&state)?;
    std::fs::write(&state, "a file where the state directory should be")?;
    let error = match rig.start(&[]).await {
        Ok(_) => panic!("the gateway started without a state directory"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("state directory") && error.contains("cannot create"), "{error}");
    assert!(!error.contains("panicked"), "{error}");
    Ok(())
}

#[tokio::test]
async fn sigterm_lets_a_running_turn_finish_and_sigusr2_restarts_in_place() -> Result<()> {
    // The agent takes a while: the stop must wait for it and deliver its reply.
    let agent = "kind = \"command\"\ncommand = [\"sh\", \"-c\", \"sleep 1; echo slow answer\"]";
    let rig = Rig::new("onmessage", agent).await?;
    let channel = &rig.world.office_general;
    let gateway = rig.start(&[]).await?;

    // SIGUSR2: a graceful stop, then the same binary again in the same process.
    rig.sim.post_as(&rig.world.alice.id, channel, "before the restart", None);
    assert_eventually!(gateway.count(&["inbound", "session="]) == 1, "the turn starts\n{}", gateway.log_text());
    gateway.signal(libc::SIGUSR2);
    assert_eventually!(
        gateway.count(&["state loaded"]) == 2 && gateway.count(&["WebSocket open"]) == 2,
        "the gateway starts again and reconnects\n{}",
        gateway.log_text()
    );
    let replies = || rig.sim.posts_by(&rig.world.bot.id).into_iter().filter(|p| p.message == "slow answer").count();
    assert_eq!(replies(), 1, "the running turn finished and was delivered before the restart");
    rig.sim.post_as(&rig.world.alice.id, channel, "after the restart", None);
    assert_eventually!(replies() == 2, "the restarted gateway answers\n{}", gateway.log_text());

    // SIGTERM while a turn runs: it finishes, its reply goes out, then exit 0.
    rig.sim.post_as(&rig.world.alice.id, channel, "just before the stop", None);
    assert_eventually!(gateway.count(&["inbound", "session="]) == 3, "the turn starts\n{}", gateway.log_text());
    let status = gateway.stop().await?;
    assert!(status.success(), "{status}");
    assert_eq!(replies(), 3, "the reply of the turn that was running when SIGTERM came");
    Ok(())
}

#[tokio::test]
async fn a_wiped_state_dir_restarted_within_the_pending_post_id_window_still_answers() -> Result<()> {
    // Reply ids start again at 1 in a fresh database; Mattermost answers a pending_post_id it
    // saw in the last 30 s with the earlier post, so marks must differ between databases.
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "first life", &gateway).await;
    gateway.stop().await?;
    std::fs::remove_dir_all(rig.scratch.path().join("state"))?;
    let gateway = rig.start(&[]).await?;
    assert_eq!(rig.ask(&channel, "second life", &gateway).await, "echo: second life");
    Ok(())
}

/// At the most verbose log level, through a connect, a reconnect and an agent call, neither
/// the bot token nor the model's API key reaches the log (tungstenite traces whole requests).
#[tokio::test]
async fn a_trace_level_log_holds_no_token_and_no_api_key() -> Result<()> {
    let model = FakeModel::start().await?;
    let agent = format!(
        "kind = \"openai\"\nbase_url = \"{}\"\nmodel = \"fake-1\"\napi_key_env = \"MODEL_KEY\"\nstream = true",
        model.base_url()
    );
    let rig = Rig::new("onmessage", &agent).await?;
    let key = "sk-trace-level-secret-0815";
    let gateway = rig.start(&[("MODEL_KEY", key), ("SWITCHBOARD_LOG", "trace")]).await?;
    let channel = rig.world.office_general.clone();
    rig.sim.post_as(&rig.world.alice.id, &channel, "first", None);
    assert_eventually!(rig.sim.posts_by(&rig.world.bot.id).len() == 1, "answered\n{}", crate::rig::tail(&gateway, 20));
    let opened = rig.sim.ws_connections_opened();
    rig.sim.drop_connections();
    assert_eventually!(rig.sim.ws_connections_opened() > opened, "reconnected");
    rig.sim.post_as(&rig.world.alice.id, &channel, "second", None);
    assert_eventually!(rig.sim.posts_by(&rig.world.bot.id).len() == 2, "answered after the reconnect");
    let log = gateway.log_text();
    assert!(log.contains(" TRACE "), "trace level is on");
    assert!(!log.contains(&rig.world.bot.token), "the bot token is in the trace log");
    assert!(!log.contains(key), "the API key is in the trace log");
    Ok(())
}

/// The `command` agent's child sees only the allowed variables: not the bot token, not a key.
#[tokio::test]
async fn the_command_agent_runs_with_a_cleared_environment() -> Result<()> {
    let agent = "kind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo token=${MM_BOT_TOKEN:-unset} key=${MODEL_KEY:-unset} path=${PATH:+set} extra=${EXTRA_VAR:-unset}\"]\nenv = [\"PATH\", \"EXTRA_VAR\"]";
    let rig = Rig::new("onmessage", agent).await?;
    let gateway = rig.start(&[("MODEL_KEY", "sk-not-for-children"), ("EXTRA_VAR", "allowed")]).await?;
    rig.sim.post_as(&rig.world.alice.id, &rig.world.office_general, "what do you see?", None);
    let wanted = "token=unset key=unset path=set extra=allowed";
    assert_eventually!(
        rig.sim.posts_by(&rig.world.bot.id).iter().any(|p| p.message == wanted),
        "the child saw only PATH and EXTRA_VAR: {:?}\n{}",
        rig.sim.posts_by(&rig.world.bot.id).iter().map(|p| &p.message).collect::<Vec<_>>(),
        crate::rig::tail(&gateway, 20)
    );
    Ok(())
}

/// An upgrade: the binary file is replaced under the running gateway; SIGUSR2 starts the new
/// file (not `…/switchboard (deleted)`), and nothing is lost. A file that cannot run is
/// refused with the reason, and the old process keeps serving.
#[tokio::test]
async fn sigusr2_after_the_binary_was_replaced_runs_the_new_file_and_refuses_a_broken_one() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let bin_dir = rig.scratch.path().join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let binary = bin_dir.join("switchboard");
    let install = |from: &std::path::Path| -> Result<()> {
        let staged = bin_dir.join(".switchboard.new");
        std::fs::copy(from, &staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&staged, &binary)?;
        Ok(())
    };
    install(&rig.artifacts.switchboard)?;
    let mut env = vec![("MM_BOT_TOKEN", rig.world.bot.token.as_str())];
    env.push(("SWITCHBOARD_LOG", "info,switchboard=debug"));
    let gateway =
        switchboard_tests::harness::Gateway::start(&binary, rig.scratch.path(), &rig.config_path, &env).await?;
    assert_eventually!(gateway.count(&["WebSocket open"]) == 1, "connected\n{}", crate::rig::tail(&gateway, 20));
    let channel = rig.world.office_general.clone();
    rig.ask(&channel, "before the upgrade", &gateway).await;
    let exe = || std::fs::read_link(format!("/proc/{}/exe", gateway.pid())).unwrap_or_default();
    let old_inode = std::fs::metadata(&binary)?.ino();

    // The package manager puts a new file at the same path.
    install(&rig.artifacts.switchboard)?;
    assert_ne!(std::fs::metadata(&binary)?.ino(), old_inode);
    assert!(exe().to_string_lossy().ends_with("(deleted)"), "the running file is gone: {:?}", exe());
    gateway.signal(libc::SIGUSR2);
    assert_eventually!(
        gateway.count(&["state loaded"]) == 2 && gateway.count(&["WebSocket open"]) == 2,
        "the new file starts\n{}",
        crate::rig::tail(&gateway, 30)
    );
    assert_eq!(exe(), binary, "the process now runs the new file");
    rig.ask(&channel, "after the upgrade", &gateway).await;

    // A broken upgrade: the file cannot run. The restart is refused; the gateway serves on.
    std::fs::write(bin_dir.join(".broken"), "#!/bin/sh\necho 'broken build' >&2\nexit 3\n")?;
    std::fs::set_permissions(bin_dir.join(".broken"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(bin_dir.join(".broken"), &binary)?;
    gateway.signal(libc::SIGUSR2);
    assert_eventually!(
        gateway.count(&["restart refused, the gateway keeps running"]) == 1,
        "the restart is refused\n{}",
        crate::rig::tail(&gateway, 30)
    );
    rig.ask(&channel, "after the refused restart", &gateway).await;
    assert_eq!(gateway.count(&["state loaded"]), 2, "no third start");
    rig.assert_answered_once(
        &[
            (channel.clone(), "before the upgrade".into()),
            (channel.clone(), "after the upgrade".into()),
            (channel.clone(), "after the refused restart".into()),
        ],
        &gateway,
    )
    .await;
    Ok(())
}

/// An agent that answers more than `max_output_bytes`: no more of it is read, and the person
/// gets the configured error reply; the next turn is answered as usual.
#[tokio::test]
async fn an_agent_answer_over_the_output_cap_is_an_error_reply() -> Result<()> {
    let agent = "kind = \"command\"\ncommand = [\"sh\", \"-c\", \"if grep -q flood; then head -c 5000000 /dev/zero | tr '\\\\0' a; else echo short answer; fi\"]\nmax_output_bytes = 1000\nhistory_limit = 0\non_error = \"reply\"\nerror_reply = \"That answer was too long to send.\"";
    let rig = Rig::new("onmessage", agent).await?;
    let gateway = rig.start(&[]).await?;
    let channel = rig.world.office_general.clone();
    rig.sim.post_as(&rig.world.alice.id, &channel, "flood me", None);
    let posts = || rig.sim.posts_by(&rig.world.bot.id).into_iter().map(|p| p.message).collect::<Vec<_>>();
    assert_eventually!(posts().len() == 1, "one reply\n{}", crate::rig::tail(&gateway, 20));
    assert_eq!(posts(), ["That answer was too long to send."]);
    assert_eq!(
        gateway.count(&["agent failed", "max_output_bytes (1000 bytes)"]),
        1,
        "{}",
        crate::rig::tail(&gateway, 20)
    );
    rig.sim.post_as(&rig.world.alice.id, &channel, "a normal question", None);
    assert_eventually!(posts().len() == 2, "the next turn is answered\n{}", crate::rig::tail(&gateway, 20));
    assert_eq!(posts()[1], "short answer");
    Ok(())
}
