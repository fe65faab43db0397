//! `switchboard check-config` through the real binary: environment variables the config names
//! that are unset (a warning, an error with `--strict`, never a value printed), a `plugin`
//! no file in the plugin directory provides, and the repository's example config.

use std::{path::Path, process::Output};

use anyhow::Result;
use switchboard_tests::harness::Artifacts;

use crate::rig::{Rig, RigOptions};

/// The variables the example config and the rig's config name.
const TOKEN_VARIABLES: &[&str] = &["MM_BOT_TOKEN", "MATRIX_ACCESS_TOKEN", "OPENAI_API_KEY", "HOOK_TOKEN"];

fn check_config(artifacts: &Artifacts, config: &Path, strict: bool, env: &[(&str, &str)]) -> Result<Output> {
    let mut command = std::process::Command::new(&artifacts.switchboard);
    command.arg("check-config").arg(config);
    if strict {
        command.arg("--strict");
    }
    for variable in TOKEN_VARIABLES {
        command.env_remove(variable);
    }
    command.envs(env.iter().copied());
    Ok(command.output()?)
}

/// What check-config printed (its report goes to stdout; stderr has the log).
fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn an_unset_token_variable_is_a_warning_an_error_with_strict_and_a_set_one_is_never_printed() -> Result<()> {
    let rig = Rig::with(RigOptions::default()).await?;
    let unset = "channels.mattermost.bot_token_env: the environment variable MM_BOT_TOKEN is not set";

    let lenient = check_config(&rig.artifacts, &rig.config_path, false, &[])?;
    let out = text(&lenient);
    assert!(lenient.status.success(), "a warning only:\n{out}");
    assert!(out.contains(&format!("warning: {unset}")) && out.contains("OK, 1 warning"), "{out}");

    let strict = check_config(&rig.artifacts, &rig.config_path, true, &[])?;
    let out = text(&strict);
    assert_eq!(strict.status.code(), Some(1), "an error with --strict:\n{out}");
    assert!(out.contains("1 problem(s)") && out.contains(&format!("  {unset}")) && !out.contains("warning"), "{out}");

    let secret = "s3cret-token-value-never-printed";
    let set = check_config(&rig.artifacts, &rig.config_path, true, &[("MM_BOT_TOKEN", secret)])?;
    let out = text(&set);
    assert!(set.status.success(), "{out}");
    assert!(!out.contains("MM_BOT_TOKEN") && !out.contains(secret), "nothing said of a set variable:\n{out}");

    // Set but empty is as good as unset.
    let empty = check_config(&rig.artifacts, &rig.config_path, true, &[("MM_BOT_TOKEN", "")])?;
    assert_eq!(empty.status.code(), Some(1), "{}", text(&empty));
    Ok(())
}

#[tokio::test]
async fn a_plugin_no_file_provides_is_named_with_the_adapters_the_directory_has() -> Result<()> {
    let rig = Rig::with(RigOptions::default()).await?;
    let config = std::fs::read_to_string(&rig.config_path)?;
    assert!(config.contains("plugin = \"mattermost\""), "{config}");
    std::fs::write(&rig.config_path, config.replace("plugin = \"mattermost\"", "plugin = \"mattermots\""))?;
    let output = check_config(&rig.artifacts, &rig.config_path, false, &[("MM_BOT_TOKEN", "x")])?;
    let out = text(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("channels.mattermost.plugin: no adapter named \"mattermots\" in "), "{out}");
    assert!(
        out.contains("found by the adapter name in their manifest; there: mattermost in libswitchboard_mattermost.so"),
        "{out}"
    );

    // An empty plugin directory says that it is empty.
    for entry in std::fs::read_dir(rig.plugin_dir())? {
        std::fs::remove_file(entry?.path())?;
    }
    let output = check_config(&rig.artifacts, &rig.config_path, false, &[("MM_BOT_TOKEN", "x")])?;
    let out = text(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("no adapter files there"), "{out}");
    Ok(())
}

/// `switchboard.example.toml` at the repository root, with the plugin directory pointed at
/// the built plugins: valid, its four token variables warned about, none with `--strict`
/// once they are set.
#[tokio::test]
async fn the_example_config_passes_check_config_with_the_built_plugins() -> Result<()> {
    let artifacts = Artifacts::discover()?;
    artifacts.matrix_plugin()?;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../switchboard.example.toml");
    let text_of_example = std::fs::read_to_string(&example)?;
    let packaged_dir = "dir = \"/usr/lib/switchboard/plugins\"";
    assert!(text_of_example.contains(packaged_dir), "the example names the package's plugin directory");
    let scratch = tempfile::tempdir()?;
    let config = scratch.path().join("switchboard.toml");
    std::fs::write(
        &config,
        text_of_example.replace(packaged_dir, &format!("dir = {:?}", artifacts.plugin_dir.display().to_string())),
    )?;

    let output = check_config(&artifacts, &config, false, &[])?;
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    for key in [
        "channels.mattermost.bot_token_env",
        "channels.matrix.access_token_env",
        "agents.assistant.api_key_env",
        "agents.hook.token_env",
    ] {
        assert!(out.contains(&format!("warning: {key}: the environment variable")), "{key}:\n{out}");
    }
    let env: Vec<(&str, &str)> = TOKEN_VARIABLES.iter().map(|v| (*v, "set")).collect();
    let output = check_config(&artifacts, &config, true, &env)?;
    let out = text(&output);
    assert!(output.status.success() && out.contains(": OK\n") && !out.contains("warning"), "{out}");
    Ok(())
}
