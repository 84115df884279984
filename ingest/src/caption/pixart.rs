//! The PixArt-α caption cleaner: diffusers' `PixArtAlphaPipeline._clean_caption`
//! (identical to DeepFloyd IF's), applied twice as `_text_preprocessing(text,
//! clean_caption=True)` does before T5.
//!
//! Reference: `diffusers/pipelines/pixart_alpha/pipeline_pixart_alpha.py` (diffusers
//! 0.42). Every step below names the Python line it reproduces; the patterns are the
//! reference's own, compiled with CPython semantics by [`super::pyre`].

use std::borrow::Cow;
use std::sync::LazyLock;

use super::pyre::{PyRe, RegexLimit, py_strip};
use super::{ftfy, html, tables};

/// CPython's `str.lower()`.
pub(crate) fn py_lower(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_lowercase();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else if c == 'Σ' {
            out.push(if final_sigma(&chars, i) { 'ς' } else { 'σ' });
        } else {
            match tables::PY_LOWER.binary_search_by_key(&(c as u32), |&(k, _)| k) {
                Ok(idx) => out.push_str(tables::PY_LOWER[idx].1),
                Err(_) => out.push(c),
            }
        }
    }
    out
}

/// CPython's Final_Sigma test: a cased letter before (skipping case-ignorable
/// chars) and none after. Cased / case-ignorable are approximated by Rust's
/// `is_lowercase || is_uppercase` and by marks, format chars and the apostrophes.
fn final_sigma(chars: &[char], i: usize) -> bool {
    let cased = |c: char| c.is_lowercase() || c.is_uppercase();
    let ignorable = |c: char| {
        matches!(
            c,
            '\'' | '.' | ':' | '^' | '`' | '\u{AD}' | '\u{B7}' | '\u{2019}'
        ) || matches!(c as u32, 0x300..=0x36F | 0x200B..=0x200F | 0xFE00..=0xFE0F)
    };
    let before = chars[..i].iter().rev().find(|&&c| !ignorable(c));
    let after = chars[i + 1..].iter().find(|&&c| !ignorable(c));
    before.is_some_and(|&c| cased(c)) && !after.is_some_and(|&c| cased(c))
}

/// `urllib.parse.unquote_plus(s)` (UTF-8, errors="replace").
pub(crate) fn unquote_plus(s: &str) -> Cow<'_, str> {
    let s: Cow<'_, str> = if s.contains('+') {
        Cow::Owned(s.replace('+', " "))
    } else {
        Cow::Borrowed(s)
    };
    if !s.contains('%') {
        return s;
    }
    let mut out = String::with_capacity(s.len());
    // CPython decodes each maximal ASCII run on its own; other chars pass through.
    let mut rest: &str = &s;
    while !rest.is_empty() {
        let ascii_len = rest.bytes().take_while(u8::is_ascii).count();
        if ascii_len > 0 {
            let run = &rest[..ascii_len];
            if run.contains('%') {
                out.push_str(&String::from_utf8_lossy(&unquote_to_bytes(run.as_bytes())));
            } else {
                out.push_str(run);
            }
            rest = &rest[ascii_len..];
        } else {
            let other_len: usize = rest
                .chars()
                .take_while(|c| !c.is_ascii())
                .map(char::len_utf8)
                .sum();
            out.push_str(&rest[..other_len]);
            rest = &rest[other_len..];
        }
    }
    Cow::Owned(out)
}

