//! The entity state machine: one active (service, entity id) on this node, sans-IO.
//!
//! It owns the CloudState rules of one `Crdt/handle` stream (protocol spec §7 and §11): command
//! ids, the user-function view, when a delta may be pushed, streamed calls and their
//! cancellation, what a reply's state action, side effects and client action turn into, and
//! the entity's lifecycle (start, passivation, delete, failure). Inputs are client commands,
//! messages from the user function, the replicated value, membership, completions of the
//! operations it asked for, and time; outputs are messages for the user function, writes,
//! routed forwards and side effects, client outcomes and reports. No tokio, no sockets, no
//! clock: [`crate::entity::task`] moves the messages, and tests drive the machine directly.
//!
//! Guarantees (documented in `docs/cloudstate.md`):
//! - commands reach the user function in arrival order, with ids from 1 on each stream;
//! - a reply's write, side effects and client action form its own *completion*: it never waits
//!   for another command's write, and other commands, streamed messages and cancellations keep
//!   flowing while a MAJORITY / ALL write is in flight;
//! - within one completion: the write, then the side effects in their order (a synchronous
//!   one is awaited before the next starts; it may target this very entity), then the client
//!   action; a failed write fails the client and runs no side effect (the write stays local
//!   and replicates later);
//! - no delta is pushed while a command or a cancellation is outstanding at the user
//!   function; then `diff(view, replicated)` goes as one delta, compared only where the
//!   changes since the last push can have touched (their footprint: O(delta), not O(value));
//! - a client's call ends once: a unary call with one reply (or forward), a streamed call with
//!   one end, after which it gets nothing (found by the `uf_message` fuzz target);
//! - every wait on the user function is bounded: a command it never answers fails the entity
//!   after the relay timeout, a cancellation it never answers is forgotten after
//!   [`Config::cancel_wait`], a half-close it never completes is cancelled after
//!   [`Config::passivation_grace`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use latticed_crdt::{initial_delta, update_part, Footprint, Origin, ReplicaId, UserValue, Voters};
use latticed_proto::cloudstate::crdt::{
    crdt_state_action, crdt_stream_in, crdt_stream_out, CrdtDelete, CrdtDelta, CrdtInit, CrdtReply,
    CrdtStateAction, CrdtStreamIn, CrdtStreamOut, CrdtWriteConsistency,
};
use latticed_proto::cloudstate::{
    client_action, ClientAction, Command, SideEffect, StreamCancelled,
};
use latticed_proto::wkt::Any;

use super::status::{ClientReply, Headers, Status};
use crate::replication::Consistency;
use crate::store::Entry;

/// The failure text of commands outstanding when an entity stops unexpectedly.
pub const ENTITY_TERMINATING: &str = "Entity terminating";
/// The failure text of commands to a deleted entity.
pub const ENTITY_DELETED: &str = "Entity deleted";

/// Names a client call (chosen by the shell, unique per entity task).
pub type ClientId = u64;
/// Names an operation the machine asked for (a write, a synchronous side effect).
pub type OpId = u64;

/// Timing and bounds.
#[derive(Clone, Debug)]
pub struct Config {
    /// idle time before passivation
    pub passivate_after: Duration,
    /// how long a half-closed stream may take to complete before it is cancelled
    pub passivation_grace: Duration,
    /// how long a `stream_cancelled` waits for its response
    pub cancel_wait: Duration,
    /// how long the user function may take to answer a command
    pub relay_timeout: Duration,
    /// commands of this entity accepted and not yet completed, at most
    pub max_in_flight: usize,
    /// active entities of one user function, at most
    pub max_entities: usize,
    /// the largest message the user function accepts (gRPC servers default to 4 MiB); a
    /// larger command is refused up front
    pub max_message_to_uf: usize,
    /// the largest message accepted from the user function
    pub max_message_from_uf: usize,
    /// `handle` streams per HTTP/2 connection to the user function
    pub streams_per_connection: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            passivate_after: Duration::from_secs(30),
            passivation_grace: Duration::from_secs(5),
            cancel_wait: Duration::from_secs(5),
            relay_timeout: Duration::from_secs(60),
            max_in_flight: 100,
            max_entities: 10_000,
            max_message_to_uf: 4 << 20,
            max_message_from_uf: 12 << 20,
            streams_per_connection: 100,
        }
    }
}

/// A client's command for this entity.
#[derive(Clone, Debug)]
pub struct CommandIn {
    /// the client
    pub client: ClientId,
    /// simple method name
    pub name: String,
    /// full name of the method's input type
    pub input_type: String,
    /// the request message's bytes
    pub payload: Vec<u8>,
    /// a server-streamed method
    pub streamed: bool,
}

/// How the user function's half of the stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UfEnd {
    /// the call could not be opened
    OpenFailed(String),
    /// the call failed
    Failed(String),
    /// the user function completed its side
    Completed,
}

