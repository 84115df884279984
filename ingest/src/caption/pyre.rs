//! CPython `re` semantics on top of `fancy-regex`.
//!
//! The reference cleaner is a sequence of Python regular expressions. Rust's engines
//! agree with CPython's on leftmost-first matching, but not on what `\w`, `\d`, `\s`
//! and `\b` mean (CPython's `\w` is `str.isalnum()` plus `_`: it includes `½` and
//! `²` and excludes combining marks and the emoji variation selector; Rust's
//! follows UTS #18), nor on `$` (CPython also matches before a final newline). This
//! module translates a Python pattern into an equivalent `fancy-regex` pattern whose
//! classes are spelled out from CPython's own tables ([`super::tables`]) and whose
//! `\b` is written with lookaround over those classes.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::LazyLock;

use fancy_regex::{Captures, Regex, RegexBuilder};

use super::tables;

/// Matching ran past the backtracking budget (only possible for pathological input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegexLimit;

/// How many backtracking steps one search may take before it gives up.
const BACKTRACK_LIMIT: usize = 50_000_000;

const SURROGATES: (u32, u32) = (0xD800, 0xDFFF);

fn push_cp(out: &mut String, cp: u32) {
    let _ = write!(out, "\\x{{{cp:X}}}");
}

/// Writes `ranges` as the inside of a character class, skipping surrogates.
fn push_ranges(out: &mut String, ranges: &[(u32, u32)]) {
    for &(a, b) in ranges {
        for (a, b) in split_surrogates(a, b) {
            push_cp(out, a);
            if b > a {
                out.push('-');
                push_cp(out, b);
            }
        }
    }
}

fn split_surrogates(a: u32, b: u32) -> Vec<(u32, u32)> {
    let (sa, sb) = SURROGATES;
    if b < sa || a > sb {
        return vec![(a, b)];
    }
    let mut v = Vec::with_capacity(2);
    if a < sa {
        v.push((a, sa - 1));
    }
    if b > sb {
        v.push((sb + 1, b));
    }
    v
}

fn complement(ranges: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut next = 0u32;
    for &(a, b) in ranges {
        if a > next {
            out.push((next, a - 1));
        }
        next = b + 1;
    }
    if next <= 0x10FFFF {
        out.push((next, 0x10FFFF));
    }
    out
}

