//! The replication driver: runs a [`Replicator`] over the QUIC transport, and the API the
//! entity runtime uses.
//!
//! One task owns the replicator. It feeds it stream frames (naming each stream by its hello,
//! which must name the node the peer's certificate names, and forgetting streams that end),
//! membership changes and ticks every `batch_window`, sends its frames, completes writes, wakes
//! subscribers of changed keys (and drops watchers nobody follows), keeps the node's readiness
//! and exports metrics. Other modules talk to it through a [`ReplicationHandle`]:
//! - [`ReplicationHandle::write`]: apply a user function's delta to a key with a write
//!   consistency, and wait for the outcome;
//! - [`ReplicationHandle::delete`]: delete a key for good;
//! - [`ReplicationHandle::read`]: the key's current entry;
//! - [`ReplicationHandle::subscribe`]: a receiver that changes whenever the key does;
//! - [`ReplicationHandle::flush`]: send pending deltas now and wait for their acks;
//! - [`ReplicationHandle::close`]: record a clean shutdown in the data file.
//!
//! With a data file (`--data-dir`), **nothing that says "done" leaves the node before it is
//! committed**: every key the replicator reports changed (or forgotten) joins the batch being
//! gathered, and the acks and write completions of that input are held until the batch holding
//! those changes (and every earlier one) is committed. So no peer gets an ack for a joined
//! delta and no client gets a reply (LOCAL, MAJORITY or ALL) for a change this node could
//! still lose in a crash. Deltas, full states and digests leave at once, before their commit:
//! a node whose previous life did not end cleanly takes a fresh replica id at start
//! ([`crate::store::disk`]), so it never issues again a dot or a counter value it may have
//! sent and not kept; what peers got of its old life stays theirs, and comes back to it by
//! anti-entropy. A write is therefore seen on other nodes without waiting for this node's disk.
//! Group commit: one batch commits on the committer thread ([`crate::store::committer`]) while
//! the next gathers; a quiet node commits each write at once. Reads and change notices to
//! local subscribers are not held (they never leave the node by themselves; a client's reply
//! is what is held). The replicator stays sans-IO: it never knows about the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use latticed_crdt::{Footprint, ReplicaId};
use latticed_membership::{MemberState, MemberView};
use latticed_proto::cloudstate::crdt::CrdtDelta;
use latticed_proto::latticed::peer as pb;
use tokio::sync::{mpsc, oneshot, watch};

use super::frame::{self, Rejection};
use super::replicator::{
    Consistency, Identity, PeerInfo, ReplicationConfig, Replicator, WriteError, WriteId,
};
use crate::metrics as m;
use crate::store::committer::{Committed, Committer, Done};
use crate::store::{Batch, Entry, Persistence};
use crate::transport::{InboundFrame, Transport};

