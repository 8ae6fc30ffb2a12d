//! `Membership`: the SWIM state machine, sans IO.
//!
//! Feed it datagrams, timer events and commands (announce to a seed, leave); it returns
//! [`Output`]: datagrams to send (to socket addresses), timers to set, and member events (up,
//! suspect, down, left). It never opens a socket, reads a clock or sleeps: the daemon's shell
//! does that, and the simulation tests drive it with a seeded in-memory network.
//!
//! SWIM itself is foca's. This module adds: the datagram envelope (a tag byte: SWIM payload or
//! leave notice), the *left* state (foca only knows down; a leaving node tells every member
//! directly before it leaves, so they report `left`, not `down`), a suspect-to-down deadline of
//! its own for every member this node holds suspect (see [`SuspectDeadlines`]), and the member
//! view with its change events.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, Codec, Foca, Incarnation, Member, NoCustomBroadcast, OwnedNotification,
    PostcardCodec, State, Timer,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::MembershipConfig;
use crate::identity::NodeId;

const TAG_SWIM: u8 = 1;
const TAG_LEAVE: u8 = 2;

/// A timer to set; hand it back through [`Membership::handle_timer`] when it fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimerEvent(Due);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Due {
    /// one foca asked for
    Swim(foca::Timer<NodeId>),
    /// a suspicion's deadline (see [`SuspectDeadlines`])
    SuspectToDown {
        member: NodeId,
        incarnation: Incarnation,
    },
}

/// The suspicions (member, foca incarnation) this node holds and has set a deadline for.
///
/// foca sets a suspect-to-down timer only on the node whose probe failed, and only while its
/// own identity lasts: a renewal (this node told it is down, say after every node was cut off
/// from every other) drops every pending timer, and a suspicion heard by gossip never had one.
/// Such a member stays suspect until it hears the suspicion and refutes it, or until a later
/// probe of it fails, which may be never: the multi-host suite saw n1 hold n3 suspect for 45 s
/// after a heal. So, as in the SWIM paper, every suspicion this node holds gets a deadline of
/// its own, `suspect_to_down_after` after this node first sees it; if the member is still
/// suspect at the same incarnation then (not refuted), it is declared down here. foca's own
/// timer usually gets there first, and declaring down twice is harmless. A member that was
/// alive after all is told it is down when it next reaches this node (TurnUndead) and comes
/// back with a new incarnation.
#[derive(Debug, Default)]
struct SuspectDeadlines {
    armed: BTreeSet<(NodeId, Incarnation)>,
}

impl SuspectDeadlines {
    /// Deadlines to set for the suspicions in `suspects` not seen before; forgets those that
    /// ended (refuted, declared down, forgotten).
    fn update(
        &mut self,
        suspects: BTreeSet<(NodeId, Incarnation)>,
        after: Duration,
    ) -> Vec<(Duration, TimerEvent)> {
        let timers = suspects
            .difference(&self.armed)
            .map(|(member, incarnation)| {
                let due = Due::SuspectToDown {
                    member: member.clone(),
                    incarnation: *incarnation,
                };
                (after, TimerEvent(due))
            })
            .collect();
        self.armed = suspects;
        timers
    }
}

/// What a member is, as reported by `/v1/members`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberState {
    /// alive
    Up,
    /// missed probes; will be declared down unless it refutes
    Suspect,
    /// declared down (crashed or unreachable)
    Down,
    /// left the cluster gracefully
    Left,
}

impl MemberState {
    /// Lower-case name: `up`, `suspect`, `down`, `left`.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Up => "up",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
            MemberState::Left => "left",
        }
    }
}

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// its identity
    pub id: NodeId,
    /// its state
    pub state: MemberState,
}

/// A member changed state (or appeared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEvent {
    /// the member's identity
    pub member: NodeId,
    /// its new state
    pub state: MemberState,
}

