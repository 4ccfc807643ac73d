//! Python `str` whitespace semantics (`str.isspace`, `str.split()`, `str.rstrip()`, regex `\s`).
//!
//! Python's notion of whitespace differs from Rust's [`char::is_whitespace`]: it also
//! includes the information separators U+001C..U+001F (bidirectional class B/S). Python's
//! `re` module uses the same predicate for `\s` on `str` patterns.

/// `str.isspace()` for one character (equal to `re.match(r"\s", c)` in Python 3.11).
pub(crate) fn is_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1C}'..='\u{20}'
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

/// `s.split()`: the non-empty runs of non-whitespace characters.
pub(crate) fn split_whitespace(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_space).filter(|w| !w.is_empty())
}

/// `s.rstrip()`.
pub(crate) fn rstrip(s: &str) -> &str {
    s.trim_end_matches(is_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code point for which Python 3.11 `chr(c).isspace()` is true, generated with
    /// `[hex(c) for c in range(0x110000) if chr(c).isspace()]`.
    const PY_SPACES: [u32; 29] = [
        0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680, 0x2000, 0x2001,
        0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028, 0x2029,
        0x202f, 0x205f, 0x3000,
    ];

    #[test]
    fn is_space_equals_python_isspace_on_all_code_points() {
        let ours: Vec<u32> = (0..=0x10FFFFu32)
            .filter_map(char::from_u32)
            .filter(|&c| is_space(c))
            .map(|c| c as u32)
            .collect();
        assert_eq!(ours, PY_SPACES);
    }

    #[test]
    fn split_and_rstrip_follow_python() {
        // Python: ' a\u3000b\x1c'.split() == ['a', 'b']
        let words: Vec<&str> = split_whitespace(" a\u{3000}b\u{1c}").collect();
        assert_eq!(words, ["a", "b"]);
        assert_eq!(split_whitespace(" \t\u{3000}\n").count(), 0);
        // Python: '\x1fab\x1c '.rstrip() == '\x1fab'
        assert_eq!(rstrip("\u{1f}ab\u{1c} "), "\u{1f}ab");
    }
}
