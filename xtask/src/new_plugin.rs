//! `cargo xtask new-plugin <name>`: a new adapter crate in `plugins/<name>/` from the template
//! in `xtask/templates/plugin/`, added to the workspace; and `check-template`, which generates
//! one into a scratch workspace, runs its tests and the conformance checks on its built
//! library, so the template cannot rot unnoticed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};

/// The template's files: (path inside the new crate, text with `{{…}}` placeholders).
/// Included at compile time, so a template that stops compiling fails `check-template`, not
/// the first person to use it.
const TEMPLATE: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../templates/plugin/Cargo.toml.tmpl")),
    ("src/lib.rs", include_str!("../templates/plugin/src/lib.rs.tmpl")),
    ("src/config.rs", include_str!("../templates/plugin/src/config.rs.tmpl")),
    ("src/wire.rs", include_str!("../templates/plugin/src/wire.rs.tmpl")),
    ("tests/conformance.rs", include_str!("../templates/plugin/tests/conformance.rs.tmpl")),
];

/// The name `check-template` generates (any valid name would do).
const CHECK_NAME: &str = "echo-platform";

/// The names one adapter name stands for in the template.
#[derive(Debug, PartialEq, Eq)]
struct Names {
    /// `{{name}}`: the manifest name and directory, e.g. `chat-example`.
    name: String,
    /// `{{package}}`: `switchboard-chat-example`.
    package: String,
    /// `{{crate_name}}`: `switchboard_chat_example`.
    crate_name: String,
    /// `{{type_name}}`: `ChatExample` (the adapter type is `ChatExampleAdapter`).
    type_name: String,
}

