use prometheus_client::metrics::histogram::Histogram;
use rusqlite::params;

use super::{schema::MIGRATIONS, *};
use crate::session::Session;

fn inbound(id: &str) -> Inbound {
    Inbound {
        message_id: id.into(),
        peer_kind: "channel".into(),
        peer_id: "c1".into(),
        thread_root_id: String::new(),
        sender_id: "u1".into(),
        sender_name: "alice".into(),
        text: format!("hello {id}"),
        created_at_ms: 1,
    }
}

#[test]
fn redelivered_inbound_is_recognised_and_state_saved_with_it() {
    let store = Store::in_memory().unwrap();
    let batch = BatchRecord {
        inbound: vec![inbound("p1"), inbound("p2")],
        adapter_state: Some((1, "{\"seq\":3}".into())),
        ..Default::default()
    };
    let ids = store.commit_batch("mm", &batch, 10).unwrap();
    assert!(ids.iter().all(Option::is_some));
    let again = BatchRecord { inbound: vec![inbound("p2"), inbound("p3")], ..Default::default() };
    let ids = store.commit_batch("mm", &again, 11).unwrap();
    assert_eq!(ids[0], None);
    assert!(ids[1].is_some());
    assert_eq!(store.adapter_state("mm").unwrap(), Some((1, "{\"seq\":3}".into())));
    assert_eq!(store.pending_inbound("mm").unwrap().len(), 3);
    assert!(store.pending_inbound("other").unwrap().is_empty());
}

#[test]
fn a_finished_turn_queues_its_reply_and_keeps_history() {
    let store = Store::in_memory().unwrap();
    let target =
        DeliveryTarget { channel_instance: "mm".into(), conversation_id: "c1".into(), thread_root_id: "".into() };
    let ids = store.commit_batch("mm", &BatchRecord { inbound: vec![inbound("p1")], ..Default::default() }, 1).unwrap();
    let turn = FinishedTurn {
        inbound_id: ids[0].unwrap(),
        session_key: "k".into(),
        transcript: vec![
            Turn { role: "user".into(), content: "hi".into() },
            Turn { role: "assistant".into(), content: "hello".into() },
        ],
        message_id: "p1".into(),
        reply: Some((target, "hello".into())),
        finished_at_ms: 2,
    };
    let reply_id = store.finish_turn(&turn).unwrap().unwrap();
    assert!(store.pending_inbound("mm").unwrap().is_empty());
    assert_eq!(store.queued_replies("mm").unwrap()[0].id, reply_id);
    assert_eq!(store.history("k", 1).unwrap(), vec![Turn { role: "assistant".into(), content: "hello".into() }]);
    assert_eq!(store.history("k", 10).unwrap().len(), 2);
    let done = BatchRecord { delivered: vec![(reply_id as u64, "post1".into())], ..Default::default() };
    store.commit_batch("mm", &done, 3).unwrap();
    assert!(store.queued_replies("mm").unwrap().is_empty());
    assert_eq!(store.counts().unwrap().outbound_delivered, 1);
}

fn turn_answering(inbound_id: i64, session_key: &str, text: &str) -> FinishedTurn {
    FinishedTurn {
        inbound_id,
        session_key: session_key.into(),
        transcript: vec![Turn { role: "user".into(), content: text.into() }],
        message_id: format!("m{inbound_id}"),
        reply: Some((
            DeliveryTarget {
                channel_instance: "mm".into(),
                conversation_id: session_key.into(),
                thread_root_id: "".into(),
            },
            format!("echo: {text}"),
        )),
        finished_at_ms: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_grouped_together_are_each_stored_or_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(dir.path(), Durability::Full).unwrap());
    // One turn in the group fails inside SQLite; only it may be rolled back.
    store
        .connection
        .lock()
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON turns WHEN NEW.content = 't13'
             BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
        )
        .unwrap();
    let writer = std::sync::Arc::new(StoreWriter::start(store.clone(), Histogram::new([0.001])));
    let batch = BatchRecord { inbound: (0..200).map(|i| inbound(&format!("p{i}"))).collect(), ..Default::default() };
    let ids: Vec<i64> = writer.commit_batch("mm", batch, 1).await.unwrap().into_iter().map(Option::unwrap).collect();
    let turns: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let writer = writer.clone();
            tokio::spawn(
                async move { writer.finish(turn_answering(id, &format!("s{}", i % 7), &format!("t{i}"))).await },
            )
        })
        .collect();
    // Channel batches arrive among the turns (redeliveries of p0..p9 and new messages).
    let batches: Vec<_> = (0..10)
        .map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move {
                let record = BatchRecord {
                    inbound: vec![inbound(&format!("p{i}")), inbound(&format!("q{i}"))],
                    ..Default::default()
                };
                writer.commit_batch("mm", record, 3).await
            })
        })
        .collect();
    let mut reply_ids = Vec::new();
    for (i, task) in turns.into_iter().enumerate() {
        let outcome = task.await.unwrap();
        if i == 13 {
            assert!(outcome.unwrap_err().to_string().contains("poisoned"));
        } else {
            reply_ids.push((i, outcome.unwrap().unwrap()));
        }
    }
    for task in batches {
        let ids = task.await.unwrap().unwrap();
        assert_eq!(ids[0], None, "a redelivery is recognised");
        assert!(ids[1].is_some());
    }
    let queued = store.queued_replies("mm").unwrap();
    assert_eq!(queued.len(), 199);
    for (i, reply_id) in &reply_ids {
        let reply = queued.iter().find(|r| r.id == *reply_id).unwrap();
        assert_eq!(reply.text, format!("echo: t{i}"));
        assert_eq!(reply.target.conversation_id, format!("s{}", i % 7));
    }
    // The refused turn left nothing behind: its message is still to be answered.
    let pending: Vec<String> = store.pending_inbound("mm").unwrap().into_iter().map(|(_, m)| m.message_id).collect();
    let mut expected: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
    expected.push("p13".into());
    expected.sort();
    let mut pending = pending;
    pending.sort();
    assert_eq!(pending, expected);
    assert_eq!(store.history("s0", 1000).unwrap().len(), 29);
    assert_eq!(store.history("s6", 1000).unwrap().len(), 27, "t13 (of 28 in s6) was refused");
}