enum Command {
    Write {
        key: String,
        delta: Box<CrdtDelta>,
        consistency: Consistency,
        writer: Writer,
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    Delete {
        key: String,
        consistency: Consistency,
        writer: Writer,
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    Read {
        key: String,
        part: Footprint,
        reply: oneshot::Sender<Option<Entry>>,
    },
    Page {
        after: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Vec<(String, Entry)>>,
    },
    Inspect {
        key: String,
        f: Inspector,
    },
    Stats {
        reply: oneshot::Sender<super::replicator::Stats>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Who made a local write, so that its own change notice can be told apart (0: nobody in
/// particular).
pub type Writer = u64;

/// How many recent changes a key's [`KeyChanges`] remembers the footprints of; a subscriber
/// further behind compares the whole value.
const RECENT_CHANGES: usize = 16;

/// What a key's subscribers see: a count of its changes, who made the latest run of them, and
/// what the recent ones touched. A subscriber that last saw `changes = n` and now sees `m`
/// knows that the `m - n` changes since were all its own when `last_writer` is its own token
/// and `writer_run >= m - n`, and that they touched [`KeyChanges::footprint_since`]`(n)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyChanges {
    /// changes of the key since it was first watched
    pub changes: u64,
    /// the local writer of the latest change (0: a peer, or an anonymous write)
    pub last_writer: Writer,
    /// how many changes in a row, up to the latest, `last_writer` made
    pub writer_run: u64,
    /// the footprints of the latest changes (at most [`RECENT_CHANGES`]), newest last
    recent: VecDeque<Footprint>,
}

impl KeyChanges {
    /// Whether the changes after `seen` were all made by `me` (a nonzero writer).
    pub fn only_by(&self, me: Writer, seen: u64) -> bool {
        me != 0 && self.last_writer == me && self.writer_run >= self.changes.saturating_sub(seen)
    }

    /// What the changes after `seen` can have touched (the whole value when they are more
    /// than this remembers).
    pub fn footprint_since(&self, seen: u64) -> Footprint {
        let missed = self.changes.saturating_sub(seen);
        let Ok(missed) = usize::try_from(missed) else {
            return Footprint::All;
        };
        if missed > self.recent.len() {
            return Footprint::All;
        }
        let mut fp = Footprint::none();
        for f in self.recent.iter().skip(self.recent.len() - missed) {
            fp.union(f);
        }
        fp
    }

    fn record(&mut self, writer: Writer, footprint: Footprint) {
        self.changes += 1;
        if writer != 0 && writer == self.last_writer {
            self.writer_run += 1;
        } else {
            self.last_writer = writer;
            self.writer_run = u64::from(writer != 0);
        }
        if self.recent.len() == RECENT_CHANGES {
            self.recent.pop_front();
        }
        self.recent.push_back(footprint);
    }
}

/// A function run on a key's entry inside the replication task (no copy of the value).
pub type Inspector = Box<dyn FnOnce(Option<&Entry>) + Send>;

/// Why a request could not be served at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// the replication task is gone (the node is shutting down)
    #[error("replication is stopped")]
    Stopped,
}

/// Tells when a queued write reached its consistency (or why not); closed if replication
/// stopped first.
pub type WriteCompletion = oneshot::Receiver<Result<(), WriteError>>;

/// A cheap, cloneable handle to the replication task.
#[derive(Clone)]
pub struct ReplicationHandle {
    tx: mpsc::Sender<Command>,
    live: watch::Receiver<BTreeSet<ReplicaId>>,
    watchers: Arc<Mutex<HashMap<String, watch::Sender<KeyChanges>>>>,
    synced: Arc<AtomicBool>,
    replica: ReplicaId,
}

impl ReplicationHandle {
    /// This node's replica id.
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// The replica ids of the members that are up now, this node's included (what votes are
    /// tallied over); changes whenever membership does.
    pub fn live_replicas(&self) -> watch::Receiver<BTreeSet<ReplicaId>> {
        self.live.clone()
    }

    /// Whether the first complete sync with a peer is done (or there is no peer).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Applies a user function's delta to `key` as an operation of this node, and waits until
    /// `consistency` is reached (or fails).
    pub async fn write(
        &self,
        key: &str,
        delta: CrdtDelta,
        consistency: Consistency,
    ) -> Result<Result<(), WriteError>, HandleError> {
        let done = self.submit_write(key, delta, consistency, 0).await?;
        done.await.map_err(|_| HandleError::Stopped)
    }

    /// Queues a write (applied locally before any later request of this handle is served) and
    /// returns at once with what tells when `consistency` is reached (or failed): the caller
    /// goes on while replicas ack. The key's subscribers see the change as `writer`'s.
    pub async fn submit_write(
        &self,
        key: &str,
        delta: CrdtDelta,
        consistency: Consistency,
        writer: Writer,
    ) -> Result<WriteCompletion, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Write {
                key: key.to_string(),
                delta: Box::new(delta),
                consistency,
                writer,
                reply,
            })
            .await
            .map_err(|_| HandleError::Stopped)?;
        Ok(rx)
    }

    /// Deletes `key` for good, waiting until `consistency` is reached (or fails).
    pub async fn delete(
        &self,
        key: &str,
        consistency: Consistency,
    ) -> Result<Result<(), WriteError>, HandleError> {
        let done = self.submit_delete(key, consistency, 0).await?;
        done.await.map_err(|_| HandleError::Stopped)
    }

    /// Queues a delete, as [`ReplicationHandle::submit_write`] queues a write.
    pub async fn submit_delete(
        &self,
        key: &str,
        consistency: Consistency,
        writer: Writer,
    ) -> Result<WriteCompletion, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Delete {
                key: key.to_string(),
                consistency,
                writer,
                reply,
            })
            .await
            .map_err(|_| HandleError::Stopped)?;
        Ok(rx)
    }

    /// The entry under `key` (a copy).
    pub async fn read(&self, key: &str) -> Result<Option<Entry>, HandleError> {
        self.read_part(key, Footprint::All).await
    }

    /// The part of the entry under `key` within `part` (see [`Entry::part`]): what a change
    /// with that footprint can have touched, copied in O(size of the part).
    pub async fn read_part(
        &self,
        key: &str,
        part: Footprint,
    ) -> Result<Option<Entry>, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Read {
                key: key.to_string(),
                part,
                reply,
            })
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Up to `limit` keys after `after`, in key order.
    pub async fn page(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(String, Entry)>, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Page {
                after,
                limit,
                reply,
            })
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Runs `f` on `key`'s entry inside the replication task, without copying the value (for
    /// monitoring and benchmarks: keep `f` short, it holds up replication).
    pub async fn inspect(&self, key: &str, f: Inspector) -> Result<(), HandleError> {
        self.tx
            .send(Command::Inspect {
                key: key.to_string(),
                f,
            })
            .await
            .map_err(|_| HandleError::Stopped)
    }

    /// Sends every pending delta to the peers now, and waits until every up peer acked them
    /// (bound the wait: a peer may never answer). For an orderly shutdown.
    pub async fn flush(&self) -> Result<(), HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush { reply })
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Records in the data file that this life ends cleanly, once what is pending is committed
    /// (the last step of an orderly shutdown; at once without a data file).
    pub async fn close(&self) -> Result<(), HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Close { reply })
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// The replication counters.
    pub async fn stats(&self) -> Result<super::replicator::Stats, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Stats { reply })
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// How many keys have a watcher (keys some subscriber follows, give or take 250 ms).
    pub fn watched_keys(&self) -> usize {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// A receiver whose value changes whenever `key` changes (locally or from a peer), saying
    /// who wrote last (see [`KeyChanges`]).
    pub fn subscribe(&self, key: &str) -> watch::Receiver<KeyChanges> {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(key.to_string())
            .or_insert_with(|| watch::channel(KeyChanges::default()).0)
            .subscribe()
    }
}

/// The running replication task.
pub struct Replication {
    handle: ReplicationHandle,
}

