//! What the daemon says about itself in `--help`: its flags, their `LATTICED_*` variables and
//! their defaults, read from the binary under test (never copied into a test).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use crate::latticed_bin;

/// `latticed <args> --help`.
pub fn help(args: &[&str]) -> String {
    let out = Command::new(latticed_bin())
        .args(args)
        .arg("--help")
        .output()
        .expect("running latticed --help");
    assert!(out.status.success(), "latticed {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// Words starting at `prefix` made of the characters `ok` allows.
pub fn words(text: &str, prefix: &str, ok: impl Fn(char) -> bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i + prefix.len()..];
        let len = tail.find(|c: char| !ok(c)).unwrap_or(tail.len());
        let word = tail[..len].trim_end_matches(['-', '_']);
        if !word.is_empty() && !before.is_some_and(|c| c.is_alphanumeric() || c == '-') {
            found.insert(format!("{prefix}{word}"));
        }
        rest = &tail[len..];
    }
    found
}

/// `--flag` words.
pub fn flags(text: &str) -> BTreeSet<String> {
    words(text, "--", |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })
    .into_iter()
    .filter(|f| f[2..].starts_with(|c: char| c.is_ascii_lowercase()))
    .collect()
}

/// `LATTICED_*` words.
pub fn variables(text: &str) -> BTreeSet<String> {
    words(text, "LATTICED_", |c| {
        c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
    })
}

/// One flag of a help text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HelpEntry {
    /// its `[env: X=]` variable
    pub env: Option<String>,
    /// its `[default: X]` value
    pub default: Option<String>,
    /// its description, the lines between its name and the next flag, joined
    pub text: String,
}

/// Per flag of a help text: its variable, default and description (clap prints the variable
/// and the default on lines of their own with the long help).
pub fn help_entries(help: &str) -> BTreeMap<String, HelpEntry> {
    let mut entries: BTreeMap<String, HelpEntry> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let t = line.trim();
        if t.starts_with("--") || t.starts_with("-h, --") || t.starts_with("-V, --") {
            let name = t.trim_start_matches("-h, ").trim_start_matches("-V, ");
            let name = name
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            entries.insert(name.clone(), HelpEntry::default());
            current = Some(name);
            continue;
        }
        let Some(entry) = current.as_ref().and_then(|n| entries.get_mut(n)) else {
            continue;
        };
        if let Some(v) = t.strip_prefix("[env: ").and_then(|v| v.strip_suffix("=]")) {
            entry.env = Some(v.to_string());
        } else if let Some(v) = t
            .strip_prefix("[default: ")
            .and_then(|v| v.strip_suffix(']'))
        {
            entry.default = Some(v.to_string());
        } else if !t.is_empty() {
            if !entry.text.is_empty() {
                entry.text.push(' ');
            }
            entry.text.push_str(t);
        }
    }
    entries
}
