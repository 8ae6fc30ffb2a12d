//! `frontend-bench`: commands per second and latency of `Process` with one GCounter increment,
//! client -> latticed -> the conformance model user function -> latticed -> client, on one
//! node; the same through a second node without the user function (routed over QUIC to the
//! first: the extra hop); next to two floors: a direct unary gRPC call from the same clients to
//! the user function (its `reportError`), and the same clients driving the user function's
//! `handle` stream directly (what latticed does for each command, without a request per
//! command).
//!
//! ```text
//! cargo run --release -p latticed-benches --bin frontend-bench -- [--clients 32] [--calls 500] [--json FILE]
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use latticed::config::Cli;
use latticed::Node;
use latticed_proto::cloudstate::crdt::crdt_client::CrdtClient;
use latticed_proto::cloudstate::crdt::{crdt_stream_in, CrdtInit, CrdtStreamIn};
use latticed_proto::cloudstate::Command;
use latticed_tests::model as m;
use latticed_tests::model::crdt_tck_model_client::CrdtTckModelClient;
use latticed_tests::model_uf::{self, ConformanceModel, TCK_MODEL};
use prost::Message;

#[derive(Parser, Debug)]
struct Args {
    /// concurrent clients (each on its own entity)
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// calls per client
    #[arg(long, default_value_t = 500)]
    calls: usize,
    /// write the figures as JSON to this file
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// leave out the routed measurement (one node only, as builds before routing measured)
    #[arg(long)]
    no_routed: bool,
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn request(id: &str) -> m::Request {
    m::Request {
        id: id.into(),
        actions: vec![m::RequestAction {
            action: Some(m::request_action::Action::Update(m::Update {
                update: Some(m::update::Update::Gcounter(m::GCounterUpdate {
                    increment: 1,
                })),
                write_consistency: 0,
            })),
        }],
    }
}

struct Figures {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn figures(mut lat: Vec<f64>, elapsed: Duration) -> Figures {
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Figures {
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

/// Joins the clients' latency samples into figures.
async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<f64>>>, start: Instant) -> Res<Figures> {
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    Ok(figures(lat, start.elapsed()))
}

async fn through_latticed(frontend: &str, args: &Args) -> Res<Figures> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut client = CrdtTckModelClient::connect(format!("http://{frontend}")).await?;
        let calls = args.calls;
        tasks.push(tokio::spawn(async move {
            let id = format!("GCounter-bench-{c}");
            let mut lat = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                if client.process(request(&id)).await.is_ok() {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            lat
        }));
    }
    collect(tasks, start).await
}

async fn direct_unary(uf: &str, args: &Args) -> Res<Figures> {
    use latticed_proto::cloudstate::entity_discovery_client::EntityDiscoveryClient;
    use latticed_proto::cloudstate::UserFunctionError;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let mut client = EntityDiscoveryClient::connect(format!("http://{uf}")).await?;
        let calls = args.calls;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                if client
                    .report_error(UserFunctionError {
                        message: "bench".into(),
                    })
                    .await
                    .is_ok()
                {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            lat
        }));
    }
    collect(tasks, start).await
}

