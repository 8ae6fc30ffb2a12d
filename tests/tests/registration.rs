//! Registration of user functions at run time (`latticed.admin.v1.UserFunctions` on the
//! front-end's port) through a real daemon started without a user function: the token and the
//! source allow-list, leases that end and are renewed, deregistration, a duplicate service.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::net::SocketAddr;

use latticed_proto::latticed::admin::v1 as pb;
use latticed_proto::latticed::admin::v1::user_functions_client::UserFunctionsClient;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model_node::{request, WAIT};
use latticed_tests::model_uf::{self, ConformanceModel, TCK_MODEL};
use latticed_tests::{poll_until, Certs, LiveNode};

const TOKEN: &str = "s3cret-token";

struct Setup {
    node: LiveNode,
    frontend: SocketAddr,
    rt: tokio::runtime::Runtime,
    _certs: Certs,
    _dir: tempfile::TempDir,
}

fn setup(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let token = token.display().to_string();
    let certs = Certs::new();
    let mut flags = vec![
        "--listen",
        "127.0.0.1:0",
        "--registration-token-file",
        &token,
    ];
    flags.extend_from_slice(extra);
    let node = LiveNode::start("n1", &certs.issue("n1"), 0, &[], &flags);
    let frontend = poll_until(WAIT, "the front-end to serve", || node.frontend());
    Setup {
        node,
        frontend,
        rt: tokio::runtime::Runtime::new().unwrap(),
        _certs: certs,
        _dir: dir,
    }
}

/// Starts a model user function; its address.
fn start_model(s: &Setup, model: &ConformanceModel) -> String {
    let model = model.clone();
    s.rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(model_uf::serve(model, l));
        a.to_string()
    })
}

/// A new connection to the front-end.
fn channel(s: &Setup) -> tonic::transport::Channel {
    s.node
        .block_on(
            tonic::transport::Endpoint::from_shared(format!("http://{}", s.frontend))
                .unwrap()
                .connect(),
        )
        .unwrap()
}

