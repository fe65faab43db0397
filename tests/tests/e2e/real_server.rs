//! Mattermost as the real server behaves (MATTERMOST.md §A6), against the strict simulator:
//! gaps that cannot resume (UpdateAt semantics, conversations never seen, unknown senders),
//! resumed drops and the reconnect backoff, bots, webhooks and announcements, rate limits,
//! a deleted thread root, a revoked token, reply order, and exactly once after `kill -9` with
//! the server's `pending_post_id` de-duplication switched off.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::Result;
use switchboard_tests::{
    assert_eventually,
    harness::Gateway,
    sim::{PostSpec, RateLimit, SimOptions},
};

use crate::rig::{tail, Rig, RigOptions};

/// The longest `reconnecting in N ms` the gateway logged.
fn longest_reconnect_delay(gateway: &Gateway) -> u64 {
    gateway
        .lines_with(&["reconnecting in"])
        .iter()
        .filter_map(|line| line.split("reconnecting in ").nth(1)?.split(" ms").next()?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// A gap the server cannot resume, over three conversations seen before, one channel and one
/// first DM never seen: every new post is answered once, nothing old comes back.
#[tokio::test]
async fn a_gap_without_resume_answers_each_new_post_once_including_conversations_never_seen() -> Result<()> {
    let rig = Rig::with(RigOptions { chatmode: "oncall", ..RigOptions::default() }).await?;
    let world = &rig.world;
    // DMs only from allow-listed usernames: a caught-up DM's sender must be looked up.
    let carol = rig.sim.add_user("carol", false);
    rig.sim.add_team_member(&world.team_id, &carol.id);
    let config = std::fs::read_to_string(&rig.config_path)?
        .replace("dm_policy = \"open\"", "dm_policy = \"allowlist\"")
        .replace("allow_from = []", "allow_from = [\"alice\", \"carol\"]");
    std::fs::write(&rig.config_path, config)?;
    let seen = rig.open_channels(3);
    let unseen = rig.open_channels(4).pop().unwrap();
    let carol_dm = rig.sim.direct_channel(&carol.id, &world.bot.id);
    let gateway = rig.start(&[]).await?;
    let mut expected = Vec::new();
    for (i, channel) in seen.iter().enumerate() {
        let token = format!("before-{i}");
        rig.sim.post_as(&world.alice.id, channel, &format!("@switchboard-bot {token}"), None);
        expected.push((channel.clone(), token));
    }
    // Old posts that the gap will touch: not mentioned (so never answered), then edited to a
    // mention; one answered already and then reacted to; a thread root from before.
    let quiet = rig.sim.post_as(&world.alice.id, &seen[0], "no mention here", None);
    let root = rig.sim.post_as(&world.bob.id, &seen[1], "a root from before the gap", None);
    rig.assert_answered_once(&expected, &gateway).await;
    let answered_before = rig.sim.posts_by(&world.bot.id);

    // The server restarts: a new connection id, nothing to resume.
    rig.sim.refuse_websockets_for(Duration::from_secs(2));
    rig.sim.drop_and_forget_connections();
    rig.sim.edit_post(&quiet.id, "@switchboard-bot edited long after it was posted");
    rig.sim.react(&world.bob.id, &answered_before[0].id, "thumbsup");
    let mut gap = Vec::new();
    for (i, channel) in seen.iter().enumerate() {
        let token = format!("gap-{i}");
        rig.sim.post_as(&world.alice.id, channel, &format!("@switchboard-bot {token}"), None);
        gap.push((channel.clone(), token));
    }
    let in_thread = "gap-thread";
    rig.sim.post_as(&world.alice.id, &seen[1], &format!("@switchboard-bot {in_thread}"), Some(&root.id));
    gap.push((seen[1].clone(), in_thread.to_string()));
    rig.sim.post_as(&world.alice.id, &unseen, "@switchboard-bot gap-unseen-channel", None);
    gap.push((unseen.clone(), "gap-unseen-channel".into()));
    rig.sim.post_as(&carol.id, &carol_dm, "gap-first-dm", None);
    gap.push((carol_dm.clone(), "gap-first-dm".into()));
    let deleted = rig.sim.post_as(&world.alice.id, &seen[2], "@switchboard-bot deleted before anyone saw it", None);
    rig.sim.delete_post(&deleted.id);

    rig.assert_answered_once(&gap, &gateway).await;
    expected.extend(gap.iter().cloned());
    rig.assert_answered_once(&expected, &gateway).await;
    let replies = rig.sim.posts_by(&world.bot.id);
    assert_eq!(
        replies.len(),
        expected.len(),
        "nothing else answered: {:?}",
        replies.iter().map(|p| &p.message).collect::<Vec<_>>()
    );
    let thread_reply = replies.iter().find(|p| p.message == format!("echo: {in_thread}")).unwrap();
    assert_eq!(thread_reply.root_id, root.id, "the thread reply stays in its thread");
    assert!(gateway.count(&["fetching what was posted meanwhile"]) >= 1, "{}", tail(&gateway, 40));
    println!(
        "gap without resume: {} new posts over 3 seen channels, 1 unseen channel and 1 first DM, all answered once; {} replies in all",
        gap.len(),
        replies.len()
    );
    Ok(())
}

/// A resume sends no `hello`: eight resumed drops in a row still reconnect within about the
/// initial delay.
#[tokio::test]
async fn resumed_drops_keep_reconnecting_at_the_initial_delay() -> Result<()> {
    // A grace shorter than the refusal below, longer than a resumed reconnect.
    let rig = Rig::with(RigOptions { gateway_keys: "disconnected_grace_ms = 1500", ..RigOptions::default() }).await?;
    let channel = rig.world.office_general.clone();
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "before the drops", &gateway).await;
    for drop in 0..8 {
        let resumed = rig.sim.resumed_connections();
        rig.sim.drop_connections();
        assert_eventually!(
            @within Duration::from_secs(10),
            rig.sim.resumed_connections() > resumed,
            "drop {drop} resumed\n{}",
            tail(&gateway, 20)
        );
        rig.ask(&channel, &format!("after drop {drop}"), &gateway).await;
    }
    rig.ask(&channel, "after eight drops", &gateway).await;
    let longest = longest_reconnect_delay(&gateway);
    println!("longest reconnect delay over 8 resumed drops: {longest} ms");
    assert!(longest <= 1500, "reconnects stay near reconnect_initial_ms (1000 + jitter): {longest} ms");
    // /status tells whether the instance's WebSocket is up, and since when.
    let up = || async { gateway.status().await.map(|s| s["connections"]["mattermost"]["websockets_up"].clone()).ok() };
    assert_eq!(up().await, Some(serde_json::json!(1)));
    assert_eq!(gateway.admin_get("/readyz").await?.0, 200, "ready through eight quick reconnects");
    rig.sim.refuse_websockets_for(Duration::from_secs(4));
    rig.sim.drop_connections();
    assert_eventually!(up().await == Some(serde_json::json!(0)), "down while the server refuses");
    // /readyz: not ready once the socket has been down longer than the grace, with why.
    let readyz = || async { gateway.admin_get("/readyz").await.ok() };
    assert_eventually!(
        readyz().await.is_some_and(|(code, body)| code == 503 && body.contains("mattermost: no WebSocket up for")),
        "not ready past the grace: {:?}",
        readyz().await
    );
    assert_eventually!(up().await == Some(serde_json::json!(1)), "up again");
    assert_eventually!(readyz().await.is_some_and(|(code, _)| code == 200), "ready again: {:?}", readyz().await);

    Ok(())
}

/// Bots, webhooks, system posts and `@channel` are not answered; `/me` and `@bot.` are.
#[tokio::test]
async fn bots_webhooks_and_announcements_are_not_answered_but_me_posts_and_full_stops_are() -> Result<()> {
    let rig = Rig::with(RigOptions { chatmode: "oncall", ..RigOptions::default() }).await?;
    let world = &rig.world;
    let channel = rig.world.office_general.clone();
    let other_bot = rig.sim.add_user("other-bot", true);
    rig.sim.add_member(&channel, &other_bot.id);
    let gateway = rig.start(&[]).await?;
    rig.sim.post_as(&other_bot.id, &channel, "@switchboard-bot are you a bot too?", None);
    rig.sim.post_webhook(&channel, "@switchboard-bot deploy finished", Some("ci"));
    rig.sim.post_system(&channel, "system_join_channel", "@switchboard-bot joined the channel");
    rig.sim.post_as(&world.alice.id, &channel, "@channel lunch is here", None);
    rig.sim.post_as(&world.alice.id, &channel, "@here standup in 5", None);
    rig.sim.post_with(
        &world.alice.id,
        &channel,
        PostSpec { message: "*waves at @switchboard-bot*".into(), kind: "me".into(), ..PostSpec::default() },
    );
    rig.sim.post_as(&world.alice.id, &channel, "could you look at this, @switchboard-bot.", None);
    let wanted = ["echo: *waves at *", "echo: could you look at this, ."];
    assert_eventually!(
        wanted.iter().all(|w| rig.sim.posts_by(&world.bot.id).iter().any(|p| p.message == *w)),
        "the /me post and the full-stop mention are answered: {:?}\n{}",
        rig.sim.posts_by(&world.bot.id).iter().map(|p| &p.message).collect::<Vec<_>>(),
        tail(&gateway, 30)
    );
    // Everything was posted before these two: had any other been answered, it would be here.
    rig.sim.post_as(&world.alice.id, &channel, "@switchboard-bot last one", None);
    assert_eventually!(
        rig.sim.posts_by(&world.bot.id).iter().any(|p| p.message == "echo: last one"),
        "the last mention is answered\n{}",
        tail(&gateway, 30)
    );
    let answers: Vec<String> = rig.sim.posts_by(&world.bot.id).into_iter().map(|p| p.message).collect();
    assert_eq!(answers.len(), 3, "nothing else answered: {answers:?}");
    Ok(())
}

/// With the server's rate limit on, a gap over many channels is caught up completely: every
/// request waits as long as `Retry-After` says, and nothing is given up.
#[tokio::test]
async fn a_rate_limited_catch_up_waits_as_told_and_gives_nothing_up() -> Result<()> {
    let rig = Rig::with(RigOptions::default()).await?;
    let channels = rig.open_channels(30);
    let gateway = rig.start(&[]).await?;
    let mut expected = Vec::new();
    for (i, channel) in channels.iter().enumerate() {
        expected.push((channel.clone(), format!("seen-{i}")));
        rig.sim.post_as(&rig.world.alice.id, channel, &format!("seen-{i}"), None);
    }
    rig.assert_answered_once(&expected, &gateway).await;
    rig.sim.set_rate_limit(Some(RateLimit { per_sec: 6, burst: 3 }));
    rig.sim.refuse_websockets_for(Duration::from_secs(1));
    rig.sim.drop_and_forget_connections();
    for (i, channel) in channels.iter().enumerate() {
        expected.push((channel.clone(), format!("gap-{i}")));
        rig.sim.post_as(&rig.world.alice.id, channel, &format!("gap-{i}"), None);
    }
    rig.assert_answered_once(&expected, &gateway).await;
    let throttled = rig.sim.throttled_count();
    println!("rate-limited catch-up: {throttled} requests answered 429, every post answered once");
    assert!(throttled > 0, "the limit was hit");
    assert_eq!(gateway.count(&["giving up"]), 0, "{}", tail(&gateway, 30));
    assert_eq!(gateway.count(&["are not answered"]), 0, "{}", tail(&gateway, 30));
    Ok(())
}

/// Three replies to one channel, the first one rate-limited: they arrive in order.
#[tokio::test]
async fn replies_to_one_conversation_arrive_in_order_when_the_first_is_rate_limited() -> Result<()> {
    let rig = Rig::with(RigOptions::default()).await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "warm up", &gateway).await;
    rig.sim.fail_next_posts(1, 429);
    for text in ["first", "second", "third"] {
        rig.sim.post_as(&rig.world.alice.id, &channel, text, None);
    }
    let replies = || -> Vec<String> {
        rig.sim.posts_by(&rig.world.bot.id).into_iter().map(|p| p.message).filter(|m| m != "echo: warm up").collect()
    };
    assert_eventually!(replies().len() == 3, "three replies: {:?}\n{}", replies(), tail(&gateway, 30));
    assert_eq!(replies(), ["echo: first", "echo: second", "echo: third"]);
    Ok(())
}

