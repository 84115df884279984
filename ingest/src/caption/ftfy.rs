//! `ftfy.fix_text` with its default configuration (ftfy 6.3.1), as the reference
//! cleaner calls it.
//!
//! Reproduced: the per-line segmentation and the "auto" HTML-unescape switch; the
//! fixer loop of `fix_and_explain` (repeat until stable): `unescape_html`,
//! `fix_encoding` (mojibake detection with ftfy's `BADNESS_RE`, re-encoding through
//! the ten single-byte codecs ftfy tries, including its "sloppy" Windows codecs,
//! `restore_byte_a0`, `replace_lossy_sequences`, `utf-8-variants` decoding,
//! `decode_inconsistent_utf8`, the Latin-1 -> Windows-1252 step and
//! `fix_c1_controls`), `fix_latin_ligatures`, `fix_character_width`,
//! `uncurl_quotes`, `fix_line_breaks`, `remove_terminal_escapes`,
//! `remove_control_chars` and NFC normalisation. `fix_surrogates` has nothing to do
//! on Rust strings (they cannot hold surrogates; `utf-8-variants` decodes a lone
//! encoded surrogate straight to U+FFFD, which is what ftfy ends with too).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::LazyLock;

use regex::bytes::Regex as BytesRegex;
use unicode_normalization::UnicodeNormalization;

use super::html;
use super::pyre::{PyRe, RegexLimit};
use super::tables;

/// One single-byte codec: its decoding table and the inverse.
struct Charmap {
    name: &'static str,
    decode: &'static [char; 256],
    encode: HashMap<char, u8>,
}

struct Ftfy {
    charmaps: Vec<Charmap>,
    badness: PyRe,
    utf8_detector: PyRe,
    altered_utf8: BytesRegex,
    lossy_utf8: BytesRegex,
    ansi: PyRe,
    entities: HashMap<&'static str, &'static str>,
    width: HashMap<char, &'static str>,
    ligatures: HashMap<char, &'static str>,
}

static FTFY: LazyLock<Ftfy> = LazyLock::new(|| Ftfy {
    charmaps: tables::CHARMAPS
        .iter()
        .map(|(name, table)| Charmap {
            name,
            decode: table,
            encode: table
                .iter()
                .enumerate()
                .map(|(i, &c)| (c, i as u8))
                .collect(),
        })
        .collect(),
    badness: PyRe::verbose(tables::FTFY_BADNESS),
    utf8_detector: PyRe::verbose(tables::FTFY_UTF8_DETECTOR),
    altered_utf8: BytesRegex::new(concat!(
        r"(?-u)[\xc2\xc3\xc5\xce\xd0\xd9][ ]",
        r"|[\xe2\xe3][ ][\x80-\x84\x86-\x9f\xa1-\xbf]",
        r"|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf][ ]",
        r"|[\xf0][ ][\x80-\xbf][\x80-\xbf]",
        r"|[\xf0][\x80-\xbf][ ][\x80-\xbf]",
        r"|[\xf0][\x80-\xbf][\x80-\xbf][ ]",
    ))
    .expect("ALTERED_UTF8_RE compiles"),
    lossy_utf8: BytesRegex::new(concat!(
        r"(?-u)[\xc2-\xdf][\x1a]",
        r"|[\xc2-\xc3][?]",
        r"|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]",
        r"|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]",
        r"|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]",
        r"|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]",
        r"|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]",
        r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]",
        r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]",
        r"|\x1a",
    ))
    .expect("LOSSY_UTF8_RE compiles"),
    ansi: PyRe::new("\x1b\\[((?:\\d|;)*)([a-zA-Z])"),
    entities: tables::FTFY_ENTITIES.iter().copied().collect(),
    width: tables::FTFY_WIDTH
        .iter()
        .map(|&(k, v)| (char::from_u32(k).expect("scalar"), v))
        .collect(),
    ligatures: tables::FTFY_LIGATURES
        .iter()
        .map(|&(k, v)| (char::from_u32(k).expect("scalar"), v))
        .collect(),
});

/// ftfy's `max_decode_length` (in code points).
const MAX_DECODE_LENGTH: usize = 1_000_000;

