//! Captioner boilerplate: the lead-ins LLaVA, ShareGPT4V, Florence-2 and friends put
//! before the actual description ("The image features", "In this image, we can
//! see", ...). They carry no information, eat T5 tokens, and make every caption
//! start alike.
//!
//! One lead-in at the start of the caption is removed (case-insensitively, with the
//! comma or colon that follows it); when the caption started with a capital letter
//! the remainder is capitalised ("The image shows a dog." -> "A dog."). A caption
//! that would become empty is left as it is.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

/// A named lead-in pattern.
#[derive(Debug)]
pub struct LeadIn {
    /// Stable name (used in tests and docs).
    pub name: &'static str,
    /// The pattern, anchored at the start, case-insensitive.
    pub pattern: &'static str,
}

const NOUN: &str = r"(?:image|picture|photo|photograph|scene|illustration|artwork|painting)";

/// The lead-ins, tried in this order; the first that matches is removed.
pub const LEAD_INS: &[LeadIn] = &[
    LeadIn {
        name: "in_this_image_we_can_see",
        pattern: r"(?:in|within)\s+(?:this|the)\s+NOUN\s*,?\s*(?:we|you|one)\s+can\s+(?:see|observe|notice|spot)\s*(?:that\s+)?",
    },
    LeadIn {
        name: "in_this_image_there_is",
        pattern: r"(?:in|within)\s+(?:this|the)\s+NOUN\s*,\s*(?:there\s+(?:is|are)\s+)?",
    },
    LeadIn {
        name: "this_is_an_image_of",
        pattern: r"this\s+is\s+(?:an?|the)\s+(?:close-?up\s+)?NOUN\s+(?:of|showing|that\s+shows|depicting)\s+",
    },
    LeadIn {
        name: "the_image_shows",
        pattern: r"(?:the|this)\s+NOUN\s+(?:features|shows|depicts|displays|captures|showcases|presents|portrays|illustrates|highlights|contains|is\s+of)\s*:?\s+",
    },
    LeadIn {
        name: "the_image_is",
        pattern: r"(?:the|this)\s+NOUN\s+is\s+(?P<keep>(?:an?|the)\s)",
    },
    LeadIn {
        name: "an_image_of",
        pattern: r"(?:an?|the)\s+NOUN\s+(?:of|showing|depicting)\s+",
    },
];

static COMPILED: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    LEAD_INS
        .iter()
        .map(|l| {
            let p = format!(r"(?i)^\s*{}", l.pattern.replace("NOUN", NOUN));
            Regex::new(&p).unwrap_or_else(|e| panic!("lead-in {} does not compile: {e}", l.name))
        })
        .collect()
});

/// Which lead-in (by name) starts `caption`, if any.
#[must_use]
pub fn matching_lead_in(caption: &str) -> Option<&'static str> {
    COMPILED
        .iter()
        .zip(LEAD_INS)
        .find(|(re, _)| re.is_match(caption))
        .map(|(_, l)| l.name)
}

/// Removes one captioner lead-in from the start of `caption`.
#[must_use]
pub fn strip_boilerplate(caption: &str) -> Cow<'_, str> {
    for re in COMPILED.iter() {
        let Some(caps) = re.captures(caption) else {
            continue;
        };
        // A `keep` group (the article after "The image is") stays in the caption.
        let cut = caps
            .name("keep")
            .map_or_else(|| caps[0].len(), |k| k.start());
        let rest = caption[cut..].trim_start();
        if rest.trim().is_empty() {
            return Cow::Borrowed(caption);
        }
        let capitalised = caption
            .trim_start()
            .chars()
            .next()
            .is_some_and(char::is_uppercase);
        return Cow::Owned(if capitalised {
            capitalise(rest)
        } else {
            rest.to_string()
        });
    }
    Cow::Borrowed(caption)
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, input: &str, expected: &str) {
        assert_eq!(matching_lead_in(input), Some(name), "{input:?}");
        assert_eq!(strip_boilerplate(input), expected, "{input:?}");
    }

    #[test]
    fn in_this_image_we_can_see() {
        check(
            "in_this_image_we_can_see",
            "In this image, we can see a man on a bench.",
            "A man on a bench.",
        );
        check(
            "in_this_image_we_can_see",
            "in the picture we can see two dogs",
            "two dogs",
        );
        check(
            "in_this_image_we_can_see",
            "In this image we can observe that it is raining.",
            "It is raining.",
        );
    }

    #[test]
    fn in_this_image_there_is() {
        check(
            "in_this_image_there_is",
            "In the image, there is a red car parked.",
            "A red car parked.",
        );
        check(
            "in_this_image_there_is",
            "In this photo, a woman is smiling.",
            "A woman is smiling.",
        );
    }

    #[test]
    fn this_is_an_image_of() {
        check(
            "this_is_an_image_of",
            "This is an image of a mountain lake at dawn.",
            "A mountain lake at dawn.",
        );
        check(
            "this_is_an_image_of",
            "This is a close-up photo of a bee.",
            "A bee.",
        );
    }

    #[test]
    fn the_image_shows() {
        for verb in [
            "features",
            "shows",
            "depicts",
            "displays",
            "captures",
            "showcases",
            "presents",
            "portrays",
        ] {
            let input = format!("The image {verb} a cozy living room.");
            check("the_image_shows", &input, "A cozy living room.");
        }
        check(
            "the_image_shows",
            "This picture captures: children playing",
            "Children playing",
        );
        check(
            "the_image_shows",
            "the scene features a quiet street",
            "a quiet street",
        );
    }

    #[test]
    fn the_image_is() {
        check(
            "the_image_is",
            "The image is a close-up of a flower.",
            "A close-up of a flower.",
        );
        check(
            "the_image_is",
            "This photo is an aerial view of Paris.",
            "An aerial view of Paris.",
        );
    }

    #[test]
    fn an_image_of() {
        check(
            "an_image_of",
            "A photo of a dog running on the beach",
            "A dog running on the beach",
        );
        check("an_image_of", "an illustration of a dragon", "a dragon");
    }

    #[test]
    fn captions_without_lead_in_are_untouched() {
        for s in [
            "A dog running on the beach",
            "The imagery of war",
            "The image",
            "In this image,",
            "Two cats; the image shows nothing else",
        ] {
            assert_eq!(strip_boilerplate(s), s);
        }
    }
}