/// Why a write did not reach its consistency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteFailure {
    /// the delta cannot be applied to the stored value (wrong type, negative increment, ...)
    Invalid(String),
    /// the key is deleted
    Deleted,
    /// the consistency was not reached in time (the write stays and replicates)
    Consistency(String),
    /// replication has stopped (the node is shutting down)
    Stopped,
}

/// What the machine is told.
#[derive(Clone, Debug)]
pub enum Input {
    /// a client's command
    Command(CommandIn),
    /// the client of a streamed call went away (or could not keep up)
    ClientGone(ClientId),
    /// a message from the user function
    FromUf(CrdtStreamOut),
    /// the user function's half of the stream ended
    UfEnded(UfEnd),
    /// the replicated entry now (the answer to [`Output::ReadReplicated`])
    Replicated(Option<Entry>),
    /// the replicated key changed, within this footprint
    KeyChanged(Footprint),
    /// the replicas that are up now (votes are tallied over them)
    Members(BTreeSet<ReplicaId>),
    /// a write or delete asked for with [`Output::Write`] / [`Output::Delete`] completed
    WriteDone(OpId, Result<(), WriteFailure>),
    /// a synchronous side effect asked for with [`Output::Route`] completed
    RouteDone(OpId),
    /// the node is shutting down: finish what is in flight, end streamed calls, passivate
    Drain,
}

/// What the machine asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// open a new `handle` call (the previous one, if any, has ended)
    OpenUf,
    /// write this message on the call
    ToUf(CrdtStreamIn),
    /// half-close our side of the call
    CloseUf,
    /// drop the call (cancel it)
    CancelUf,
    /// read the part of the replicated entry within the footprint (all of it for
    /// [`Footprint::All`]), answer with [`Input::Replicated`]
    ReadReplicated(Footprint),
    /// write the user function's delta as an operation of this node
    Write {
        /// completion id
        op: OpId,
        /// the delta
        delta: CrdtDelta,
        /// consistency
        consistency: Consistency,
    },
    /// delete the key
    Delete {
        /// completion id
        op: OpId,
        /// consistency
        consistency: Consistency,
    },
    /// route a command the user function built (a side effect or a forward)
    Route {
        /// synchronous side effect: answer with [`Input::RouteDone`]
        op: Option<OpId>,
        /// forward: the routed command's outcome goes to this client
        reply_to: Option<ClientId>,
        /// target service
        service: String,
        /// target method
        command: String,
        /// request message
        payload: Option<Any>,
    },
    /// a unary client's outcome (the client is done)
    Reply {
        /// client
        client: ClientId,
        /// message and headers, or failure
        outcome: Result<ClientReply, Status>,
    },
    /// one element of a streamed call (none: an empty reply, nothing for the client)
    Stream {
        /// client
        client: ClientId,
        /// the message
        message: Option<Vec<u8>>,
        /// the reply's headers (the client's response headers if this is its call's first)
        headers: Headers,
    },
    /// a streamed call ends (OK, or with a failure)
    EndStream {
        /// client
        client: ClientId,
        /// the failure, if any
        failure: Option<Status>,
    },
    /// tell the user function with `reportError`
    ReportError(String),
    /// the entity is done; the task ends (commands still in its inbox go to a fresh entity)
    Stopped(EndReason),
}

/// Why an entity stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// idle, passivated
    Passivated,
    /// deleted (here or elsewhere), and idle since
    Deleted,
    /// failed: the reason was logged and reported
    Failed(String),
    /// replication stopped: the node is shutting down
    Shutdown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// waiting for the replicated value before `init`
    Starting,
    /// the stream is open
    Running,
    /// half-closed after idling; waiting for the user function to complete its side
    Passivating,
    /// the key is deleted: commands answer `Entity deleted`; the stream (if any) is closing
    Deleted,
    /// done
    Stopped,
}

/// A command sent to the user function, awaiting its reply.
#[derive(Debug)]
struct Sent {
    client: ClientId,
    streamed: bool,
    deadline: Instant,
}

/// What remains to do for a reply (or a cancellation response) once the user function
/// answered: its write, its side effects, its client action.
#[derive(Debug)]
struct Completion {
    client: Option<ClientId>,
    streamed: bool,
    /// the write this completion waits for
    write: Option<OpId>,
    effects: VecDeque<SideEffect>,
    /// the synchronous side effect this completion waits for
    effect: Option<OpId>,
    action: Option<ClientAction>,
    /// a streamed call stays open after the action
    keep_open: bool,
    deletes: bool,
    /// order of arrival: a client's completions finish in this order
    seq: u64,
    /// the write and side effects are done; the client action waits for earlier ones
    ready: bool,
}

