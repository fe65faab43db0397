//! The environment variables a config names: every key ending in `_env`, the host's
//! (`gateway.admin_token_env`, agents' `api_key_env` and `token_env`) and the adapters' alike
//! (`bot_token_env`, `access_token_env`), so `switchboard check-config` can say which are unset
//! before `switchboard run` finds out. Only names are read and reported, never values.

use std::path::Path;

use toml::{Table, Value};

/// A `*_env` key and the variable it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvReference {
    /// Where in the config, e.g. `channels.mattermost.bot_token_env`.
    pub key_path: String,
    pub variable: String,
}

/// Every `*_env` key of the config file at `path` with a string value, by key path (written
/// like the config errors': `a.b.c`, arrays as `bindings[0]`). A file that cannot be read or
/// parsed has none (the config check reports why).
pub fn referenced(path: &Path) -> Vec<EnvReference> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    let Ok(table) = text.parse::<Table>() else { return Vec::new() };
    let mut found = Vec::new();
    collect(&table, "", &mut found);
    found.sort_by(|a, b| a.key_path.cmp(&b.key_path));
    found
}

/// The references whose variable is unset or empty in this process's environment.
pub fn unset(references: &[EnvReference]) -> Vec<&EnvReference> {
    references.iter().filter(|r| std::env::var_os(&r.variable).is_none_or(|v| v.is_empty())).collect()
}

fn collect(table: &Table, prefix: &str, found: &mut Vec<EnvReference>) {
    for (key, value) in table {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            Value::String(variable) if key.ends_with("_env") => {
                found.push(EnvReference { key_path: path, variable: variable.clone() })
            }
            Value::Table(inner) => collect(inner, &path, found),
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    if let Value::Table(inner) = item {
                        collect(inner, &format!("{path}[{index}]"), found);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_env_key_is_found_with_its_path_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
[gateway]
admin_token_env = "ADMIN"
[channels.mm]
bot_token_env = "MM"
[agents.a]
env = ["PATH"]
api_key_env = "KEY"
[[extra]]
token_env = "HOOK"
"#,
        )
        .unwrap();
        let found: Vec<(String, String)> = referenced(&path).into_iter().map(|r| (r.key_path, r.variable)).collect();
        let pairs =
            |list: &[(&str, &str)]| list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        assert_eq!(
            found,
            pairs(&[
                ("agents.a.api_key_env", "KEY"),
                ("channels.mm.bot_token_env", "MM"),
                ("extra[0].token_env", "HOOK"),
                ("gateway.admin_token_env", "ADMIN"),
            ])
        );
    }

    #[test]
    fn a_variable_set_to_nothing_counts_as_unset() {
        let references = vec![
            EnvReference { key_path: "a".into(), variable: "PATH".into() },
            EnvReference { key_path: "b".into(), variable: "SWITCHBOARD_TEST_SURELY_UNSET_VARIABLE".into() },
        ];
        let unset: Vec<&str> = unset(&references).into_iter().map(|r| r.key_path.as_str()).collect();
        assert_eq!(unset, vec!["b"]);
    }
}