/// `ftfy.fix_text(text)` with the default config.
pub(crate) fn fix_text(text: &str) -> Result<String, RegexLimit> {
    let f = &*FTFY;
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.find('\n').map_or(rest.len(), |p| p + 1);
        if end > MAX_DECODE_LENGTH
            && let Some((b, _)) = rest[..end].char_indices().nth(MAX_DECODE_LENGTH)
        {
            end = b;
        }
        let segment = &rest[..end];
        if unescape && segment.contains('<') {
            unescape = false;
        }
        out.push_str(&f.fix_segment(segment, unescape)?);
        rest = &rest[end..];
    }
    Ok(out)
}

impl Ftfy {
    /// `fix_and_explain(segment)` without the explanation.
    fn fix_segment(&self, text: &str, unescape: bool) -> Result<String, RegexLimit> {
        let mut text = text.to_string();
        loop {
            let orig = text.clone();
            if unescape {
                text = self.unescape_html(&text);
            }
            text = self.fix_encoding(&text)?;
            text = self.fix_c1_controls(&text);
            text = self.translate(&text, &self.ligatures);
            text = self.translate(&text, &self.width);
            text = uncurl_quotes(&text);
            text = fix_line_breaks(&text);
            text = self.ansi.sub(&text, "")?.into_owned();
            text = remove_control_chars(&text);
            text = text.nfc().collect();
            if text == orig {
                return Ok(text);
            }
        }
    }

    fn is_bad(&self, text: &str) -> Result<bool, RegexLimit> {
        self.badness.search(text)
    }

    /// `fix_encoding(text)`: one-step fixes until nothing changes.
    fn fix_encoding(&self, text: &str) -> Result<String, RegexLimit> {
        let mut text = text.to_string();
        loop {
            let next = self.fix_encoding_one_step(&text)?;
            if next == text {
                return Ok(text);
            }
            text = next;
        }
    }

    fn possible(&self, text: &str, map: &Charmap) -> bool {
        let sub = map.decode[0x1A];
        text.chars().all(|c| {
            let cp = c as u32;
            (cp < 0x80 && cp != 0x1A) || c == sub || map.encode.get(&c).is_some_and(|&b| b >= 0x80)
        })
    }

