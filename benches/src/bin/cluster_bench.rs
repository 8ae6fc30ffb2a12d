//! `cluster-bench`: N in-process latticed nodes on 127.0.0.1 replicating a stream of
//! single-key writes over real QUIC, with and without deltas.
//!
//! ```text
//! cargo run --release -p latticed-benches --bin cluster-bench -- [--nodes 3,10]
//!     [--writes 20000] [--rate 2000] [--kinds counter,orset] [--data-dir DIR]
//!     [--growth KEYS] [--json FILE]
//! ```
//!
//! With `--data-dir DIR` every node keeps its state in a data file under `DIR/<case>/<node>`
//! (`--data-dir` of the daemon: every write committed before it is acknowledged or sent), on
//! whatever disk DIR is on; without it, memory only. `--growth KEYS` measures instead the
//! data file of one node (under `--data-dir`, or a temporary folder) as KEYS keys are written,
//! then deleted (tombstones kept forever), then KEYS more written and deleted.
//!
//! For each node count, kind (GCounter increments on one key; adds to one ORSet pre-filled with
//! 10k elements) and mode (deltas, or the key's full state each time) it runs two passes:
//! - throughput: every node writes as fast as it can; `writes_per_sec` is all writes over the
//!   time until every node holds every write;
//! - latency: writes paced at `--rate` per second cluster-wide (evenly spaced: each node's
//!   writes are offset by its share of the gap); `p50_ms` / `p99_ms` are the time from a write
//!   until every node holds it.
//!
//! A node holds a write from the moment its change notice for the key reaches the bench's
//! observer of that node; the observer then reads the key to see which writes it holds (that
//! read's round trip is not counted, unless another change came in during it: then its end is
//! the time).
//!
//! `bytes_per_write` is replication bytes sent per write per peer. Figures are printed and, with
//! `--json`, written as JSON.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use latticed::config::Cli;
use latticed::replication::{Consistency, ReplicationHandle};
use latticed::store::Entry;
use latticed::Node;
use latticed_crdt::{Element, Store};
use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, GCounterDelta, OrSetDelta};