struct Driver {
    replicator: Replicator,
    transport: Transport,
    watchers: Arc<Mutex<HashMap<String, watch::Sender<KeyChanges>>>>,
    /// the key and local writer of the write being handled (its change notice names it)
    writer: Option<(String, Writer)>,
    synced: Arc<AtomicBool>,
    /// configured without peers
    alone: bool,
    /// peer name -> address, from membership
    addrs: BTreeMap<String, SocketAddr>,
    /// stream -> the peer name its hello gave, and the hello
    streams: HashMap<u64, (String, bytes::Bytes)>,
    /// peers that are up
    up: BTreeSet<String>,
    live: watch::Sender<BTreeSet<ReplicaId>>,
    waiting: HashMap<WriteId, oneshot::Sender<Result<(), WriteError>>>,
    /// flushes waiting for every up peer to ack everything
    flushing: Vec<oneshot::Sender<()>>,
    reported: super::replicator::Stats,
    /// the data file's batches and what waits for them (`None`: memory only)
    commits: Option<Commits>,
}

/// How long a node with a data file goes without a commit: an idle node still records that it
/// is alive (the data file's `alive_at`, checked against `--tombstone-ttl` at the next start).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Group commit: the batch being gathered, the one committing, and the output held for them.
struct Commits {
    committer: Committer,
    /// keys changed (or forgotten) since the last batch was handed over
    dirty: BTreeSet<String>,
    /// number of the batch being gathered
    open: u64,
    /// the batch committing now
    in_flight: Option<u64>,
    /// every batch up to this one is committed
    committed: u64,
    /// outputs waiting for their batch, oldest first
    held: VecDeque<Held>,
    last_commit: Instant,
    /// the earliest time the next batch may be handed over (`None`: at once): batches keep
    /// to a schedule of one per `gap`, see [`Commits::handed_over`]
    slot: Option<Instant>,
    /// the batch window: a busy node hands over one batch per window, so that one
    /// transaction and fsync carry more changes; a quiet node's change goes at once
    gap: Duration,
    /// keys whose delta logs in the data file are full: the next batch changing one carries
    /// its whole value (a compaction from memory; at most one entry per key in the store, and
    /// each leaves with its key's next batch)
    full_logs: HashSet<String>,
}

/// Acks and completions that may leave once batch `after` is committed.
struct Held {
    after: u64,
    /// ack frames
    frames: Vec<(String, Vec<u8>)>,
    completed: Vec<(WriteId, Result<(), WriteError>)>,
}

impl Commits {
    fn new(committer: Committer, gap: Duration) -> Commits {
        Commits {
            committer,
            dirty: BTreeSet::new(),
            open: 1,
            in_flight: None,
            committed: 0,
            held: VecDeque::new(),
            last_commit: Instant::now(),
            slot: None,
            gap,
            full_logs: HashSet::new(),
        }
    }

    /// Notes an output's changed keys; returns the batch its frames and completions must wait
    /// for, or `None` if they may go now.
    fn gate<'a>(
        &mut self,
        changed: impl IntoIterator<Item = &'a String>,
        forgotten: &[String],
    ) -> Option<u64> {
        self.dirty.extend(changed.into_iter().cloned());
        self.dirty.extend(forgotten.iter().cloned());
        let after = if self.dirty.is_empty() {
            self.open - 1
        } else {
            self.open
        };
        (after > self.committed || !self.held.is_empty()).then_some(after)
    }

    /// The gathered batch, taken out to be committed, unless one is committing or the last
    /// one was handed over less than `gap` ago (`heartbeat`: even an empty one, at once).
    fn next_batch(
        &mut self,
        now: Instant,
        replicator: &mut Replicator,
        heartbeat: bool,
    ) -> Option<Batch> {
        if self.in_flight.is_some() || (self.dirty.is_empty() && !heartbeat) {
            return None;
        }
        if !heartbeat && self.gathering_until().is_some_and(|t| now < t) {
            return None;
        }
        self.handed_over(now);
        Some(self.take_batch(replicator))
    }

    /// Moves the schedule on past a batch handed over at `now`. Slots are one window apart
    /// and a batch handed over late (the driver wakes on a timer of millisecond resolution,
    /// so up to a millisecond after its slot) does not push the next slot back: busy, the
    /// node makes one transaction and fsync per window on average, not one per window plus
    /// the timer's lateness. The catch-up is at most half a window, so two batches are never
    /// less than half a window apart, and after a quiet spell the schedule starts again.
    fn handed_over(&mut self, now: Instant) {
        let earliest = now.checked_sub(self.gap / 2).unwrap_or(now);
        let base = self.slot.map_or(now, |s| s.max(earliest));
        self.slot = Some(base + self.gap);
    }

    /// Until when the gathered changes wait for their slot (`None`: nothing waits for it).
    fn gathering_until(&self) -> Option<Instant> {
        if self.dirty.is_empty() || self.in_flight.is_some() {
            return None;
        }
        self.slot
    }

    /// What is gathered, taken out even while a batch commits (the committer commits batches
    /// in order): before the clean end is recorded every change this node made, and may have
    /// sent, must be in the file, or its next life would reuse a replica id whose dots the
    /// file lacks.
    fn last_batch(&mut self, replicator: &mut Replicator) -> Option<Batch> {
        (!self.dirty.is_empty()).then(|| self.take_batch(replicator))
    }

    fn take_batch(&mut self, replicator: &mut Replicator) -> Batch {
        let mut batch = Batch::new(self.open, now_ms());
        for key in std::mem::take(&mut self.dirty) {
            let change = if self.full_logs.remove(&key) {
                replicator.take_whole(&key)
            } else {
                replicator.take_change(&key)
            };
            batch.put(key, change);
        }
        self.in_flight = Some(self.open);
        self.open += 1;
        batch
    }

    /// Notes a committed batch; returns the outputs that waited for it.
    fn committed(&mut self, done: Done) -> Vec<Held> {
        let n = done.number;
        self.committed = n;
        self.full_logs.extend(done.full_logs);
        self.in_flight = None;
        self.last_commit = Instant::now();
        let ready = self.held.iter().take_while(|h| h.after <= n).count();
        self.held.drain(..ready).collect()
    }

    /// Whether nothing is gathered, committing or held.
    fn is_idle(&self) -> bool {
        self.dirty.is_empty() && self.in_flight.is_none() && self.held.is_empty()
    }
}