/// The thread's root is deleted while the agent works: the reply goes to the channel.
#[tokio::test]
async fn a_reply_to_a_deleted_thread_goes_to_its_channel() -> Result<()> {
    let agent = "kind = \"command\"\ncommand = [\"sh\", \"-c\", \"sleep 1; echo late answer\"]";
    let rig = Rig::with(RigOptions { agent, ..RigOptions::default() }).await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    let root = rig.sim.post_as(&rig.world.bob.id, &channel, "a thread", None);
    assert_eventually!(gateway.count(&["inbound", "session="]) == 1, "the root's turn starts");
    rig.sim.post_as(&rig.world.alice.id, &channel, "a question in the thread", Some(&root.id));
    assert_eventually!(gateway.count(&["inbound", "session="]) == 2, "the reply's turn starts");
    rig.sim.delete_post(&root.id);
    let late =
        || rig.sim.posts_by(&rig.world.bot.id).into_iter().filter(|p| p.message.ends_with("late answer")).count();
    assert_eventually!(
        @within Duration::from_secs(30),
        late() == 2,
        "both replies arrive\n{}",
        tail(&gateway, 30)
    );
    let posts = rig.sim.posts_by(&rig.world.bot.id);
    assert!(posts.iter().all(|p| p.root_id.is_empty()), "top level: {posts:?}");
    assert!(posts.iter().any(|p| p.message.starts_with("(In reply to a thread")), "{posts:?}");
    Ok(())
}

