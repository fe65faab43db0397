//! Message text rules: mention detection and stripping, onchar prefixes, and splitting long
//! replies at paragraph or line boundaries.

/// Whether `message` contains `@<username>` as a whole word (case-insensitive).
pub fn mentions(message: &str, username: &str) -> bool {
    mention_spans(message, username).next().is_some()
}

fn mention_spans<'a>(message: &'a str, username: &str) -> impl Iterator<Item = (usize, usize)> + 'a {
    let needle = format!("@{}", username.to_lowercase());
    let lower = message.to_lowercase();
    let spans: Vec<(usize, usize)> = if username.is_empty() || lower.len() != message.len() {
        Vec::new()
    } else {
        lower
            .match_indices(&needle)
            .filter(|(at, _)| {
                let before = lower[..*at].chars().next_back();
                before.is_none_or(|c| !(c.is_alphanumeric() || c == '@')) && ends_word(&lower[at + needle.len()..])
            })
            .map(|(at, _)| (at, at + needle.len()))
            .collect()
    };
    spans.into_iter()
}

/// Whether a name ends where `rest` begins: usernames may hold `.`, `_` and `-`, so a mention
/// ends at anything else, or at a `.` that ends a sentence (`ask @bot.`), as the server reads it.
fn ends_word(rest: &str) -> bool {
    let mut chars = rest.chars();
    match chars.next() {
        None => true,
        Some('.') => chars.next().is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-')),
        Some(c) => !(c.is_alphanumeric() || c == '_' || c == '-'),
    }
}

/// Whether `message` contains `word` as a whole word, in any case.
pub fn contains_word(message: &str, word: &str) -> bool {
    let (lower, word) = (message.to_lowercase(), word.to_lowercase());
    if word.is_empty() || lower.len() != message.len() {
        return false;
    }
    lower.match_indices(&word).any(|(at, _)| {
        let before = lower[..at].chars().next_back();
        before.is_none_or(|c| !c.is_alphanumeric()) && ends_word(&lower[at + word.len()..])
    })
}

/// `message` without its mentions of `@<username>`, whitespace tidied.
pub fn strip_mentions(message: &str, username: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut last = 0;
    for (start, end) in mention_spans(message, username) {
        out.push_str(&message[last..start]);
        last = end;
    }
    out.push_str(&message[last..]);
    let trimmed = out.trim();
    let trimmed = trimmed.strip_prefix(',').or_else(|| trimmed.strip_prefix(':')).unwrap_or(trimmed);
    trimmed.trim().to_string()
}

/// Split `text` into parts of at most `limit` characters, preferring a paragraph break, then
/// a line break, then a space; never inside a character.
pub fn split(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    let mut parts = Vec::new();
    let mut rest = text;
    while rest.chars().count() > limit {
        let hard = rest.char_indices().nth(limit).map_or(rest.len(), |(i, _)| i);
        let window = &rest[..hard];
        let cut = window
            .rfind("\n\n")
            .filter(|&i| i > 0)
            .map(|i| (i, i + 2))
            .or_else(|| window.rfind('\n').filter(|&i| i > 0).map(|i| (i, i + 1)))
            .or_else(|| window.rfind(' ').filter(|&i| i > 0).map(|i| (i, i + 1)))
            .unwrap_or((hard, hard));
        parts.push(rest[..cut.0].to_string());
        rest = &rest[cut.1..];
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest.to_string());
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_whole_words_and_are_stripped() {
        assert!(mentions("@bot hi", "bot"));
        assert!(mentions("hi @Bot", "bot"));
        assert!(!mentions("hi @bots", "bot"));
        assert!(!mentions("a@bot", "bot"));
        assert!(mentions("could you look, @bot.", "bot"), "a sentence's full stop ends the name");
        assert!(mentions("@bot. Then more", "bot"));
        assert!(!mentions("@bot.two hi", "bot"), "bot.two is another user");
        assert!(!mentions("@bot-two hi", "bot"));
        assert!(contains_word("Hey Jarvis, status?", "jarvis"));
        assert!(!contains_word("jarvisbot status", "jarvis"));
        assert_eq!(strip_mentions("@bot what is up?", "bot"), "what is up?");
        assert_eq!(strip_mentions("hey @bot, look", "bot"), "hey , look");
        assert_eq!(strip_mentions("@bot: status", "bot"), "status");
    }

    #[test]
    fn long_text_splits_at_paragraphs_then_lines_and_keeps_every_character() {
        let paragraph = "word ".repeat(1000);
        let text = format!("{paragraph}\n\n{paragraph}\n\n{paragraph}");
        let parts = split(&text, 6000);
        assert!(parts.iter().all(|p| p.chars().count() <= 6000));
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.join("\n\n"), text);
        let hard = "é".repeat(10);
        let parts = split(&hard, 3);
        assert_eq!(parts.concat(), hard);
        assert!(parts.iter().all(|p| p.chars().count() <= 3));
        assert_eq!(split("short", 10), vec!["short"]);
    }
}
