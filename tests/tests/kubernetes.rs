//! The Kubernetes manifests in docker/kubernetes/ (no cluster runs on the project's machines:
//! they are checked here, not scheduled):
//!
//! - every object passes `kubernetes-validate` (PyPI, offline schemas) in strict mode against
//!   a pinned Kubernetes version;
//! - their ports, probe paths, flags and variables are the daemon's own, read from the binary
//!   under test (`--help`) and from a running daemon's admin endpoint;
//! - the DaemonSet's pods (init container, daemon) and the user-function Deployment's pod run
//!   under Docker with the manifests' arguments, environment (but for the registration
//!   allow-list, set to the Docker network's subnet as one sets it to a cluster's pod CIDR),
//!   volumes and security settings, as a kubelet would run them: two nodes that find each other through the headless Service's
//!   name, answer `/healthz` and `/readyz`, a user function that registers itself with its
//!   node's daemon, and a stop within the grace period.
//!
//! Without the validator (`python3 -m pip install kubernetes-validate`, which brings PyYAML,
//! used here to read the manifests) or without Docker, the tests that need them fail when `CI`
//! is set and are skipped with a message otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use latticed::config::parse_duration;
use latticed_tests::docker::{
    build_images, container_ip, docker, docker_ok, docker_or_skip, repo_root,
};
use latticed_tests::help::{flags, help, help_entries, variables};
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model_node::{pn_change, request};
use latticed_tests::{http_get, latticed_bin, poll_until, tool_or_skip, Daemon, DaemonConfig};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.34.0";
/// Bound of every wait on the containers.
const SETTLE: Duration = Duration::from_secs(60);

/// One object of a manifest file.
struct Object {
    file: String,
    v: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.v["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.v["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn pod_spec(&self) -> &Value {
        &self.v["spec"]["template"]["spec"]
    }
}

fn manifest_dir() -> PathBuf {
    repo_root().join("docker/kubernetes")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifest_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "manifests: {files:?}");
    files
}

/// Whether the validator and PyYAML are installed; without them: a failure under CI, else a
/// skip.
fn validator_or_skip() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import kubernetes_validate, yaml"])
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("kubernetes-validate")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    tool_or_skip(
        "Kubernetes manifest suite",
        ok,
        "`kubernetes-validate` (python3 -m pip install kubernetes-validate)",
    )
}

/// The manifests' objects, or `None` (after the message) when the validator is missing.
fn manifests_or_skip() -> Option<Vec<Object>> {
    validator_or_skip().then(objects)
}

