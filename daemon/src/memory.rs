//! Giving memory back to the OS after entities end.
//!
//! glibc's malloc keeps memory freed in the middle of its heaps: the per-thread arenas the
//! tokio workers allocate from are trimmed only at their top, so after a wave of 1,000 entities
//! passivates the daemon's RSS would stay at its peak for good (measured: 18 MB at start, 45 MB
//! with 1,000 entities, still 45 MB after they all passivated; mimalloc, tried instead, kept it
//! too while the runtime idled). `malloc_trim(0)` gives every free page of every arena back.
//! It walks the heaps, so it runs on a blocking thread, at most once per [`TRIM_EVERY`], and
//! only after entities ended since the last run.
//!
//! This module owns that, and is the daemon's one place with `unsafe` (one FFI call; `unsafe`
//! is denied everywhere else). On a target without glibc it does nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How often, at most, freed memory is given back.
pub const TRIM_EVERY: Duration = Duration::from_secs(3);

/// Entities that ended since the process started.
static ENDED: AtomicU64 = AtomicU64::new(0);

/// An entity ended: its memory is free now.
pub fn entity_ended() {
    ENDED.fetch_add(1, Ordering::Relaxed);
}

/// Whether the task of [`spawn`] runs (one per process, however many nodes it holds).
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Starts [`give_back_after_entities_end`] unless it runs already in this process.
pub fn spawn() {
    if !RUNNING.swap(true, Ordering::Relaxed) {
        tokio::spawn(give_back_after_entities_end());
    }
}

/// Runs for good: every [`TRIM_EVERY`], gives freed memory back if entities ended since the
/// last time.
pub async fn give_back_after_entities_end() {
    let mut seen = ENDED.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = ENDED.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            let _ = tokio::task::spawn_blocking(give_back).await;
        }
    }
}

/// Gives the allocator's free pages back to the OS.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only walks and trims glibc's own heaps under their locks; it takes
    // no pointer and leaves every live allocation untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn giving_back_leaves_live_memory_alone() {
        let live: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 4096]).collect();
        let freed: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 4096]).collect();
        drop(freed);
        super::give_back();
        assert!(live
            .iter()
            .enumerate()
            .all(|(i, v)| v.iter().all(|b| *b == i as u8)));
    }
}
