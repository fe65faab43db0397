//! Session keys: the grammar both sides of the ABI share.
//!
//! Keys follow `agent:<agent>:<channel instance>:<channel|group|dm>:<peer>[:thread:<root>]`
//! (ARCHITECTURE.md §5). The host builds them for the sessions it routes to; an adapter that
//! lists sessions (`HostApi::sessions`) or looks one up builds keys and prefixes with the same
//! functions, so both agree on every escape.
//!
//! # Key grammar
//!
//! ```text
//! key   = "agent:" part ":" part ":" kind ":" part [ ":thread:" root ]
//!         ; agent id, channel instance id, kind, peer, thread root id
//! kind  = "channel" / "group" / "dm" / name
//! name  = lower *31( lower / digit / "_" )     ; a kind an adapter named (ABI v1.1)
//! part  = *( any char but ":" and "%" / "%25" / "%3A" )
//! root  = 1*( any char but ":" and "%" / "%25" / "%3A" )
//! ```
//!
//! Each part is its value with `%` written `%25` and `:` written `%3A` (upper case), and
//! nothing else escaped: `:` is the separator, and Matrix ids carry it (`@alice:example.org`,
//! `!abc:example.org`). Escaping only those two keeps every key whose values have neither —
//! all Mattermost ones, whose ids are `[a-z0-9]` — byte for byte what it was before escaping
//! existed, so stored sessions keep their keys. A `%` followed by anything but `25` or `3A` is
//! not a key ([`SessionKey::parse`] refuses it), so each session has exactly one key. The
//! agent and channel instance ids are escaped too: they are config keys, and a quoted TOML key
//! may hold `:`. An empty thread root means "no thread", so a key never ends in `:thread:`.
//!
//! Listing by prefix (the host's registry, [`HostApi::sessions`](crate::HostApi::sessions)) compares bytes, so a
//! prefix must end at a part boundary — with `:` — or it also matches longer values:
//! `agent:main:matrix:dm:@alice%3Aexample.org` is a prefix of the key of `@alice:example.org.evil`.
//! [`session_key_prefix`] builds such prefixes; a peer's session without a thread is looked up
//! by its exact key.

use std::{borrow::Cow, fmt, str::FromStr};

use crate::{PeerKind, PeerKindName};

/// A conversation kind as the key's `<kind>` part: a [`PeerKind`], a [`PeerKindName`] or its
/// text (which the caller has checked with [`PeerKindName::is_valid`]).
pub trait KindPart {
    fn kind_part(&self) -> &str;
}

impl KindPart for PeerKind {
    fn kind_part(&self) -> &str {
        self.as_str()
    }
}

impl KindPart for PeerKindName {
    fn kind_part(&self) -> &str {
        self.0.as_str()
    }
}

impl KindPart for &PeerKindName {
    fn kind_part(&self) -> &str {
        self.0.as_str()
    }
}

impl KindPart for &str {
    fn kind_part(&self) -> &str {
        self
    }
}

/// The session key for a conversation. In DMs the peer is the person, so a DM session follows
/// them; elsewhere it is the conversation. Every part is escaped (see the module docs); an
/// empty `thread_root` is no thread.
pub fn session_key(
    agent: &str,
    channel_instance: &str,
    kind: impl KindPart,
    peer: &str,
    thread_root: Option<&str>,
) -> String {
    let mut key = session_key_prefix(agent, channel_instance, kind, None);
    key.push_str(&escape_key_part(peer));
    if let Some(root) = thread_root.filter(|r| !r.is_empty()) {
        key.push_str(":thread:");
        key.push_str(&escape_key_part(root));
    }
    key
}

/// A key prefix that ends at a part boundary (with `:`), so that a listing by it matches whole
/// parts only. Without `peer`: every session of `agent` on `channel_instance` of this `kind`.
/// With `peer`: that peer's thread sessions only — its session without a thread is the exact
/// key `session_key(.., peer, None)`, which is not a safe prefix (it is also a prefix of the
/// keys of every peer whose id merely starts with `peer`).
pub fn session_key_prefix(agent: &str, channel_instance: &str, kind: impl KindPart, peer: Option<&str>) -> String {
    let mut prefix =
        format!("agent:{}:{}:{}:", escape_key_part(agent), escape_key_part(channel_instance), kind.kind_part());
    if let Some(peer) = peer {
        prefix.push_str(&escape_key_part(peer));
        prefix.push(':');
    }
    prefix
}

/// One value as a key part: `%` → `%25`, `:` → `%3A`, nothing else (see the module docs for
/// why only these two). Borrowed when there is nothing to escape, as with every Mattermost id.
pub fn escape_key_part(value: &str) -> Cow<'_, str> {
    if !value.contains([':', '%']) {
        return Cow::Borrowed(value);
    }
    let mut part = String::with_capacity(value.len() + 4);
    for c in value.chars() {
        match c {
            '%' => part.push_str("%25"),
            ':' => part.push_str("%3A"),
            c => part.push(c),
        }
    }
    Cow::Owned(part)
}