/// The next committed batch number, or never without a data file.
async fn next_commit(rx: &mut Option<Committed>) -> Option<Done> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Replication {
    /// Starts the replication task for the node `identity` names; `seed` (random per process)
    /// seeds its random choices. A node that is `alone` by design (no peers configured) is
    /// synced while it knows no peer; any other, and one that learns of a peer, is synced after
    /// its first complete anti-entropy round with a peer. With `persistence`, the store starts
    /// from what the data file held and every change is committed to it before it leaves the
    /// node.
    #[allow(clippy::too_many_arguments)] // the node's wiring, called once
    pub fn start(
        identity: Identity,
        seed: u64,
        alone: bool,
        config: ReplicationConfig,
        transport: Transport,
        frames: mpsc::Receiver<InboundFrame>,
        members: watch::Receiver<Vec<MemberView>>,
        persistence: Option<Persistence>,
    ) -> Replication {
        let replica = identity.replica;
        let config = ReplicationConfig {
            acks_wait_for_commit: persistence.is_some(),
            ..config
        };
        let mut replicator = Replicator::new(identity, config.clone(), seed);
        let (commits, committed) = match persistence {
            Some(p) => {
                replicator.restore(Instant::now(), now_ms(), p.records);
                let (committer, committed) = Committer::start(p.durable, p.on_fatal);
                (
                    Some(Commits::new(committer, config.batch_window)),
                    Some(committed),
                )
            }
            None => (None, None),
        };
        transport.set_stream_hello(replicator.hello());
        let (tx, rx) = mpsc::channel(1024);
        let watchers = Arc::new(Mutex::new(HashMap::new()));
        let synced = Arc::new(AtomicBool::new(alone));
        let (live_tx, live) = watch::channel(BTreeSet::from([replica]));
        let tick = config.batch_window.max(Duration::from_millis(1));
        // the coarse deadlines a tick checks, each kept within a fraction of its period
        let idle_tick = super::replicator::IDLE_TICK
            .min(config.anti_entropy_interval / 4)
            .min(config.resend_after / 4)
            .max(tick);
        let driver = Driver {
            writer: None,
            replicator,
            transport,
            watchers: watchers.clone(),
            synced: synced.clone(),
            alone,
            addrs: BTreeMap::new(),
            streams: HashMap::new(),
            up: BTreeSet::new(),
            live: live_tx,
            waiting: HashMap::new(),
            flushing: Vec::new(),
            reported: Default::default(),
            commits,
        };
        tokio::spawn(driver.run(rx, frames, members, committed, (tick, idle_tick)));
        Replication {
            handle: ReplicationHandle {
                tx,
                live,
                watchers,
                synced,
                replica,
            },
        }
    }

    /// A handle for other modules.
    pub fn handle(&self) -> ReplicationHandle {
        self.handle.clone()
    }
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut frames: mpsc::Receiver<InboundFrame>,
        mut members: watch::Receiver<Vec<MemberView>>,
        mut committed: Option<Committed>,
        (tick, idle_tick): (Duration, Duration),
    ) {
        // the tick comes every batch window while something waits for it, else every
        // `idle_tick`: an idle node does not wake 500 times a second
        let ticker = tokio::time::sleep(tick);
        tokio::pin!(ticker);
        let mut report = tokio::time::interval(Duration::from_millis(250));
        self.on_members(&members.borrow_and_update().clone());
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                Some(f) = frames.recv() => self.on_frame(f),
                changed = members.changed() => {
                    if changed.is_err() { return; }
                    let view = members.borrow_and_update().clone();
                    self.on_members(&view);
                }
                () = &mut ticker => {
                    self.replicator.tick(Instant::now());
                    ticker.as_mut().reset(tokio::time::Instant::now() + idle_tick);
                }
                _ = report.tick() => self.report(),
                n = next_commit(&mut committed) => match n {
                    Some(n) => self.on_committed(n),
                    // the commit thread stopped: its fatal handler ends the process
                    None => return,
                },
            }
            self.flush();
            // wake for the batch window while deltas wait for it, and when the gathered
            // changes may go to the committer
            let mut wake = self
                .replicator
                .wants_batch_tick()
                .then(|| Instant::now() + tick);
            if let Some(t) = self.commits.as_ref().and_then(Commits::gathering_until) {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            if let Some(at) = wake.map(tokio::time::Instant::from_std) {
                if ticker.deadline() > at {
                    ticker.as_mut().reset(at);
                }
            }
        }
    }

    fn on_members(&mut self, view: &[MemberView]) {
        self.addrs.clear();
        let mut infos = Vec::new();
        for m in view.iter().skip(1) {
            self.addrs.insert(m.id.name.clone(), m.id.addr);
            infos.push(PeerInfo {
                name: m.id.name.clone(),
                state: m.state,
                incarnation: m.id.incarnation,
            });
        }
        infos.retain(|p| p.state != MemberState::Left || self.addrs.contains_key(&p.name));
        let up: BTreeSet<String> = infos
            .iter()
            .filter(|p| p.state == MemberState::Up)
            .map(|p| p.name.clone())
            .collect();
        // (the replicator greets every peer that came up with its hello)
        self.up = up;
        self.replicator.set_members(&infos);
        self.publish_live();
    }

    fn on_command(&mut self, c: Command) {
        let now = Instant::now();
        match c {
            Command::Write {
                key,
                delta,
                consistency,
                writer,
                reply,
            } => match self
                .replicator
                .write(now, now_ms(), &key, &delta, consistency)
            {
                Ok((id, _)) => {
                    self.waiting.insert(id, reply);
                    self.writer = Some((key, writer));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Delete {
                key,
                consistency,
                writer,
                reply,
            } => {
                let id = self.replicator.delete(now, &key, consistency);
                self.waiting.insert(id, reply);
                self.writer = Some((key, writer));
            }
            Command::Read { key, part, reply } => {
                let _ = reply.send(self.replicator.store().get(&key).map(|e| e.part(&part)));
            }
            Command::Page {
                after,
                limit,
                reply,
            } => {
                let page = self
                    .replicator
                    .store()
                    .page(after.as_deref(), limit)
                    .into_iter()
                    .map(|(k, e)| (k.clone(), e.clone()))
                    .collect();
                let _ = reply.send(page);
            }
            Command::Inspect { key, f } => f(self.replicator.store().get(&key)),
            Command::Stats { reply } => {
                let _ = reply.send(self.replicator.stats().clone());
            }
            Command::Flush { reply } => {
                self.replicator.flush(now);
                self.flushing.push(reply);
            }
            Command::Close { reply } => {
                self.submit_last_batch();
                match &self.commits {
                    Some(c) => {
                        let done = c.committer.close(now_ms());
                        tokio::spawn(async move {
                            let _ = done.await;
                            let _ = reply.send(());
                        });
                    }
                    None => {
                        let _ = reply.send(());
                    }
                }
            }
        }
    }

    /// A batch is on disk: what waited for it leaves.
    fn on_committed(&mut self, done: Done) {
        let Some(c) = &mut self.commits else { return };
        for h in c.committed(done) {
            self.release(h.frames, h.completed);
        }
    }

    /// Hands the gathered batch to the committer, unless one is committing (`heartbeat`: even
    /// an empty one).
    fn submit_batch(&mut self, heartbeat: bool) {
        let Some(c) = &mut self.commits else { return };
        if let Some(batch) = c.next_batch(Instant::now(), &mut self.replicator, heartbeat) {
            // a stopped committer already called its fatal handler
            c.committer.submit(batch);
        }
    }

    /// Hands what is gathered to the committer now, even while a batch commits (before the
    /// clean end is recorded: see [`Commits::last_batch`]).
    fn submit_last_batch(&mut self) {
        let Some(c) = &mut self.commits else { return };
        if let Some(batch) = c.last_batch(&mut self.replicator) {
            c.committer.submit(batch);
        }
    }

    /// Sends frames and completes writes.
    fn release(
        &mut self,
        frames: Vec<(String, Vec<u8>)>,
        completed: Vec<(WriteId, Result<(), WriteError>)>,
    ) {
        for (to, body) in frames {
            match self.addrs.get(&to) {
                Some(addr) => self.transport.send_frame(*addr, body),
                None => tracing::debug!(peer = %to, "no address for peer; frame dropped"),
            }
        }
        for (id, result) in completed {
            if let Some(reply) = self.waiting.remove(&id) {
                let _ = reply.send(result);
            }
        }
    }

    fn on_frame(&mut self, f: InboundFrame) {
        if f.end {
            self.streams.remove(&f.stream);
            metrics::gauge!(m::REPLICATION_STREAMS, "direction" => "in")
                .set(self.streams.len() as f64);
            return;
        }
        // The first frame of a stream is its hello, which names the peer; a peer that passed
        // the mutual-TLS handshake is a cluster member even before SWIM reports it. Every later
        // hello on the stream must name the same node.
        let decoded = frame::decode(&f.body);
        let hello_name = match &decoded {
            Ok(pb::Frame {
                kind: Some(pb::frame::Kind::Hello(h)),
            }) => Some(h.node_name.clone()),
            _ => None,
        };
        let is_hello = hello_name.is_some();
        let name = match (self.streams.get(&f.stream), hello_name) {
            (Some((name, _)), Some(h)) if *name != h => {
                self.rejected(Rejection::Sender);
                tracing::debug!(peer = %name, claimed = %h, "a stream's hello names another node; dropped");
                return;
            }
            (Some((name, _)), _) => name.clone(),
            (None, Some(h)) => {
                // the hello speaks for the node its certificate names, and no other
                if !f
                    .peer_cert
                    .as_deref()
                    .is_some_and(|c| crate::certs::certifies(c, &h))
                {
                    self.rejected(Rejection::Identity);
                    tracing::warn!(claimed = %h, addr = %f.from,
                        "a peer's hello names a node its certificate does not; stream ignored");
                    return;
                }
                tracing::debug!(peer = %h, addr = %f.from, "replication stream open");
                self.streams.insert(f.stream, (h.clone(), f.body.clone()));
                metrics::gauge!(m::REPLICATION_STREAMS, "direction" => "in")
                    .set(self.streams.len() as f64);
                h
            }
            (None, None) => {
                self.rejected(Rejection::Malformed);
                tracing::debug!(addr = %f.from, "stream does not open with a hello; frame dropped");
                return;
            }
        };
        let now = Instant::now();
        // rejections are counted by the replicator and exported by `report`
        let mut result = self
            .replicator
            .handle_decoded(now, &name, f.body.len(), decoded);
        if result == Err(Rejection::UnknownPeer) {
            // the replicator forgot the peer (membership removed it) while its stream stayed
            // open: the stream's hello names it again
            if let Some((_, hello)) = self.streams.get(&f.stream) {
                let hello = hello.clone();
                if self.replicator.handle_frame(now, &name, &hello).is_ok() {
                    result = self.replicator.handle_frame(now, &name, &f.body);
                }
            }
        }
        match result {
            Err(Rejection::Version) => tracing::warn!(peer = %name, addr = %f.from,
                "peer speaks no replication protocol version this node speaks; its frames are dropped"),
            Err(r) => {
                tracing::debug!(peer = %name, reason = r.label(), "dropped a replication frame")
            }
            Ok(()) => {}
        }
        if is_hello {
            self.publish_live();
        }
    }

    fn publish_live(&self) {
        let mut live: BTreeSet<ReplicaId> = self
            .up
            .iter()
            .filter_map(|n| self.replicator.peer_replica(n))
            .collect();
        live.insert(self.replicator.replica());
        self.live.send_if_modified(|cur| {
            if *cur != live {
                *cur = live;
                true
            } else {
                false
            }
        });
    }

    fn rejected(&self, r: Rejection) {
        metrics::counter!(m::REJECTED_FRAMES, "reason" => r.label()).increment(1);
    }

    fn flush(&mut self) {
        let mut out = self.replicator.take_output();
        let frames = std::mem::take(&mut out.frames);
        let acks = std::mem::take(&mut out.acks);
        let completed = std::mem::take(&mut out.completed);
        let gate = match &mut self.commits {
            None => None,
            Some(c) => c.gate(out.changed.iter().map(|(k, _)| k), &out.forgotten),
        };
        // deltas, states and digests leave at once, committed or not: after an unclean stop
        // the node takes a fresh replica id, so nothing it sent and lost is ever issued again.
        // What says "done" waits for the commit: acks (MAJORITY / ALL count them) and write
        // completions (the client's reply).
        self.release(frames, Vec::new());
        match (gate, &mut self.commits) {
            (Some(after), Some(c)) => {
                if !acks.is_empty() || !completed.is_empty() {
                    c.held.push_back(Held {
                        after,
                        frames: acks,
                        completed,
                    });
                }
            }
            _ => self.release(acks, completed),
        }
        self.submit_batch(false);
        let writer = self.writer.take();
        if !out.changed.is_empty() {
            let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            for (k, footprint) in out.changed {
                if let Some(tx) = w.get(&k) {
                    let by = match &writer {
                        Some((key, writer)) if *key == k => *writer,
                        _ => 0,
                    };
                    tx.send_modify(|c| c.record(by, footprint));
                }
            }
        }
        for l in out.ack_latencies {
            metrics::histogram!(m::REPLICATION_ACK_SECONDS).record(l.as_secs_f64());
        }
        if !self.flushing.is_empty()
            && self.replicator.is_quiet()
            && self.commits.as_ref().is_none_or(Commits::is_idle)
        {
            for reply in self.flushing.drain(..) {
                let _ = reply.send(());
            }
        }
        // a node alone by design is ready while it has no peer; one that has peers (or learns
        // of any: a restarted seed without --join) is ready after its first sync with one
        let synced = self.replicator.has_synced() || (self.alone && self.replicator.is_synced());
        let was = self.synced.swap(synced, Ordering::Relaxed);
        if synced != was {
            match (synced, self.replicator.has_synced()) {
                (true, true) => tracing::info!("first sync complete"),
                (true, false) => tracing::info!("alone again: ready"),
                (false, _) => tracing::info!("peers known: not ready until a first sync with one"),
            }
        }
    }

    fn report(&mut self) {
        let s = self.replicator.stats().clone();
        let r = &self.reported;
        metrics::counter!(m::DELTAS_SENT).increment(s.deltas_sent - r.deltas_sent);
        metrics::counter!(m::DELTAS_RECEIVED).increment(s.deltas_received - r.deltas_received);
        metrics::counter!(m::REPLICATION_BYTES_SENT).increment(s.bytes_sent - r.bytes_sent);
        metrics::counter!(m::REPLICATION_BYTES_RECEIVED)
            .increment(s.bytes_received - r.bytes_received);
        metrics::counter!(m::FULL_SYNCS).increment(s.full_syncs - r.full_syncs);
        metrics::counter!(m::ANTI_ENTROPY_ROUNDS)
            .increment(s.anti_entropy_rounds - r.anti_entropy_rounds);
        metrics::counter!(m::WRITE_CONSISTENCY_FAILURES)
            .increment(s.consistency_failures - r.consistency_failures);
        for (reason, n) in &s.rejected {
            let before = r.rejected.get(reason).copied().unwrap_or(0);
            metrics::counter!(m::REJECTED_FRAMES, "reason" => *reason).increment(n - before);
        }
        metrics::gauge!(m::KEYS).set(self.replicator.store().len() as f64);
        // a key's watcher goes once no subscriber is left (subscribing holds the lock, so a
        // new watcher always has its receiver)
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, tx| tx.receiver_count() > 0);
        metrics::gauge!(m::DELTA_BUFFER_BYTES).set(self.replicator.buffer_bytes() as f64);
        self.reported = s;
        if self
            .commits
            .as_ref()
            .is_some_and(|c| c.is_idle() && c.last_commit.elapsed() >= HEARTBEAT)
        {
            self.submit_batch(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Commits, Held, KeyChanges, RECENT_CHANGES};
    use latticed_crdt::{Element, Footprint};

    fn some() -> Footprint {
        Footprint::none()
    }

    fn elements(names: &[&str]) -> Footprint {
        Footprint::Elements(names.iter().map(|n| Element::string(n)).collect())
    }

    fn commits() -> Commits {
        let (committer, _) =
            crate::store::committer::Committer::start(Box::new(Never), Box::new(|_| {}));
        Commits::new(committer, std::time::Duration::from_millis(2))
    }

    /// A store that never commits: these tests drive the numbers by hand.
    struct Never;
    impl crate::store::Durable for Never {
        fn commit(
            &mut self,
            _: &crate::store::Batch,
        ) -> Result<Vec<String>, crate::store::disk::DiskError> {
            Ok(Vec::new())
        }
        fn close(&mut self, _: i64) -> Result<(), crate::store::disk::DiskError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "never".into()
        }
    }

    /// A replicator, and a GCounter increment to write with it.
    fn replicator_and_increment() -> (
        crate::replication::Replicator,
        latticed_proto::cloudstate::crdt::CrdtDelta,
    ) {
        use crate::replication::{Identity, ReplicationConfig, Replicator};
        use latticed_proto::cloudstate::crdt::{crdt_delta::Delta, CrdtDelta, GCounterDelta};
        let identity = Identity {
            name: "n1".into(),
            replica: 1,
            epoch: 1,
        };
        let r = Replicator::new(identity, ReplicationConfig::default(), 1);
        let inc = CrdtDelta {
            delta: Some(Delta::Gcounter(GCounterDelta { increment: 1 })),
        };
        (r, inc)
    }

    /// Group commit: a quiet node's change is handed over at once; under load batches keep
    /// to one per batch window (one transaction and fsync per window), and the driver is told
    /// when the gathered changes may go.
    #[test]
    fn batches_are_a_batch_window_apart_and_a_quiet_change_goes_at_once() {
        use crate::replication::{Consistency, Replicator};
        use std::time::Duration;
        let (mut r, inc) = replicator_and_increment();
        let mut c = commits();
        let t0 = std::time::Instant::now();
        let write = |c: &mut Commits, r: &mut Replicator, key: &str| {
            r.write(t0, 0, key, &inc, Consistency::Local).unwrap();
            c.gate(&[key.to_string()], &[]);
        };
        assert_eq!(c.gathering_until(), None, "nothing gathered");
        write(&mut c, &mut r, "a");
        let first = c
            .next_batch(t0, &mut r, false)
            .expect("a quiet change goes at once");
        c.committed = first.number;
        c.in_flight = None;
        write(&mut c, &mut r, "b");
        let until = t0 + c.gap;
        assert_eq!(c.gathering_until(), Some(until));
        assert!(
            c.next_batch(t0 + Duration::from_micros(500), &mut r, false)
                .is_none(),
            "within the window: gathers"
        );
        write(&mut c, &mut r, "c");
        let second = c
            .next_batch(until, &mut r, false)
            .expect("the window passed");
        assert_eq!(second.puts.len(), 2, "both changes in one batch");
        c.committed = second.number;
        c.in_flight = None;
        // a heartbeat goes whatever the window
        assert!(c.next_batch(until, &mut r, true).is_some());
        c.in_flight = None;
        // a change long after the last batch goes at once
        write(&mut c, &mut r, "d");
        let later = until + Duration::from_secs(1);
        assert!(c.next_batch(later, &mut r, false).is_some());
    }

    /// Handed over late (the driver's timer has millisecond resolution), a batch does not
    /// push the schedule back: busy, a node commits once per window on average, and never
    /// twice within half a window.
    #[test]
    fn a_late_batch_keeps_the_schedule_of_one_per_window() {
        use crate::replication::Consistency;
        use std::time::Duration;
        let (mut r, inc) = replicator_and_increment();
        let mut c = commits();
        let gap = c.gap;
        let late = Duration::from_micros(900);
        let t0 = std::time::Instant::now();
        let mut starts = Vec::new();
        let mut now = t0;
        for i in 0..50 {
            r.write(now, 0, "k", &inc, Consistency::Local).unwrap();
            c.gate(&["k".to_string()], &[]);
            let slot = c.gathering_until().unwrap_or(now);
            if i > 0 {
                let early = slot - Duration::from_micros(1);
                assert!(
                    c.next_batch(early, &mut r, false).is_none(),
                    "not before its slot"
                );
            }
            // every batch is handed over late, after its commit and the timer's lateness
            now = slot.max(now) + late;
            let b = c.next_batch(now, &mut r, false).expect("its slot passed");
            starts.push(now);
            c.committed = b.number;
            c.in_flight = None;
        }
        for w in starts.windows(2) {
            assert!(w[1] - w[0] >= gap / 2, "never within half a window");
        }
        let span = starts[starts.len() - 1] - starts[0];
        let per_window = span.as_secs_f64() / (starts.len() - 1) as f64 / gap.as_secs_f64();
        assert!(
            (0.99..1.05).contains(&per_window),
            "one batch per window on average, not per window plus the lateness: {per_window}"
        );
    }

    /// A key the data file reports full goes whole in its next batch (a compaction from
    /// memory), once; then as deltas again.
    #[test]
    fn a_key_reported_full_goes_whole_in_its_next_batch() {
        use crate::replication::Consistency;
        use crate::store::committer::Done;
        use crate::store::Change;
        let (mut r, inc) = replicator_and_increment();
        let mut c = commits();
        let t0 = std::time::Instant::now();
        let mut batch = |c: &mut Commits, full: &[&str]| {
            r.write(t0, 0, "a", &inc, Consistency::Local).unwrap();
            c.gate(&["a".to_string()], &[]);
            let b = c.next_batch(t0, &mut r, true).expect("a batch");
            c.committed(Done {
                number: b.number,
                full_logs: full.iter().map(|k| k.to_string()).collect(),
            });
            match &b.puts[..] {
                [(_, Change::Whole(_))] => "whole",
                [(_, Change::Delta(_))] => "delta",
                other => panic!("unexpected batch {other:?}"),
            }
        };
        // the first batch of a key is whole (tracking starts); the file reports it full after
        // the second
        assert_eq!(batch(&mut c, &[]), "whole");
        assert_eq!(batch(&mut c, &["a"]), "delta");
        assert_eq!(batch(&mut c, &[]), "whole", "the report is followed");
        assert_eq!(batch(&mut c, &[]), "delta", "once");
        assert!(c.full_logs.is_empty());
    }

    /// Before the clean end is recorded, what is gathered goes to the committer even while a
    /// batch commits; ordinarily it waits for that commit.
    #[test]
    fn the_last_batch_is_taken_even_while_one_commits() {
        use crate::replication::Consistency;
        let (mut r, inc) = replicator_and_increment();
        let mut c = commits();
        let now = std::time::Instant::now();
        r.write(now, 0, "a", &inc, Consistency::Local).unwrap();
        c.gate(&["a".to_string()], &[]);
        let first = c.next_batch(now, &mut r, false).expect("a batch to commit");
        assert_eq!(
            first
                .puts
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        r.write(now, 0, "b", &inc, Consistency::Local).unwrap();
        c.gate(&["b".to_string()], &[]);
        assert!(
            c.next_batch(now, &mut r, false).is_none(),
            "gathers while one commits"
        );
        let last = c
            .last_batch(&mut r)
            .expect("the last batch, before the clean end");
        assert_eq!(last.number, first.number + 1);
        assert_eq!(
            last.puts
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert!(
            c.last_batch(&mut r).is_none(),
            "nothing gathered: nothing more"
        );
    }

    /// Output of a step that changed a key waits for the batch being gathered; output of a
    /// step that changed nothing waits for the batch committing, if any, and goes at once
    /// when everything is committed.
    #[test]
    fn output_waits_for_the_batch_holding_its_changes() {
        let mut c = commits();
        assert_eq!(c.gate(&[], &[]), None, "nothing pending: at once");
        assert_eq!(c.gate(&["k".into()], &[]), Some(1), "a change: its batch");
        c.held.push_back(Held {
            after: 1,
            frames: vec![],
            completed: vec![],
        });
        // batch 1 handed over
        c.dirty.clear();
        c.in_flight = Some(1);
        c.open = 2;
        assert_eq!(c.gate(&[], &[]), Some(1), "no change, batch 1 committing");
        assert_eq!(c.gate(&[], &["gone".into()]), Some(2), "a forgotten key");
        c.committed = 1;
        c.in_flight = None;
        c.held.clear();
        c.dirty.clear();
        assert_eq!(c.gate(&[], &[]), None, "all committed: at once");
        assert!(c.is_idle());
    }

    #[test]
    fn a_subscriber_tells_its_own_changes_from_others() {
        let mut c = KeyChanges::default();
        c.record(7, some());
        assert!(c.only_by(7, 0));
        c.record(7, some());
        assert!(c.only_by(7, 0), "two of its own in a row");
        assert!(!c.only_by(8, 0), "not another writer's");
        let seen = c.changes;
        c.record(0, some());
        c.record(7, some());
        assert!(!c.only_by(7, seen), "a peer's change in between");
        assert!(c.only_by(7, c.changes - 1), "only the latest since");
        let mut anon = KeyChanges::default();
        anon.record(0, some());
        assert!(!anon.only_by(0, 0), "anonymous writes are nobody's own");
    }

    #[test]
    fn a_subscriber_learns_what_the_changes_it_missed_touched() {
        let mut c = KeyChanges::default();
        c.record(0, elements(&["a"]));
        let seen = c.changes;
        c.record(0, elements(&["b"]));
        c.record(0, elements(&["c"]));
        assert_eq!(c.footprint_since(seen), elements(&["b", "c"]));
        assert_eq!(c.footprint_since(c.changes), Footprint::none());
        for _ in 0..RECENT_CHANGES {
            c.record(0, elements(&["d"]));
        }
        assert_eq!(c.footprint_since(seen), Footprint::All, "too far behind");
        assert_eq!(c.footprint_since(c.changes - 1), elements(&["d"]));
    }
}
