//! User functions on the real CloudState JavaScript support library, for the interop suite.
//!
//! The library is not part of this project: it comes from `../shared/interop/` beside the
//! project's root (`cloudstate-node-support.tar.xz`, the published library with its
//! dependencies installed; override with `LATTICED_INTEROP_TARBALL`), and runs on the machine's
//! Node.js (`node` on the PATH, or `LATTICED_NODE`). Both missing is a clear test failure, never
//! a skip. The tarball is unpacked once into `target/interop/`; the user function
//! (`tests/interop/user-function.js`, its protos in `tests/interop/protos`) has its descriptor
//! compiled with the library's own `bin/compile-descriptor.js`, as a user would.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The unpacked library and a compiled descriptor, ready to start user functions from.
#[derive(Clone, Debug)]
pub struct NodeSupport {
    /// `node`
    pub node: PathBuf,
    /// the unpacked `node-support` folder
    pub library: PathBuf,
    /// a folder holding `user-function.desc` for the interop user function
    pub workdir: PathBuf,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    // target/<profile>/deps/<test> -> target
    let exe = std::env::current_exe().expect("the test's own path");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir().join("../target"))
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NodeSupport {
    /// Finds Node.js and the library (unpacking it on first use) and compiles the interop
    /// user function's descriptor; panics with what is missing and how to get it.
    pub fn get() -> NodeSupport {
        static ONCE: OnceLock<NodeSupport> = OnceLock::new();
        ONCE.get_or_init(NodeSupport::prepare).clone()
    }

    fn prepare() -> NodeSupport {
        let node = PathBuf::from(std::env::var("LATTICED_NODE").unwrap_or_else(|_| "node".into()));
        let version = Command::new(&node).arg("--version").output();
        match version {
            Ok(o) if o.status.success() => {}
            _ => panic!(
                "the interop suite needs Node.js (20 or later) as `node` on the PATH, or \
                 LATTICED_NODE=/path/to/node: {} does not run",
                node.display()
            ),
        }
        let tarball = std::env::var("LATTICED_INTEROP_TARBALL")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                manifest_dir().join("../../shared/interop/cloudstate-node-support.tar.xz")
            });
        let root = target_dir().join("interop");
        let library = root.join("node-support");
        if !library.join("package.json").exists() {
            assert!(
                tarball.exists(),
                "the interop suite needs the CloudState JavaScript support library: {} is \
                 missing (it lives in ../shared/interop/ beside the project's root; set \
                 LATTICED_INTEROP_TARBALL to use another copy)",
                tarball.display()
            );
            // unpack beside, then rename: test binaries may race to unpack
            let scratch = root.join(format!("unpack-{}", std::process::id()));
            std::fs::create_dir_all(&scratch).expect("creating target/interop");
            run(
                Command::new("tar")
                    .arg("-xJf")
                    .arg(&tarball)
                    .arg("-C")
                    .arg(&scratch),
                "unpacking the support library",
            );
            if std::fs::rename(scratch.join("node-support"), &library).is_err() {
                assert!(
                    library.join("package.json").exists(),
                    "cannot move the unpacked library to {}",
                    library.display()
                );
            }
            let _ = std::fs::remove_dir_all(&scratch);
        }
        let workdir = root.join(format!("uf-{}", std::process::id()));
        std::fs::create_dir_all(&workdir).expect("creating the user function's folder");
        let protos = manifest_dir().join("interop/protos");
        run(
            Command::new(&node)
                .current_dir(&workdir)
                .arg(library.join("bin/compile-descriptor.js"))
                .arg(format!("-I{}", protos.display()))
                .arg(protos.join("interop/crdts.proto")),
            "compiling the interop user function's descriptor",
        );
        NodeSupport {
            node,
            library,
            workdir,
        }
    }
}

/// A running JavaScript user function (killed on drop).
pub struct JsUserFunction {
    /// where it listens
    pub addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl JsUserFunction {
    /// Starts the interop user function on an ephemeral port and waits until it listens.
    pub fn start() -> JsUserFunction {
        Self::serving(&[], 0)
    }

    /// Starts the interop user function serving only the entities `only` (all: none named) on
    /// `port` (0: an ephemeral one), and waits until it listens.
    pub fn serving(only: &[&str], port: u16) -> JsUserFunction {
        let ns = NodeSupport::get();
        let script = manifest_dir().join("interop/user-function.js");
        let mut child = Command::new(&ns.node)
            .current_dir(&ns.workdir)
            .arg(script)
            .env("CLOUDSTATE_NODE_SUPPORT", &ns.library)
            .env("SERVE", only.join(","))
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting node");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("gRPC server started on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
                let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("a socket address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the JavaScript user function did not start:\n{}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        };
        JsUserFunction { addr, child, log }
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for JsUserFunction {
    fn drop(&mut self) {
        self.kill();
    }
}