impl Names {
    fn new(name: &str) -> Result<Self> {
        let mut chars = name.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        // Empty segments would make `a--b` and `a-b` the same type name, and a trailing `-`
        // an odd package name.
        ensure!(
            well_formed && !name.ends_with('-') && !name.contains("--"),
            "`{name}` is not a plugin name: lower-case letters, digits and single hyphens, starting with a letter"
        );
        let type_name = name
            .split('-')
            .map(|segment| {
                let mut chars = segment.chars();
                chars.next().map(|first| first.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
            })
            .collect();
        Ok(Self {
            name: name.to_string(),
            package: format!("switchboard-{name}"),
            crate_name: format!("switchboard_{}", name.replace('-', "_")),
            type_name,
        })
    }

    fn render(&self, template: &str) -> String {
        template
            .replace("{{name}}", &self.name)
            .replace("{{package}}", &self.package)
            .replace("{{crate_name}}", &self.crate_name)
            .replace("{{type_name}}", &self.type_name)
    }
}

/// `cargo xtask new-plugin <name>` in the workspace at `root`.
pub fn new_plugin(root: &Path, name: &str) -> Result<()> {
    let names = generate(root, name)?;
    println!(
        "Created plugins/{name}/ (package {package}) and added it to the workspace members.

Next steps:
  cargo test -p {package}          # the conformance and protocol tests (they pass as generated)
  - replace the placeholder platform API: the URLs in plugins/{name}/src/lib.rs (`poll`, `send`),
    the JSON shapes in plugins/{name}/src/wire.rs and the Authorization header (`request`);
  - add (\"{package}\", \"{crate_name}\") to PLUGINS in xtask/src/main.rs so that
    `cargo xtask build` installs the library into target/plugins/;
  - configure an instance: [channels.<id>] plugin = \"{name}\", base_url = \"https://…\",
    token_env = \"<ENV VAR WITH THE TOKEN>\";
  - read docs/plugin-guide.md (store before act, handover, idempotent delivery, panics).",
        package = names.package,
        crate_name = names.crate_name,
    );
    Ok(())
}

/// Write the crate into `<root>/plugins/<name>/`, add it to the workspace members and format
/// it; the workspace's `Cargo.lock` is consulted for package names already taken.
fn generate(root: &Path, name: &str) -> Result<Names> {
    let names = Names::new(name)?;
    let dir = root.join("plugins").join(name);
    ensure!(!dir.exists(), "{} exists already", dir.display());
    let lock = root.join("Cargo.lock");
    if let Ok(lock) = std::fs::read_to_string(&lock) {
        // `tests` or `plugin-api` would give a package name the workspace already has.
        ensure!(
            !lock.contains(&format!("name = \"{}\"\n", names.package)),
            "a package named {} exists already",
            names.package
        );
    }
    let manifest_path = root.join("Cargo.toml");
    let manifest =
        std::fs::read_to_string(&manifest_path).with_context(|| format!("cannot read {}", manifest_path.display()))?;
    // Edited before anything is written, so a manifest we cannot edit leaves no half-made crate.
    let manifest = add_member(&manifest, &format!("plugins/{name}"))?;

    let mut sources = Vec::new();
    for (path, template) in TEMPLATE {
        let file = dir.join(path);
        let parent = file.parent().context("template files are in the crate directory")?;
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        std::fs::write(&file, names.render(template)).with_context(|| format!("cannot write {}", file.display()))?;
        if path.ends_with(".rs") {
            sources.push(file);
        }
    }
    std::fs::write(&manifest_path, manifest).with_context(|| format!("cannot write {}", manifest_path.display()))?;
    rustfmt(root, &sources);
    Ok(names)
}

/// Format the generated sources as the workspace does: the template is written for one
/// length of names, and a longer or shorter one moves line breaks. Best effort: without
/// rustfmt the crate still compiles, and `cargo fmt` fixes it later.
fn rustfmt(root: &Path, files: &[PathBuf]) {
    let mut command = Command::new("rustfmt");
    command.args(["--edition", "2021"]).args(files).current_dir(root);
    if root.join("rustfmt.toml").exists() {
        command.arg("--config-path").arg(root.join("rustfmt.toml"));
    }
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("xtask: rustfmt failed ({status}); run `cargo fmt` later"),
        Err(e) => eprintln!("xtask: cannot run rustfmt ({e}); run `cargo fmt` later"),
    }
}

/// Add `member` to the `members` array of `[workspace]`, and to `default-members` when there
/// is one, editing the text so the file keeps its layout and comments: after the last
/// `plugins/…` entry (else at the end), on a line of its own in a multi-line array.
fn add_member(manifest: &str, member: &str) -> Result<String> {
    let mut text = manifest.to_string();
    let mut found = false;
    for key in ["members", "default-members"] {
        let Some(array) = workspace_array(&text, key)? else {
            continue;
        };
        found |= key == "members";
        text = insert_entry(&text, array, member)?;
    }
    ensure!(found, "no `members = [...]` in the [workspace] table");
    Ok(text)
}

/// The byte range of the `[...]` value of `key` in the `[workspace]` table, brackets included.
fn workspace_array(text: &str, key: &str) -> Result<Option<(usize, usize)>> {
    let mut in_workspace = false;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim();
        // A table header (values never start a line with `[`: arrays open on their key's line).
        if trimmed.starts_with('[') {
            in_workspace = trimmed.split('#').next().unwrap_or_default().trim() == "[workspace]";
            continue;
        }
        let Some(rest) = trimmed.strip_prefix(key) else { continue };
        let Some(value) = rest.trim_start().strip_prefix('=') else { continue };
        if !in_workspace {
            continue;
        }
        ensure!(value.trim_start().starts_with('['), "`{key}` in [workspace] is not an array");
        let open = start + line.find('[').context("the array opens on its key's line")?;
        let mut in_string = false;
        let mut in_comment = false;
        for (i, c) in text[open..].char_indices() {
            match c {
                '\n' => in_comment = false,
                _ if in_comment => {}
                '"' => in_string = !in_string,
                '#' if !in_string => in_comment = true,
                ']' if !in_string => return Ok(Some((open, open + i + 1))),
                _ => {}
            }
        }
        bail!("`{key}` in [workspace] is not closed");
    }
    Ok(None)
}

/// Insert `"member"` into the array at `array` (a byte range of `text`).
fn insert_entry(text: &str, (open, close): (usize, usize), member: &str) -> Result<String> {
    let body = &text[open + 1..close - 1];
    // The string entries: (start, end) of each `"…"` within `body`, quotes included.
    let mut entries = Vec::new();
    let mut start = None;
    let mut in_comment = false;
    for (i, c) in body.char_indices() {
        match (c, start) {
            ('\n', None) => in_comment = false,
            (_, None) if in_comment => {}
            ('#', None) => in_comment = true,
            ('"', None) => start = Some(i),
            ('"', Some(s)) => {
                entries.push((s, i + 1));
                start = None;
            }
            _ => {}
        }
    }
    let quoted = format!("\"{member}\"");
    ensure!(!entries.iter().any(|&(s, e)| body[s..e] == quoted), "{member} is a workspace member already");
    let anchor = entries.iter().rev().find(|&&(s, _)| body[s + 1..].starts_with("plugins/")).or(entries.last());
    let Some(&(anchor_start, anchor_end)) = anchor else {
        // An empty array.
        return Ok(format!("{}{quoted}{}", &text[..open + 1], &text[open + 1..]));
    };
    let after = &body[anchor_end..];
    let comma = after.trim_start_matches([' ', '\t']).starts_with(',');
    let (at, insert) = if body.contains('\n') {
        let line_start = body[..anchor_start].rfind('\n').map_or(0, |n| n + 1);
        let indent: String = body[line_start..anchor_start].chars().take_while(|c| c.is_whitespace()).collect();
        if comma {
            // After the anchor's line, so a comment at its end stays with it.
            let at = anchor_end + after.find('\n').unwrap_or_else(|| after.find(',').unwrap_or(0) + 1);
            (at, format!("\n{indent}{quoted},"))
        } else {
            (anchor_end, format!(",\n{indent}{quoted}"))
        }
    } else {
        (anchor_end, format!(", {quoted}"))
    };
    let at = open + 1 + at;
    Ok(format!("{}{insert}{}", &text[..at], &text[at..]))
}

