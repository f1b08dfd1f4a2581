//! `--rename REGEX=REPLACEMENT` rules: applied in order to every final key, each
//! replacing every match (like Python's `re.sub`), with `$1`/`${name}` group references;
//! and `--exclude REGEX` patterns, which drop the tensors whose final key matches.

use crate::error::{Error, Result};
use regex::Regex;
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct RenameRule {
    pub pattern: Regex,
    pub replacement: String,
}

impl RenameRule {
    /// Parses `REGEX=REPLACEMENT`, split at the first `=`.
    pub fn parse(spec: &str) -> Result<RenameRule> {
        let (pat, rep) = spec
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("--rename '{spec}' is not REGEX=REPLACEMENT")))?;
        let pattern = Regex::new(pat)
            .map_err(|e| Error::Usage(format!("--rename '{spec}': bad regular expression: {e}")))?;
        Ok(RenameRule {
            pattern,
            replacement: rep.to_string(),
        })
    }
}

/// Parses an `--exclude` pattern.
pub fn parse_exclude(spec: &str) -> Result<Regex> {
    Regex::new(spec)
        .map_err(|e| Error::Usage(format!("--exclude '{spec}': bad regular expression: {e}")))
}

/// Whether any `--exclude` pattern matches the final key.
pub fn excluded(patterns: &[Regex], name: &str) -> bool {
    patterns.iter().any(|p| p.is_match(name))
}

/// Applies every rule in order.
pub fn apply(rules: &[RenameRule], name: &str) -> String {
    let mut s = name.to_string();
    for r in rules {
        s = r
            .pattern
            .replace_all(&s, r.replacement.as_str())
            .into_owned();
    }
    s
}

/// Notes for `--rename` rules and `--exclude` patterns that touch none of `keys` (the
/// names before renaming): most often a typo, and the output would silently keep the old
/// names or the unwanted tensors. A rule counts as used when it matches the name as the
/// rules before it left it; a pattern when it matches a final name.
pub fn unused(rules: &[RenameRule], exclude: &[Regex], keys: &[String]) -> Vec<String> {
    let mut renamed = vec![false; rules.len()];
    let mut excluded_any = vec![false; exclude.len()];
    for k in keys {
        let mut s = k.clone();
        for (i, r) in rules.iter().enumerate() {
            if r.pattern.is_match(&s) {
                renamed[i] = true;
                s = r
                    .pattern
                    .replace_all(&s, r.replacement.as_str())
                    .into_owned();
            }
        }
        for (i, p) in exclude.iter().enumerate() {
            excluded_any[i] |= p.is_match(&s);
        }
    }
    let rename_notes = rules
        .iter()
        .zip(&renamed)
        .filter(|(_, u)| !**u)
        .map(|(r, _)| {
            format!(
                "--rename '{}={}' matched no key, so it renamed nothing",
                r.pattern.as_str(),
                r.replacement
            )
        });
    let exclude_notes = exclude
        .iter()
        .zip(&excluded_any)
        .filter(|(_, u)| !**u)
        .map(|(p, _)| {
            format!(
                "--exclude '{}' matched no key (after renames), so it left nothing out",
                p.as_str()
            )
        });
    rename_notes.chain(exclude_notes).collect()
}

/// Fails if two planned outputs have the same final name, naming both sources.
pub fn check_unique<'a>(names: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<()> {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for (out, src) in names {
        if let Some(prev) = seen.insert(out, src) {
            return Err(Error::Plan(format!(
                "two tensors would be written as '{out}': '{prev}' and '{src}' (check --rename rules and component names)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_apply_in_order_with_groups() {
        let rules = [
            RenameRule::parse(r"^model\.=language_model.model.").unwrap(),
            RenameRule::parse(r"layers\.(\d+)=blocks.$1").unwrap(),
        ];
        assert_eq!(
            apply(&rules, "model.layers.3.w"),
            "language_model.model.blocks.3.w"
        );
    }

    #[test]
    fn bad_specs_are_usage_errors() {
        assert!(RenameRule::parse("nothing").unwrap_err().is_usage());
        assert!(RenameRule::parse("(=x").unwrap_err().is_usage());
    }

    #[test]
    fn rules_that_match_nothing_are_named() {
        let rules = [
            RenameRule::parse(r"^model\.=m.").unwrap(),
            RenameRule::parse(r"^m\.layers=L").unwrap(),
            RenameRule::parse(r"typo=x").unwrap(),
        ];
        let exclude = [
            parse_exclude(r"^L\.0\.").unwrap(),
            parse_exclude("nowhere").unwrap(),
        ];
        let keys = ["model.layers.0.w".to_string(), "lm_head.weight".to_string()];
        let notes = unused(&rules, &exclude, &keys);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("'typo=x'"), "{notes:?}");
        assert!(notes[1].contains("'nowhere'"), "{notes:?}");
    }

    #[test]
    fn collisions_are_reported_with_both_sources() {
        let e = check_unique([("a", "x"), ("a", "y")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'x'") && e.contains("'y'"), "{e}");
    }
}