/// Every object of every manifest, read by PyYAML (as JSON).
fn objects() -> Vec<Object> {
    const TO_JSON: &str = "import json, sys, yaml\n\
        print(json.dumps([[f, d] for f in sys.argv[1:] \
        for d in yaml.safe_load_all(open(f)) if d is not None]))";
    let out = Command::new("python3")
        .arg("-c")
        .arg(TO_JSON)
        .args(manifest_files())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "reading the manifests: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Vec<(String, Value)> = serde_json::from_slice(&out.stdout).unwrap();
    all.into_iter()
        .map(|(file, v)| Object { file, v })
        .collect()
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Object {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in docker/kubernetes/"))
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The containers (init containers first) of a pod spec.
fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    array(&pod["initContainers"])
        .iter()
        .chain(array(&pod["containers"]))
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    containers(pod)
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Expands `$(NAME)` from `env` as the kubelet does (an unknown name stays as written).
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 2..];
        match tail.find(')') {
            Some(j) if env.contains_key(&tail[..j]) => {
                out.push_str(&env[&tail[..j]]);
                rest = &tail[j + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A container's environment as the kubelet makes it: in order, `$(NAME)` expanded from the
/// variables before, `fieldRef`s from `fields`.
fn environment(c: &Value, fields: &BTreeMap<&str, String>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in array(&c["env"]) {
        let name = str_of(&e["name"]).to_string();
        let value = if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            fields
                .get(path)
                .unwrap_or_else(|| panic!("no value for the field {path}"))
                .clone()
        } else {
            expand(str_of(&e["value"]), &env)
        };
        env.insert(name, value);
    }
    env
}

/// A container's arguments, expanded from its environment.
fn arguments(c: &Value, env: &BTreeMap<String, String>) -> Vec<String> {
    array(&c["args"])
        .iter()
        .map(|a| expand(str_of(a), env))
        .collect()
}

/// Values the downward API would give, for the checks that do not run anything.
fn fake_fields() -> BTreeMap<&'static str, String> {
    [
        ("spec.nodeName", "node-a"),
        ("status.podIP", "10.244.1.7"),
        ("status.hostIP", "192.0.2.10"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

fn is_latticed(c: &Value) -> bool {
    str_of(&c["image"]).starts_with("latticed:")
}

/// The subcommand words of a latticed container's arguments (empty: a node).
fn subcommand(args: &[String]) -> Vec<&str> {
    let words: Vec<&str> = args
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    if words == ["run"] {
        Vec::new()
    } else {
        words
    }
}

/// What a node container runs with: each flag's value from its variable, else its default
/// (`--help`).
struct NodeSettings {
    env: BTreeMap<String, String>,
    entries: BTreeMap<String, latticed_tests::help::HelpEntry>,
}

impl NodeSettings {
    fn of(c: &Value) -> NodeSettings {
        NodeSettings {
            env: environment(c, &fake_fields()),
            entries: help_entries(&help(&[])),
        }
    }

    fn get(&self, flag: &str) -> String {
        let entry = self
            .entries
            .get(flag)
            .unwrap_or_else(|| panic!("{flag} is not a flag of latticed"));
        entry
            .env
            .as_ref()
            .and_then(|v| self.env.get(v))
            .or(entry.default.as_ref())
            .unwrap_or_else(|| panic!("{flag}: neither set nor defaulted"))
            .clone()
    }

    fn addr(&self, flag: &str) -> SocketAddr {
        let v = self.get(flag);
        v.parse()
            .unwrap_or_else(|e| panic!("{flag} {v} is not an address: {e}"))
    }
}

/// The daemon's container in the DaemonSet.
fn daemon_container(objects: &[Object]) -> &Value {
    container(
        find(objects, "DaemonSet", "latticed").pod_spec(),
        "latticed",
    )
}

/// A container port (`port` by number or name) as a number.
fn resolve_port(c: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    array(&c["ports"])
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {port}")) as u16
}

#[test]
fn every_manifest_passes_the_kubernetes_schema_in_strict_mode() {
    if !validator_or_skip() {
        return;
    }
    let validate = |files: &[PathBuf]| {
        Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .args(files)
            .output()
            .expect("kubernetes-validate")
    };
    let files = manifest_files();
    let out = validate(&files);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate:\n{text}");
    // every object was seen and passed
    let passed = text.lines().filter(|l| l.contains(" passed for ")).count();
    assert_eq!(passed, objects().len(), "{text}");
    println!("{text}");

    // the validator is strict: one unknown field in the DaemonSet's pod spec fails it
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("daemonset.yaml");
    let original = std::fs::read_to_string(manifest_dir().join("daemonset.yaml")).unwrap();
    let mangled = original.replacen(
        "      terminationGracePeriodSeconds:",
        "      terminationGraceSeconds:",
        1,
    );
    assert_ne!(mangled, original);
    std::fs::write(&bad, mangled).unwrap();
    let out = validate(&[bad]);
    assert!(
        !out.status.success(),
        "a misspelt field passed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn every_flag_and_variable_in_the_manifests_is_the_daemons() {
    let Some(objects) = manifests_or_skip() else {
        return;
    };
    let mut checked = 0;
    for o in objects.iter().filter(|o| !o.pod_spec().is_null()) {
        for c in containers(o.pod_spec()).filter(|c| is_latticed(c)) {
            let env = environment(c, &fake_fields());
            let args = arguments(c, &env);
            let sub = subcommand(&args);
            let text = help(&sub);
            let what = format!("{} {}: container {}", o.file, o.name(), c["name"]);
            let unknown: Vec<_> = args
                .iter()
                .filter(|a| a.starts_with("--"))
                .filter(|a| !flags(&text).contains(a.as_str()))
                .collect();
            assert!(
                unknown.is_empty(),
                "{what}: `latticed {}` has no {unknown:?}",
                sub.join(" ")
            );
            if sub.is_empty() {
                let known = variables(&text);
                let stray: Vec<_> = env
                    .keys()
                    .filter(|k| k.starts_with("LATTICED_") && !known.contains(k.as_str()))
                    .collect();
                assert!(stray.is_empty(), "{what}: unknown variables {stray:?}");
            }
            checked += 1;
        }
    }
    // the daemon, its certificate's init container, the registration sidecar
    assert!(checked >= 3, "only {checked} latticed containers found");
}

#[test]
fn ports_services_and_annotations_are_the_daemons_ports() {
    let Some(objects) = manifests_or_skip() else {
        return;
    };
    let daemonset = find(&objects, "DaemonSet", "latticed");
    let c = daemon_container(&objects);
    let s = NodeSettings::of(c);
    let (listen, cluster, admin) = (
        s.addr("--listen"),
        s.addr("--cluster-addr"),
        s.addr("--admin-addr"),
    );
    // probes and Prometheus come from outside the pod: the admin endpoint must not be loopback
    assert!(!admin.ip().is_loopback(), "--admin-addr {admin}");
    assert!(!listen.ip().is_loopback(), "--listen {listen}");
    let ports: BTreeSet<(u16, String)> = array(&c["ports"])
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_u64().unwrap() as u16,
                p["protocol"].as_str().unwrap_or("TCP").to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(u16, String)> = [
        (listen.port(), "TCP".to_string()),
        (cluster.port(), "UDP".to_string()),
        (admin.port(), "TCP".to_string()),
    ]
    .into();
    assert_eq!(ports, expected, "container ports vs the daemon's ports");

    // the advertised address is the pod's, on the cluster port
    let advertise = s.addr("--advertise-addr");
    assert_eq!(
        advertise,
        SocketAddr::new(
            fake_fields()["status.podIP"].parse().unwrap(),
            cluster.port()
        )
    );

    // --join-dns names the headless Service, in its namespace, on its port
    let peers = find(&objects, "Service", "latticed-peers");
    assert_eq!(peers.v["spec"]["clusterIP"], "None");
    assert_eq!(peers.v["spec"]["publishNotReadyAddresses"], true);
    let port = &array(&peers.v["spec"]["ports"])[0];
    assert_eq!(port["protocol"], "UDP");
    assert_eq!(resolve_port(c, &port["targetPort"]), cluster.port());
    let ns = str_of(&peers.v["metadata"]["namespace"]);
    assert_eq!(
        s.get("--join-dns"),
        format!("latticed-peers.{ns}.svc.cluster.local:{}", port["port"])
    );
    // both Services select the DaemonSet's pods
    let labels = &daemonset.v["spec"]["template"]["metadata"]["labels"];
    for svc in ["latticed-peers", "latticed"] {
        let sel = find(&objects, "Service", svc).v["spec"]["selector"]
            .as_object()
            .unwrap();
        assert!(
            sel.iter().all(|(k, v)| labels[k] == *v),
            "Service {svc} selects {sel:?}, the pods are {labels}"
        );
    }
    let clients = find(&objects, "Service", "latticed");
    let port = &array(&clients.v["spec"]["ports"])[0];
    assert_eq!(resolve_port(c, &port["targetPort"]), listen.port());

    // Prometheus scrapes the admin port
    let notes = &daemonset.v["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(notes["prometheus.io/scrape"], "true");
    assert_eq!(notes["prometheus.io/port"], admin.port().to_string());

    // user functions reach the daemon on the node's address, at the front-end's host port
    let frontend = array(&c["ports"])
        .iter()
        .find(|p| p["containerPort"] == listen.port())
        .unwrap();
    assert_eq!(frontend["hostPort"], listen.port(), "{frontend}");
    let uf = find(&objects, "Deployment", "model-user-function");
    let register = container(uf.pod_spec(), "register");
    let env = environment(register, &fake_fields());
    let args = arguments(register, &env);
    let at = args.iter().position(|a| a == "--latticed").unwrap();
    assert_eq!(
        args[at + 1],
        format!("{}:{}", fake_fields()["status.hostIP"], listen.port())
    );
}

#[test]
fn probes_and_scrape_path_are_served_by_the_admin_endpoint() {
    let Some(objects) = manifests_or_skip() else {
        return;
    };
    let daemonset = find(&objects, "DaemonSet", "latticed");
    let c = daemon_container(&objects);
    let admin = NodeSettings::of(c).addr("--admin-addr");
    // a node alone, without peers, is ready: both probes answer 200
    let daemon = Daemon::start(DaemonConfig {
        name: "n1".into(),
        ..Default::default()
    });
    let mut probed = 0;
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(resolve_port(c, &get["port"]), admin.port(), "{probe}");
        let path = str_of(&get["path"]);
        poll_until(SETTLE, &format!("{probe} {path} to answer 200"), || {
            (daemon.get(path)?.0 == 200).then_some(())
        });
        probed += 1;
    }
    assert_eq!(probed, 2);
    let path =
        str_of(&daemonset.v["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]);
    let (status, body) = daemon.get(path).unwrap();
    assert_eq!(status, 200, "{path}");
    assert!(body.contains("# TYPE latticed_"), "{path}: {body}");
    // and a path the daemon does not serve is told apart
    assert_eq!(daemon.get("/no-such-probe").unwrap().0, 404);
}

#[test]
fn the_grace_period_covers_the_shutdown_grace_and_the_leave() {
    let Some(objects) = manifests_or_skip() else {
        return;
    };
    let pod = find(&objects, "DaemonSet", "latticed").pod_spec();
    let s = NodeSettings::of(daemon_container(&objects));
    let grace = parse_duration(&s.get("--shutdown-grace")).unwrap();
    // the leave's bound, as --help states it: "... then the node leaves (within 2 s more)"
    let text = &s.entries["--shutdown-grace"].text;
    let leave = text
        .split("within ")
        .nth(1)
        .and_then(|t| t.split(" more").next())
        .map(|t| parse_duration(&t.replace(' ', "")).unwrap())
        .unwrap_or_else(|| panic!("no leave bound in the help of --shutdown-grace: {text}"));
    let period = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    assert!(
        period >= grace + leave,
        "terminationGracePeriodSeconds {period:?} < --shutdown-grace {grace:?} + leave {leave:?}"
    );
    println!("grace period {period:?} >= shutdown grace {grace:?} + leave {leave:?}");
}

// ---------------------------------------------------------------------------------------------
// The pods under Docker

/// The project's image for a manifest's image (`latticed:latest` -> `latticed:dev`).
fn local_image(image: &str) -> String {
    let repo = image.split(':').next().unwrap();
    assert!(
        ["latticed", "latticed-model"].contains(&repo),
        "an image the project does not build: {image}"
    );
    format!("{repo}:dev")
}

/// `256Mi` -> `256m` (Docker's unit).
fn docker_memory(quantity: &str) -> String {
    let n = quantity
        .strip_suffix("Mi")
        .unwrap_or_else(|| panic!("a memory quantity in Mi: {quantity}"));
    format!("{n}m")
}

/// Everything one test run creates in Docker; removed on drop (logs printed if failing).
struct Run {
    id: String,
    network: String,
    containers: Vec<String>,
    dir: tempfile::TempDir,
    /// variables set to what this network needs in place of the manifests' cluster-specific
    /// values (as a user edits them for a cluster)
    overrides: BTreeMap<String, String>,
}

impl Run {
    fn new() -> Run {
        let id = format!("latticed-k8s-{}", std::process::id());
        let network = id.clone();
        docker_ok(&["network", "create", &network]);
        // the network's subnet is this "cluster's" pod CIDR: registrations come from it
        let subnet = docker_ok(&[
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            &network,
        ]);
        let subnet = subnet.split_whitespace().next().unwrap().to_string();
        Run {
            id,
            network,
            containers: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            overrides: [("LATTICED_REGISTRATION_ALLOW".to_string(), subnet)].into(),
        }
    }

    /// The secrets the manifests use, as folders of files: the cluster CA made by `latticed
    /// certs init`, and a registration token.
    fn make_secrets(&self) -> PathBuf {
        let secrets = self.dir.path().join("secrets");
        let ca = secrets.join("latticed-ca");
        let out = Command::new(latticed_bin())
            .args(["certs", "init", "--dir", ca.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "certs init: {out:?}");
        let token = secrets.join("latticed-registration");
        std::fs::create_dir_all(&token).unwrap();
        std::fs::write(token.join("token"), format!("k8s-test-{}\n", self.id)).unwrap();
        secrets
    }

    /// A pod's "pause" container: it holds the network namespace every container of the pod
    /// joins (as in Kubernetes), and its address is the pod IP. The model user function serves
    /// as one, on a port nothing else uses.
    fn pause(&mut self, pod: &str, aliases: &[&str]) -> IpAddr {
        let name = format!("{}-{pod}", self.id);
        let mut args = vec!["run", "-d", "--name", &name, "--network", &self.network];
        for a in aliases {
            args.extend(["--network-alias", a]);
        }
        args.extend(["latticed-model:dev", "--port", "65000"]);
        docker_ok(&args);
        self.containers.push(name.clone());
        container_ip(&name)
    }

    /// The volumes of a pod spec as folders, the way the kubelet fills them: an emptyDir
    /// writable by all, a secret's files (or its `items`) owned by root:fsGroup with its
    /// `defaultMode`, a hostPath folder.
    fn volumes(&self, pod: &str, spec: &Value, secrets: &Path) -> BTreeMap<String, PathBuf> {
        use std::os::unix::fs::{chown, PermissionsExt};
        let fs_group = spec["securityContext"]["fsGroup"]
            .as_u64()
            .map(|g| g as u32);
        let mut out = BTreeMap::new();
        for v in array(&spec["volumes"]) {
            let name = str_of(&v["name"]).to_string();
            let dir = self.dir.path().join(pod).join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(secret) = v["secret"].as_object() {
                let from = secrets.join(str_of(&secret["secretName"]));
                let items: Vec<(String, String)> = match secret.get("items") {
                    Some(items) => array(items)
                        .iter()
                        .map(|i| (str_of(&i["key"]).into(), str_of(&i["path"]).into()))
                        .collect(),
                    None => std::fs::read_dir(&from)
                        .unwrap()
                        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .map(|f| (f.clone(), f))
                        .collect(),
                };
                let mode = secret
                    .get("defaultMode")
                    .and_then(Value::as_u64)
                    .unwrap_or(0o644);
                for (key, path) in items {
                    let file = dir.join(&path);
                    std::fs::copy(from.join(&key), &file).unwrap();
                    chown(&file, Some(0), fs_group).unwrap();
                    std::fs::set_permissions(&file, PermissionsExt::from_mode(mode as u32))
                        .unwrap();
                }
            } else {
                assert!(
                    v.get("emptyDir").is_some() || v.get("hostPath").is_some(),
                    "a volume kind this test does not make: {v}"
                );
                let mode = if v.get("emptyDir").is_some() {
                    0o777
                } else {
                    0o755
                };
                std::fs::set_permissions(&dir, PermissionsExt::from_mode(mode)).unwrap();
            }
            out.insert(name, dir);
        }
        out
    }

    /// `docker run` of one container of a pod spec in the pod's namespace: its image,
    /// arguments and environment (with `fields` for the downward API), volume mounts, user,
    /// read-only root, dropped capabilities and memory limit. `detach`: keep it running (a
    /// container), else wait for it to exit 0 (an init container).
    #[allow(clippy::too_many_arguments)]
    fn run_container(
        &mut self,
        pod: &str,
        spec: &Value,
        c: &Value,
        volumes: &BTreeMap<String, PathBuf>,
        fields: &BTreeMap<&str, String>,
        detach: bool,
    ) -> String {
        let name = format!("{}-{pod}-{}", self.id, str_of(&c["name"]));
        let mut env = environment(c, fields);
        for (k, v) in &self.overrides {
            if let Some(value) = env.get_mut(k) {
                *value = v.clone();
            }
        }
        let mut args: Vec<String> = vec!["run".into(), "--name".into(), name.clone()];
        args.push(if detach { "-d" } else { "--rm" }.into());
        args.extend(["--network".into(), format!("container:{}-{pod}", self.id)]);
        let sc = &spec["securityContext"];
        if let (Some(u), Some(g)) = (sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()) {
            args.extend(["--user".into(), format!("{u}:{g}")]);
        }
        if let Some(g) = sc["fsGroup"].as_u64() {
            args.extend(["--group-add".into(), g.to_string()]);
        }
        let csc = &c["securityContext"];
        if csc["readOnlyRootFilesystem"] == true {
            args.push("--read-only".into());
        }
        if csc["allowPrivilegeEscalation"] == false {
            args.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        for cap in array(&csc["capabilities"]["drop"]) {
            args.extend(["--cap-drop".into(), str_of(cap).into()]);
        }
        if let Some(mem) = c["resources"]["limits"]["memory"].as_str() {
            args.extend(["--memory".into(), docker_memory(mem)]);
        }
        for (k, v) in &env {
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        // the test reads /v1/keys from the host (the Docker network's gateway), where an
        // operator would use loopback inside the pod or the inspect token
        args.extend(["-e".into(), "LATTICED_ADMIN_INSPECT_ALLOW=0.0.0.0/0".into()]);
        for mnt in array(&c["volumeMounts"]) {
            let mut host = volumes[str_of(&mnt["name"])].clone();
            if let Some(sub) = mnt["subPath"].as_str() {
                host = host.join(sub);
            }
            let ro = if mnt["readOnly"] == true { ":ro" } else { "" };
            args.extend([
                "-v".into(),
                format!("{}:{}{ro}", host.display(), str_of(&mnt["mountPath"])),
            ]);
        }
        args.push(local_image(str_of(&c["image"])));
        args.extend(arguments(c, &env));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        if detach {
            self.containers.push(name.clone());
            docker_ok(&refs);
        } else {
            let out = docker(&refs);
            assert!(
                out.status.success(),
                "{name} ({args:?}) failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        name
    }

    /// A whole pod of `object` (a DaemonSet or Deployment) on the network: its pause container
    /// with `aliases`, its volumes, its init containers run to completion, its containers
    /// started. `fields`: the downward API, `status.podIP` filled in here. Returns the pod IP.
    fn pod(
        &mut self,
        pod: &str,
        object: &Object,
        aliases: &[&str],
        secrets: &Path,
        mut fields: BTreeMap<&'static str, String>,
    ) -> IpAddr {
        let spec = object.pod_spec();
        let ip = self.pause(pod, aliases);
        fields.insert("status.podIP", ip.to_string());
        let volumes = self.volumes(pod, spec, secrets);
        for c in array(&spec["initContainers"]) {
            self.run_container(pod, spec, c, &volumes, &fields, false);
        }
        for c in array(&spec["containers"]) {
            self.run_container(pod, spec, c, &volumes, &fields, true);
        }
        ip
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for c in self.containers.iter().rev() {
            if std::thread::panicking() {
                let logs = docker(&["logs", "--tail", "30", c]);
                eprintln!(
                    "--- {c} last log lines:\n{}{}",
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            docker(&["rm", "-f", "-v", c]);
        }
        docker(&["network", "rm", &self.network]);
    }
}

/// `name -> state` as the node at `admin` reports its members.
fn member_states(admin: SocketAddr) -> Option<BTreeMap<String, String>> {
    let (200, body) = http_get(admin, "/v1/members")? else {
        return None;
    };
    let v: Value = serde_json::from_str(&body).ok()?;
    Some(
        array(&v["members"])
            .iter()
            .map(|m| {
                (
                    str_of(&m["name"]).to_string(),
                    str_of(&m["state"]).to_string(),
                )
            })
            .collect(),
    )
}

/// A metric's value (summed over its label sets matching `labels`) from `/metrics` at `admin`.
fn metric(admin: SocketAddr, name: &str, labels: &str) -> f64 {
    let Some((_, body)) = http_get(admin, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_pods_run_under_docker_as_the_manifests_say() {
    let Some(objects) = manifests_or_skip() else {
        return;
    };
    if !docker_or_skip("Kubernetes pod suite") {
        return;
    }
    build_images();
    let daemonset = find(&objects, "DaemonSet", "latticed");
    let c = daemon_container(&objects);
    let s = NodeSettings::of(c);
    let (listen, admin_port) = (s.addr("--listen").port(), s.addr("--admin-addr").port());
    let peers = s.get("--join-dns");
    let peers_name = peers.rsplit_once(':').unwrap().0.to_string();
    let grace = daemonset.pod_spec()["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();

    let mut run = Run::new();
    let secrets = run.make_secrets();
    // two nodes; each pod's IP stands for its node's address too (hostPort: the node's
    // address:9000 reaches the pod's 9000)
    let mut nodes = Vec::new();
    for node in ["node-a", "node-b"] {
        let fields = [("spec.nodeName", node.to_string())].into();
        let ip = run.pod(node, daemonset, &[&peers_name], &secrets, fields);
        nodes.push((node, ip));
    }
    let admin = |ip: IpAddr| SocketAddr::new(ip, admin_port);
    let started = Instant::now();
    for (node, ip) in &nodes {
        let probe = |probe: &str| str_of(&c[probe]["httpGet"]["path"]).to_string();
        for p in [probe("livenessProbe"), probe("readinessProbe")] {
            poll_until(SETTLE, &format!("{node}: {p} 200"), || {
                (http_get(admin(*ip), &p)?.0 == 200).then_some(())
            });
        }
    }
    println!(
        "both nodes live and ready {:.1?} after start",
        started.elapsed()
    );
    // they found each other through the Service's name, with certificates for their own
    // names: every replication stream was accepted
    for (node, ip) in &nodes {
        let states = poll_until(SETTLE, "both nodes up", || {
            member_states(admin(*ip)).filter(|m| m.len() == 2 && m.values().all(|s| s == "up"))
        });
        assert!(states.contains_key(*node), "{node}: {states:?}");
        assert_eq!(
            metric(admin(*ip), "latticed_rejected_frames_total", "identity"),
            0.0
        );
        assert!(
            metric(
                admin(*ip),
                "latticed_replication_streams",
                "direction=\"in\""
            ) >= 1.0
        );
    }

    // the user function's pod on node-a registers with node-a's daemon (status.hostIP)
    let uf = find(&objects, "Deployment", "model-user-function");
    let fields = [("status.hostIP", nodes[0].1.to_string())].into();
    run.pod("uf-a", uf, &[], &secrets, fields);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let frontend = format!("http://{}:{listen}", nodes[0].1);
    let id = "PNCounter-k8s";
    let reply = poll_until(SETTLE, "a command through node-a's front-end", || {
        rt.block_on(async {
            let mut c = CrdtTckModelClient::connect(frontend.clone()).await.ok()?;
            let req = request(id, vec![pn_change(7)]);
            c.process(req).await.ok()
        })
    });
    println!(
        "through the registered user function: {:?}",
        reply.into_inner()
    );
    // and the write reached node-b
    poll_until(SETTLE, "node-b to hold the counter", || {
        let path = format!("/v1/keys/CrdtTckModel-{id}");
        let (200, body) = http_get(admin(nodes[1].1), &path)? else {
            return None;
        };
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["value"] == 7).then_some(())
    });

    // SIGTERM: node-a drains and leaves within the grace period, exit 0; node-b sees it leave
    let daemon_a = format!("{}-node-a-latticed", run.id);
    let stopping = Instant::now();
    docker_ok(&["stop", "--time", &grace.to_string(), &daemon_a]);
    let took = stopping.elapsed();
    let code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &daemon_a]);
    assert_eq!(code, "0", "node-a's daemon exit code after SIGTERM");
    assert!(took < Duration::from_secs(grace), "stopped in {took:?}");
    poll_until(SETTLE, "node-b to see node-a leave", || {
        member_states(admin(nodes[1].1))?
            .get("node-a")
            .is_some_and(|s| s == "left")
            .then_some(())
    });
    println!("node-a stopped in {took:.1?} (grace {grace} s), exit 0, left");
}