async fn direct(uf: &str, args: &Args) -> Res<Figures> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut client = CrdtClient::connect(format!("http://{uf}")).await?;
        let calls = args.calls;
        tasks.push(tokio::spawn(async move {
            let id = format!("GCounter-direct-{c}");
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let init = CrdtStreamIn {
                message: Some(crdt_stream_in::Message::Init(CrdtInit {
                    service_name: TCK_MODEL.into(),
                    entity_id: id.clone(),
                    delta: None,
                })),
            };
            let _ = tx.send(init).await;
            // the call is opened by a task of its own, as latticed does: support libraries
            // (and the model) send the response headers only with their first message
            let mut call = Some(tokio::spawn(async move {
                client
                    .handle(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            }));
            let mut out = None;
            let mut lat = Vec::with_capacity(calls);
            for n in 0..calls {
                let t = Instant::now();
                let cmd = Command {
                    entity_id: id.clone(),
                    id: n as i64 + 1,
                    name: "Process".into(),
                    payload: Some(latticed_proto::wkt::Any {
                        type_url: "type.googleapis.com/cloudstate.tck.model.crdt.Request".into(),
                        value: request(&id).encode_to_vec(),
                    }),
                    streamed: false,
                    metadata: None,
                };
                if tx
                    .send(CrdtStreamIn {
                        message: Some(crdt_stream_in::Message::Command(cmd)),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                if let Some(call) = call.take() {
                    match call.await {
                        Ok(Ok(resp)) => out = Some(resp.into_inner()),
                        _ => return lat,
                    }
                }
                let Some(stream) = out.as_mut() else {
                    return lat;
                };
                if let Ok(Some(_)) = stream.message().await {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            lat
        }));
    }
    collect(tasks, start).await
}

/// The argument list of a bench node named `name` with certificates from `certs`.
fn node_args(certs: &std::path::Path, name: &str, extra: &[&str]) -> Res<Cli> {
    latticed::certs::issue(certs, name, false)?;
    let d = certs.display();
    let mut argv: Vec<String> = [
        "latticed",
        "--node-name",
        name,
        "--cluster-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--probe-period",
        "500ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend([
        "--ca-cert".to_string(),
        format!("{d}/ca.pem"),
        "--cert".to_string(),
        format!("{d}/{name}.pem"),
        "--key".to_string(),
        format!("{d}/{name}-key.pem"),
    ]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    Ok(Cli::try_parse_from(argv)?)
}

async fn frontend_of(node: &Node) -> Res<String> {
    let mut fe = node.frontend.clone();
    loop {
        if let Some(a) = *fe.borrow_and_update() {
            return Ok(a.to_string());
        }
        fe.changed().await?;
    }
}

/// Starts a second node without the user function, joined to `node`, and measures the same
/// commands through it (routed to `node`).
async fn through_second_node(
    node: &Node,
    certs: &std::path::Path,
    args: &Args,
) -> Res<(Node, Figures)> {
    let join = node.cluster_addr.to_string();
    let edge =
        Node::start(&node_args(certs, "edge", &["--user-function", "none", "--join", &join])?.run)
            .await?;
    let edge_frontend = frontend_of(&edge).await?;
    // the edge node routes once it has learnt where the service is
    let mut probe = CrdtTckModelClient::connect(format!("http://{edge_frontend}")).await?;
    let give_up = Instant::now() + Duration::from_secs(30);
    while let Err(e) = probe.process(request("GCounter-probe")).await {
        if Instant::now() > give_up {
            return Err(format!("the second node does not route the service: {e}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warm = Args {
        clients: args.clients,
        calls: 20,
        json: None,
        no_routed: true,
    };
    through_latticed(&edge_frontend, &warm).await?;
    let routed = through_latticed(&edge_frontend, args).await?;
    Ok((edge, routed))
}

fn main() -> Res<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let uf = listener.local_addr()?.to_string();
        let mut model = ConformanceModel::default();
        model.quiet = true;
        tokio::spawn(model_uf::serve(model, listener));
        let certs = tempfile::tempdir()?;
        latticed::certs::init_ca(certs.path(), false)?;
        let node = Node::start(&node_args(certs.path(), "bench", &["--user-function", &uf])?.run).await?;
        let frontend = frontend_of(&node).await?;
        // warm up
        let warm = Args { clients: args.clients, calls: 20, json: None, no_routed: true };
        through_latticed(&frontend, &warm).await?;
        let floor = direct(&uf, &args).await?;
        let unary = direct_unary(&uf, &args).await?;
        let proxied = through_latticed(&frontend, &args).await?;
        // then a second node, without the user function: its commands are routed to the first
        // (which now also replicates every write to it)
        let routed = if args.no_routed {
            None
        } else {
            Some(through_second_node(&node, certs.path(), &args).await?)
        };
        let hop = routed.as_ref().map_or(String::new(), |(_, r)| {
            format!(
                "; routed through a second node {:.0} cmds/s, p50 {:.2} ms, p99 {:.2} ms",
                r.per_sec, r.p50_ms, r.p99_ms
            )
        });
        println!(
            "{} clients x {} calls: latticed {:.0} cmds/s, p50 {:.2} ms, p99 {:.2} ms{hop}; direct unary call to the user function {:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms; its handle stream driven directly {:.0} cmds/s, p50 {:.2} ms, p99 {:.2} ms",
            args.clients, args.calls, proxied.per_sec, proxied.p50_ms, proxied.p99_ms, unary.per_sec, unary.p50_ms, unary.p99_ms, floor.per_sec, floor.p50_ms, floor.p99_ms
        );
        if let Some(path) = &args.json {
            let routed_json = routed.as_ref().map(|(_, r)| {
                serde_json::json!({"commands_per_sec": r.per_sec, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms})
            });
            let json = serde_json::json!({
                "clients": args.clients,
                "calls_per_client": args.calls,
                "latticed": {"commands_per_sec": proxied.per_sec, "p50_ms": proxied.p50_ms, "p99_ms": proxied.p99_ms},
                "routed": routed_json,
                "direct_unary": {"calls_per_sec": unary.per_sec, "p50_ms": unary.p50_ms, "p99_ms": unary.p99_ms},
                "direct_stream": {"commands_per_sec": floor.per_sec, "p50_ms": floor.p50_ms, "p99_ms": floor.p99_ms},
            });
            std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        }
        if let Some((edge, _)) = routed {
            edge.shutdown().await;
        }
        node.shutdown().await;
        Res::Ok(())
    })
}
