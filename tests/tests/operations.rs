//! docs/operations.md is true to the binary: every flag and `LATTICED_*` variable that
//! `latticed --help` (and the help of its subcommands) prints is on the page; every flag in the
//! page's tables is one the binary knows; and a table row gives the variable and the default
//! that `--help` gives for its flag.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use latticed_tests::latticed_bin;

fn doc() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join("docs/operations.md")).unwrap()
}

/// `latticed <args> --help`.
fn help(args: &[&str]) -> String {
    let out = Command::new(latticed_bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "latticed {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Every help text the binary has for operators.
fn helps() -> Vec<String> {
    [
        &[][..],
        &["certs", "init"][..],
        &["certs", "issue"][..],
        &["check-uf"][..],
    ]
    .iter()
    .map(|a| help(a))
    .collect()
}

/// Words starting at `prefix` made of the characters `ok` allows.
fn words(text: &str, prefix: &str, ok: impl Fn(char) -> bool) -> BTreeSet<String> {
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
fn flags(text: &str) -> BTreeSet<String> {
    words(text, "--", |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })
    .into_iter()
    .filter(|f| f[2..].starts_with(|c: char| c.is_ascii_lowercase()))
    .collect()
}

/// `LATTICED_*` words.
fn variables(text: &str) -> BTreeSet<String> {
    words(text, "LATTICED_", |c| {
        c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
    })
}

/// The rows of the page's tables whose first cell names a flag: flag -> the whole row.
fn table_rows(doc: &str) -> BTreeMap<String, Vec<String>> {
    let mut rows: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with('|')) {
        let first = line.split('|').nth(1).unwrap_or("");
        for f in flags(first) {
            rows.entry(f).or_default().push(line.to_string());
        }
    }
    rows
}

/// Per flag of a help text: its `[env: X=]` variable and its `[default: X]` value (on a line of
/// their own, as clap prints them).
fn help_entries(help: &str) -> BTreeMap<String, (Option<String>, Option<String>)> {
    let mut entries = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let t = line.trim();
        if t.starts_with("--") || t.starts_with("-h, --") || t.starts_with("-V, --") {
            let name = t.trim_start_matches("-h, ").trim_start_matches("-V, ");
            let name = name.split_whitespace().next().unwrap().to_string();
            entries.insert(name.clone(), (None, None));
            current = Some(name);
            continue;
        }
        let Some(name) = &current else { continue };
        let entry = entries.get_mut(name).unwrap();
        if let Some(v) = t.strip_prefix("[env: ").and_then(|v| v.strip_suffix("=]")) {
            entry.0 = Some(v.to_string());
        }
        if let Some(v) = t
            .strip_prefix("[default: ")
            .and_then(|v| v.strip_suffix(']'))
        {
            entry.1 = Some(v.to_string());
        }
    }
    entries
}

#[test]
fn every_flag_and_variable_of_help_is_documented() {
    let doc = doc();
    let (doc_flags, doc_vars) = (flags(&doc), variables(&doc));
    let mut missing = Vec::new();
    for h in helps() {
        missing.extend(flags(&h).difference(&doc_flags).cloned());
        missing.extend(variables(&h).difference(&doc_vars).cloned());
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "printed by `latticed --help` (or a subcommand's) but not in docs/operations.md: {missing:?}"
    );
}

#[test]
fn every_flag_in_the_tables_is_known_to_the_binary() {
    let known: BTreeSet<String> = helps().iter().flat_map(|h| flags(h)).collect();
    let stale: Vec<String> = table_rows(&doc())
        .into_keys()
        .filter(|f| !known.contains(f))
        .collect();
    assert!(
        stale.is_empty(),
        "in docs/operations.md's tables but unknown to `latticed --help`: {stale:?}"
    );
}

#[test]
fn every_table_row_gives_the_variable_and_default_of_help() {
    let rows = table_rows(&doc());
    let mut wrong = Vec::new();
    for h in helps() {
        for (flag, (var, default)) in help_entries(&h) {
            let Some(rows) = rows.get(&flag) else {
                wrong.push(format!("{flag}: no table row"));
                continue;
            };
            if let Some(var) = var {
                if !rows.iter().any(|r| r.contains(&format!("`{var}`"))) {
                    wrong.push(format!("{flag}: the row lacks its variable `{var}`"));
                }
            }
            if let Some(default) = default {
                if !rows.iter().any(|r| r.contains(&format!("`{default}`"))) {
                    wrong.push(format!("{flag}: the row lacks its default `{default}`"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "docs/operations.md: {wrong:#?}");
}

#[test]
fn the_checks_see_what_they_check() {
    // The parsers find the flags, variables and defaults of the main help at all.
    let main = help(&[]);
    let entries = help_entries(&main);
    assert!(flags(&main).contains("--cluster-addr"));
    assert!(flags(&main).contains("--listen") && flags(&main).contains("--listen-tls-cert"));
    assert!(variables(&main).contains("LATTICED_CLUSTER_ADDR"));
    assert_eq!(
        entries.get("--cluster-addr"),
        Some(&(
            Some("LATTICED_CLUSTER_ADDR".to_string()),
            Some("0.0.0.0:7946".to_string())
        ))
    );
    assert!(entries.len() > 30, "{entries:?}");
    assert_eq!(
        flags("a `--join` b --x-y, -- --ignored --9 x--y"),
        ["--ignored", "--join", "--x-y"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}