/// The value of one key part; only the two escapes [`escape_key_part`] writes are accepted,
/// so that a value has a single spelling.
fn unescape_key_part(part: &str) -> Result<String, KeyError> {
    let mut value = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(at) = rest.find('%') {
        value.push_str(&rest[..at]);
        let escape = &rest[at..];
        if escape.starts_with("%25") {
            value.push('%');
        } else if escape.starts_with("%3A") {
            value.push(':');
        } else {
            return Err(KeyError::Escape(part.to_string()));
        }
        rest = &escape[3..];
    }
    value.push_str(rest);
    Ok(value)
}

/// A session key taken apart, its parts unescaped. `to_string()` (or [`session_key`] with the
/// same values) gives the key back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub agent: String,
    pub channel_instance: String,
    pub kind: PeerKindName,
    pub peer: String,
    /// `None` for a session without a thread; never `Some("")`.
    pub thread_root: Option<String>,
}

/// Why a string is not a session key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a session key starts with `agent:`")]
    NotAgent,
    #[error("a session key has 5 parts, or 7 with a thread; this one has {0}")]
    Parts(usize),
    #[error("`{0}` is no conversation kind (channel, group, dm, or 1-32 of a-z, 0-9, _ starting with a letter)")]
    Kind(String),
    #[error("the sixth part of a session key is `thread`, not `{0}`")]
    NotThread(String),
    #[error("the thread root is empty (a session without a thread has no `:thread:` part)")]
    EmptyThreadRoot,
    #[error("`{0}`: a `%` in a key part is `%25` or `%3A`")]
    Escape(String),
}

impl SessionKey {
    /// The parts of `key`, unescaped. Refuses what [`session_key`] cannot write, so that
    /// `parse` and `to_string` are inverses.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        let parts: Vec<&str> = key.split(':').collect();
        if parts[0] != "agent" {
            return Err(KeyError::NotAgent);
        }
        let thread_root = match parts.len() {
            5 => None,
            7 if parts[5] == "thread" => match parts[6] {
                "" => return Err(KeyError::EmptyThreadRoot),
                root => Some(unescape_key_part(root)?),
            },
            7 => return Err(KeyError::NotThread(parts[5].to_string())),
            n => return Err(KeyError::Parts(n)),
        };
        let kind = PeerKindName::new(parts[3]);
        if !kind.is_valid() {
            return Err(KeyError::Kind(parts[3].to_string()));
        }
        Ok(Self {
            agent: unescape_key_part(parts[1])?,
            channel_instance: unescape_key_part(parts[2])?,
            kind,
            peer: unescape_key_part(parts[4])?,
            thread_root,
        })
    }
}

impl FromStr for SessionKey {
    type Err = KeyError;

