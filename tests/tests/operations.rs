//! docs/operations.md is true to the binary: every flag and `LATTICED_*` variable that
//! `latticed --help` (and the help of its subcommands) prints is on the page; every flag in the
//! page's tables is one the binary knows; and a table row gives the variable and the default
//! that `--help` gives for its flag.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use latticed_tests::help::{flags, help, help_entries, variables, HelpEntry};

fn doc() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join("docs/operations.md")).unwrap()
}

/// Every help text the binary has for operators.
fn helps() -> Vec<String> {
    [
        &[][..],
        &["certs", "init"][..],
        &["certs", "issue"][..],
        &["check-uf"][..],
        &["register"][..],
    ]
    .iter()
    .map(|a| help(a))
    .collect()
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
        for (
            flag,
            HelpEntry {
                env: var, default, ..
            },
        ) in help_entries(&h)
        {
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
    let cluster = &entries["--cluster-addr"];
    assert_eq!(cluster.env.as_deref(), Some("LATTICED_CLUSTER_ADDR"));
    assert_eq!(cluster.default.as_deref(), Some("0.0.0.0:7946"));
    assert!(cluster.text.contains("QUIC endpoint"), "{cluster:?}");
    assert!(entries.len() > 30, "{entries:?}");
    assert_eq!(
        flags("a `--join` b --x-y, -- --ignored --9 x--y"),
        ["--ignored", "--join", "--x-y"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}