/// One active entity.
pub struct Machine {
    service: String,
    entity_id: String,
    key: String,
    config: Config,
    phase: Phase,
    voters: Voters,
    /// what the user function holds
    view: Option<UserValue>,
    next_id: i64,
    next_op: OpId,
    /// commands waiting for the stream to open
    queued: VecDeque<CommandIn>,
    /// commands sent, awaiting the user function's reply
    sent: BTreeMap<i64, Sent>,
    /// replies being completed, by command id (cancellations use negative ids)
    completions: BTreeMap<i64, Completion>,
    /// op -> the completion waiting for it
    ops: HashMap<OpId, i64>,
    /// open streamed calls: command id -> client
    streams: BTreeMap<i64, ClientId>,
    /// `stream_cancelled` sent: command id -> deadline for the response
    cancelling: BTreeMap<i64, Instant>,
    /// a change may need pushing, within this part of the value
    dirty: Option<Footprint>,
    /// a read of this part is asked for and not answered yet
    reading: Option<Footprint>,
    idle_deadline: Instant,
    grace_deadline: Option<Instant>,
    /// the stream is open (or opening)
    open: bool,
    next_cancel_key: i64,
    next_seq: u64,
    /// a reply asked for the delete: later commands answer `Entity deleted`
    deleting: bool,
    /// the node is shutting down: passivate as soon as nothing is in flight
    draining: bool,
    /// the time of the latest input
    now: Instant,
    end: Option<EndReason>,
    out: VecDeque<Output>,
}

fn consistency(c: i32) -> Consistency {
    match CrdtWriteConsistency::try_from(c) {
        Ok(CrdtWriteConsistency::Majority) => Consistency::Majority,
        Ok(CrdtWriteConsistency::All) => Consistency::All,
        _ => Consistency::Local,
    }
}

impl Machine {
    /// A machine for `entity_id` of `service`, replicated under `key`. It starts by asking for
    /// the replicated value.
    pub fn new(
        service: &str,
        entity_id: &str,
        key: &str,
        config: Config,
        voters: Voters,
        now: Instant,
    ) -> Machine {
        let idle_deadline = now + config.passivate_after;
        let mut m = Machine {
            service: service.to_string(),
            entity_id: entity_id.to_string(),
            key: key.to_string(),
            config,
            phase: Phase::Starting,
            voters,
            view: None,
            next_id: 0,
            next_op: 0,
            queued: VecDeque::new(),
            sent: BTreeMap::new(),
            completions: BTreeMap::new(),
            ops: HashMap::new(),
            streams: BTreeMap::new(),
            cancelling: BTreeMap::new(),
            dirty: None,
            reading: Some(Footprint::All),
            idle_deadline,
            grace_deadline: None,
            open: false,
            next_cancel_key: 0,
            next_seq: 0,
            deleting: false,
            draining: false,
            now,
            end: None,
            out: VecDeque::new(),
        };
        m.out.push_back(Output::ReadReplicated(Footprint::All));
        m
    }

    /// What the user function holds, as far as the machine knows.
    pub fn view(&self) -> Option<&UserValue> {
        self.view.as_ref()
    }

    /// The replicated key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Whether the entity is done.
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Commands accepted and not completed.
    pub fn in_flight(&self) -> usize {
        self.queued.len()
            + self.sent.len()
            + self
                .completions
                .values()
                .filter(|c| c.client.is_some())
                .count()
    }

    /// When [`Machine::handle_timeout`] must be called next.
    pub fn next_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Stopped {
            return None;
        }
        let relay = self.sent.values().map(|s| s.deadline).min();
        let cancel = self.cancelling.values().copied().min();
        [Some(self.idle_deadline), relay, cancel, self.grace_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    fn busy(&self) -> bool {
        !self.queued.is_empty()
            || !self.sent.is_empty()
            || !self.completions.is_empty()
            || !self.streams.is_empty()
            || !self.cancelling.is_empty()
    }

    fn touch(&mut self, now: Instant) {
        self.idle_deadline = now + self.config.passivate_after;
    }

    /// Handles one input.
    pub fn handle(&mut self, now: Instant, input: Input) {
        self.now = now;
        match input {
            Input::Command(c) => {
                self.touch(now);
                self.command(now, c);
            }
            Input::ClientGone(client) => {
                self.touch(now);
                self.client_gone(now, client);
            }
            Input::FromUf(m) => {
                self.touch(now);
                self.on_uf_message(now, m);
            }
            Input::UfEnded(end) => self.uf_ended(end),
            Input::Replicated(entry) => self.replicated(now, entry),
            Input::KeyChanged(footprint) => {
                self.mark(&footprint);
                self.maybe_read();
            }
            Input::Members(live) => {
                self.voters.live = live;
                // only a tally (a vote, or votes in a map) reads the members
                if matches!(
                    self.view,
                    Some(UserValue::Vote(_) | UserValue::ORMap(_)) | None
                ) {
                    self.mark(&Footprint::All);
                }
                self.maybe_read();
            }
            Input::WriteDone(op, result) => self.write_done(op, result),
            Input::Drain => self.drain(),
            Input::RouteDone(op) => {
                if let Some(id) = self.ops.remove(&op) {
                    if let Some(c) = self.completions.get_mut(&id) {
                        c.effect = None;
                    }
                    self.advance(id);
                }
            }
        }
        self.after_change();
    }

    /// Handles the passing of time.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if let Some(id) = self
            .sent
            .iter()
            .find(|(_, s)| s.deadline <= now)
            .map(|(id, _)| *id)
        {
            let reason = format!(
                "the user function did not answer command {id} of entity {} within {:?}",
                self.entity_id, self.config.relay_timeout
            );
            if let Some(s) = self.sent.remove(&id) {
                self.fail_sent(id, s, Status::deadline_exceeded(reason.clone()));
            }
            self.fail(reason);
            return;
        }
        let before = self.cancelling.len();
        self.cancelling.retain(|_, deadline| now < *deadline);
        if before != self.cancelling.len() {
            // a push held back for the cancellation may go now
            self.mark(&Footprint::none());
        }
        if self.grace_deadline.is_some_and(|d| d <= now) {
            self.grace_deadline = None;
            self.out.push_back(Output::CancelUf);
            self.uf_ended(UfEnd::Completed);
        }
        if self.idle_deadline <= now {
            self.touch(now);
            if !self.busy() {
                self.idle(now);
            }
        }
        self.after_change();
    }