fn unquote_to_bytes(s: &[u8]) -> Vec<u8> {
    let hexval = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && i + 2 < s.len()
            && let (Some(h), Some(l)) = (hexval(s[i + 1]), hexval(s[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// The compiled reference patterns.
pub(crate) struct PixArt {
    url1: PyRe,
    url2: PyRe,
    nickname: PyRe,
    cjk: [PyRe; 7],
    dashes: PyRe,
    double_quotes: PyRe,
    single_quotes: PyRe,
    quot: PyRe,
    amp: PyRe,
    ip: PyRe,
    article_id: PyRe,
    escaped_newline: PyRe,
    hash_short: PyRe,
    hash_long: PyRe,
    long_number: PyRe,
    filename: PyRe,
    quote_run: PyRe,
    dot_run: PyRe,
    bad_punct: PyRe,
    spaced_dot: PyRe,
    dash_underscore: PyRe,
    code1: PyRe,
    code2: PyRe,
    code3: PyRe,
    shipping: PyRe,
    download: PyRe,
    click: PyRe,
    ext_word: PyRe,
    page: PyRe,
    mixed_code: PyRe,
    dimensions: PyRe,
    colon: PyRe,
    punct_space: PyRe,
    spaces: PyRe,
    quoted: PyRe,
    lead_punct: PyRe,
    trail_punct: PyRe,
    dot_word: PyRe,
}

/// `bad_punct_regex` of the pipeline class.
const BAD_PUNCT: &str = concat!(
    r"[",
    "#®•©™&@·º½¾¿¡§~",
    r"\)",
    r"\(",
    r"\]",
    r"\[",
    r"\}",
    r"\{",
    r"\|",
    "\\",
    r"\/",
    r"\*",
    r"]{1,}"
);

static PIXART: LazyLock<PixArt> = LazyLock::new(PixArt::compile);

impl PixArt {
    /// The shared compiled patterns (compiled once per process).
    pub(crate) fn get() -> &'static PixArt {
        &PIXART
    }

    fn compile() -> Self {
        Self {
            url1: PyRe::new(
                r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
            ),
            url2: PyRe::new(
                r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
            ),
            nickname: PyRe::new(r"@[\w\d]+\b"),
            cjk: [
                PyRe::new(r"[\u31c0-\u31ef]+"),
                PyRe::new(r"[\u31f0-\u31ff]+"),
                PyRe::new(r"[\u3200-\u32ff]+"),
                PyRe::new(r"[\u3300-\u33ff]+"),
                PyRe::new(r"[\u3400-\u4dbf]+"),
                PyRe::new(r"[\u4dc0-\u4dff]+"),
                PyRe::new(r"[\u4e00-\u9fff]+"),
            ],
            dashes: PyRe::new(
                r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+",
            ),
            double_quotes: PyRe::new("[`´«»“”¨]"),
            single_quotes: PyRe::new("[‘’]"),
            quot: PyRe::new(r"&quot;?"),
            amp: PyRe::new(r"&amp"),
            ip: PyRe::new(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"),
            article_id: PyRe::new(r"\d:\d\d\s+$"),
            escaped_newline: PyRe::new(r"\\n"),
            hash_short: PyRe::new(r"#\d{1,3}\b"),
            hash_long: PyRe::new(r"#\d{5,}\b"),
            long_number: PyRe::new(r"\b\d{6,}\b"),
            filename: PyRe::new(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"),
            quote_run: PyRe::new(r#"[\"\']{2,}"#),
            dot_run: PyRe::new(r"[\.]{2,}"),
            bad_punct: PyRe::new(BAD_PUNCT),
            spaced_dot: PyRe::new(r"\s+\.\s+"),
            dash_underscore: PyRe::new(r"(?:\-|\_)"),
            code1: PyRe::new(r"\b[a-zA-Z]{1,3}\d{3,15}\b"),
            code2: PyRe::new(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"),
            code3: PyRe::new(r"\b\d+[a-zA-Z]+\d+\b"),
            shipping: PyRe::new(r"(worldwide\s+)?(free\s+)?shipping"),
            download: PyRe::new(r"(free\s)?download(\sfree)?"),
            click: PyRe::new(r"\bclick\b\s(?:for|on)\s\w+"),
            ext_word: PyRe::new(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?"),
            page: PyRe::new(r"\bpage\s+\d+\b"),
            mixed_code: PyRe::new(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"),
            dimensions: PyRe::new(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b"),
            colon: PyRe::new(r"\b\s+\:\s+"),
            punct_space: PyRe::new(r"(\D[,\./])\b"),
            spaces: PyRe::new(r"\s+"),
            quoted: PyRe::new(r#"^[\"\']([\w\W]+)[\"\']$"#),
            lead_punct: PyRe::new(r"^[\'\_,\-\:;]"),
            trail_punct: PyRe::new(r"[\'\_,\-\:\-\+]$"),
            dot_word: PyRe::new(r"^\.\S+$"),
        }
    }

    /// `_text_preprocessing(text, clean_caption=True)` for one caption.
    pub(crate) fn clean_twice(&self, caption: &str) -> Result<String, RegexLimit> {
        let once = self.clean_once(caption)?;
        self.clean_once(&once)
    }

    /// One `_clean_caption(caption)`.
    pub(crate) fn clean_once(&self, caption: &str) -> Result<String, RegexLimit> {
        let c = unquote_plus(caption);
        let c = py_lower(py_strip(&c));
        let c = c.replace("<person>", "person");
        // urls:
        let c = self.url1.sub(&c, "")?.into_owned();
        let c = self.url2.sub(&c, "")?.into_owned();
        // html:
        let c = html::soup_text(&c);
        // @<nickname>
        let mut c = self.nickname.sub(&c, "")?.into_owned();
        for re in &self.cjk {
            c = re.sub(&c, "")?.into_owned();
        }
        let c = self.dashes.sub(&c, "-")?;
        let c = self.double_quotes.sub(&c, "\"")?.into_owned();
        let c = self.single_quotes.sub(&c, "'")?.into_owned();
        let c = self.quot.sub(&c, "")?.into_owned();
        let c = self.amp.sub(&c, "")?.into_owned();
        let c = self.ip.sub(&c, " ")?.into_owned();
        let c = self.article_id.sub(&c, "")?.into_owned();
        let c = self.escaped_newline.sub(&c, " ")?.into_owned();
        let c = self.hash_short.sub(&c, "")?.into_owned();
        let c = self.hash_long.sub(&c, "")?.into_owned();
        let c = self.long_number.sub(&c, "")?.into_owned();
        let c = self.filename.sub(&c, "")?.into_owned();
        let c = self.quote_run.sub(&c, "\"")?.into_owned();
        let c = self.dot_run.sub(&c, " ")?.into_owned();
        let c = self.bad_punct.sub(&c, " ")?.into_owned();
        let mut c = self.spaced_dot.sub(&c, " ")?.into_owned();
        // this-is-my-cute-cat / this_is_my_cute_cat
        if self.dash_underscore.count(&c)? > 3 {
            c = self.dash_underscore.sub(&c, " ")?.into_owned();
        }
        let c = ftfy::fix_text(&c)?;
        let c = html::unescape(&html::unescape(&c));
        let c = self.code1.sub(&c, "")?.into_owned();
        let c = self.code2.sub(&c, "")?.into_owned();
        let c = self.code3.sub(&c, "")?.into_owned();
        let c = self.shipping.sub(&c, "")?.into_owned();
        let c = self.download.sub(&c, "")?.into_owned();
        let c = self.click.sub(&c, "")?.into_owned();
        let c = self.ext_word.sub(&c, "")?.into_owned();
        let c = self.page.sub(&c, "")?.into_owned();
        let c = self.mixed_code.sub(&c, " ")?.into_owned();
        let c = self.dimensions.sub(&c, "")?.into_owned();
        let c = self.colon.sub(&c, ": ")?.into_owned();
        let c = self
            .punct_space
            .sub_with(&c, |caps| format!("{} ", &caps[1]))?
            .into_owned();
        let c = self.spaces.sub(&c, " ")?.into_owned();
        // `caption.strip()` here discards its result in the reference: a no-op.
        let c = self
            .quoted
            .sub_with(&c, |caps| caps[1].to_string())?
            .into_owned();
        let c = self.lead_punct.sub(&c, "")?.into_owned();
        let c = self.trail_punct.sub(&c, "")?.into_owned();
        let c = self.dot_word.sub(&c, "")?.into_owned();
        Ok(py_strip(&c).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquote_plus_matches_cpython() {
        assert_eq!(unquote_plus("a+b%20c"), "a b c");
        assert_eq!(unquote_plus("%C3%A9t%C3%A9"), "été");
        assert_eq!(unquote_plus("100%"), "100%");
        assert_eq!(unquote_plus("%zz%4"), "%zz%4");
        assert_eq!(unquote_plus("%FF"), "\u{FFFD}");
        // Each ASCII run decodes on its own.
        assert_eq!(unquote_plus("%C3é%A9"), "\u{FFFD}é\u{FFFD}");
    }

    #[test]
    fn lower_matches_cpython() {
        assert_eq!(py_lower("ÀB İ"), "àb i\u{307}");
        assert_eq!(py_lower("ΟΔΟΣ ΣΑ"), "οδος σα");
    }

    #[test]
    fn reference_examples() {
        let p = PixArt::get();
        let clean = |s: &str| p.clean_twice(s).unwrap();
        assert_eq!(
            clean("A cat. Free shipping! Visit www.shop.com"),
            "a cat. ! visit"
        );
        assert_eq!(clean("  <b>Bold</b> &amp; beautiful  "), "bold beautiful");
    }
}
