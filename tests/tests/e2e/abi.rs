//! ABI v1.1 against what was built before it and what must never load: a plugin built from
//! the frozen v1.0 interface (`tests/fixtures/abi-v1_0/`) loads into this host, answers, and
//! hands over to the current build under traffic; a plugin built with `panic = "abort"` is
//! refused while the running build keeps answering.

use std::time::Duration;

use anyhow::Result;
use switchboard_tests::assert_eventually;

use crate::rig::{tail, Rig};

/// What the v1.0 fixture appends to every reply.
const V1_0_TAG: &str = " [v1.0]";

#[tokio::test]
async fn a_plugin_built_from_the_v1_0_interface_loads_answers_and_hands_over_to_the_current_build() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channel = rig.open_channels(1).remove(0);
    rig.drop_build(&rig.artifacts.fixture("abi-v1_0-echo")?)?;
    let gateway = rig.start(&[]).await?;

    // Loaded through the reversed layout check, with the defaults for the v1.1 module fields.
    let status = gateway.status().await?;
    let first = &status["generations"][0];
    assert_eq!(first["state"], "running", "{status}");
    assert_eq!(first["build"], "abi-v1_0-echo", "{status}");
    assert_eq!(first["abi_minor"], 0, "a v1.0 library has no abi_minor field: read as 0\n{status}");

    rig.sim.post_as(&rig.world.alice.id, &channel, "hello from v1.0", None);
    assert_eventually!(
        @within Duration::from_secs(30),
        rig.bot_posts().contains_key(&format!("echo: hello from v1.0{V1_0_TAG}")),
        "the v1.0 plugin answers\n{}",
        tail(&gateway, 40)
    );

    // The current build replaces it while messages keep coming: each answered once, by one
    // of the two, in its channel.
    let mut asked = Vec::new();
    for i in 0..20 {
        if i == 5 {
            rig.drop_build(&rig.artifacts.mattermost_plugin())?;
        }
        let text = format!("across the upgrade {i}");
        rig.sim.post_as(&rig.world.alice.id, &channel, &text, None);
        asked.push(text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answers = |text: &str| {
        let posts = rig.bot_posts();
        let plain = posts.get(&format!("echo: {text}")).cloned().unwrap_or_default();
        let tagged = posts.get(&format!("echo: {text}{V1_0_TAG}")).cloned().unwrap_or_default();
        [plain, tagged].concat()
    };
    assert_eventually!(
        @within Duration::from_secs(60),
        asked.iter().all(|text| !answers(text).is_empty()),
        "every message is answered\n{}",
        tail(&gateway, 60)
    );
    assert_eventually!(
        gateway.status().await?["generations"][1]["state"] == "running",
        "the current build runs\n{}",
        tail(&gateway, 40)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for text in &asked {
        assert_eq!(answers(text), vec![channel.clone()], "{text:?} answered once, in its channel");
    }
    let status = gateway.status().await?;
    assert_eq!(status["generations"][1]["abi_minor"], switchboard_plugin_api::ABI_MINOR, "{status}");
    assert_eq!(status["generations"][0]["state"], "unloaded", "{status}");

    let answer = rig.ask(&channel, "after the upgrade", &gateway).await;
    assert!(!answer.ends_with(V1_0_TAG), "the current build answers: {answer}");
    gateway.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_plugin_built_with_panic_abort_is_refused_and_the_running_build_keeps_answering() -> Result<()> {
    let rig = Rig::new("onmessage", "kind = \"echo\"").await?;
    let channel = rig.open_channels(1).remove(0);
    let gateway = rig.start(&[]).await?;
    rig.ask(&channel, "before the abort build", &gateway).await;

    rig.drop_build(&rig.artifacts.fixture("panic-abort")?)?;
    assert_eventually!(
        gateway.count(&["was built with panic = \"abort\""]) > 0,
        "the abort build is refused, saying why\n{}",
        tail(&gateway, 40)
    );
    rig.ask(&channel, "after the abort build", &gateway).await;
    let status = gateway.status().await?;
    let generations = status["generations"].as_array().cloned().unwrap_or_default();
    assert_eq!(generations.len(), 1, "nothing of the abort build was constructed\n{status}");
    assert_eq!(generations[0]["state"], "running", "{status}");
    gateway.stop().await?;
    Ok(())
}