/// A revoked token: the upgrade still succeeds, unauthenticated; the gateway says so once and
/// `/readyz` fails until the token works again.
#[tokio::test]
async fn a_revoked_token_is_one_clear_error_and_fails_readiness() -> Result<()> {
    let rig = Rig::with(RigOptions { gateway_keys: "", ..RigOptions::default() }).await?;
    let gateway = rig.start(&[]).await?;
    assert_eventually!(gateway.admin_get("/readyz").await?.0 == 200, "ready first");
    let token = rig.world.bot.token.clone();
    rig.sim.revoke_token(&rig.world.bot.id);
    rig.sim.drop_and_forget_connections();
    assert_eventually!(
        @within Duration::from_secs(20),
        gateway.admin_get("/readyz").await?.0 == 503,
        "readiness fails\n{}",
        tail(&gateway, 30)
    );
    let (_, body) = gateway.admin_get("/readyz").await?;
    assert!(body.contains("refused the bot token"), "{body}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(gateway.count(&["refused the bot token", "ERROR"]), 1, "one error:\n{}", tail(&gateway, 40));
    assert!(!gateway.log_text().contains(&token), "the token is never logged");
    Ok(())
}

/// Exactly once without the server's help: `pending_post_id` de-duplication off, three
/// `kill -9` while 500 messages stream over 10 channels.
#[tokio::test]
async fn kill_9_three_times_without_server_deduplication_loses_and_duplicates_nothing() -> Result<()> {
    let sim = SimOptions { dedup_pending_post_ids: false, ..SimOptions::default() };
    let rig = Rig::with(RigOptions { sim, ..RigOptions::default() }).await?;
    let channels = rig.open_channels(10);
    let gateway = rig.start(&[]).await?;
    let counter = AtomicUsize::new(0);
    let (posted, rig) = (&counter, &rig);
    let expected: Vec<(String, String)> =
        (0..500).map(|i| (channels[i % channels.len()].clone(), format!("x-{i:03}-{}", i * 7919 % 1000))).collect();
    let stream = async {
        for (channel, token) in &expected {
            rig.sim.post_as(&rig.world.alice.id, channel, token, None);
            posted.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(6)).await;
        }
    };
    let crashes = async move {
        let mut gateway = gateway;
        let mut kills = Vec::new();
        for at in [100, 230, 360] {
            while posted.load(Ordering::SeqCst) < at {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Right after replies left: the gateway has just posted.
            let before = rig.sim.posts_by(&rig.world.bot.id).len();
            assert_eventually!(rig.sim.posts_by(&rig.world.bot.id).len() > before, "replies are leaving");
            kills.push(rig.sim.posts_by(&rig.world.bot.id).len());
            gateway.kill_hard()?;
            gateway = rig.start(&[]).await?;
        }
        anyhow::Ok((kills, gateway))
    };
    let ((), crashed) = tokio::join!(stream, crashes);
    let (kills, gateway) = crashed?;
    rig.assert_answered_once(&expected, &gateway).await;
    let total = rig.bot_posts().values().map(Vec::len).sum::<usize>();
    println!("kill -9 ×3 without de-duplication: replies posted when killed {kills:?}; {total} replies to 500 messages, 0 duplicates, 0 lost");
    assert_eq!(total, 500, "500 messages, 500 replies");
    Ok(())
}

/// More posts in a gap than the server returns for one `since` query (1000 rows, not the
/// newest): the adapter walks the channel page by page and answers every one once.
#[tokio::test]
async fn a_catch_up_past_the_servers_row_limit_answers_every_post_once() -> Result<()> {
    // One session takes all 1,100 posts; its lane holds 16, the rest wait in the store.
    let rig = Rig::with(RigOptions { gateway_keys: "lane_capacity = 16", ..RigOptions::default() }).await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    let mut expected = vec![(channel.clone(), "seen".to_string())];
    rig.sim.post_as(&rig.world.alice.id, &channel, "seen", None);
    rig.assert_answered_once(&expected, &gateway).await;
    rig.sim.refuse_websockets_for(Duration::from_secs(1));
    rig.sim.drop_and_forget_connections();
    for i in 0..1100 {
        let token = format!("many-{i:04}");
        rig.sim.post_as(&rig.world.alice.id, &channel, &token, None);
        expected.push((channel.clone(), token));
    }
    rig.assert_answered_once(&expected, &gateway).await;
    assert!(rig.sim.posts_queries(&channel) >= 2, "paged: {} queries", rig.sim.posts_queries(&channel));
    Ok(())
}

/// A half-open drop: the server still holds the old connection as active, so the reconnect
/// gets a new connection id (no resume). The adapter's ping notices the dead socket; what was
/// posted meanwhile, a first DM included, is caught up.
#[tokio::test]
async fn a_half_open_drop_is_noticed_and_what_was_posted_meanwhile_is_answered() -> Result<()> {
    let rig = Rig::with(RigOptions { channel_keys: "ping_interval_ms = 500", ..RigOptions::default() }).await?;
    let carol = rig.sim.add_user("carol", false);
    rig.sim.add_team_member(&rig.world.team_id, &carol.id);
    let carol_dm = rig.sim.direct_channel(&carol.id, &rig.world.bot.id);
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    let mut expected = vec![(channel.clone(), "before".to_string())];
    rig.sim.post_as(&rig.world.alice.id, &channel, "before", None);
    rig.assert_answered_once(&expected, &gateway).await;
    let hellos = rig.sim.hellos_sent();
    rig.sim.half_open_drop();
    for (who, conversation, token) in [
        (&rig.world.alice.id, &channel, "during-1"),
        (&carol.id, &carol_dm, "during-dm"),
        (&rig.world.alice.id, &channel, "during-2"),
    ] {
        rig.sim.post_as(who, conversation, token, None);
        expected.push((conversation.clone(), token.to_string()));
    }
    rig.assert_answered_once(&expected, &gateway).await;
    assert!(rig.sim.hellos_sent() > hellos, "a new connection id, not a resume");
    Ok(())
}

/// The server is slow to create a post: the gateway's request times out, and its repeat finds
/// the first still being handled (500 `deduplicate_create_post.pending`). The reply is looked
/// for until the first attempt's post shows up, and is posted once. (This needs the server's
/// de-duplication cache on: it is what answers the 500. Without it a server that finishes a
/// request long after its client gave up can make a second post; see the README.)
#[tokio::test]
async fn a_post_still_being_created_by_the_server_is_not_posted_twice() -> Result<()> {
    let sim = SimOptions::default();
    assert!(sim.dedup_pending_post_ids);
    let rig = Rig::with(RigOptions { channel_keys: "request_timeout_ms = 500", sim, ..RigOptions::default() }).await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "warm up", &gateway).await;
    rig.sim.delay_next_posts(1, Duration::from_secs(3));
    rig.sim.post_as(&rig.world.alice.id, &channel, "slow server", None);
    let replies =
        || rig.sim.posts_by(&rig.world.bot.id).into_iter().filter(|p| p.message == "echo: slow server").count();
    assert_eventually!(replies() == 1, "the reply arrives\n{}", tail(&gateway, 30));
    assert_eventually!(
        gateway.count(&["delivered reply", "session="]) == 2,
        "and is confirmed\n{}",
        tail(&gateway, 30)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(replies(), 1, "posted once\n{}", tail(&gateway, 30));
    Ok(())
}