    fn from_str(key: &str) -> Result<Self, KeyError> {
        Self::parse(key)
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&session_key(
            &self.agent,
            &self.channel_instance,
            &self.kind,
            &self.peer,
            self.thread_root.as_deref(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_grammar() {
        assert_eq!(
            session_key("main", "mattermost", PeerKind::Channel, "c1", None),
            "agent:main:mattermost:channel:c1"
        );
        assert_eq!(session_key("main", "mm", PeerKind::Group, "g1", Some("")), "agent:main:mm:group:g1");
        assert_eq!(session_key("ops", "mm", PeerKind::Dm, "u1", Some("r1")), "agent:ops:mm:dm:u1:thread:r1");
    }

    #[test]
    fn mattermost_keys_are_what_they_were_before_escaping() {
        // Literal strings: stored sessions must keep their keys.
        for (key, literal) in [
            (
                session_key("main", "mattermost", PeerKind::Dm, "8k3jx9q1ptd5mgu4b7yo6wzr3e", None),
                "agent:main:mattermost:dm:8k3jx9q1ptd5mgu4b7yo6wzr3e",
            ),
            (
                session_key("main", "mattermost", PeerKind::Channel, "c1", Some("p9r")),
                "agent:main:mattermost:channel:c1:thread:p9r",
            ),
            (session_key("ops", "mm-2", PeerKind::Group, "g1", Some("")), "agent:ops:mm-2:group:g1"),
        ] {
            assert_eq!(key, literal);
            assert_eq!(SessionKey::parse(&key).unwrap().to_string(), literal);
        }
    }

    #[test]
    fn matrix_ids_are_escaped_and_come_back() {
        let key = session_key("main", "matrix", PeerKind::Dm, "@alice:example.org", None);
        assert_eq!(key, "agent:main:matrix:dm:@alice%3Aexample.org");
        let parsed = SessionKey::parse(&key).unwrap();
        assert_eq!(
            parsed,
            SessionKey {
                agent: "main".into(),
                channel_instance: "matrix".into(),
                kind: PeerKind::Dm.into(),
                peer: "@alice:example.org".into(),
                thread_root: None,
            }
        );

        let key = session_key("main", "matrix", PeerKind::Group, "!abc:example.org", Some("$ev:example.org"));
        assert_eq!(key, "agent:main:matrix:group:!abc%3Aexample.org:thread:$ev%3Aexample.org");
        let parsed: SessionKey = key.parse().unwrap();
        assert_eq!(
            (parsed.peer.as_str(), parsed.thread_root.as_deref()),
            ("!abc:example.org", Some("$ev:example.org"))
        );
        assert_eq!(parsed.to_string(), key);

        // A kind an adapter named (v1.1) is a key part like the three of PeerKind.
        let key = session_key("main", "irc", PeerKindName::new("server_notice"), "libera", None);
        assert_eq!(key, "agent:main:irc:server_notice:libera");
        assert_eq!(SessionKey::parse(&key).unwrap().kind, PeerKindName::new("server_notice"));

        // A value that looks escaped already is escaped again, so it comes back as it was.
        let key = session_key("a:b", "in%st", PeerKind::Channel, "x%3Ay", Some("%25"));
        assert_eq!(key, "agent:a%3Ab:in%25st:channel:x%253Ay:thread:%2525");
        let parsed = SessionKey::parse(&key).unwrap();
        assert_eq!(
            (
                parsed.agent.as_str(),
                parsed.channel_instance.as_str(),
                parsed.peer.as_str(),
                parsed.thread_root.as_deref()
            ),
            ("a:b", "in%st", "x%3Ay", Some("%25"))
        );
    }

    #[test]
    fn what_is_not_a_key_is_refused() {
        for (key, error) in [
            ("", KeyError::NotAgent),
            ("session:main:mm:dm:u1", KeyError::NotAgent),
            ("agent:main:mm:dm", KeyError::Parts(4)),
            ("agent:main:mm:dm:@alice:example.org", KeyError::Parts(6)),
            ("agent:main:mm:dm:u1:thread:r1:x", KeyError::Parts(8)),
            ("agent:main:mm:Room:u1", KeyError::Kind("Room".into())),
            ("agent:main:mm:1on1:u1", KeyError::Kind("1on1".into())),
            ("agent:main:mm:dm:u1:reply:r1", KeyError::NotThread("reply".into())),
            ("agent:main:mm:dm:u1:thread:", KeyError::EmptyThreadRoot),
            ("agent:main:mm:dm:a%3ab", KeyError::Escape("a%3ab".into())),
            ("agent:main:mm:dm:100%", KeyError::Escape("100%".into())),
            ("agent:main:m%2:dm:u1", KeyError::Escape("m%2".into())),
        ] {
            assert_eq!(SessionKey::parse(key), Err(error), "{key:?}");
        }
    }

    mod round_trip {
        use proptest::prelude::*;

        use super::*;

        /// Any string, or one made mostly of the characters escaping is about.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![any::<String>(), "[a:%3A25@.!]{0,12}"]
        }

        fn kind() -> impl Strategy<Value = PeerKind> {
            prop_oneof![Just(PeerKind::Channel), Just(PeerKind::Group), Just(PeerKind::Dm)]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn parse_gives_back_what_session_key_was_given(
                agent in value(),
                instance in value(),
                kind in kind(),
                peer in value(),
                root in proptest::option::of(value()),
            ) {
                let key = session_key(&agent, &instance, kind, &peer, root.as_deref());
                let parsed = SessionKey::parse(&key).unwrap();
                let root = root.filter(|r| !r.is_empty());
                prop_assert_eq!(
                    &parsed,
                    &SessionKey { agent, channel_instance: instance, kind: kind.into(), peer, thread_root: root }
                );
                prop_assert_eq!(parsed.to_string(), key);
            }

            #[test]
            fn a_peer_prefix_matches_that_peer_only(
                peer in value(),
                other in value(),
                root in value(),
            ) {
                let prefix = session_key_prefix("main", "matrix", PeerKind::Dm, Some(&peer));
                let key = session_key("main", "matrix", PeerKind::Dm, &other, Some(&root));
                prop_assert_eq!(key.starts_with(&prefix), peer == other && !root.is_empty());
            }

            #[test]
            fn whatever_parses_is_written_back_unchanged(key in "agent:[a:%3A25]{0,6}:[a:%3A25]{0,6}:(dm|group|x):[a:%3A25]{0,8}") {
                if let Ok(parsed) = SessionKey::parse(&key) {
                    prop_assert_eq!(parsed.to_string(), key);
                }
            }
        }
    }
}