#[test]
fn a_file_that_is_not_a_database_is_reported_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DATABASE_FILE), vec![0x5a; 8192]).unwrap();
    match Store::open(dir.path(), Durability::Normal) {
        Err(StoreError::Corrupt { .. }) => {}
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("opened a file full of junk"),
    }
}

#[test]
fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), Durability::Full).unwrap();
        store.commit_batch("mm", &BatchRecord { inbound: vec![inbound("p1")], ..Default::default() }, 1).unwrap();
    }
    let store = Store::open(dir.path(), Durability::Full).unwrap();
    assert_eq!(store.pending_inbound("mm").unwrap().len(), 1);
}

#[test]
fn a_version_2_database_keeps_its_pending_work_through_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    {
        let connection = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        connection.execute_batch(&MIGRATIONS[..2].join(";\n")).unwrap();
        connection.pragma_update(None, "user_version", 2).unwrap();
        connection
            .execute_batch(
                "INSERT INTO inbound (channel_instance, message_id, peer_kind, peer_id, thread_root_id, sender_id,
                     sender_name, text, created_at_ms, received_at_ms, status)
                 VALUES ('mm', 'p1', 'channel', 'c', '', 'u', 'alice', 'hi', 1, 1, 'received'),
                        ('mm', 'p2', 'channel', 'c', '', 'u', 'alice', 'hi', 1, 1, 'answered');
                 INSERT INTO outbound (session_key, channel_instance, conversation_id, thread_root_id, text,
                     inbound_id, status, created_at_ms, updated_at_ms)
                 VALUES ('s', 'mm', 'c', '', 'queued one', 1, 'queued', 1, 1),
                        ('s', 'mm', 'c', '', 'sent one', 2, 'delivered', 1, 1);",
            )
            .unwrap();
    }
    let store = Store::open(dir.path(), Durability::Full).unwrap();
    let pending = store.pending_inbound("mm").unwrap();
    assert_eq!(pending.iter().map(|p| p.1.message_id.as_str()).collect::<Vec<_>>(), ["p1"]);
    let queued = store.queued_replies("mm").unwrap();
    assert_eq!(queued.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(), ["queued one"]);
    let counts = store.counts().unwrap();
    assert_eq!((counts.inbound_pending, counts.outbound_queued, counts.outbound_delivered), (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_wait_for_a_wal_sync_and_leave_in_the_order_they_were_queued() {
    for durability in [Durability::Full, Durability::Normal] {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path(), durability).unwrap());
        let writer = StoreWriter::start(store.clone(), Histogram::new([0.001]));
        let batch = BatchRecord { inbound: (0..40).map(|i| inbound(&format!("p{i}"))).collect(), ..Default::default() };
        let ids = writer.commit_batch("mm", batch, 1).await.unwrap();
        let (told, mut sent) = tokio::sync::mpsc::unbounded_channel();
        let mut queued = Vec::new();
        for (i, id) in ids.into_iter().enumerate() {
            let reply_id = writer.finish(turn_answering(id.unwrap(), "s", &format!("t{i}"))).await.unwrap().unwrap();
            queued.push(reply_id);
            let told = told.clone();
            writer.after_sync(Box::new(move |synced| {
                let _ = told.send(synced.map(|()| reply_id));
            }));
        }
        let mut left = Vec::new();
        while left.len() < queued.len() {
            let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), sent.recv()).await;
            left.push(outcome.expect("every reply is told").unwrap().expect("the WAL syncs"));
        }
        assert_eq!(left, queued, "{durability:?}: replies leave in the order they were queued");

        // Many waiters while commits keep coming: the syncs overlap and end in any order,
        // the answers still come in the order asked.
        let writer = std::sync::Arc::new(writer);
        let committing = {
            let writer = writer.clone();
            tokio::spawn(async move {
                for round in 0..50 {
                    let inbound = (0..5).map(|i| inbound(&format!("q{round}-{i}"))).collect();
                    writer.commit_batch("mm", BatchRecord { inbound, ..Default::default() }, 1).await.unwrap();
                }
            })
        };
        let (told, mut answered) = tokio::sync::mpsc::unbounded_channel();
        for asked in 0..1000 {
            let told = told.clone();
            writer.after_sync(Box::new(move |synced| {
                let _ = told.send(synced.map(|()| asked));
            }));
            if asked % 20 == 0 {
                tokio::task::yield_now().await;
            }
        }
        committing.await.unwrap();
        for expected in 0..1000 {
            let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), answered.recv()).await;
            assert_eq!(outcome.expect("every waiter is told").unwrap().expect("the WAL syncs"), expected);
        }
    }
}