#[derive(Parser, Debug)]
#[command(about = "Replication benchmark: in-process latticed nodes on loopback")]
struct Args {
    /// node counts to run
    #[arg(long, value_delimiter = ',', default_values_t = [3usize, 10])]
    nodes: Vec<usize>,
    /// writes per pass
    #[arg(long, default_value_t = 20_000)]
    writes: usize,
    /// cluster-wide write rate of the latency pass, per second
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    /// kinds: counter, orset
    #[arg(long, value_delimiter = ',', default_values_t = ["counter".to_string(), "orset".to_string()])]
    kinds: Vec<String>,
    /// modes: delta, full_state
    #[arg(long, value_delimiter = ',', default_values_t = ["delta".to_string(), "full_state".to_string()])]
    modes: Vec<String>,
    /// elements the ORSet holds before the measurement
    #[arg(long, default_value_t = 10_000)]
    prefill: usize,
    /// writes each node keeps in flight (submitted, not yet completed); 1: each write waits
    /// for the one before (with a data file, for its commit)
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// keep each node's state in a data file under this folder (default: memory only)
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// measure the data file's growth with this many keys written and deleted, instead of
    /// replication
    #[arg(long)]
    growth: Option<usize>,
    /// write the figures as JSON to this file
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const KEY: &str = "bench";
const DEADLINE: Duration = Duration::from_secs(120);

fn inc() -> CrdtDelta {
    CrdtDelta {
        delta: Some(Delta::Gcounter(GCounterDelta { increment: 1 })),
    }
}

fn add(elements: Vec<latticed_proto::wkt::Any>) -> CrdtDelta {
    CrdtDelta {
        delta: Some(Delta::Orset(OrSetDelta {
            cleared: false,
            removed: vec![],
            added: elements,
        })),
    }
}

fn element(origin: usize, k: usize) -> Element {
    Element::string(&format!("w-{origin:02}-{k:08}"))
}

struct Cluster {
    nodes: Vec<Node>,
    handles: Vec<ReplicationHandle>,
    _certs: tempfile::TempDir,
}

async fn start(n: usize, full: bool, data: Option<&std::path::Path>) -> Res<Cluster> {
    let dir = tempfile::tempdir()?;
    latticed::certs::init_ca(dir.path(), false)?;
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..n {
        let name = format!("b{i}");
        latticed::certs::issue(dir.path(), &name, false)?;
        let d = dir.path().display();
        let mut argv = vec![
            "latticed".to_string(),
            "--node-name".into(),
            name.clone(),
            "--cluster-addr".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--ca-cert".into(),
            format!("{d}/ca.pem"),
            "--cert".into(),
            format!("{d}/{name}.pem"),
            "--key".into(),
            format!("{d}/{name}-key.pem"),
            "--probe-period".into(),
            "500ms".into(),
            "--user-function".into(),
            "none".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(first) = nodes.first() {
            argv.extend(["--join".to_string(), first.cluster_addr.to_string()]);
        }
        if full {
            argv.push("--replicate-full-state".into());
        }
        if let Some(data) = data {
            argv.extend([
                "--data-dir".to_string(),
                data.join(&name).display().to_string(),
            ]);
        }
        let cli = Cli::try_parse_from(argv)?;
        nodes.push(Node::start(&cli.run).await?);
    }
    let handles = nodes.iter().map(|n| n.replication.clone()).collect();
    Ok(Cluster {
        nodes,
        handles,
        _certs: dir,
    })
}

/// Per origin node: how many of its bench writes (counted from `base`) a node holds. For sets,
/// `known` says how many are already known to be held, so that each call only probes new ones.
async fn held(
    h: &ReplicationHandle,
    origins: &[u64],
    kind: &str,
    base: &[usize],
    known: &[usize],
) -> Res<Vec<usize>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let origins = origins.to_vec();
    let kind = kind.to_string();
    let base = base.to_vec();
    let known = known.to_vec();
    h.inspect(
        KEY,
        Box::new(move |e: Option<&Entry>| {
            let mut out = vec![0usize; origins.len()];
            if let Some(Entry::Value(v)) = e {
                match v.store() {
                    Store::ORSet(_) if kind == "orset" => {
                        for (j, slot) in out.iter_mut().enumerate() {
                            let mut k = base[j] + known[j];
                            while v.contains_element(&element(j, k)) {
                                k += 1;
                            }
                            *slot = k - base[j];
                        }
                    }
                    _ => {
                        let c: BTreeMap<u64, u64> = v
                            .counter_contributions()
                            .into_iter()
                            .map(|(r, i, _)| (r, i))
                            .collect();
                        for (j, r) in origins.iter().enumerate() {
                            let have = c.get(r).copied().unwrap_or(0) as usize;
                            out[j] = have.saturating_sub(base[j]);
                        }
                    }
                }
            }
            let _ = tx.send(out);
        }),
    )
    .await?;
    Ok(rx.await?)
}

/// arrivals[node][origin][k]: when `node` first held the k-th write of `origin`
type Arrivals = Vec<Vec<Vec<Option<Instant>>>>;

struct Pass {
    p50_ms: f64,
    p99_ms: f64,
    /// from a write until one other node holds it (each other node a sample)
    one_p50_ms: f64,
    writes_per_sec: f64,
    bytes_per_write: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn pass(
    c: &Cluster,
    kind: &str,
    writes: usize,
    rate: Option<f64>,
    base: &[usize],
    in_flight: usize,
) -> Res<Pass> {
    let n = c.handles.len();
    let per_node = writes / n;
    let origins: Vec<u64> = c.handles.iter().map(|h| h.replica()).collect();
    let issued: Arc<Mutex<Vec<Vec<Instant>>>> =
        Arc::new(Mutex::new(vec![Vec::with_capacity(per_node); n]));
    let arrived: Arc<Mutex<Arrivals>> =
        Arc::new(Mutex::new(vec![vec![vec![None; per_node]; n]; n]));
    let bytes_before: u64 = {
        let mut t = 0;
        for h in &c.handles {
            t += h.stats().await?.bytes_sent;
        }
        t
    };
    let start = Instant::now();
    // observers
    let mut observers = Vec::new();
    for (i, h) in c.handles.iter().enumerate() {
        let h = h.clone();
        let origins = origins.clone();
        let arrived = arrived.clone();
        let kind = kind.to_string();
        let base = base.to_vec();
        observers.push(tokio::spawn(async move {
            let mut changes = h.subscribe(KEY);
            let mut seen = vec![0usize; origins.len()];
            // when the key's change was announced: what the look that follows finds was
            // held by then, unless another change came in meanwhile (then the look's end)
            let mut notified = Instant::now();
            loop {
                let counts = held(&h, &origins, &kind, &base, &seen)
                    .await
                    .unwrap_or_default();
                let now = if changes.has_changed().unwrap_or(true) {
                    Instant::now()
                } else {
                    notified
                };
                {
                    let mut a = arrived.lock().unwrap_or_else(|p| p.into_inner());
                    for (j, c) in counts.iter().enumerate() {
                        for k in seen[j]..(*c).min(per_node) {
                            a[i][j][k] = Some(now);
                        }
                        seen[j] = seen[j].max((*c).min(per_node));
                    }
                }
                if seen.iter().all(|s| *s >= per_node) || start.elapsed() > DEADLINE {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
                notified = Instant::now();
            }
        }));
    }
    // writers
    let mut writers = Vec::new();
    for (j, h) in c.handles.iter().enumerate() {
        let h = h.clone();
        let issued = issued.clone();
        let kind = kind.to_string();
        let base_j = base[j];
        let gap = rate.map(|r| Duration::from_secs_f64(n as f64 / r));
        writers.push(tokio::spawn(async move {
            // each node's writes are offset by its share of the gap, so that the cluster's
            // writes come evenly spaced at `rate`, not as a burst of one per node every gap
            let mut tick = gap.map(|g| {
                let offset = g.mul_f64(j as f64 / n as f64);
                tokio::time::interval_at(tokio::time::Instant::now() + offset, g)
            });
            let mut pending = std::collections::VecDeque::new();
            for k in 0..per_node {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let d = if kind == "orset" {
                    add(vec![element(j, base_j + k).to_any()])
                } else {
                    inc()
                };
                issued.lock().unwrap_or_else(|p| p.into_inner())[j].push(Instant::now());
                match h.submit_write(KEY, d, Consistency::Local, 0).await {
                    Ok(done) => pending.push_back(done),
                    Err(e) => eprintln!("write failed: {e}"),
                }
                while pending.len() >= in_flight.max(1) {
                    if let Some(done) = pending.pop_front() {
                        if let Ok(Err(e)) = done.await {
                            eprintln!("write failed: {e}");
                        }
                    }
                }
            }
            for done in pending {
                if let Ok(Err(e)) = done.await {
                    eprintln!("write failed: {e}");
                }
            }
        }));
    }
    for w in writers {
        w.await?;
    }
    for o in observers {
        o.await?;
    }
    let issued = issued.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let arrived = arrived.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut lat = Vec::new();
    let mut one = Vec::new();
    let mut last = start;
    for (j, issued_j) in issued.iter().enumerate() {
        for (k, t0) in issued_j.iter().enumerate().take(per_node) {
            for (i, a) in arrived.iter().enumerate() {
                if let (true, Some(at)) = (i != j, a[j][k]) {
                    one.push(at.saturating_duration_since(*t0).as_secs_f64() * 1000.0);
                }
            }
            let all: Option<Instant> = arrived
                .iter()
                .map(|a| a[j][k])
                .try_fold(start, |m, a| a.map(|a| m.max(a)));
            if let Some(done) = all {
                lat.push(done.saturating_duration_since(*t0).as_secs_f64() * 1000.0);
                last = last.max(done);
            }
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    one.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let complete = lat.len();
    let mut bytes_after = 0;
    for h in &c.handles {
        bytes_after += h.stats().await?.bytes_sent;
    }
    let total = (per_node * n) as f64;
    if complete < per_node * n {
        eprintln!(
            "  only {complete} of {} writes reached every node within {DEADLINE:?}",
            per_node * n
        );
    }
    Ok(Pass {
        p50_ms: percentile(&lat, 0.5),
        one_p50_ms: percentile(&one, 0.5),
        p99_ms: percentile(&lat, 0.99),
        writes_per_sec: complete as f64 / last.duration_since(start).as_secs_f64().max(1e-9),
        bytes_per_write: (bytes_after - bytes_before) as f64 / (total * (n as f64 - 1.0)).max(1.0),
    })
}

async fn wait_all(c: &Cluster, kind: &str, want: usize) -> Res<()> {
    let origins: Vec<u64> = c.handles.iter().map(|h| h.replica()).collect();
    let started = Instant::now();
    loop {
        let mut ok = true;
        for h in &c.handles {
            let zero = vec![0; origins.len()];
            let counts = held(h, &origins, kind, &zero, &zero).await?;
            ok &= counts.iter().sum::<usize>() >= want;
        }
        if ok {
            return Ok(());
        }
        if started.elapsed() > DEADLINE {
            return Err("the cluster did not converge".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn case(n: usize, kind: &str, full: bool, args: &Args) -> Res<serde_json::Value> {
    let mode = if full { "full_state" } else { "delta" };
    let data = args
        .data_dir
        .as_ref()
        .map(|d| d.join(format!("{n}-{kind}-{mode}-{}", std::process::id())));
    let c = start(n, full, data.as_deref()).await?;
    // warm-up: one write per node, everywhere; then the pre-fill
    let mut base = vec![0usize; n];
    if kind == "orset" {
        let h = &c.handles[0];
        let mut k = 0;
        while k < args.prefill {
            let batch: Vec<_> = (k..(k + 500).min(args.prefill))
                .map(|x| element(0, x).to_any())
                .collect();
            k += batch.len();
            h.write(KEY, add(batch), Consistency::Local).await??;
        }
        base[0] = args.prefill;
        for (j, h) in c.handles.iter().enumerate().skip(1) {
            h.write(KEY, add(vec![element(j, 0).to_any()]), Consistency::Local)
                .await??;
            base[j] = 1;
        }
        wait_all(&c, kind, args.prefill + n - 1).await?;
    } else {
        for h in &c.handles {
            h.write(KEY, inc(), Consistency::Local).await??;
        }
        base = vec![1; n];
        wait_all(&c, kind, n).await?;
    }
    // full states of a 10k set are large: fewer writes in that mode
    let writes = if full && kind == "orset" {
        (args.writes / 50).max(n * 10)
    } else {
        args.writes
    };
    let throughput = pass(&c, kind, writes, None, &base, args.in_flight).await?;
    for (j, b) in base.iter_mut().enumerate() {
        *b += writes / n;
        let _ = j;
    }
    let paced_writes = ((args.rate * 5.0) as usize).min(writes).max(n * 10);
    let latency = pass(
        &c,
        kind,
        paced_writes,
        Some(args.rate),
        &base,
        args.in_flight,
    )
    .await?;
    if std::env::var("BENCH_DEBUG").is_ok() {
        for h in &c.handles {
            eprintln!("  {:?}", h.stats().await?);
        }
    }
    for node in c.nodes {
        node.shutdown().await;
    }
    let storage = if data.is_some() { "disk" } else { "memory" };
    println!(
        "{n:>2} nodes {kind:<7} {mode:<10} {storage:<6} {writes:>6} writes: {:>9.0} writes/s, {:>7.1} B/write/peer; at {} writes/s: p50 {:.2} ms, p99 {:.2} ms, to one node p50 {:.2} ms (saturated: p50 {:.1} ms, p99 {:.1} ms)",
        throughput.writes_per_sec, throughput.bytes_per_write, args.rate, latency.p50_ms, latency.p99_ms, latency.one_p50_ms, throughput.p50_ms, throughput.p99_ms
    );
    Ok(serde_json::json!({
        "nodes": n,
        "kind": kind,
        "mode": mode,
        "storage": storage,
        "in_flight": args.in_flight,
        "writes": writes,
        "writes_per_sec": throughput.writes_per_sec,
        "bytes_per_write": throughput.bytes_per_write,
        "rate": args.rate,
        "p50_ms": latency.p50_ms,
        "p99_ms": latency.p99_ms,
        "one_node_p50_ms": latency.one_p50_ms,
        "saturated_p50_ms": throughput.p50_ms,
        "saturated_p99_ms": throughput.p99_ms,
    }))
}

/// Size of the data file under `dir` (one node's), bytes.
fn file_size(dir: &std::path::Path) -> Res<u64> {
    Ok(std::fs::metadata(dir.join(latticed::store::disk::DATA_FILE))?.len())
}

/// The data file of one node as `keys` keys are written (GCounter +1 each), deleted, and as
/// many more written and deleted.
async fn growth(keys: usize, args: &Args) -> Res<serde_json::Value> {
    let tmp = tempfile::tempdir()?;
    let base = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let data = base.join(format!("growth-{}", std::process::id()));
    let c = start(1, false, Some(&data)).await?;
    let h = &c.handles[0];
    let dir = data.join("b0");
    let empty = file_size(&dir)?;
    let mut sizes = vec![("empty", empty)];
    for (round, labels) in [["written", "deleted"], ["written again", "deleted again"]]
        .into_iter()
        .enumerate()
    {
        let keys: Vec<String> = (0..keys).map(|i| format!("key-{round}-{i:08}")).collect();
        for (delete, label) in [(false, labels[0]), (true, labels[1])] {
            // many writes in flight at once, as many clients would
            for chunk in keys.chunks(256) {
                let mut done = Vec::new();
                for k in chunk {
                    done.push(if delete {
                        h.submit_delete(k, Consistency::Local, 0).await?
                    } else {
                        h.submit_write(k, inc(), Consistency::Local, 0).await?
                    });
                }
                for d in done {
                    d.await??;
                }
            }
            sizes.push((label, file_size(&dir)?));
        }
    }
    for node in c.nodes {
        node.shutdown().await;
    }
    for (what, size) in &sizes {
        println!(
            "growth, {keys} keys: {what:<14} {size:>12} bytes ({:.0} B/key over empty)",
            (*size as f64 - empty as f64) / keys as f64
        );
    }
    Ok(serde_json::json!({
        "growth_keys": keys,
        "sizes": sizes.iter().map(|(w, s)| serde_json::json!({"after": w, "bytes": s})).collect::<Vec<_>>(),
    }))
}

fn main() -> Res<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut cases = Vec::new();
    if let Some(keys) = args.growth {
        cases.push(rt.block_on(growth(keys, &args))?);
        if let Some(path) = &args.json {
            std::fs::write(
                path,
                serde_json::to_string_pretty(&serde_json::json!({"cases": cases}))?,
            )?;
        }
        return Ok(());
    }
    rt.block_on(async {
        for n in &args.nodes {
            for kind in &args.kinds {
                for mode in &args.modes {
                    cases.push(case(*n, kind, mode == "full_state", &args).await?);
                }
            }
        }
        Res::Ok(())
    })?;
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&serde_json::json!({"cases": cases}))?,
        )?;
    }
    Ok(())
}
