//! DogStatsD mogrifiers: rules that turn a dotted stat name into a shorter name and tags,
//! so `ratelimit.service.rate_limit.edge.user.over_limit` can reach Datadog as
//! `ratelimit.service.rate_limit.over_limit` tagged `domain:edge,descriptor:user`.
//!
//! They are envoyproxy/ratelimit's (`USE_DOG_STATSD_MOGRIFIERS=NAME,…` with
//! `DOG_STATSD_MOGRIFIER_<NAME>_PATTERN`, `_NAME` and `_TAGS`) and behave as its do: the
//! first whose pattern matches a name rewrites it; `$N` in the name and tag templates is
//! the pattern's Nth group (empty when that group took no part in the match), and a `$N`
//! past the pattern's groups is left as written.

use regex::{Captures, Regex};

/// One rewrite rule.
#[derive(Debug, Clone)]
pub struct Mogrifier {
    /// The name it was given (`HITS` in `DOG_STATSD_MOGRIFIER_HITS_PATTERN`), for messages.
    pub label: String,
    pattern: Regex,
    name: String,
    tags: Vec<(String, String)>,
}

/// Two mogrifiers are the same when they were written the same.
impl PartialEq for Mogrifier {
    fn eq(&self, other: &Self) -> bool {
        self.label == other.label
            && self.pattern.as_str() == other.pattern.as_str()
            && self.name == other.name
            && self.tags == other.tags
    }
}

impl Eq for Mogrifier {}

impl Mogrifier {
    /// `pattern` is a regular expression (RE2 syntax, as Go's); `name` and each tag's value
    /// are templates with `$N`. Every part must be present: a mogrifier without a pattern
    /// or a name would drop or blank every stat it touched.
    pub fn new(
        label: &str,
        pattern: &str,
        name: &str,
        tags: Vec<(String, String)>,
    ) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err(format!(
                "mogrifier {label} has no pattern: write the regular expression of the stat \
                 names it rewrites, e.g. ^ratelimit\\.service\\.rate_limit\\.([^.]+)\\.(.+)\\.([^.]+)$"
            ));
        }
        let pattern = Regex::new(pattern)
            .map_err(|error| format!("mogrifier {label}: the pattern does not compile: {error}"))?;
        if name.is_empty() {
            return Err(format!(
                "mogrifier {label} has no name: write what a matching stat is called instead, \
                 e.g. ratelimit.service.rate_limit.$3"
            ));
        }
        for (key, value) in &tags {
            if key.is_empty() || value.is_empty() {
                return Err(format!(
                    "mogrifier {label}: the tag {key:?}:{value:?} needs both a key and a value, \
                     e.g. domain:$1"
                ));
            }
        }
        Ok(Self {
            label: label.to_owned(),
            pattern,
            name: name.to_owned(),
            tags,
        })
    }

    /// The new name and the `key:value` tags, when `stat` matches.
    fn apply(&self, stat: &str) -> Option<(String, Vec<String>)> {
        let groups = self.pattern.captures(stat)?;
        let tags = (self.tags.iter())
            .map(|(key, value)| format!("{key}:{}", expand(value, &groups)))
            .collect();
        Some((expand(&self.name, &groups), tags))
    }
}

/// `stat` as the first matching mogrifier rewrites it, with its tags; unchanged and
/// untagged when none matches.
pub fn mogrify(mogrifiers: &[Mogrifier], stat: &str) -> (String, Vec<String>) {
    (mogrifiers.iter())
        .find_map(|mogrifier| mogrifier.apply(stat))
        .unwrap_or_else(|| (stat.to_owned(), Vec::new()))
}

/// `template` with every `$N` replaced by group N of `groups`.
fn expand(template: &str, groups: &Captures<'_>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let group = after[..digits].parse::<usize>().ok();
        match group.filter(|&n| n < groups.len()) {
            Some(n) => out.push_str(groups.get(n).map_or("", |m| m.as_str())),
            // A `$` without digits, or a group the pattern does not have: kept as written.
            None => out.push_str(&rest[at..at + 1 + digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HITS: &str = "ratelimit.service.rate_limit.mongo_cps.database_users.within_limit";

    fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let own = |(k, v): &(&str, &str)| ((*k).to_owned(), (*v).to_owned());
        pairs.iter().map(own).collect()
    }

    fn by_domain() -> Mogrifier {
        Mogrifier::new(
            "TAG",
            r"^ratelimit\.service\.rate_limit\.(.*)\.(.*)\.(.*)$",
            "ratelimit.service.rate_limit.$3",
            tags(&[("domain", "$1"), ("descriptor", "$2")]),
        )
        .unwrap()
    }

    #[test]
    fn a_matching_name_becomes_the_template_with_its_groups_as_tags() {
        let (name, tags) = mogrify(&[by_domain()], HITS);
        assert_eq!(name, "ratelimit.service.rate_limit.within_limit");
        assert_eq!(tags, ["domain:mongo_cps", "descriptor:database_users"]);
    }

    #[test]
    fn a_name_nothing_matches_is_left_alone() {
        let (name, tags) = mogrify(&[by_domain()], "ratelimit.service.config_load_success");
        assert_eq!(name, "ratelimit.service.config_load_success");
        assert!(tags.is_empty());
        assert_eq!(mogrify(&[], HITS).0, HITS);
    }

    #[test]
    fn the_first_match_wins() {
        let specific = Mogrifier::new(
            "SPECIFIC",
            r"^ratelimit\.service\.rate_limit\.(.*)\.(.*)\.over_limit$",
            "custom.over",
            tags(&[("domain", "$1")]),
        )
        .unwrap();
        let both = [specific, by_domain()];
        let over = HITS.replace("within_limit", "over_limit");
        assert_eq!(
            mogrify(&both, &over),
            (
                "custom.over".to_owned(),
                vec!["domain:mongo_cps".to_owned()]
            )
        );
        assert_eq!(
            mogrify(&both, HITS).0,
            "ratelimit.service.rate_limit.within_limit"
        );
    }

    #[test]
    fn groups_the_pattern_lacks_stay_as_written_and_absent_ones_are_empty() {
        let odd = Mogrifier::new(
            "ODD",
            r"^ratelimit\.(service)(\.nothing)?\.(.*)$",
            "x.$2.$3",
            tags(&[("five", "$5"), ("cost", "$ and $1x"), ("ten", "$10")]),
        )
        .unwrap();
        let (name, tags) = mogrify(&[odd], "ratelimit.service.a.b");
        assert_eq!(name, "x..a.b");
        assert_eq!(tags, ["five:$5", "cost:$ and servicex", "ten:$10"]);
    }

    #[test]
    fn a_mogrifier_missing_a_part_is_refused_with_what_to_write() {
        let no_pattern = Mogrifier::new("A", "", "n", vec![]).unwrap_err();
        assert!(
            no_pattern.contains("mogrifier A has no pattern"),
            "{no_pattern}"
        );
        let bad = Mogrifier::new("B", "(", "n", vec![]).unwrap_err();
        assert!(
            bad.contains("mogrifier B: the pattern does not compile"),
            "{bad}"
        );
        let no_name = Mogrifier::new("C", "x", "", vec![]).unwrap_err();
        assert!(no_name.contains("mogrifier C has no name"), "{no_name}");
        let empty_tag = Mogrifier::new("D", "x", "n", tags(&[("domain", "")])).unwrap_err();
        assert!(
            empty_tag.contains("needs both a key and a value"),
            "{empty_tag}"
        );
    }
}