#[test]
fn pruning_deletes_finished_rows_past_their_cut_off_and_keeps_pending_work() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Durability::Normal).unwrap();
    {
        let connection = store.connection.lock().unwrap();
        for (i, at) in [(1, 100), (2, 200), (3, 5_000)] {
            connection
                .execute(
                    "INSERT INTO turns (session_key, role, content, message_id, at_ms) VALUES ('k', 'user', 'x', ?1, ?2)",
                    params![format!("m{i}"), at],
                )
                .unwrap();
            connection
                .execute(
                    "INSERT INTO dead_letters (channel_instance, generation, event_kind, conversation_id, session_key, payload, error, at_ms)
                     VALUES ('mm', 1, 'ws_frame', 'c', 'k', 'p', 'e', ?1)",
                    [at],
                )
                .unwrap();
        }
        // Old: one answered, one still waiting; one new answered.
        for (id, status, at) in [("a", "answered", 100), ("w", "received", 100), ("n", "answered", 5_000)] {
            connection
                .execute(
                    "INSERT INTO inbound (channel_instance, message_id, peer_kind, peer_id, thread_root_id, sender_id,
                     sender_name, text, created_at_ms, received_at_ms, status)
                     VALUES ('mm', ?1, 'channel', 'c', '', 'u', 'alice', 't', ?2, ?2, ?3)",
                    params![id, at, status],
                )
                .unwrap();
            let reply_status = if status == "received" { "queued" } else { "delivered" };
            connection
                .execute(
                    "INSERT INTO outbound (session_key, channel_instance, conversation_id, thread_root_id, text, status,
                     created_at_ms, updated_at_ms) VALUES ('k', 'mm', 'c', '', 'r', ?1, ?2, ?2)",
                    params![reply_status, at],
                )
                .unwrap();
        }
    }
    let pruned = store.prune(Some(1_000), None, Some(1_000)).unwrap();
    assert_eq!(pruned, Pruned { turns: 2, dead_letters: 0, inbound: 1, outbound: 1 });
    let connection = store.connection.lock().unwrap();
    let count = |sql: &str| connection.query_row(sql, [], |row| row.get::<_, i64>(0)).unwrap();
    assert_eq!(count("SELECT count(*) FROM turns"), 1);
    assert_eq!(count("SELECT count(*) FROM dead_letters"), 3, "0 days: kept");
    assert_eq!(count("SELECT count(*) FROM inbound WHERE status = 'received'"), 1, "waiting work stays");
    assert_eq!(count("SELECT count(*) FROM outbound WHERE status = 'queued'"), 1, "queued replies stay");
    drop(connection);
    assert_eq!(store.prune(Some(1_000), Some(1_000), Some(1_000)).unwrap().dead_letters, 2);
}

