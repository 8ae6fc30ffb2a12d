//! The committer: one dedicated thread (std, not a tokio task: a commit blocks on fsync) that
//! commits the batches it is handed to a [`Durable`], in order, one transaction and one fsync
//! each, and reports each committed batch back ([`Done`]: its number, and the keys whose delta
//! logs are full).
//!
//! Group commit is the caller's side of it: the replication driver hands over one batch at a
//! time and gathers the next one (every key changed meanwhile, once) while this one commits.
//! A failed commit is fatal: it is logged, handed to the fatal handler (the node exits
//! non-zero) and never retried, since after a failed fsync what the file holds is unknown. The
//! thread ends when every [`Committer`] handle is dropped, after the batches queued.
//!
//! The thread runs at a lower priority than the rest of the process ([`NICENESS`]): on a node
//! whose cores are busy, the wake of a finished fsync does not preempt the threads that serve
//! clients and replicate, and a commit that waits for a core gathers a larger next batch.
//!
//! This module owns the thread and its channels; it does not know what a batch holds.

use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::disk::DiskError;
use super::{Batch, Durable};
use crate::metrics as m;

/// How much the commit thread's nice value is above the process's (capped at 19, the lowest
/// priority): low enough that, on busy cores, the runtime's threads run first (measured with
/// `cluster-bench --data-dir`, 3 nodes on 2 cores: the p99 of a write's visibility on every
/// node fell from about 2x to about 1.5x that of memory only, at the same throughput), not so
/// low that commits stall.
pub const NICENESS: i32 = 10;

/// What to do when a commit fails (the node logs and exits non-zero).
pub type FatalHandler = Box<dyn FnOnce(DiskError) + Send>;

enum Job {
    Commit(Batch),
    Close {
        now_ms: i64,
        done: oneshot::Sender<()>,
    },
}

/// The handle that hands batches to the committer thread.
pub struct Committer {
    jobs: std_mpsc::Sender<Job>,
}

/// A committed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    /// its number
    pub number: u64,
    /// keys whose delta logs in the file are full: the next batch changing one should carry
    /// its whole value ([`Durable::commit`])
    pub full_logs: Vec<String>,
}

/// The batches committed, in order.
pub type Committed = mpsc::UnboundedReceiver<Done>;

impl Committer {
    /// Starts the thread over `durable`; `on_fatal` is called (on that thread) with the error of
    /// a failed commit, after which the thread stops.
    pub fn start(durable: Box<dyn Durable>, on_fatal: FatalHandler) -> (Committer, Committed) {
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::unbounded_channel();
        let run = move || run(durable, rx, done_tx, on_fatal);
        if let Err(e) = std::thread::Builder::new()
            .name("latticed-commit".into())
            .spawn(run)
        {
            // without the thread nothing would ever be committed (so nothing acknowledged):
            // as fatal as a failed commit, and said so at once
            tracing::error!(error = %e, "cannot start the commit thread");
            std::process::exit(crate::cli::EXIT_DISK);
        }
        (Committer { jobs }, done)
    }

    /// Queues a batch; its number comes back on [`Committed`] once it is durable. `false` if
    /// the thread stopped (after a fatal error).
    pub fn submit(&self, batch: Batch) -> bool {
        self.jobs.send(Job::Commit(batch)).is_ok()
    }

    /// Queues the record of a clean end of this life; the receiver resolves once it is written
    /// (or the thread stopped).
    pub fn close(&self, now_ms: i64) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let _ = self.jobs.send(Job::Close { now_ms, done });
        rx
    }
}