    fn fix_encoding_one_step(&self, text: &str) -> Result<String, RegexLimit> {
        if text.is_empty() || text.is_ascii() || !self.is_bad(text)? {
            return Ok(text.to_string());
        }
        let mut possible_latin1 = false;
        for map in &self.charmaps {
            if !self.possible(text, map) {
                continue;
            }
            if map.name == "latin-1" {
                possible_latin1 = true;
            }
            let mut bytes: Vec<u8> = text.chars().map(|c| map.encode[&c]).collect();
            if map.name != "macroman" && self.altered_utf8.is_match(&bytes) {
                bytes = self.restore_byte_a0(&bytes);
            }
            if map.name.starts_with("sloppy") {
                bytes = self
                    .lossy_utf8
                    .replace_all(&bytes, "\u{FFFD}".as_bytes())
                    .into_owned();
            }
            let decoded = if bytes.contains(&0xED) || bytes.contains(&0xC0) {
                decode_utf8_variants(&bytes)
            } else {
                String::from_utf8(bytes).ok()
            };
            if let Some(fixed) = decoded {
                return Ok(fixed);
            }
        }
        if self.utf8_detector.search(text)? {
            let fixed = self.decode_inconsistent_utf8(text)?;
            if fixed != text {
                return Ok(fixed);
            }
        }
        // ftfy tests for "windows-1252" among the possible encodings, a name that
        // list never holds ("sloppy-windows-1252" is), so this branch always runs.
        if possible_latin1
            && let Some(fixed) = latin1_to_windows1252(text)
            && fixed != text
        {
            return Ok(fixed);
        }
        if text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)) {
            return Ok(self.fix_c1_controls(text));
        }
        Ok(text.to_string())
    }

    /// `fixes.restore_byte_a0`.
    fn restore_byte_a0(&self, bytes: &[u8]) -> Vec<u8> {
        // A_GRAVE_WORD_RE = b"\xc3 (?! |quele|quela|quilo|s )" -> b"\xc3\xa0 "
        let mut out = Vec::with_capacity(bytes.len() + 4);
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == 0xC3 && bytes.get(i + 1) == Some(&b' ') {
                let after = &bytes[i + 2..];
                let blocked = [&b" "[..], b"quele", b"quela", b"quilo", b"s "]
                    .iter()
                    .any(|w| after.starts_with(w));
                if !blocked {
                    out.extend_from_slice(b"\xc3\xa0 ");
                    i += 2;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        self.altered_utf8
            .replace_all(&out, |m: &regex::bytes::Captures<'_>| {
                m[0].iter()
                    .map(|&b| if b == b' ' { 0xA0 } else { b })
                    .collect::<Vec<u8>>()
            })
            .into_owned()
    }

    /// `fixes.decode_inconsistent_utf8`.
    fn decode_inconsistent_utf8(&self, text: &str) -> Result<String, RegexLimit> {
        let text_len = text.chars().count();
        let failed = Cell::new(false);
        let out = self.utf8_detector.sub_with(text, |caps| {
            let sub = &caps[0];
            let result = (|| -> Result<String, RegexLimit> {
                if sub.chars().count() < text_len && self.is_bad(sub)? {
                    self.fix_encoding(sub)
                } else {
                    Ok(sub.to_string())
                }
            })();
            result.unwrap_or_else(|_| {
                failed.set(true);
                sub.to_string()
            })
        })?;
        if failed.get() {
            return Err(RegexLimit);
        }
        Ok(out.into_owned())
    }

    /// `fixes.fix_c1_controls`: C1 controls read as sloppy Windows-1252.
    fn fix_c1_controls(&self, text: &str) -> String {
        if !text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)) {
            return text.to_string();
        }
        let cp1252 = &self.charmaps[1];
        debug_assert_eq!(cp1252.name, "sloppy-windows-1252");
        text.chars()
            .map(|c| {
                if ('\u{80}'..='\u{9f}').contains(&c) {
                    cp1252.decode[c as usize]
                } else {
                    c
                }
            })
            .collect()
    }

    /// `fixes.unescape_html`: `&#?[0-9A-Za-z]{1,24};` through ftfy's entity table.
    fn unescape_html(&self, text: &str) -> String {
        if !text.contains('&') {
            return text.to_string();
        }
        let b = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        let mut i = 0;
        while let Some(p) = text[i..].find('&').map(|p| p + i) {
            let start = if b.get(p + 1) == Some(&b'#') {
                p + 2
            } else {
                p + 1
            };
            let mut e = start;
            while e < b.len() && e - start < 24 && b[e].is_ascii_alphanumeric() {
                e += 1;
            }
            if e > start && b.get(e) == Some(&b';') {
                let m = &text[p..=e];
                let rep = if let Some(v) = self.entities.get(m) {
                    Some((*v).to_string())
                } else if m.starts_with("&#") {
                    let u = html::unescape(m);
                    if u.contains(';') { None } else { Some(u) }
                } else {
                    None
                };
                if let Some(rep) = rep {
                    out.push_str(&text[last..p]);
                    out.push_str(&rep);
                    last = e + 1;
                }
                i = e + 1;
            } else {
                i = p + 1;
            }
        }
        out.push_str(&text[last..]);
        out
    }

    fn translate(&self, text: &str, map: &HashMap<char, &'static str>) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            match map.get(&c) {
                Some(s) => out.push_str(s),
                None => out.push(c),
            }
        }
        out
    }
}

/// `text.encode("latin-1").decode("windows-1252")` (strict: undefined bytes fail).
fn latin1_to_windows1252(text: &str) -> Option<String> {
    text.chars()
        .map(|c| {
            let cp = c as u32;
            if cp > 0xFF {
                None
            } else if (0x80..0xA0).contains(&cp) {
                let d = tables::CP1252_C1[(cp - 0x80) as usize];
                (d != '\u{FFFD}').then_some(d)
            } else {
                Some(c)
            }
        })
        .collect()
}