fn session(key: &str, created_at_ms: i64) -> Session {
    Session {
        key: key.into(),
        agent_id: "main".into(),
        target: DeliveryTarget {
            channel_instance: "mm".into(),
            conversation_id: "c1".into(),
            thread_root_id: "".into(),
        },
        created_at_ms,
        last_active_ms: created_at_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_runs_on_the_writer_thread_in_the_order_submitted() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(dir.path(), Durability::Full).unwrap());
    let writer = StoreWriter::start(store.clone(), Histogram::new([0.001]));
    let batch = BatchRecord { inbound: vec![inbound("p1"), inbound("p2")], ..Default::default() };
    let ids: Vec<i64> = writer.commit_batch("mm", batch, 1).await.unwrap().into_iter().map(Option::unwrap).collect();

    // Submitted while the writer is held (a slow commit): all of it waits, in order.
    let held = store.hold_writer();
    let (stored_on, stored) = std::sync::mpsc::channel();
    writer.insert_session(session("s", 1_000), move |outcome| {
        let _ = stored_on.send((std::thread::current().name().map(String::from), outcome.is_ok()));
    });
    let turn = writer.finish(FinishedTurn { finished_at_ms: 5_000, ..turn_answering(ids[0], "s", "hi") });
    let status = writer.set_inbound_status(ids[1], "no_agent");
    let letter = DeadLetter {
        channel_instance: "mm".into(),
        generation: 1,
        event_kind: "ws_frame".into(),
        conversation_id: "c1".into(),
        session_key: "s".into(),
        payload: "{}".into(),
        error: "panicked twice".into(),
    };
    let dead_letter = writer.add_dead_letter(letter.clone(), 6_000);
    let state_before = writer.adapter_state("mm");
    let saved =
        writer.submit_batch("mm", BatchRecord { adapter_state: Some((1, "{}".into())), ..Default::default() }, 7);
    let state_after = writer.adapter_state("mm");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(stored.try_recv().is_err(), "nothing was written on the calling thread");
    assert_eq!(store.session("s").unwrap(), None);
    drop(held);

    let reply_id = turn.await.unwrap().unwrap();
    status.await.unwrap();
    assert!(dead_letter.await.unwrap() > 0);
    assert_eq!(state_before.await.unwrap(), None, "a read sees what was submitted before it, not after");
    saved.await.unwrap();
    assert_eq!(state_after.await.unwrap(), Some((1, "{}".into())));
    let (thread, ok) = stored.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    assert_eq!((thread.as_deref(), ok), (Some(WRITER_THREAD), true));
    // The turn found the session's row: stored before it, although submitted in one group.
    assert_eq!(store.session("s").unwrap().unwrap().last_active_ms, 5_000);
    assert_eq!(store.dead_letters().unwrap(), vec![letter]);

    // A reply marked failed is gone from the queue for a read submitted after the mark.
    assert_eq!(writer.queued_replies("mm").await.unwrap().len(), 1);
    let held = store.hold_writer();
    let failed = writer.mark_failed(reply_id as u64, "gave up", 8);
    let queued = writer.queued_replies("mm");
    drop(held);
    failed.await.unwrap();
    assert!(queued.await.unwrap().is_empty());
    let counts = store.counts_async().await.unwrap();
    assert_eq!((counts.inbound_pending, counts.outbound_failed, counts.dead_letters), (0, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_reads_do_not_wait_for_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(dir.path(), Durability::Normal).unwrap());
    let writer = StoreWriter::start(store.clone(), Histogram::new([0.001]));
    let ids = writer.commit_batch("mm", BatchRecord { inbound: vec![inbound("p1")], ..Default::default() }, 1).await;
    let id = ids.unwrap()[0].unwrap();
    writer.finish(turn_answering(id, "s", "hi")).await.unwrap();
    let _held = store.hold_writer();
    let reads = async {
        let history = store.history_async("s", 10).await.unwrap();
        let waiting = store.waiting_inbound_async(id).await.unwrap();
        let counts = store.counts_async().await.unwrap();
        (history.len(), waiting.is_none(), counts.turns)
    };
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), reads).await;
    assert_eq!(read.expect("reads go on while the writer is held"), (1, true, 1));
}

#[test]
fn sessions_are_read_by_key_and_listed_by_instance_and_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Durability::Normal).unwrap();
    let mut other = session("agent:main:other:channel:c1", 1);
    other.target.channel_instance = "other".into();
    let sessions =
        [session("agent:main:mm:channel:c1", 1), session("agent:main:mm:dm:u1", 2), session("agent:ops:mm:dm:u1", 3)];
    store.insert_sessions(&sessions).unwrap();
    store.insert_session(&other).unwrap();
    assert_eq!(store.session("agent:main:mm:dm:u1").unwrap(), Some(sessions[1].clone()));
    assert_eq!(store.session("agent:main:mm:dm:u2").unwrap(), None);
    assert_eq!(store.sessions_of("mm", "").unwrap(), sessions);
    assert_eq!(store.sessions_of("mm", "agent:main:").unwrap(), sessions[..2]);
    assert_eq!(store.sessions_of("other", "agent:main:").unwrap(), vec![other]);
    assert_eq!(store.recent_sessions(2).unwrap().iter().map(|s| s.created_at_ms).collect::<Vec<_>>(), [3, 2]);
    assert_eq!(store.session_count().unwrap(), 4);
}
