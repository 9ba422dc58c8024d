//! Text that others wrote (a guest's log lines and reasons, a producer's
//! event ids) is data: before it reaches a terminal or a text log line, its
//! control characters are escaped, so a newline cannot forge a log line and
//! an escape sequence cannot repaint an operator's terminal.

use std::borrow::Cow;

/// `text` with control characters and bidirectional overrides escaped
/// (`\n`, `\u{1b}`, ...); unchanged (and not copied) when it has none.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Control characters (C0, DEL, C1) and the bidirectional embedding,
/// override and isolate marks that reorder what a terminal shows.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` on one line: each run of whitespace (newlines, the indentation of
/// a debug dump such as wasmparser's "expected=[\n    0x0,\n ...]") becomes
/// one space, so an error stays one line in logs and CLI output.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_plain_text_is_untouched() {
        assert!(matches!(printable("all fine, ünïcødé too"), Cow::Borrowed(_)));
        assert_eq!(printable("line\n2026-01-01T00:00:00Z  INFO forged"), "line\\n2026-01-01T00:00:00Z  INFO forged");
        assert_eq!(printable("\u{1b}[2Jgone"), "\\u{1b}[2Jgone");
        assert_eq!(printable("tab\there\r"), "tab\\there\\r");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
    }

    #[test]
    fn a_debug_dump_comes_out_on_one_line() {
        assert_eq!(one_line("bad magic number - expected=[\n    0x0,\n    0x61,\n] actual=[]"), "bad magic number - expected=[ 0x0, 0x61, ] actual=[]");
    }
}
