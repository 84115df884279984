//! Shard lists: brace patterns, list files and the SA-1B links file.
//!
//! Brace patterns follow the Python `braceexpand` package that WebDataset uses:
//! `{a,b,c}` alternatives, `{000..099}` integer ranges (zero-padded to the wider bound
//! when either bound has a leading zero), `{a..e}` character ranges, an optional step
//! (`{0..10..2}`), nesting, and `\{` for a literal brace.

use std::path::Path;

/// One input shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Position in the manifest's shard list (rank/world split and output order).
    pub index: usize,
    /// Where to read it: path, `file://` or `http(s)://` URL.
    pub url: String,
    /// Its name (basename of the URL, or the links file's `file_name`).
    pub name: String,
}

/// Errors in a shard list.
#[derive(Debug, thiserror::Error)]
pub enum ShardListError {
    /// A brace pattern is malformed.
    #[error("bad brace pattern `{pattern}`: {why}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        why: String,
    },
    /// A links or list file is malformed.
    #[error("{file}:{line}: {why}")]
    File {
        /// The file (path or URL).
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// Expands one brace pattern into its strings, in order.
pub fn brace_expand(pattern: &str) -> Result<Vec<String>, ShardListError> {
    let err = |why: &str| ShardListError::Pattern {
        pattern: pattern.to_string(),
        why: why.to_string(),
    };
    let chars: Vec<char> = pattern.chars().collect();
    let (out, end) = expand_seq(&chars, 0, false).map_err(|w| err(&w))?;
    if end != chars.len() {
        return Err(err("unbalanced `}`"));
    }
    Ok(out)
}

/// Expands from `i` until the end (or, inside braces, until an unmatched `,` or `}`).
/// Returns the expansions and the index where it stopped.
fn expand_seq(s: &[char], mut i: usize, inside: bool) -> Result<(Vec<String>, usize), String> {
    let mut acc = vec![String::new()];
    while i < s.len() {
        match s[i] {
            '\\' if i + 1 < s.len() => {
                for a in &mut acc {
                    a.push(s[i + 1]);
                }
                i += 2;
            }
            '{' => {
                let close = matching_brace(s, i).ok_or("unbalanced `{`")?;
                let body: String = s[i + 1..close].iter().collect();
                let parts = match range(&body)? {
                    Some(r) => r,
                    None if has_top_level_comma(&s[i + 1..close]) => {
                        let mut parts = Vec::new();
                        let mut j = i + 1;
                        loop {
                            let (alt, stop) = expand_seq(s, j, true)?;
                            parts.extend(alt);
                            if s[stop] == '}' {
                                break;
                            }
                            j = stop + 1;
                        }
                        parts
                    }
                    // braceexpand keeps `{x}` (no comma, not a range) literally
                    None => {
                        let (inner, _) = expand_seq(s, i + 1, true)?;
                        inner.into_iter().map(|x| format!("{{{x}}}")).collect()
                    }
                };
                acc = acc
                    .iter()
                    .flat_map(|a| parts.iter().map(move |p| format!("{a}{p}")))
                    .collect();
                i = close + 1;
            }
            ',' | '}' if inside => return Ok((acc, i)),
            '}' => return Err("unbalanced `}`".into()),
            c => {
                for a in &mut acc {
                    a.push(c);
                }
                i += 1;
            }
        }
    }
    if inside {
        return Err("unbalanced `{`".into());
    }
    Ok((acc, i))
}

fn matching_brace(s: &[char], open: usize) -> Option<usize> {
    let mut depth = 0;
    let mut i = open;
    while i < s.len() {
        match s[i] {
            '\\' => i += 1,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn has_top_level_comma(s: &[char]) -> bool {
    let mut depth = 0;
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            '\\' => i += 1,
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// `a..b` or `a..b..step` with integers or single characters.
fn range(body: &str) -> Result<Option<Vec<String>>, String> {
    let parts: Vec<&str> = body.split("..").collect();
    if !(parts.len() == 2 || parts.len() == 3) {
        return Ok(None);
    }
    let step: i64 = match parts.get(2) {
        Some(s) => match s.parse::<i64>() {
            Ok(0) => 1,
            Ok(v) => v.abs(),
            Err(_) => return Ok(None),
        },
        None => 1,
    };
    if let (Ok(a), Ok(b)) = (parts[0].parse::<i64>(), parts[1].parse::<i64>()) {
        let padded = |p: &str| {
            p.trim_start_matches('-').len() > 1 && p.trim_start_matches('-').starts_with('0')
        };
        let width = if padded(parts[0]) || padded(parts[1]) {
            parts[0].len().max(parts[1].len())
        } else {
            0
        };
        let count = (a - b).unsigned_abs() / step as u64 + 1;
        if count > 10_000_000 {
            return Err(format!("range {a}..{b} has {count} elements"));
        }
        let dir = if b >= a { 1 } else { -1 };
        return Ok(Some(
            (0..count as i64)
                .map(|k| format!("{:0width$}", a + dir * k * step))
                .collect(),
        ));
    }
    let (ca, cb): (Vec<char>, Vec<char>) = (parts[0].chars().collect(), parts[1].chars().collect());
    if ca.len() == 1 && cb.len() == 1 && ca[0].is_ascii_alphabetic() && cb[0].is_ascii_alphabetic()
    {
        let (a, b) = (ca[0] as i64, cb[0] as i64);
        let dir = if b >= a { 1 } else { -1 };
        let count = (a - b).abs() / step + 1;
        return Ok(Some(
            (0..count)
                .map(|k| {
                    char::from_u32((a + dir * k * step) as u32)
                        .unwrap_or('?')
                        .to_string()
                })
                .collect(),
        ));
    }
    Ok(None)
}

/// The shard name of a URL: its last path component, without query.
pub fn name_of(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// Resolves a manifest-relative location: URLs and absolute paths stay, relative paths
/// are taken from `base` (the manifest's directory).
pub fn resolve(location: &str, base: &Path) -> String {
    if location.contains("://") || Path::new(location).is_absolute() {
        location.to_string()
    } else {
        base.join(location).to_string_lossy().into_owned()
    }
}

/// Parses a list file: one URL or path per line; blank lines and `#` comments skipped;
/// each line may be a brace pattern.
pub fn parse_list(text: &str, file: &str, base: &Path) -> Result<Vec<String>, ShardListError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let expanded = brace_expand(line).map_err(|e| ShardListError::File {
            file: file.to_string(),
            line: n + 1,
            why: e.to_string(),
        })?;
        out.extend(expanded.iter().map(|u| resolve(u, base)));
    }
    Ok(out)
}

/// Parses SA-1B's links file: a header `file_name<TAB>cdn_link`, then one shard per
/// line. Returns (file_name, url) pairs in file order.
pub fn parse_sa1b_links(text: &str, file: &str) -> Result<Vec<(String, String)>, ShardListError> {
    let err = |line: usize, why: String| ShardListError::File {
        file: file.to_string(),
        line,
        why,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(err(1, "empty links file".into()));
    };
    let cols: Vec<&str> = header.trim_end_matches('\r').split('\t').collect();
    let (Some(fi), Some(li)) = (
        cols.iter().position(|c| *c == "file_name"),
        cols.iter().position(|c| *c == "cdn_link"),
    ) else {
        return Err(err(
            1,
            format!("expected a header `file_name<TAB>cdn_link`, found `{header}`"),
        ));
    };
    let mut out = Vec::new();
    for (n, line) in lines {
        let f: Vec<&str> = line.trim_end_matches('\r').split('\t').collect();
        match (f.get(fi), f.get(li)) {
            (Some(name), Some(link)) if !name.is_empty() && !link.is_empty() => {
                out.push((name.to_string(), link.to_string()));
            }
            _ => {
                return Err(err(
                    n + 1,
                    format!("expected {} tab-separated columns", cols.len()),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_patterns_like_braceexpand() {
        let e = |p: &str| brace_expand(p).unwrap();
        assert_eq!(
            e("s-{000..003}.tar"),
            ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
        );
        assert_eq!(e("{8..11}"), ["8", "9", "10", "11"]);
        assert_eq!(e("{09..11}"), ["09", "10", "11"]);
        assert_eq!(e("{a,b}{1..2}"), ["a1", "a2", "b1", "b2"]);
        assert_eq!(e("x{a,{b,c}d}"), ["xa", "xbd", "xcd"]);
        assert_eq!(e("{0..6..3}"), ["0", "3", "6"]);
        assert_eq!(e("{3..1}"), ["3", "2", "1"]);
        assert_eq!(e("{a..c}"), ["a", "b", "c"]);
        assert_eq!(e("lit\\{x\\}"), ["lit{x}"]);
        assert!(
            brace_expand("lit\\{x}").is_err(),
            "braceexpand also calls this unbalanced"
        );
        assert_eq!(e("{x}"), ["{x}"]);
        assert_eq!(e("https://h/p/sa_{000000..000999}.tar").len(), 1000);
        assert!(
            brace_expand("a{b")
                .unwrap_err()
                .to_string()
                .contains("unbalanced")
        );
        assert!(brace_expand("a}b").is_err());
    }

    #[test]
    fn links_and_lists() {
        let l = parse_sa1b_links(
            "file_name\tcdn_link\nsa_000000.tar\thttps://x/a?sig=1\n\nsa_000001.tar\thttps://x/b\n",
            "l.tsv",
        )
        .unwrap();
        assert_eq!(
            l,
            vec![
                ("sa_000000.tar".into(), "https://x/a?sig=1".into()),
                ("sa_000001.tar".into(), "https://x/b".into())
            ]
        );
        let e = parse_sa1b_links("name\turl\n", "l.tsv")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("l.tsv:1:") && e.contains("file_name"), "{e}");
        let e = parse_sa1b_links("file_name\tcdn_link\nonly-one-column\n", "l.tsv")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("l.tsv:2:"), "{e}");
        let list = parse_list(
            "# shards\n a-{0..1}.tar\n\nhttp://h/c.tar\n/abs/d.tar\n",
            "list.txt",
            Path::new("/m"),
        )
        .unwrap();
        assert_eq!(
            list,
            ["/m/a-0.tar", "/m/a-1.tar", "http://h/c.tar", "/abs/d.tar"]
        );
        assert_eq!(
            name_of("https://h/x/sa_000001.tar?Policy=abc"),
            "sa_000001.tar"
        );
    }
}