    fn idle(&mut self, now: Instant) {
        match self.phase {
            Phase::Running => {
                // passivate: half-close, give the user function a grace period
                self.phase = Phase::Passivating;
                self.out.push_back(Output::CloseUf);
                self.grace_deadline = Some(now + self.config.passivation_grace);
            }
            Phase::Deleted if !self.open => self.stop(EndReason::Deleted),
            _ => {}
        }
    }

    fn stop(&mut self, reason: EndReason) {
        self.phase = Phase::Stopped;
        self.end = Some(reason.clone());
        self.out.push_back(Output::Stopped(reason));
    }

    /// Why the entity stopped, once it has.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.end.clone()
    }

    fn command(&mut self, now: Instant, c: CommandIn) {
        if self.deleting || matches!(self.phase, Phase::Deleted | Phase::Stopped) {
            self.fail_client(c.client, c.streamed, Status::unknown(ENTITY_DELETED));
            return;
        }
        if self.in_flight() >= self.config.max_in_flight {
            let status = Status::resource_exhausted(format!(
                "entity {} has {} commands in flight, the most it takes",
                self.entity_id, self.config.max_in_flight
            ));
            self.fail_client(c.client, c.streamed, status);
            return;
        }
        match self.phase {
            Phase::Running => self.send_command(now, c),
            // before init, or while the old stream completes: wait
            _ => self.queued.push_back(c),
        }
    }

    /// Fails a command sent to the user function. A streamed call whose stream is no longer
    /// open has ended already (a streamed message ended it, or a drain), or its client left.
    fn fail_sent(&mut self, id: i64, s: Sent, status: Status) {
        if !s.streamed || self.streams.remove(&id).is_some() {
            self.fail_client(s.client, s.streamed, status);
        }
    }

    /// Ends a streamed call. Completions of its client still pending (streamed messages
    /// waiting for their write or side effects) then run for no one: the call is over.
    fn end_stream(&mut self, client: ClientId, failure: Option<Status>) {
        self.out.push_back(Output::EndStream { client, failure });
        for c in self.completions.values_mut() {
            if c.client == Some(client) {
                c.client = None;
            }
        }
    }

    fn fail_client(&mut self, client: ClientId, streamed: bool, status: Status) {
        if streamed {
            self.end_stream(client, Some(status));
        } else {
            self.out.push_back(Output::Reply {
                client,
                outcome: Err(status),
            });
        }
    }

    fn send_command(&mut self, now: Instant, c: CommandIn) {
        self.next_id += 1;
        let id = self.next_id;
        if c.streamed {
            // registered before the command goes: a streamed message may precede the reply
            self.streams.insert(id, c.client);
        }
        self.sent.insert(
            id,
            Sent {
                client: c.client,
                streamed: c.streamed,
                deadline: now + self.config.relay_timeout,
            },
        );
        self.tell_uf(crdt_stream_in::Message::Command(Command {
            entity_id: self.entity_id.clone(),
            id,
            name: c.name,
            payload: Some(Any {
                type_url: format!("type.googleapis.com/{}", c.input_type),
                value: c.payload,
            }),
            streamed: c.streamed,
            metadata: None,
        }));
    }

    fn tell_uf(&mut self, m: crdt_stream_in::Message) {
        self.out
            .push_back(Output::ToUf(CrdtStreamIn { message: Some(m) }));
    }

    fn client_gone(&mut self, now: Instant, client: ClientId) {
        let Some(id) = self
            .streams
            .iter()
            .find(|(_, c)| **c == client)
            .map(|(id, _)| *id)
        else {
            return;
        };
        self.streams.remove(&id);
        if self.phase != Phase::Running {
            return;
        }
        self.cancelling.insert(id, now + self.config.cancel_wait);
        self.tell_uf(crdt_stream_in::Message::StreamCancelled(StreamCancelled {
            entity_id: self.entity_id.clone(),
            id,
        }));
    }

    fn replicated(&mut self, now: Instant, entry: Option<Entry>) {
        let part = self.reading.take().unwrap_or(Footprint::All);
        match self.phase {
            Phase::Starting => self.start(now, entry),
            Phase::Running => self.push(entry, part),
            _ => {}
        }
    }

    /// A change may need pushing within `footprint`.
    fn mark(&mut self, footprint: &Footprint) {
        match &mut self.dirty {
            Some(d) => d.union(footprint),
            None => self.dirty = Some(footprint.clone()),
        }
    }

    /// The replicated value is known: open the stream with `init`, or go to deleted mode.
    fn start(&mut self, now: Instant, entry: Option<Entry>) {
        let value = match entry {
            Some(Entry::Deleted) => {
                self.phase = Phase::Deleted;
                for c in std::mem::take(&mut self.queued) {
                    self.fail_client(c.client, c.streamed, Status::unknown(ENTITY_DELETED));
                }
                return;
            }
            Some(Entry::Value(v)) => Some(v.read(&self.voters)),
            None => None,
        };
        self.phase = Phase::Running;
        self.open = true;
        self.next_id = 0;
        self.dirty = None;
        self.out.push_back(Output::OpenUf);
        self.tell_uf(crdt_stream_in::Message::Init(CrdtInit {
            service_name: self.service.clone(),
            entity_id: self.entity_id.clone(),
            delta: value.as_ref().map(initial_delta),
        }));
        self.view = value;
        for c in std::mem::take(&mut self.queued) {
            self.send_command(now, c);
        }
    }

    /// Nothing outstanding at the user function: ask for the replicated value if it may have
    /// changed.
    fn maybe_read(&mut self) {
        if self.phase == Phase::Running
            && self.reading.is_none()
            && self.sent.is_empty()
            && self.cancelling.is_empty()
        {
            let Some(mut part) = self.dirty.take() else {
                return;
            };
            if self.view.is_none() {
                // a first value is sent whole
                part = Footprint::All;
            }
            self.reading = Some(part.clone());
            self.out.push_back(Output::ReadReplicated(part));
        }
    }

    /// Pushes `diff(view, replicated)` within `part` (the replicated entry's part that was
    /// read) if nothing is outstanding at the user function. Costs O(size of the part).
    fn push(&mut self, entry: Option<Entry>, part: Footprint) {
        if !self.sent.is_empty() || !self.cancelling.is_empty() {
            // a command went out since the read was asked for: try again afterwards
            self.mark(&part);
            return;
        }
        let now_part = match entry {
            Some(Entry::Value(v)) => v.read(&self.voters),
            Some(Entry::Deleted) => {
                self.deleted_elsewhere();
                return;
            }
            None => return,
        };
        let delta = match &mut self.view {
            None => {
                let d = initial_delta(&now_part);
                self.view = Some(now_part);
                Some(d)
            }
            Some(view) => match update_part(view, &part, now_part) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(key = self.key, error = %e,
                        "cannot express a change to the user function");
                    None
                }
            },
        };
        if let Some(d) = delta {
            self.tell_uf(crdt_stream_in::Message::Delta(d));
        }
    }

    /// The key was deleted on another node: tell the user function, close everything.
    fn deleted_elsewhere(&mut self) {
        self.tell_uf(crdt_stream_in::Message::Delete(CrdtDelete {}));
        self.enter_deleted();
    }

    fn enter_deleted(&mut self) {
        if self.open && self.phase != Phase::Deleted {
            self.out.push_back(Output::CloseUf);
            self.grace_deadline = Some(self.now + self.config.passivation_grace);
        }
        self.phase = Phase::Deleted;
        for (id, s) in std::mem::take(&mut self.sent) {
            self.fail_sent(id, s, Status::unknown(ENTITY_DELETED));
        }
        for (_, client) in std::mem::take(&mut self.streams) {
            self.end_stream(client, None);
        }
        for c in std::mem::take(&mut self.queued) {
            self.fail_client(c.client, c.streamed, Status::unknown(ENTITY_DELETED));
        }
        self.cancelling.clear();
    }

    fn on_uf_message(&mut self, now: Instant, m: CrdtStreamOut) {
        if !matches!(self.phase, Phase::Running | Phase::Passivating) {
            return;
        }
        match m.message {
            Some(crdt_stream_out::Message::Reply(reply)) => self.reply(now, reply),
            Some(crdt_stream_out::Message::StreamedMessage(s)) => {
                let Some(client) = self.streams.get(&s.command_id).copied() else {
                    if self.cancelling.contains_key(&s.command_id) {
                        // written before the user function read the cancellation
                        return;
                    }
                    self.out.push_back(Output::ReportError(format!(
                        "Received streamed message for unknown command id: {}",
                        s.command_id
                    )));
                    return;
                };
                let key = self.completion_key();
                let comp = self.completion(
                    Some(client),
                    true,
                    s.side_effects,
                    s.client_action,
                    !s.end_stream,
                );
                self.completions.insert(key, comp);
                if s.end_stream {
                    self.streams.remove(&s.command_id);
                }
                self.advance(key);
            }
            Some(crdt_stream_out::Message::StreamCancelledResponse(r)) => {
                // a late response (its wait expired) still carries the user function's
                // change: it is applied all the same
                self.cancelling.remove(&r.command_id);
                let key = self.completion_key();
                let comp = self.completion(None, false, r.side_effects, None, false);
                self.completions.insert(key, comp);
                self.state_action(key, r.state_action);
                self.advance(key);
            }
            Some(crdt_stream_out::Message::Failure(f)) if f.command_id != 0 => {
                let status = Status::unknown(f.description);
                if let Some(s) = self.sent.remove(&f.command_id) {
                    self.fail_sent(f.command_id, s, status);
                } else if let Some(client) = self.streams.remove(&f.command_id) {
                    // an open streamed call (its reply kept it open)
                    self.fail_client(client, true, status);
                }
            }
            Some(crdt_stream_out::Message::Failure(f)) => {
                self.fail(format!("stream-level failure: {}", f.description));
            }
            None => self.fail("an empty message from the user function".into()),
        }
    }

    fn completion(
        &mut self,
        client: Option<ClientId>,
        streamed: bool,
        effects: Vec<SideEffect>,
        action: Option<ClientAction>,
        keep_open: bool,
    ) -> Completion {
        self.next_seq += 1;
        Completion {
            client,
            streamed,
            write: None,
            effects: effects.into(),
            effect: None,
            action,
            keep_open,
            deletes: false,
            seq: self.next_seq,
            ready: false,
        }
    }

    /// Keys of completions that are not replies (streamed messages, cancellation responses):
    /// negative, so they never meet a command id.
    fn completion_key(&mut self) -> i64 {
        self.next_cancel_key -= 1;
        self.next_cancel_key
    }

    fn reply(&mut self, _now: Instant, reply: CrdtReply) {
        let id = reply.command_id;
        let Some(sent) = self.sent.remove(&id) else {
            self.fail(format!(
                "Received reply for entity id {} for unknown command {id}",
                self.entity_id
            ));
            return;
        };
        let keep_open = sent.streamed && reply.streamed && self.streams.contains_key(&id);
        // a streamed call whose client left or was ended (drain) is answered to no one
        let client = (!sent.streamed || self.streams.contains_key(&id)).then_some(sent.client);
        if sent.streamed && !keep_open {
            self.streams.remove(&id);
        }
        let comp = self.completion(
            client,
            sent.streamed,
            reply.side_effects,
            reply.client_action,
            keep_open,
        );
        self.completions.insert(id, comp);
        self.state_action(id, reply.state_action);
        self.advance(id);
    }

    /// A state action: the view first (the user function already changed its value), then
    /// the write, which the completion waits for.
    fn state_action(&mut self, id: i64, action: Option<CrdtStateAction>) {
        let Some(action) = action else { return };
        let c = consistency(action.write_consistency);
        let op = self.next_op;
        self.next_op += 1;
        match action.action {
            Some(crdt_state_action::Action::Update(d)) => {
                // applied as an operation of this node, most deltas change the replicated
                // value exactly as they changed the user function's; a register write may
                // lose (REVERSE or CUSTOM clocks) and a vote's tally is the proxy's: compare
                // once it is applied
                if may_differ(&d) {
                    self.mark(&Footprint::All);
                }
                match &mut self.view {
                    Some(v) => {
                        let _ = v.apply(&d, Origin::UserFunction);
                    }
                    None => self.view = UserValue::from_delta(&d, Origin::UserFunction).ok(),
                }
                self.out.push_back(Output::Write {
                    op,
                    delta: d,
                    consistency: c,
                });
            }
            Some(crdt_state_action::Action::Delete(_)) => {
                // deleted mode starts now: later commands answer `Entity deleted`
                self.deleting = true;
                self.out.push_back(Output::Delete { op, consistency: c });
                if let Some(comp) = self.completions.get_mut(&id) {
                    comp.deletes = true;
                }
            }
            None => return,
        }
        self.ops.insert(op, id);
        if let Some(comp) = self.completions.get_mut(&id) {
            comp.write = Some(op);
        }
    }

    fn write_done(&mut self, op: OpId, result: Result<(), WriteFailure>) {
        let Some(id) = self.ops.remove(&op) else {
            return;
        };
        let Some(comp) = self.completions.get_mut(&id) else {
            return;
        };
        comp.write = None;
        let failure = match result {
            Ok(()) => None,
            Err(WriteFailure::Invalid(e)) => {
                let msg = format!("Invalid state action for {}: {e}", self.key);
                self.out.push_back(Output::ReportError(msg.clone()));
                Some(Status::unknown(msg))
            }
            Err(WriteFailure::Deleted) => Some(Status::unknown(ENTITY_DELETED)),
            Err(WriteFailure::Consistency(msg)) => Some(Status::unknown(msg)),
            Err(WriteFailure::Stopped) => Some(Status::unknown(ENTITY_TERMINATING)),
        };
        if let Some(status) = failure {
            // the user function holds a change the replicated value may lack: compare
            self.mark(&Footprint::All);
            // no side effect, no client action: the client gets the failure
            let Some(comp) = self.completions.remove(&id) else {
                return;
            };
            if let Some(client) = comp.client {
                if comp.streamed {
                    // the call ends here: the user function is told, as if the client left
                    let now = self.now;
                    self.client_gone(now, client);
                }
                self.fail_client(client, comp.streamed, status);
            }
            return;
        }
        self.advance(id);
    }

    /// Moves completion `id` on as far as it can go.
    fn advance(&mut self, id: i64) {
        loop {
            let Some(comp) = self.completions.get_mut(&id) else {
                return;
            };
            if comp.write.is_some() || comp.effect.is_some() {
                return;
            }
            let Some(effect) = comp.effects.pop_front() else {
                break;
            };
            if effect.synchronous {
                let op = self.next_op;
                self.next_op += 1;
                comp.effect = Some(op);
                self.ops.insert(op, id);
                self.out.push_back(route(Some(op), None, effect));
                return;
            }
            self.out.push_back(route(None, None, effect));
        }
        let Some(comp) = self.completions.get_mut(&id) else {
            return;
        };
        comp.ready = true;
        match comp.client {
            Some(client) => self.finish_ready(client),
            None => {
                self.completions.remove(&id);
            }
        }
    }

    /// Finishes `client`'s ready completions, oldest first, up to the first one still waiting.
    fn finish_ready(&mut self, client: ClientId) {
        loop {
            let Some((id, ready)) = self
                .completions
                .iter()
                .filter(|(_, c)| c.client == Some(client))
                .min_by_key(|(_, c)| c.seq)
                .map(|(id, c)| (*id, c.ready))
            else {
                return;
            };
            if !ready {
                return;
            }
            if let Some(comp) = self.completions.remove(&id) {
                self.finish(comp);
            }
        }
    }

    /// The client action of a completion whose write and side effects are done.
    fn finish(&mut self, comp: Completion) {
        let Some(client) = comp.client else { return };
        let action = comp.action.and_then(|a| a.action);
        match action {
            Some(client_action::Action::Forward(f)) => {
                self.out.push_back(Output::Route {
                    op: None,
                    reply_to: Some(client),
                    service: f.service_name,
                    command: f.command_name,
                    payload: f.payload,
                });
                if comp.streamed && !comp.keep_open {
                    self.end_stream(client, None);
                }
            }
            Some(client_action::Action::Failure(f)) => {
                let status = Status::unknown(f.description);
                if comp.streamed {
                    self.streams.retain(|_, c| *c != client);
                }
                self.fail_client(client, comp.streamed, status);
            }
            Some(client_action::Action::Reply(r)) => {
                let reply = ClientReply {
                    message: Some(r.payload.map(|p| p.value).unwrap_or_default()),
                    headers: headers(r.metadata),
                };
                self.deliver(client, comp.streamed, comp.keep_open, reply);
            }
            None => self.deliver(
                client,
                comp.streamed,
                comp.keep_open,
                ClientReply::default(),
            ),
        }
        if comp.deletes {
            self.enter_deleted();
        }
    }

    fn deliver(&mut self, client: ClientId, streamed: bool, keep_open: bool, reply: ClientReply) {
        if !streamed {
            self.out.push_back(Output::Reply {
                client,
                outcome: Ok(reply),
            });
            return;
        }
        self.out.push_back(Output::Stream {
            client,
            message: reply.message,
            headers: reply.headers,
        });
        if !keep_open {
            self.end_stream(client, None);
        }
    }

    fn uf_ended(&mut self, end: UfEnd) {
        self.open = false;
        self.grace_deadline = None;
        match self.phase {
            Phase::Passivating => {
                if self.queued.is_empty() {
                    self.stop(EndReason::Passivated);
                } else {
                    // commands arrived while passivating: a fresh stream for them
                    self.phase = Phase::Starting;
                    self.reading = Some(Footprint::All);
                    self.view = None;
                    self.out.push_back(Output::ReadReplicated(Footprint::All));
                }
            }
            // stays to answer `Entity deleted` until idle
            Phase::Deleted => {}
            Phase::Running => {
                let reason = match end {
                    UfEnd::OpenFailed(e) => {
                        let status = Status::unavailable(format!("user function unavailable: {e}"));
                        self.fail_everything(status);
                        format!("cannot open the entity stream: {e}")
                    }
                    UfEnd::Failed(e) => format!("the entity stream failed: {e}"),
                    UfEnd::Completed => "the user function ended the entity stream".into(),
                };
                self.fail(reason);
            }
            Phase::Starting | Phase::Stopped => {}
        }
    }

    fn fail_everything(&mut self, status: Status) {
        // a client fails once, though a streamed one may be in several of these
        let mut failed = BTreeSet::new();
        let streams = &self.streams;
        // a streamed call no longer open has ended already, or its client left
        let sent = std::mem::take(&mut self.sent)
            .into_iter()
            .filter(|(id, s)| !s.streamed || streams.contains_key(id))
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .into_iter();
        let queued = std::mem::take(&mut self.queued).into_iter();
        let completions = std::mem::take(&mut self.completions).into_values();
        let calls = sent
            .map(|s| (s.client, s.streamed))
            .chain(queued.map(|c| (c.client, c.streamed)))
            .chain(completions.filter_map(|c| c.client.map(|client| (client, c.streamed))))
            .chain(
                std::mem::take(&mut self.streams)
                    .into_values()
                    .map(|c| (c, true)),
            );
        for (client, streamed) in calls.collect::<Vec<_>>() {
            if failed.insert(client) {
                self.fail_client(client, streamed, status.clone());
            }
        }
        self.ops.clear();
        self.cancelling.clear();
    }

    /// The entity failed: everything outstanding fails with `Entity terminating`, the
    /// user function is told, the stream is dropped.
    fn fail(&mut self, reason: String) {
        if self.phase == Phase::Stopped {
            return;
        }
        self.fail_everything(Status::unknown(ENTITY_TERMINATING));
        if self.open {
            self.out.push_back(Output::CancelUf);
            self.open = false;
        }
        self.out.push_back(Output::ReportError(reason.clone()));
        self.stop(EndReason::Failed(reason));
    }

    /// After any input: push if possible; a draining entity passivates once idle.
    fn after_change(&mut self) {
        self.maybe_read();
        if self.draining && !self.busy() && self.reading.is_none() {
            let now = self.now;
            self.idle(now);
        }
    }

    /// The node is shutting down: streamed calls end (their clients may resubscribe on
    /// another node), what is in flight finishes, then the entity passivates.
    fn drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        for (id, client) in std::mem::take(&mut self.streams) {
            // the user function is told, as if the client had left (its answer is not
            // waited for: a late one is applied all the same)
            if self.phase == Phase::Running {
                self.tell_uf(crdt_stream_in::Message::StreamCancelled(StreamCancelled {
                    entity_id: self.entity_id.clone(),
                    id,
                }));
            }
            self.end_stream(
                client,
                Some(Status::unavailable("the node is shutting down")),
            );
        }
        if self.phase == Phase::Deleted && !self.open && !self.busy() {
            self.stop(EndReason::Deleted);
        }
    }

    /// The replicated value's source stopped (the node is shutting down).
    pub fn shutdown(&mut self) {
        if self.phase == Phase::Stopped {
            return;
        }
        self.fail_everything(Status::unavailable("the node is shutting down"));
        if self.open {
            self.out.push_back(Output::CancelUf);
            self.open = false;
        }
        self.stop(EndReason::Shutdown);
    }
}