/// What the shell must do after an input.
#[derive(Debug, Default)]
pub struct Output {
    /// datagrams to send: destination, bytes
    pub datagrams: Vec<(SocketAddr, Bytes)>,
    /// timers to set: delay, event to hand back
    pub timers: Vec<(Duration, TimerEvent)>,
    /// member changes
    pub events: Vec<MemberEvent>,
}

/// Why an input was rejected. The state is unchanged, except as foca documents for partial
/// packets (it never panics on them).
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// An empty datagram or one with an unknown tag.
    #[error("not a membership datagram")]
    NotMembership,
    /// A leave notice that does not decode.
    #[error("malformed leave notice")]
    BadLeaveNotice,
    /// foca refused the packet or the operation.
    #[error("swim: {0}")]
    Swim(String),
}

type Swim = Foca<NodeId, PostcardCodec, StdRng, NoCustomBroadcast>;

/// The SWIM membership of one node.
pub struct Membership {
    foca: Swim,
    runtime: AccumulatingRuntime<NodeId>,
    /// name -> incarnation that announced it is leaving
    left: BTreeMap<String, u64>,
    /// last reported view (self excluded), to compute events
    view: BTreeMap<String, MemberView>,
    leaving: bool,
    suspect_deadlines: SuspectDeadlines,
    suspect_to_down_after: Duration,
}

impl Membership {
    /// A node with `identity`, alone until it announces itself to a seed. `seed` makes the
    /// random choices reproducible.
    pub fn new(identity: NodeId, config: &MembershipConfig, seed: u64) -> Self {
        Membership {
            foca: Foca::new(
                identity,
                config.to_foca(),
                StdRng::seed_from_u64(seed),
                PostcardCodec,
            ),
            runtime: AccumulatingRuntime::new(),
            left: BTreeMap::new(),
            view: BTreeMap::new(),
            leaving: false,
            suspect_deadlines: SuspectDeadlines::default(),
            suspect_to_down_after: config.suspect_to_down_after,
        }
    }

    /// This node's identity (its incarnation may grow if foca renews it).
    pub fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Asks the node at `seed` to let this node in.
    pub fn announce(&mut self, seed: SocketAddr) -> Result<Output, MembershipError> {
        let r = self.foca.announce(NodeId::seed(seed), &mut self.runtime);
        let out = self.drain();
        r.map_err(swim)?;
        Ok(out)
    }

    /// Handles a datagram received from a peer.
    pub fn handle_datagram(&mut self, data: &[u8]) -> Result<Output, MembershipError> {
        let Some((&tag, body)) = data.split_first() else {
            return Err(MembershipError::NotMembership);
        };
        match tag {
            TAG_SWIM => {
                self.forget_previous_life(body);
                let r = self.foca.handle_data(body, &mut self.runtime);
                // Told it is down (TurnUndead) by a member it holds down itself, foca renews
                // this node's identity and leaves it disconnected, probing nobody, until some
                // later datagram goes its whole way. If none comes (the member that would
                // have sent it has died), this node never probes again and detects nothing:
                // the multi-host clock-skew test saw two nodes miss a SIGKILL for 45 s after
                // a heal. An empty update list only re-evaluates the connection state, which
                // restarts probing while members are active.
                let _ = self
                    .foca
                    .apply_many(std::iter::empty(), false, &mut self.runtime);
                let out = self.drain();
                r.map_err(swim)?;
                Ok(out)
            }
            TAG_LEAVE => {
                let id = decode_leave(body).ok_or(MembershipError::BadLeaveNotice)?;
                if id.name == self.identity().name {
                    return Ok(Output::default());
                }
                tracing::debug!(member = %id, "leave notice");
                self.left.insert(id.name.clone(), id.incarnation);
                let r = self.foca.apply_many(
                    std::iter::once(Member::new(id, Default::default(), State::Down)),
                    true,
                    &mut self.runtime,
                );
                let out = self.drain();
                r.map_err(swim)?;
                Ok(out)
            }
            _ => Err(MembershipError::NotMembership),
        }
    }

