//! latticed-membership: SWIM cluster membership as a sans-IO state machine around foca.
//!
//! - [`NodeId`] (`identity`): who a member is; the same name with a higher incarnation wins.
//! - [`MembershipConfig`] (`config`): SWIM timing, and the foca configuration made from it.
//! - [`Membership`] (`membership`): datagrams, timer events and commands in; datagrams to send,
//!   timers to set and member events out.
//!
//! No sockets, no tokio, no clock: the daemon's transport drives it over QUIC datagrams, and the
//! tests drive it over a seeded simulated network.

#![forbid(unsafe_code)]

pub mod config;
pub mod identity;
pub mod membership;

pub use config::{MembershipConfig, DEFAULT_MAX_PACKET_SIZE};
pub use identity::NodeId;
pub use membership::{
    MemberEvent, MemberState, MemberView, Membership, MembershipError, Output, TimerEvent,
};
