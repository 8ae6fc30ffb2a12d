//! Running the project's images under the Docker Engine: the `docker` command, the images from
//! `docker/build-image`, and the policy for a machine without Docker.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Instant;

use crate::tool_or_skip;

/// `docker ARGS`, whatever its outcome.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

/// Runs `docker ARGS`, panicking with its stderr on failure; returns stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether `suite` can run: a Docker Engine answers. Without one: a failure under CI, else a
/// skip.
pub fn docker_or_skip(suite: &str) -> bool {
    let up = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    tool_or_skip(suite, up, "a Docker Engine (`docker version` failed)")
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `docker/build-image`: `latticed:dev` and `latticed-model:dev` from the current sources (a
/// no-op when nothing changed). Once per test process: tests run in parallel.
pub fn build_images() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if *built {
        return;
    }
    let started = Instant::now();
    let status = Command::new(repo_root().join("docker/build-image"))
        .status()
        .expect("running docker/build-image");
    assert!(status.success(), "docker/build-image failed");
    eprintln!("images ready in {:.1?}", started.elapsed());
    *built = true;
}

/// The container's address on its (first) network.
pub fn container_ip(name: &str) -> std::net::IpAddr {
    let ip = docker_ok(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        name,
    ]);
    ip.split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address for the container {name}: {ip:?}"))
}
