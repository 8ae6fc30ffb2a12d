//! Vote: every replica's current vote, counted over the members that are up.
//!
//! Per replica one entry `(version, vote)` of a [`DotFun`]: the dot's counter is the version, so
//! changing one's vote is a write that covers one's previous entry. A tally needs the set of live
//! replicas ([`Voters`]), which membership supplies; `votes_for` and `total_voters` are computed,
//! never stored.

use std::collections::BTreeSet;

use crate::causal::Causal;
use crate::context::{CausalContext, ReplicaId};
use crate::dotstore::DotFun;

/// Per replica: its latest vote, tagged with the dot of that vote.
pub type VoteStore = DotFun<bool>;

/// A vote among the live replicas.
pub type Vote = Causal<VoteStore>;

/// Who counts in a tally: this replica and the replicas that are up now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Voters {
    /// this replica (always counted)
    pub me: ReplicaId,
    /// replicas that are up (this one need not be listed)
    pub live: BTreeSet<ReplicaId>,
}

impl Voters {
    /// A lone replica.
    pub fn alone(me: ReplicaId) -> Self {
        Voters {
            me,
            live: BTreeSet::new(),
        }
    }
}

/// The result of a vote as CloudState reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VoteTally {
    /// this replica's vote
    pub self_vote: bool,
    /// live replicas voting true
    pub votes_for: u32,
    /// live replicas
    pub total_voters: u32,
}

pub(crate) fn own_vote(store: &VoteStore, me: ReplicaId) -> bool {
    store.latest_of(me).is_some_and(|(_, v)| *v)
}

pub(crate) fn tally(store: &VoteStore, voters: &Voters) -> VoteTally {
    let total = voters.live.len() + usize::from(!voters.live.contains(&voters.me));
    let votes_for = store
        .latest_per_replica()
        .filter(|(d, v)| **v && (d.actor == voters.me || voters.live.contains(&d.actor)))
        .count();
    VoteTally {
        self_vote: own_vote(store, voters.me),
        votes_for: u32::try_from(votes_for).unwrap_or(u32::MAX),
        total_voters: u32::try_from(total).unwrap_or(u32::MAX),
    }
}

/// The delta of `replica` voting `vote`; `None` if that is its vote already.
pub(crate) fn set(
    store: &VoteStore,
    ctx: &CausalContext,
    replica: ReplicaId,
    vote: bool,
) -> Option<Causal<VoteStore>> {
    let old = store.latest_of(replica);
    if old.is_some_and(|(_, v)| *v) == vote {
        return None;
    }
    let z = ctx.next_dot(replica);
    let mut delta_store = VoteStore::default();
    delta_store.insert(z.clone(), vote);
    let covered = old.map(|(d, _)| d.clone());
    Some(Causal::from_delta_parts(
        delta_store,
        CausalContext::from_parts([], covered.into_iter().chain([z])),
    ))
}

impl Vote {
    /// The tally among `voters`.
    pub fn tally(&self, voters: &Voters) -> VoteTally {
        tally(&self.store, voters)
    }

    /// The delta of `replica` voting `vote`; `None` if unchanged.
    pub fn set(&self, replica: ReplicaId, vote: bool) -> Option<Vote> {
        set(&self.store, &self.ctx, replica, vote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_only_live_replicas() {
        let mut v = Vote::new();
        for r in [1, 2, 3] {
            let d = v.set(r, true).expect("changed");
            v.join(&d);
        }
        let all = Voters {
            me: 1,
            live: [1, 2, 3].into(),
        };
        assert_eq!(
            v.tally(&all),
            VoteTally {
                self_vote: true,
                votes_for: 3,
                total_voters: 3
            }
        );
        let two = Voters {
            me: 1,
            live: [2].into(),
        };
        assert_eq!(v.tally(&two).votes_for, 2);
        assert_eq!(v.tally(&two).total_voters, 2);
        let d = v.set(1, false).expect("changed");
        v.join(&d);
        assert_eq!(v.tally(&all).votes_for, 2);
        assert!(!v.tally(&all).self_vote);
        assert!(v.set(1, false).is_none());
    }
}
