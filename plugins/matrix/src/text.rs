//! Message text rules: mentions of the bot in a body (its MXID, display name or localpart),
//! reply fallbacks, and splitting long replies into events.

/// Where `name` occurs in `body` as a whole word (case-insensitive): not inside a longer word
/// or id. Byte ranges into `body`.
fn name_spans(body: &str, name: &str) -> Vec<(usize, usize)> {
    let lower = body.to_lowercase();
    let name = name.to_lowercase();
    // Lower-casing changed lengths (rare scripts): no byte ranges to trust, no match.
    if name.is_empty() || lower.len() != body.len() {
        return Vec::new();
    }
    let part_of_a_name = |c: char| c.is_alphanumeric() || c == '_' || c == '@';
    lower
        .match_indices(&name)
        .filter(|(at, _)| {
            let before = lower[..*at].chars().next_back();
            before.is_none_or(|c| !part_of_a_name(c)) && ends_name(&lower[at + name.len()..])
        })
        .map(|(at, _)| (at, at + name.len()))
        .collect()
}

/// Whether a name ends where `rest` begins: ids go on with letters, digits, `_`, `-`, and
/// with `.` or `:` before more of them (`@bot:example.org.evil`, `bot:example.org`), while a
/// sentence's `.` or a client's `:` after a name end it.
fn ends_name(rest: &str) -> bool {
    let mut chars = rest.chars();
    match chars.next() {
        None => true,
        Some('.' | ':') => chars.next().is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-')),
        Some(c) => !(c.is_alphanumeric() || c == '_' || c == '-'),
    }
}

/// Whether `body` names the bot by one of `names` (whole words, any case).
pub fn mentions(body: &str, names: &[&str]) -> bool {
    names.iter().any(|name| !name_spans(body, name).is_empty())
}

/// `body` without the bot's names (`names`, longest first wins where they overlap), and
/// without the `:` or `,` a client puts after a leading one; whitespace tidied.
pub fn strip_mentions(body: &str, names: &[&str]) -> String {
    let mut names: Vec<&str> = names.iter().copied().filter(|n| !n.is_empty()).collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut text = body.to_string();
    for name in names {
        let spans = name_spans(&text, name);
        for (start, end) in spans.into_iter().rev() {
            text.replace_range(start..end, "");
        }
    }
    let trimmed = text.trim();
    let trimmed = trimmed.strip_prefix(':').or_else(|| trimmed.strip_prefix(',')).unwrap_or(trimmed);
    trimmed.trim().to_string()
}

/// A reply's body without the quoted fallback clients put before it (`> <@alice:…> what was
/// said` lines, then a blank line).
pub fn strip_reply_fallback(body: &str) -> &str {
    if !body.starts_with("> ") {
        return body;
    }
    let mut rest = body;
    while rest.starts_with('>') {
        match rest.split_once('\n') {
            Some((_, after)) => rest = after,
            None => return "",
        }
    }
    rest.strip_prefix('\n').unwrap_or(rest)
}

/// How many bytes `c` takes inside a JSON string.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Split `text` into parts whose JSON-escaped size is at most `limit` bytes (a Matrix event
/// is at most 64 KiB as JSON), preferring a paragraph break, then a line break, then a space;
/// never inside a character. The breaks a part ends at are dropped.
pub fn split(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(8);
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let mut size = 0;
        let mut hard = rest.len();
        for (at, c) in rest.char_indices() {
            size += json_len(c);
            if size > limit {
                hard = at;
                break;
            }
        }
        if hard == rest.len() {
            break;
        }
        let window = &rest[..hard];
        let (end, next) = window
            .rfind("\n\n")
            .filter(|&i| i > 0)
            .map(|i| (i, i + 2))
            .or_else(|| window.rfind('\n').filter(|&i| i > 0).map(|i| (i, i + 1)))
            .or_else(|| window.rfind(' ').filter(|&i| i > 0).map(|i| (i, i + 1)))
            // No break in the window: cut hard (a character takes at most 6 of the >= 8 bytes).
            .unwrap_or((hard, hard));
        parts.push(rest[..end].to_string());
        rest = &rest[next..];
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest.to_string());
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["@switchboard:localhost", "Switch Board", "switchboard"];

    #[test]
    fn the_bot_is_mentioned_by_id_display_name_or_localpart_as_whole_words() {
        assert!(mentions("@switchboard:localhost: hi", NAMES));
        assert!(mentions("Switch Board: status?", NAMES));
        assert!(mentions("hey switchboard, status?", NAMES));
        assert!(!mentions("switchboards are old", NAMES));
        assert!(!mentions("@switchboard:localhost.evil hi", &["@switchboard:localhost"]));
        assert!(!mentions("ask @switchboard2:localhost", NAMES));
        assert!(!mentions("nothing here", NAMES));
    }

    #[test]
    fn mentions_are_stripped_with_the_punctuation_after_a_leading_one() {
        assert_eq!(strip_mentions("@switchboard:localhost: what is up?", NAMES), "what is up?");
        assert_eq!(strip_mentions("Switch Board, status", NAMES), "status");
        assert_eq!(strip_mentions("switchboard: ping", NAMES), "ping");
        assert_eq!(strip_mentions("no names", NAMES), "no names");
    }

    #[test]
    fn reply_fallbacks_are_removed() {
        assert_eq!(strip_reply_fallback("> <@alice:localhost> hello\n> more\n\nthe answer"), "the answer");
        assert_eq!(strip_reply_fallback("plain"), "plain");
        assert_eq!(strip_reply_fallback("> only a quote"), "");
    }

    #[test]
    fn long_text_splits_at_paragraphs_then_lines_within_the_escaped_size() {
        let paragraph = "word ".repeat(1000);
        let text = format!("{paragraph}\n\n{paragraph}\n\n{paragraph}");
        let parts = split(&text, 6000);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.join("\n\n"), text);
        let quotes = "\"".repeat(100);
        let parts = split(&quotes, 50);
        assert!(parts.iter().all(|p| p.len() <= 25), "a quote is two bytes escaped: {parts:?}");
        assert_eq!(parts.concat(), quotes);
        let wide = "é".repeat(100);
        let parts = split(&wide, 21);
        assert!(parts.iter().all(|p| p.len() <= 21));
        assert_eq!(parts.concat(), wide);
        assert_eq!(split("short", 100), vec!["short"]);
        assert_eq!(split("", 100), vec![""]);
    }
}