/// Whether a user function's delta, applied to the replicated value as this node's operation,
/// may leave it other than the user function's own value: LWW register writes (anywhere in it)
/// may lose, and vote tallies are computed by the proxy.
fn may_differ(d: &CrdtDelta) -> bool {
    use latticed_proto::cloudstate::crdt::crdt_delta::Delta;
    match &d.delta {
        Some(Delta::Lwwregister(_)) | Some(Delta::Vote(_)) | None => true,
        Some(Delta::Ormap(m)) => m
            .updated
            .iter()
            .chain(&m.added)
            .any(|e| e.delta.as_ref().is_none_or(may_differ)),
        Some(_) => false,
    }
}

fn route(op: Option<OpId>, reply_to: Option<ClientId>, e: SideEffect) -> Output {
    Output::Route {
        op,
        reply_to,
        service: e.service_name,
        command: e.command_name,
        payload: e.payload,
    }
}

/// The response headers a reply's metadata asks for: its string entries (protocol spec §3
/// Reply); binary entries are ignored, as the reference proxy does. Which names are valid
/// headers is the front-end's to judge.
fn headers(metadata: Option<latticed_proto::cloudstate::Metadata>) -> Headers {
    use latticed_proto::cloudstate::metadata_entry::Value;
    metadata
        .into_iter()
        .flat_map(|m| m.entries)
        .filter_map(|e| match e.value {
            Some(Value::StringValue(v)) => Some((e.key, v)),
            _ => None,
        })
        .collect()
}