fn normalise(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn class(ranges: &[(u32, u32)]) -> String {
    let mut s = String::from("[");
    push_ranges(&mut s, ranges);
    s.push(']');
    s
}

struct Classes {
    word: Vec<(u32, u32)>,
    digit: Vec<(u32, u32)>,
    space: Vec<(u32, u32)>,
    boundary: String,
    not_boundary: String,
}

static CLASSES: LazyLock<Classes> = LazyLock::new(|| {
    let word = tables::PY_WORD.to_vec();
    let word_class = class(&word);
    let w = &word_class;
    Classes {
        digit: tables::PY_DIGIT.to_vec(),
        space: tables::PY_SPACE.to_vec(),
        boundary: format!("(?:(?<={w})(?!{w})|(?<!{w})(?={w}))"),
        not_boundary: format!("(?:(?<={w})(?={w})|(?<!{w})(?!{w}))"),
        word,
    }
});

/// Whether CPython's `re` counts `c` as whitespace (`\s`, also `str.isspace`).
pub(crate) fn is_py_space(c: char) -> bool {
    let cp = c as u32;
    if cp < 0x80 {
        return matches!(cp, 0x09..=0x0D | 0x1C..=0x20);
    }
    in_ranges(tables::PY_SPACE, cp)
}

/// Whether CPython's `re` counts `c` as a word character (`\w`).
#[cfg(test)]
pub(crate) fn is_py_word(c: char) -> bool {
    in_ranges(tables::PY_WORD, c as u32)
}

fn in_ranges(ranges: &[(u32, u32)], cp: u32) -> bool {
    ranges
        .binary_search_by(|&(a, b)| {
            if b < cp {
                std::cmp::Ordering::Less
            } else if a > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Python's `str.strip()` with no argument.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Translates a CPython pattern (`verbose`: compiled with `re.VERBOSE`) into a
/// `fancy-regex` pattern with the same meaning.
///
/// Supports what the reference patterns use: classes (with `\w \W \d \D \s \S` and
/// escapes inside), groups and lookaround, quantifiers, `\b \B \A \Z`, `^ $ .`, and
/// `\xHH \uHHHH \UHHHHHHHH` escapes.
pub(crate) fn translate(pattern: &str, verbose: bool) -> String {
    translate_mode(pattern, verbose, false)
}

/// Like [`translate`], with every zero-width assertion (`\b`, `\B`, `$`,
/// lookaround) dropped: the result matches a superset of what the pattern matches,
/// has no lookaround, and so runs on the `regex` crate's automata. It is used as a
/// prefilter: where it finds nothing, the exact pattern cannot match either.
fn translate_relaxed(pattern: &str, verbose: bool) -> String {
    translate_mode(pattern, verbose, true)
}

/// The index after the group opened at `chars[i] == '('` closes.
fn skip_group(chars: &[char], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 1,
            '[' => {
                i += 1;
                if chars.get(i) == Some(&'^') {
                    i += 1;
                }
                if chars.get(i) == Some(&']') {
                    i += 1;
                }
                while i < chars.len() && chars[i] != ']' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

fn translate_mode(pattern: &str, verbose: bool, relaxed: bool) -> String {
    let cls = &*CLASSES;
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if verbose && matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C') {
            i += 1;
            continue;
        }
        if verbose && c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        match c {
            '\\' => {
                let (item, next) = escape(&chars, i + 1);
                i = next;
                match item {
                    Escape::Char(ch) => push_literal(&mut out, ch),
                    Escape::Set(ranges, negated) => {
                        out.push('[');
                        if negated {
                            out.push('^');
                        }
                        push_ranges(&mut out, &ranges);
                        out.push(']');
                    }
                    Escape::Boundary | Escape::NotBoundary if relaxed => {}
                    Escape::Boundary => out.push_str(&cls.boundary),
                    Escape::NotBoundary => out.push_str(&cls.not_boundary),
                    Escape::Start => out.push_str("\\A"),
                    Escape::End => out.push_str("\\z"),
                }
                continue;
            }
            '$' if relaxed => {}
            '$' => out.push_str("(?=\\n?\\z)"),
            '(' if relaxed
                && chars.get(i + 1) == Some(&'?')
                && (matches!(chars.get(i + 2), Some('=' | '!'))
                    || (chars.get(i + 2) == Some(&'<')
                        && matches!(chars.get(i + 3), Some('=' | '!')))) =>
            {
                i = skip_group(&chars, i);
                continue;
            }
            '[' => {
                i = parse_class(&chars, i + 1, &mut out);
                continue;
            }
            '(' | ')' | '|' | '*' | '+' | '?' | '{' | '}' | '^' | '.' => out.push(c),
            ',' | '<' | '=' | '!' | ':' | 'P' | '>' => out.push(c),
            _ => push_literal(&mut out, c),
        }
        i += 1;
    }
    out
}

fn push_literal(out: &mut String, c: char) {
    if c.is_ascii_alphanumeric() || (!c.is_ascii() && !c.is_whitespace()) {
        out.push(c);
    } else {
        push_cp(out, c as u32);
    }
}

enum Escape {
    Char(char),
    Set(Vec<(u32, u32)>, bool),
    Boundary,
    NotBoundary,
    Start,
    End,
}

fn hex(chars: &[char], from: usize, n: usize) -> (char, usize) {
    let s: String = chars[from..from + n].iter().collect();
    let cp = u32::from_str_radix(&s, 16).expect("hex escape in a built-in pattern");
    (
        char::from_u32(cp).expect("escape is a scalar value"),
        from + n,
    )
}

/// Parses the escape whose letter is at `chars[i]`; returns it and the next index.
fn escape(chars: &[char], i: usize) -> (Escape, usize) {
    let cls = &*CLASSES;
    let e = chars[i];
    let item = match e {
        'w' => Escape::Set(cls.word.clone(), false),
        'W' => Escape::Set(cls.word.clone(), true),
        'd' => Escape::Set(cls.digit.clone(), false),
        'D' => Escape::Set(cls.digit.clone(), true),
        's' => Escape::Set(cls.space.clone(), false),
        'S' => Escape::Set(cls.space.clone(), true),
        'b' => Escape::Boundary,
        'B' => Escape::NotBoundary,
        'A' => Escape::Start,
        'Z' => Escape::End,
        'x' => {
            let (c, next) = hex(chars, i + 1, 2);
            return (Escape::Char(c), next);
        }
        'u' => {
            let (c, next) = hex(chars, i + 1, 4);
            return (Escape::Char(c), next);
        }
        'U' => {
            let (c, next) = hex(chars, i + 1, 8);
            return (Escape::Char(c), next);
        }
        'n' => Escape::Char('\n'),
        't' => Escape::Char('\t'),
        'r' => Escape::Char('\r'),
        'f' => Escape::Char('\x0C'),
        'v' => Escape::Char('\x0B'),
        'a' => Escape::Char('\x07'),
        c if c.is_ascii_alphanumeric() => panic!("unsupported escape \\{c} in a built-in pattern"),
        c => Escape::Char(c),
    };
    (item, i + 1)
}

/// Parses a class body starting after `[`; writes the translated class; returns the
/// index after the closing `]`.
fn parse_class(chars: &[char], mut i: usize, out: &mut String) -> usize {
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    let mut first = true;
    loop {
        let c = chars[i];
        if c == ']' && !first {
            i += 1;
            break;
        }
        first = false;
        // One item: a char (possibly the start of a range) or a set.
        let (lo, next) = if c == '\\' {
            match escape(chars, i + 1) {
                (Escape::Char(ch), next) => (ch, next),
                (Escape::Set(set, neg), next) => {
                    if neg {
                        ranges.extend(complement(&set));
                    } else {
                        ranges.extend(set);
                    }
                    i = next;
                    continue;
                }
                (Escape::Boundary, next) => ('\x08', next),
                _ => panic!("unsupported escape in a class of a built-in pattern"),
            }
        } else {
            (c, i + 1)
        };
        i = next;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']') {
            let (hi, next) = if chars[i + 1] == '\\' {
                match escape(chars, i + 2) {
                    (Escape::Char(ch), next) => (ch, next),
                    _ => panic!("bad range end in a built-in pattern"),
                }
            } else {
                (chars[i + 1], i + 2)
            };
            ranges.push((lo as u32, hi as u32));
            i = next;
        } else {
            ranges.push((lo as u32, lo as u32));
        }
    }
    let ranges = normalise(ranges);
    out.push('[');
    if negated {
        out.push('^');
    }
    push_ranges(out, &ranges);
    out.push(']');
    i
}

/// A compiled CPython pattern.
#[derive(Debug)]
pub(crate) struct PyRe {
    re: Regex,
    /// A lookaround-free superset of `re` on the `regex` crate (see
    /// [`translate_relaxed`]): most captions match few patterns, and this rejects
    /// them without running the backtracking VM.
    prefilter: Option<regex::Regex>,
}

impl PyRe {
    /// Compiles a built-in (constant) CPython pattern; panics if it does not compile,
    /// which the unit tests rule out.
    pub(crate) fn new(pattern: &str) -> Self {
        Self::with_flags(pattern, false)
    }

    /// Like [`PyRe::new`] for a pattern compiled with `re.VERBOSE`.
    pub(crate) fn verbose(pattern: &str) -> Self {
        Self::with_flags(pattern, true)
    }

    fn with_flags(pattern: &str, verbose: bool) -> Self {
        let translated = translate(pattern, verbose);
        let re = RegexBuilder::new(&translated)
            .backtrack_limit(BACKTRACK_LIMIT)
            .delegate_size_limit(1 << 26)
            .delegate_dfa_size_limit(1 << 26)
            .build()
            .unwrap_or_else(|e| panic!("built-in pattern {pattern:?} does not compile: {e}"));
        let prefilter = regex::RegexBuilder::new(&translate_relaxed(pattern, verbose))
            .size_limit(1 << 26)
            .dfa_size_limit(1 << 26)
            .build()
            .ok();
        Self { re, prefilter }
    }

    /// False when the prefilter proves the pattern cannot match `text`.
    fn may_match(&self, text: &str) -> bool {
        self.prefilter.as_ref().is_none_or(|p| p.is_match(text))
    }

    /// `re.sub(pattern, literal, text)`.
    pub(crate) fn sub<'t>(&self, text: &'t str, literal: &str) -> Result<Cow<'t, str>, RegexLimit> {
        if !self.may_match(text) {
            return Ok(Cow::Borrowed(text));
        }
        self.re
            .try_replacen(text, 0, fancy_regex::NoExpand(literal))
            .map_err(|_| RegexLimit)
    }

    /// `re.sub(pattern, function, text)`.
    pub(crate) fn sub_with<'t>(
        &self,
        text: &'t str,
        f: impl FnMut(&Captures<'_, str>) -> String,
    ) -> Result<Cow<'t, str>, RegexLimit> {
        if !self.may_match(text) {
            return Ok(Cow::Borrowed(text));
        }
        self.re.try_replacen(text, 0, f).map_err(|_| RegexLimit)
    }

    /// `bool(re.search(pattern, text))`.
    pub(crate) fn search(&self, text: &str) -> Result<bool, RegexLimit> {
        if !self.may_match(text) {
            return Ok(false);
        }
        self.re.is_match(text).map_err(|_| RegexLimit)
    }

    /// `len(re.findall(pattern, text))`.
    pub(crate) fn count(&self, text: &str) -> Result<usize, RegexLimit> {
        if !self.may_match(text) {
            return Ok(0);
        }
        let mut n = 0;
        for m in self.re.find_iter(text) {
            m.map_err(|_| RegexLimit)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_word_class_differs_from_rust_where_it_should() {
        // U+FE0F (emoji presentation selector) is a mark: Rust's \w, not CPython's.
        assert!(!is_py_word('\u{FE0F}'));
        assert!(is_py_word('½') && is_py_word('²') && is_py_word('_') && is_py_word('é'));
        let re = PyRe::new(r"\bx");
        assert!(!re.search("\u{FE0F}").unwrap());
        // In CPython "❤️x" has a boundary before x (both ❤ and FE0F are non-word).
        assert!(re.search("\u{2764}\u{FE0F}x").unwrap());
        assert!(!re.search("½x").unwrap());
    }

    #[test]
    fn dollar_matches_before_a_final_newline() {
        let re = PyRe::new(r"a$");
        assert!(re.search("a\n").unwrap());
        assert!(re.search("a").unwrap());
        assert!(!re.search("a\n\n").unwrap());
    }

    #[test]
    fn classes_with_escapes_and_ranges() {
        let re = PyRe::new(r"[\'\_,\-\:\-\+]$");
        assert_eq!(re.sub("ab-", "").unwrap(), "ab");
        assert_eq!(re.sub("ab+", "").unwrap(), "ab");
        let re = PyRe::new(r"[\w\W]+");
        assert_eq!(re.sub("a\nb", "x").unwrap(), "x");
        let re = PyRe::verbose("[a-z] [ ]  b # comment\n");
        assert!(re.search("q b").unwrap());
        assert!(!re.search("qb").unwrap());
        assert!(!re.search("q  b").unwrap());
    }

    #[test]
    fn relaxed_patterns_drop_only_zero_width_assertions() {
        let r = translate_relaxed(r"\bab(?!@)c(?<=c)$", false);
        assert_eq!(r, "abc");
        let r = translate_relaxed(r"x(?<![\)(])y", false);
        assert_eq!(r, "xy");
        // Every built-in pattern gets a prefilter.
        for re in [
            PyRe::new(r"\b\d+[a-zA-Z]+\d+\b"),
            PyRe::verbose(super::tables::FTFY_BADNESS),
        ] {
            assert!(re.prefilter.is_some());
        }
    }

    #[test]
    fn strip_uses_python_whitespace() {
        assert_eq!(py_strip("\x1c\u{3000} a b \x1f"), "a b");
        assert_eq!(py_strip("\u{200B}a"), "\u{200B}a");
    }
}