/// ftfy's `utf-8-variants` codec: UTF-8 plus CESU-8 surrogate pairs and the
/// two-byte NUL `C0 80`. `None` where the bytes do not decode.
fn decode_utf8_variants(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(&[0xC0, 0x80]) {
            out.push('\0');
            i += 2;
            continue;
        }
        if rest.len() >= 6
            && rest[0] == 0xED
            && (0xA0..=0xAF).contains(&rest[1])
            && (0x80..=0xBF).contains(&rest[2])
            && rest[3] == 0xED
            && (0xB0..=0xBF).contains(&rest[4])
            && (0x80..=0xBF).contains(&rest[5])
        {
            let hi = 0xD000 + ((u32::from(rest[1]) & 0x3F) << 6) + (u32::from(rest[2]) & 0x3F);
            let lo = 0xD000 + ((u32::from(rest[4]) & 0x3F) << 6) + (u32::from(rest[5]) & 0x3F);
            let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
            out.push(char::from_u32(cp)?);
            i += 6;
            continue;
        }
        if rest.len() >= 3
            && rest[0] == 0xED
            && (0xA0..=0xBF).contains(&rest[1])
            && (0x80..=0xBF).contains(&rest[2])
        {
            out.push('\u{FFFD}');
            i += 3;
            continue;
        }
        // The longest valid UTF-8 prefix up to the next special byte.
        let next_special = rest[1..]
            .iter()
            .position(|&b| b == 0xC0 || b == 0xED)
            .map_or(rest.len(), |p| p + 1);
        let chunk = &rest[..next_special];
        match std::str::from_utf8(chunk) {
            Ok(s) => {
                out.push_str(s);
                i += next_special;
            }
            Err(e) if e.valid_up_to() > 0 => {
                out.push_str(std::str::from_utf8(&chunk[..e.valid_up_to()]).ok()?);
                i += e.valid_up_to();
            }
            Err(_) => {
                // A multi-byte char cut by the chunk boundary: take it whole.
                let len = match rest[0] {
                    0xC2..=0xDF => 2,
                    0xE0..=0xEF => 3,
                    0xF0..=0xF4 => 4,
                    _ => return None,
                };
                let s = std::str::from_utf8(rest.get(..len)?).ok()?;
                out.push_str(s);
                i += len;
            }
        }
    }
    Some(out)
}

fn uncurl_quotes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{201C}'..='\u{201F}' => '"',
            '\u{2018}'..='\u{201B}' | '\u{02BC}' => '\'',
            c => c,
        })
        .collect()
}

fn fix_line_breaks(text: &str) -> String {
    if !text.contains(['\r', '\u{2028}', '\u{2029}', '\u{85}']) {
        return text.to_string();
    }
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

fn remove_control_chars(text: &str) -> String {
    text.chars()
        .filter(|&c| {
            !matches!(c as u32,
                0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ftfy_docstring_examples() {
        assert_eq!(fix_text("âœ” No problems").unwrap(), "✔ No problems");
        assert_eq!(
            fix_text("&macr;\\_(ã\u{83}\u{84})_/&macr;").unwrap(),
            "¯\\_(ツ)_/¯"
        );
        assert_eq!(
            fix_text("Broken text&hellip; it&#x2019;s ﬂubberiﬁc!").unwrap(),
            // (ftfy's docstring says "...", ftfy 6.3.1 itself gives the ellipsis)
            "Broken text… it's flubberific!"
        );
        assert_eq!(fix_text("ＬＯＵＤ　ＮＯＩＳＥＳ").unwrap(), "LOUD NOISES");
        assert_eq!(fix_text("sÃ³").unwrap(), "só");
        assert_eq!(fix_text("voilÃ le travail").unwrap(), "voilà le travail");
        assert_eq!(fix_text("schÃ¶n").unwrap(), "schön");
    }

    #[test]
    fn html_unescape_is_off_after_a_lt() {
        assert_eq!(
            fix_text("a &amp; b\n<c> &amp;").unwrap(),
            "a & b\n<c> &amp;"
        );
    }

    #[test]
    fn utf8_variants() {
        assert_eq!(decode_utf8_variants(b"a\xc0\x80b").unwrap(), "a\0b");
        assert_eq!(
            decode_utf8_variants(b"\xed\xa0\xbd\xed\xb8\x80").unwrap(),
            "😀"
        );
        assert!(decode_utf8_variants(b"\xc3").is_none());
    }
}
