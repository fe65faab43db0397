//! The real Synapse the Matrix adapter will be tested against (`switchboard_tests::matrix`):
//! it starts from the venv `cargo xtask real-servers synapse` installs, takes users, rooms and
//! a quick burst of messages (the test config's raised rate limits: no 429), reads them back
//! in order, posts a repeated transaction id once, logs every request, and stops on SIGTERM.

use std::time::Instant;

use anyhow::Result;
use switchboard_tests::matrix::{Preset, Synapse};

#[tokio::test]
async fn synapse_takes_a_quick_burst_reads_it_back_in_order_and_posts_a_repeated_txn_once() -> Result<()> {
    let synapse = Synapse::start().await?;
    eprintln!("synapse up on {} (pid {:?}) in {:?}", synapse.base_url(), synapse.pid(), synapse.started_in());

    let alice = synapse.register("alice", true).await?;
    let bob = synapse.register("bob", false).await?;
    assert_eq!(alice.user_id, "@alice:localhost");
    assert_eq!(bob.user_id, "@bob:localhost");
    let bob_before = synapse.sync(&bob, None).await?;

    let room = synapse.create_room(&alice, Preset::PrivateChat, &[&bob.user_id]).await?;
    let invited = synapse.sync(&bob, Some(&bob_before.next_batch)).await?;
    assert_eq!(invited.invited_rooms(), vec![room.clone()], "bob's /sync shows the invite");
    assert_eq!(synapse.join(&bob, &room).await?, room);

    // A burst well past Synapse's default rc_message (burst 10): every PUT answers 200.
    let burst = Instant::now();
    let mut sent = Vec::new();
    for i in 0..20 {
        let body = format!("message {i:02}");
        sent.push((body.clone(), synapse.send_text(&alice, &room, &body).await?));
    }
    let burst = burst.elapsed();
    let read = synapse.messages(&bob, &room).await?;
    assert_eq!(
        read.iter().map(|m| (m.body.clone(), m.event_id.clone())).collect::<Vec<_>>(),
        sent,
        "bob reads the 20 messages in the order sent"
    );
    assert!(read.iter().all(|m| m.sender == alice.user_id));

    // The same transaction id twice from the same access token: one post, one event id.
    let first = synapse.send_text_txn(&alice, &room, "reply-42", "sent once").await?;
    let again = synapse.send_text_txn(&alice, &room, "reply-42", "sent once").await?;
    assert_eq!(first, again, "a repeated txn id answers with the first event's id");
    let read = synapse.messages(&bob, &room).await?;
    assert_eq!(read.len(), 21);
    assert_eq!(read.iter().filter(|m| m.body == "sent once").count(), 1, "the repeat posted nothing");

    // The access log shows each request (how the adapter's tests will see its /sync calls).
    assert_eq!(synapse.access_lines(&["PUT", "/send/m.room.message/"]).len(), 22, "{}", synapse.log_tail(30));

    let stopped = synapse.stop().await?;
    eprintln!("20 messages in {burst:?}; synapse stopped in {:?} ({})", stopped.took, stopped.status);
    assert!(!stopped.killed, "Synapse stops on SIGTERM");
    assert!(stopped.status.success(), "Synapse exits cleanly: {}", stopped.status);
    Ok(())
}