    /// Incarnations are the wall clock's milliseconds at start, so a node whose clock was set
    /// back between two starts comes back with a lower incarnation than its previous life,
    /// which then wins foca's address conflict: the new life is ignored until the dead one is
    /// forgotten (remove-down-after, 15 min by default). A down life sends nothing, so a
    /// datagram from the same name and address with another incarnation comes from a newer
    /// life: forget the down one now, as the remove-down timer would later.
    fn forget_previous_life(&mut self, body: &[u8]) {
        let Ok(header) = Codec::<NodeId>::decode_header(&mut PostcardCodec, &mut &body[..]) else {
            return;
        };
        let src = header.src;
        let dead: Vec<NodeId> = self
            .foca
            .iter_membership_state()
            .filter(|m| {
                m.state() == State::Down
                    && m.id().addr == src.addr
                    && m.id().name == src.name
                    && m.id().incarnation > src.incarnation
            })
            .map(|m| m.id().clone())
            .collect();
        for id in dead {
            tracing::info!(old = %id, new = %src, "a newer life with a lower incarnation (clock set back?): forgetting the old one");
            if let Err(e) = self
                .foca
                .handle_timer(Timer::RemoveDown(id), &mut self.runtime)
            {
                tracing::debug!(error = %e, "swim remove down");
            }
        }
    }

    /// Handles a timer set earlier.
    pub fn handle_timer(&mut self, timer: TimerEvent) -> Output {
        match timer.0 {
            Due::Swim(t) => {
                if let Err(e) = self.foca.handle_timer(t, &mut self.runtime) {
                    tracing::debug!(error = %e, "swim timer");
                }
            }
            Due::SuspectToDown {
                member,
                incarnation,
            } => self.suspicion_expired(member, incarnation),
        }
        self.drain()
    }

    /// A suspicion's own deadline (see [`SuspectDeadlines`]): down, unless refuted meanwhile.
    fn suspicion_expired(&mut self, member: NodeId, incarnation: Incarnation) {
        let still_suspect = self.foca.iter_membership_state().any(|m| {
            m.id() == &member && m.state() == State::Suspect && m.incarnation() == incarnation
        });
        if !still_suspect {
            return;
        }
        tracing::info!(%member, "suspect past the suspect timeout without refuting: down");
        if let Err(e) = self.foca.apply_many(
            std::iter::once(Member::new(member, incarnation, State::Down)),
            true,
            &mut self.runtime,
        ) {
            tracing::debug!(error = %e, "swim suspect to down");
        }
    }