/// `cargo xtask check-template`: generate a plugin into a scratch workspace next to nothing
/// but the real `plugin-api`, then run its tests and clippy there. The scratch workspace takes
/// the root manifest's settings (package fields, lints, profiles, dependency versions) and its
/// lock file, and builds into the project's target directory, so the dependencies it shares
/// with the workspace (abi_stable, serde) are not built again.
pub fn check_template(root: &Path, target: &Path) -> Result<()> {
    let started = Instant::now();
    // The nested cargo runs in the scratch directory: a relative CARGO_TARGET_DIR would mean a
    // fresh target directory there, and every dependency built from scratch.
    let target = &std::path::absolute(target).context("cannot resolve the target directory")?;
    // A fixed place under the target directory: the generated crate keeps one package id from
    // run to run, so its dependencies' builds are found again, and nothing is left in /tmp.
    let scratch = target.join("template-check");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).context("cannot read the root Cargo.toml")?;
    std::fs::write(scratch.join("Cargo.toml"), scratch_manifest(&manifest, root)?)?;
    std::fs::copy(root.join("Cargo.lock"), scratch.join("Cargo.lock")).context("cannot copy Cargo.lock")?;
    if root.join("rustfmt.toml").exists() {
        std::fs::copy(root.join("rustfmt.toml"), scratch.join("rustfmt.toml"))?;
    }
    generate(&scratch, CHECK_NAME)?;

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest_path = scratch.join("Cargo.toml");
    let runs: [&[&str]; 3] = [
        &["fmt", "--all", "--check"],
        &["test", "--quiet"],
        &["clippy", "--quiet", "--all-targets", "--", "-D", "warnings"],
    ];
    for args in runs {
        eprintln!("xtask: check-template: cargo {}", args.join(" "));
        let mut command = Command::new(&cargo);
        command.args(&args[..1]).arg("--manifest-path").arg(&manifest_path).args(&args[1..]);
        let status = command
            .env("CARGO_TARGET_DIR", target)
            .current_dir(&scratch)
            .status()
            .with_context(|| format!("cannot run {cargo}"))?;
        // The scratch workspace stays for a look when something failed.
        ensure!(status.success(), "the generated plugin fails `cargo {}` (in {})", args.join(" "), scratch.display());
    }
    conformance_of_the_built_library(root, target, &scratch)?;
    std::fs::remove_dir_all(&scratch).with_context(|| format!("cannot remove {}", scratch.display()))?;
    eprintln!("xtask: check-template: the generated plugin passes ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// The stranger's path: build the generated plugin's library and have the real `switchboard`
/// binary run the conformance checks on it, from the plugin's sample config.
fn conformance_of_the_built_library(root: &Path, target: &Path, scratch: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let builds: [(&Path, &[&str]); 2] = [
        (scratch, &["build", "--quiet"]),
        (root, &["build", "--quiet", "--package", "switchboard", "--bin", "switchboard"]),
    ];
    for (workspace, args) in builds {
        eprintln!("xtask: check-template: cargo {} (in {})", args.join(" "), workspace.display());
        let status = Command::new(&cargo)
            .args(args)
            .arg("--manifest-path")
            .arg(workspace.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", target)
            .current_dir(workspace)
            .status()
            .with_context(|| format!("cannot run {cargo}"))?;
        ensure!(status.success(), "`cargo {}` failed in {}", args.join(" "), workspace.display());
    }
    let names = Names::new(CHECK_NAME)?;
    let library = target.join("debug").join(crate::dylib_name(&names.crate_name));
    let switchboard = target.join("debug").join("switchboard");
    eprintln!("xtask: check-template: {} check-plugin --conformance {}", switchboard.display(), library.display());
    let status = Command::new(&switchboard)
        .arg("check-plugin")
        .arg("--conformance")
        .arg(&library)
        .status()
        .with_context(|| format!("cannot run {}", switchboard.display()))?;
    ensure!(status.success(), "the generated plugin's library fails the conformance checks ({status})");
    Ok(())
}

/// The root manifest for the scratch workspace: the root's, with a `[workspace]` table of no
/// members (the generated plugin adds itself) and workspace dependency paths made absolute.
fn scratch_manifest(manifest: &str, root: &Path) -> Result<String> {
    let root = root.to_str().context("the workspace path is not UTF-8")?;
    let mut out = String::new();
    let mut table = String::new();
    for line in manifest.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            table = trimmed.to_string();
            if table == "[workspace]" {
                out.push_str("[workspace]\nresolver = \"2\"\nmembers = []\n");
            }
        }
        if table == "[workspace]" {
            continue;
        }
        if table == "[workspace.dependencies]" && line.contains("path = \"") && !line.contains("path = \"/") {
            out.push_str(&line.replacen("path = \"", &format!("path = \"{root}/"), 1));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    ensure!(out.contains("[workspace]"), "the root Cargo.toml has no [workspace] table");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_derived() {
        let names = Names::new("chat-example2").unwrap();
        assert_eq!(
            names,
            Names {
                name: "chat-example2".into(),
                package: "switchboard-chat-example2".into(),
                crate_name: "switchboard_chat_example2".into(),
                type_name: "ChatExample2".into(),
            }
        );
        for bad in ["", "Chat", "2chat", "chat_x", "chat-", "a--b", "chat x", "ç"] {
            assert!(Names::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_template_has_no_unknown_placeholders() {
        let names = Names::new("x").unwrap();
        for (path, template) in TEMPLATE {
            let rendered = names.render(template);
            assert!(!rendered.contains("{{"), "{path}: {rendered}");
            assert!(!rendered.contains("TODO"), "{path} has a TODO");
        }
    }

    #[test]
    fn members_are_added_keeping_the_layout() {
        let one_line = "[workspace]\nresolver = \"2\"\nmembers = [\"host\", \"plugins/mattermost\", \"xtask\"]\n\
                        default-members = [\"host\", \"plugins/mattermost\"]\n# members = []\n\n[workspace.package]\n";
        assert_eq!(
            add_member(one_line, "plugins/chat").unwrap(),
            "[workspace]\nresolver = \"2\"\nmembers = [\"host\", \"plugins/mattermost\", \"plugins/chat\", \"xtask\"]\n\
             default-members = [\"host\", \"plugins/mattermost\", \"plugins/chat\"]\n# members = []\n\n\
             [workspace.package]\n"
        );
        let multi_line = "[workspace]\nmembers = [\n    \"host\",  # the gateway\n    \"xtask\"\n]\n";
        assert_eq!(
            add_member(multi_line, "plugins/chat").unwrap(),
            "[workspace]\nmembers = [\n    \"host\",  # the gateway\n    \"xtask\",\n    \"plugins/chat\"\n]\n"
        );
        let trailing_comma = "[workspace]\nmembers = [\n  \"plugins/a\",\n  \"xtask\",\n]\n";
        assert_eq!(
            add_member(trailing_comma, "plugins/chat").unwrap(),
            "[workspace]\nmembers = [\n  \"plugins/a\",\n  \"plugins/chat\",\n  \"xtask\",\n]\n"
        );
        assert_eq!(
            add_member("[workspace]\nmembers = []\n", "plugins/c").unwrap(),
            "[workspace]\nmembers = [\"plugins/c\"]\n"
        );
        assert!(add_member("[workspace]\nmembers = [\"plugins/c\"]\n", "plugins/c").is_err());
        // `members` of another table is not the workspace's.
        assert!(add_member("[package]\nmembers = []\n", "plugins/c").is_err());
    }

    #[test]
    fn the_real_manifest_takes_a_member() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let edited = add_member(&manifest, "plugins/chat").unwrap();
        assert_eq!(edited.matches("\"plugins/chat\"").count(), 1 + manifest.contains("default-members") as usize);
        assert_eq!(edited.lines().count(), manifest.lines().count());
    }

    #[test]
    fn the_scratch_manifest_points_at_the_real_crates() {
        let manifest = "[workspace]\nmembers = [\"a\"]\n\n[workspace.dependencies]\nserde = \"1\"\n\
                        api = { path = \"plugin-api\" }\n\n[profile.dev]\npanic = \"unwind\"\n";
        let scratch = scratch_manifest(manifest, Path::new("/src/sb")).unwrap();
        assert_eq!(
            scratch,
            "[workspace]\nresolver = \"2\"\nmembers = []\n[workspace.dependencies]\nserde = \"1\"\n\
             api = { path = \"/src/sb/plugin-api\" }\n\n[profile.dev]\npanic = \"unwind\"\n"
        );
    }
}