fn run(
    mut durable: Box<dyn Durable>,
    jobs: std_mpsc::Receiver<Job>,
    committed: mpsc::UnboundedSender<Done>,
    on_fatal: FatalHandler,
) {
    lower_priority();
    for job in jobs {
        match job {
            Job::Commit(batch) => {
                let start = Instant::now();
                let full_logs = match durable.commit(&batch) {
                    Ok(full) => full,
                    Err(e) => {
                        tracing::error!(file = %durable.describe(), error = %e,
                            "committing a batch failed: stopping (a failed fsync is never retried)");
                        on_fatal(e);
                        return;
                    }
                };
                metrics::histogram!(m::STORE_COMMIT_SECONDS).record(start.elapsed().as_secs_f64());
                metrics::counter!(m::STORE_KEYS_WRITTEN)
                    .increment((batch.puts.len() + batch.removes.len()) as u64);
                let done = Done {
                    number: batch.number,
                    full_logs,
                };
                if committed.send(done).is_err() {
                    // nobody waits for commits any more
                    return;
                }
            }
            Job::Close { now_ms, done } => {
                if let Err(e) = durable.close(now_ms) {
                    tracing::warn!(file = %durable.describe(), error = %e,
                        "could not record the clean shutdown");
                }
                let _ = done.send(());
            }
        }
    }
}

/// Raises the calling thread's nice value by [`NICENESS`] (on Linux a nice value is per
/// thread, and a new thread starts with its creator's). A failure only costs the priority:
/// logged, not fatal.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        let nice = rustix::process::getpriority_process(Some(tid))
            .unwrap_or(0)
            .saturating_add(NICENESS)
            .min(19);
        if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
            tracing::debug!(error = %e, "the commit thread keeps the process's priority");
        }
    }
}

/// The calling thread's nice value.
#[cfg(all(test, target_os = "linux"))]
fn niceness() -> i32 {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(i32::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    struct Fake {
        log: Arc<Mutex<Vec<u64>>>,
        fail_at: Option<u64>,
        /// the committing thread's nice value at each commit
        nice: Arc<Mutex<Vec<i32>>>,
    }

    impl Durable for Fake {
        fn commit(&mut self, batch: &Batch) -> Result<Vec<String>, DiskError> {
            #[cfg(target_os = "linux")]
            self.nice.lock().unwrap().push(niceness());
            if Some(batch.number) == self.fail_at {
                return Err(DiskError::Failed {
                    path: "fake".into(),
                    what: "committing",
                    reason: "injected".into(),
                });
            }
            self.log.lock().unwrap().push(batch.number);
            Ok(vec![format!("key-{}", batch.number)])
        }
        fn close(&mut self, _: i64) -> Result<(), DiskError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    #[tokio::test]
    async fn batches_commit_in_order_and_a_failure_is_fatal_once() {
        let fake = Fake {
            fail_at: Some(3),
            ..Fake::default()
        };
        let fatal = Arc::new(Mutex::new(Vec::new()));
        let seen = fatal.clone();
        let (c, mut done) = Committer::start(
            Box::new(fake.clone()),
            Box::new(move |e| seen.lock().unwrap().push(e.to_string())),
        );
        for n in 1..=4 {
            assert!(c.submit(Batch::new(n, 0)));
        }
        for n in 1..=2 {
            let d = done.recv().await.map(|d| (d.number, d.full_logs));
            assert_eq!(
                d,
                Some((n, vec![format!("key-{n}")])),
                "reported as committed"
            );
        }
        assert_eq!(done.recv().await, None, "nothing after the failure");
        assert_eq!(*fake.log.lock().unwrap(), vec![1, 2]);
        assert_eq!(fatal.lock().unwrap().len(), 1);
        assert!(!c.submit(Batch::new(5, 0)), "the thread stopped");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn commits_run_below_the_process_priority() {
        let fake = Fake::default();
        let (c, mut done) = Committer::start(Box::new(fake.clone()), Box::new(|_| {}));
        assert!(c.submit(Batch::new(1, 0)));
        assert!(done.recv().await.is_some());
        let here = niceness();
        let seen = fake.nice.lock().unwrap().clone();
        assert_eq!(seen, vec![(here + NICENESS).min(19)], "this thread: {here}");
    }
}