    /// Leaves the cluster: tells every member directly, then lets SWIM spread the word.
    pub fn leave(&mut self) -> Output {
        self.leaving = true;
        let notice = encode_leave(self.foca.identity());
        let mut datagrams: Vec<(SocketAddr, Bytes)> = self
            .foca
            .iter_members()
            .map(|m| (m.id().addr, notice.clone()))
            .collect();
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::debug!(error = %e, "swim leave");
        }
        let mut out = self.drain();
        datagrams.append(&mut out.datagrams);
        out.datagrams = datagrams;
        out
    }

    /// Every member this node knows, itself first.
    pub fn members(&self) -> Vec<MemberView> {
        let me = MemberView {
            id: self.identity().clone(),
            state: if self.leaving {
                MemberState::Left
            } else {
                MemberState::Up
            },
        };
        std::iter::once(me)
            .chain(self.view.values().cloned())
            .collect()
    }

    /// Members (other than this node) that are up or suspect.
    pub fn live_members(&self) -> impl Iterator<Item = &NodeId> {
        self.view
            .values()
            .filter(|m| matches!(m.state, MemberState::Up | MemberState::Suspect))
            .map(|m| &m.id)
    }

    fn state_of(&self, m: &Member<NodeId>) -> MemberState {
        match m.state() {
            State::Alive => MemberState::Up,
            State::Suspect => MemberState::Suspect,
            State::Down => {
                if self.left.get(&m.id().name) == Some(&m.id().incarnation) {
                    MemberState::Left
                } else {
                    MemberState::Down
                }
            }
        }
    }

    fn drain(&mut self) -> Output {
        let mut out = Output::default();
        while let Some((to, data)) = self.runtime.to_send() {
            let mut framed = Vec::with_capacity(data.len() + 1);
            framed.push(TAG_SWIM);
            framed.extend_from_slice(&data);
            out.datagrams.push((to.addr, Bytes::from(framed)));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            out.timers.push((after, TimerEvent(Due::Swim(timer))));
        }
        while let Some(n) = self.runtime.to_notify() {
            match n {
                OwnedNotification::Defunct if !self.leaving => {
                    tracing::warn!("this node was declared down by the cluster; rejoining")
                }
                OwnedNotification::Rejoin(id) => tracing::info!(identity = %id, "rejoined"),
                _ => {}
            }
        }
        let suspects = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == State::Suspect)
            .map(|m| (m.id().clone(), m.incarnation()))
            .collect();
        out.timers.extend(
            self.suspect_deadlines
                .update(suspects, self.suspect_to_down_after),
        );
        let me = self.foca.identity().name.clone();
        let mut next: BTreeMap<String, MemberView> = BTreeMap::new();
        for m in self.foca.iter_membership_state() {
            if m.id().name == me || m.id().name.is_empty() {
                continue;
            }
            let view = MemberView {
                id: m.id().clone(),
                state: self.state_of(m),
            };
            // with two lives of one name around, report the newer
            match next.get(&m.id().name) {
                Some(existing) if existing.id.incarnation > m.id().incarnation => {}
                _ => {
                    next.insert(m.id().name.clone(), view);
                }
            }
        }
        for (name, v) in &next {
            if self.view.get(name) != Some(v) {
                out.events.push(MemberEvent {
                    member: v.id.clone(),
                    state: v.state,
                });
            }
        }
        self.view = next;
        out
    }
}

fn swim(e: foca::Error) -> MembershipError {
    MembershipError::Swim(e.to_string())
}

fn encode_leave(id: &NodeId) -> Bytes {
    let name = id.name.as_bytes();
    let addr = id.addr.to_string();
    let mut out = Vec::with_capacity(1 + 2 + name.len() + 2 + addr.len() + 8);
    out.push(TAG_LEAVE);
    for field in [name, addr.as_bytes()] {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&field[..usize::from(len)]);
    }
    out.extend_from_slice(&id.incarnation.to_be_bytes());
    Bytes::from(out)
}

fn decode_leave(mut body: &[u8]) -> Option<NodeId> {
    let mut field = || -> Option<String> {
        let (len, rest) = body.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        let (s, rest) = (rest.get(..len)?, rest.get(len..)?);
        body = rest;
        String::from_utf8(s.to_vec()).ok()
    };
    let name = field()?;
    let addr = field()?.parse().ok()?;
    let inc = body.get(..8)?;
    let incarnation = u64::from_be_bytes(inc.try_into().ok()?);
    Some(NodeId {
        name,
        addr,
        incarnation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_notice_round_trips_and_rejects_garbage() {
        let id = NodeId::new("n1", "127.0.0.1:7946".parse().unwrap(), 42);
        let framed = encode_leave(&id);
        assert_eq!(framed[0], TAG_LEAVE);
        assert_eq!(decode_leave(&framed[1..]), Some(id));
        assert_eq!(decode_leave(&framed[1..5]), None);
        assert_eq!(decode_leave(&[0xff, 0xff, 1]), None);
    }

    #[test]
    fn garbage_datagrams_are_errors_not_panics() {
        let id = NodeId::new("n1", "127.0.0.1:7946".parse().unwrap(), 1);
        let mut m = Membership::new(id, &MembershipConfig::default(), 1);
        assert!(m.handle_datagram(&[]).is_err());
        assert!(m.handle_datagram(&[9, 1, 2]).is_err());
        assert!(m
            .handle_datagram(&[TAG_SWIM, 0xde, 0xad, 0xbe, 0xef])
            .is_err());
        assert!(m.handle_datagram(&[TAG_LEAVE, 0, 5]).is_err());
        assert_eq!(m.members().len(), 1);
    }
}
