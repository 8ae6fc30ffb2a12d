//! `MembershipConfig`: the SWIM timing knobs, and the foca configuration made from them.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

/// The largest datagram a QUIC connection carries before path MTU discovery (quinn's initial
/// MTU of 1200 bytes less headers); SWIM packets must fit in one.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 1150;

/// SWIM timing and sizing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// How often a random member is probed.
    pub probe_period: Duration,
    /// How long a probe waits for an ack before asking others to probe indirectly.
    pub probe_rtt: Duration,
    /// How long a suspect member has to refute the suspicion before it is declared down.
    pub suspect_to_down_after: Duration,
    /// How long a down member is remembered (and reported) before it is forgotten.
    pub remove_down_after: Duration,
    /// Largest SWIM packet.
    pub max_packet_size: usize,
    /// Expected cluster size (tunes dissemination).
    pub cluster_size_hint: u32,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(500),
            suspect_to_down_after: Duration::from_secs(3),
            remove_down_after: Duration::from_secs(15 * 60),
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            cluster_size_hint: 16,
        }
    }
}

impl MembershipConfig {
    /// The worst-case time between a member's crash and everyone reporting it down, ignoring
    /// message loss: one probe period to be probed, the probe's round trip, the suspicion.
    pub fn detection_bound(&self) -> Duration {
        self.probe_period + self.probe_rtt + self.suspect_to_down_after + self.probe_period
    }

    pub(crate) fn to_foca(&self) -> foca::Config {
        let size = NonZeroU32::new(self.cluster_size_hint.max(1)).unwrap_or(NonZeroU32::MIN);
        let mut c = foca::Config::new_lan(size);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt.min(self.probe_period);
        c.suspect_to_down_after = self.suspect_to_down_after;
        c.remove_down_after = Some(self.remove_down_after);
        c.max_packet_size =
            NonZeroUsize::new(self.max_packet_size.max(256)).unwrap_or(NonZeroUsize::MIN);
        c.notify_down_members = true;
        // announce to a random member now and then: heals partitions that left two halves
        // each believing the other down
        if let Some(p) = c.periodic_announce.as_mut() {
            p.frequency = self.probe_period * 5;
        }
        if let Some(p) = c.periodic_announce_to_down_members.as_mut() {
            p.frequency = self.probe_period * 3;
        }
        c
    }
}
