//! The docs are true to the code: every metric the daemon defines (daemon/src/metrics.rs) and
//! every metric a running daemon exports is listed in docs/metrics.md, and the page lists none
//! that the code lacks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use latticed_tests::{poll_until, Daemon, DaemonConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Names in backticks that look like metric names.
fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    doc.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            w.len() > "latticed_".len()
                && w.starts_with("latticed_")
                && w.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// The names `daemon/src/metrics.rs` defines.
fn defined() -> BTreeSet<String> {
    let code = std::fs::read_to_string(root().join("daemon/src/metrics.rs")).unwrap();
    code.lines()
        .filter(|l| l.trim_start().starts_with("pub const") && l.contains("&str = \"latticed_"))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_defined_metric_is_documented_and_every_documented_one_exists() {
    let doc = documented();
    let code = defined();
    let missing: Vec<_> = code.difference(&doc).collect();
    assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
    let stale: Vec<_> = doc.difference(&code).collect();
    assert!(
        stale.is_empty(),
        "in docs/metrics.md but not in the code: {stale:?}"
    );
}

#[test]
fn every_metric_a_running_daemon_exports_is_documented() {
    let daemon = Daemon::start(DaemonConfig {
        name: "n1".into(),
        ..Default::default()
    });
    let body = poll_until(Duration::from_secs(20), "/metrics", || {
        daemon
            .get("/metrics")
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b)
    });
    let doc = documented();
    let exported: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(!exported.is_empty(), "{body}");
    let missing: Vec<_> = exported.difference(&doc).collect();
    assert!(
        missing.is_empty(),
        "exported but not in docs/metrics.md: {missing:?}"
    );
}