fn client(s: &Setup) -> UserFunctionsClient<tonic::transport::Channel> {
    UserFunctionsClient::new(channel(s))
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn register(
    s: &Setup,
    address: &str,
    ttl_seconds: u32,
    token: Option<&str>,
) -> Result<pb::Registration, tonic::Status> {
    let req = pb::RegisterRequest {
        address: address.into(),
        ttl_seconds,
    };
    s.node
        .block_on(client(s).register(with_token(req, token)))
        .map(tonic::Response::into_inner)
}

/// `Process` on the front-end: the call's status code.
fn process(s: &Setup, id: &str) -> tonic::Code {
    let channel = channel(s);
    s.node.block_on(async {
        match CrdtTckModelClient::new(channel)
            .process(request(id, vec![]))
            .await
        {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        }
    })
}

/// `grpc.health.v1` for `service`.
fn health(s: &Setup, service: &str) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    let channel = channel(s);
    s.node.block_on(async {
        HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map_or(-1, |r| r.into_inner().status)
    })
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

fn metric(s: &Setup, line: &str) -> bool {
    let (_, body) = latticed_tests::http_get(s.node.admin, "/metrics").unwrap();
    body.lines().any(|l| l.starts_with(line))
}

#[test]
fn registration_needs_the_token_and_holds_a_lease() {
    let s = setup(&[]);
    let model = ConformanceModel::default();
    let addr = start_model(&s, &model);
    // nothing served yet
    assert_eq!(process(&s, "GCounter-r"), tonic::Code::Unimplemented);
    // without the token, or with another: refused and counted
    for token in [None, Some("wrong")] {
        let err = register(&s, &addr, 60, token).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    }
    assert!(metric(
        &s,
        "latticed_registration_refusals_total{reason=\"token\"} 2"
    ));
    // registered: its services are served
    let r = register(&s, &addr, 2, Some(TOKEN)).unwrap();
    assert_eq!(r.address, addr);
    assert!(r.services.contains(&TCK_MODEL.to_string()), "{r:?}");
    assert!((1..=2).contains(&r.ttl_seconds), "{r:?}");
    assert_eq!(process(&s, "GCounter-r"), tonic::Code::Ok);
    assert_eq!(health(&s, TCK_MODEL), SERVING);
    // renewed for longer, listed, then deregistered
    let r = register(&s, &addr, 60, Some(TOKEN)).unwrap();
    assert!(r.ttl_seconds > 2, "{r:?}");
    let listed = s
        .node
        .block_on(client(&s).list(with_token(pb::ListRequest {}, Some(TOKEN))))
        .unwrap()
        .into_inner();
    assert_eq!(listed.user_functions.len(), 1);
    assert_eq!(listed.user_functions[0].address, addr);
    let removed = s
        .node
        .block_on(client(&s).deregister(with_token(
            pb::DeregisterRequest {
                address: addr.clone(),
            },
            Some(TOKEN),
        )))
        .unwrap()
        .into_inner();
    assert!(removed.removed);
    assert_eq!(process(&s, "GCounter-r"), tonic::Code::Unimplemented);
    // a lease that is not renewed ends, and the services go with it
    register(&s, &addr, 1, Some(TOKEN)).unwrap();
    assert_eq!(process(&s, "GCounter-r"), tonic::Code::Ok);
    poll_until(WAIT, "the lease to end", || {
        (process(&s, "GCounter-r") == tonic::Code::Unimplemented).then_some(())
    });
    poll_until(WAIT, "health to say so", || {
        (health(&s, TCK_MODEL) == NOT_SERVING).then_some(())
    });
    // the same services from a second user function while the first is registered
    register(&s, &addr, 60, Some(TOKEN)).unwrap();
    let other = ConformanceModel::default();
    let other_addr = start_model(&s, &other);
    let err = register(&s, &other_addr, 60, Some(TOKEN)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(other.errors.lock().unwrap()[0].contains("already served"));
    // an address where nothing answers
    let err = register(&s, "127.0.0.1:1", 60, Some(TOKEN)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let err = register(&s, "no-port", 60, Some(TOKEN)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

#[test]
fn registration_from_outside_the_allowed_networks_is_refused() {
    let s = setup(&["--registration-allow", "10.0.0.0/8"]);
    let model = ConformanceModel::default();
    let addr = start_model(&s, &model);
    let err = register(&s, &addr, 60, Some(TOKEN)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(metric(
        &s,
        "latticed_registration_refusals_total{reason=\"source\"}"
    ));
    assert!(
        model.proxies.lock().unwrap().is_empty(),
        "it was discovered"
    );
}

/// `latticed register` for the model at `addr` with the token `token` (a file); the process.
fn register_sidecar(s: &Setup, addr: &str, token: &str, ttl: &str) -> std::process::Child {
    let file = s._dir.path().join(format!("token-{token}"));
    std::fs::write(&file, format!("{token}\n")).unwrap();
    std::process::Command::new(latticed_tests::latticed_bin())
        .args([
            "register",
            "--latticed",
            &s.frontend.to_string(),
            "--address",
            addr,
        ])
        .args(["--ttl", ttl, "--token-file"])
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn latticed_register_keeps_a_lease_and_ends_it_on_sigterm() {
    let s = setup(&[]);
    let model = ConformanceModel::default();
    let addr = start_model(&s, &model);
    let mut sidecar = register_sidecar(&s, &addr, TOKEN, "3s");
    poll_until(WAIT, "the sidecar to register the model", || {
        (process(&s, "GCounter-sidecar") == tonic::Code::Ok).then_some(())
    });
    // the lease (3 s) is renewed: still served well after it would have ended
    let until = std::time::Instant::now() + std::time::Duration::from_secs(7);
    while std::time::Instant::now() < until {
        assert_eq!(process(&s, "GCounter-sidecar"), tonic::Code::Ok);
        std::thread::sleep(std::time::Duration::from_millis(500)); // spacing calls, not syncing
    }
    // SIGTERM: it deregisters at once (not at the lease's end) and exits 0
    let pid = sidecar.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = poll_until(WAIT, "the sidecar to exit", || sidecar.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
    assert_eq!(process(&s, "GCounter-sidecar"), tonic::Code::Unimplemented);
}

#[test]
fn latticed_register_refused_exits_1() {
    // refused for its source address (the metrics are the test process's: a refused token
    // would count in the exact count another test of this file asserts)
    let s = setup(&["--registration-allow", "10.0.0.0/8"]);
    let model = ConformanceModel::default();
    let addr = start_model(&s, &model);
    let mut sidecar = register_sidecar(&s, &addr, TOKEN, "60s");
    let status = poll_until(WAIT, "the sidecar to give up", || {
        sidecar.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut sidecar.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("PermissionDenied"), "{err}");
    assert_eq!(process(&s, "GCounter-sidecar"), tonic::Code::Unimplemented);
}
