//! How `protect` stops: every wait on its stop path observes the stop, and is bounded.
//!
//! - The first SIGINT/SIGTERM asks for a clean stop: the agent reads what is still dirty,
//!   places a last cut and waits for the process server to acknowledge everything, for at
//!   most the drain timeout (`drain-timeout-secs`, default 30 s), saying every few seconds
//!   what it waits for. Stopped during the initial sync it leaves at once: no recovery
//!   point of the epoch can exist yet, and the next start syncs again anyway.
//! - A second signal, or the drain timeout passing, abandons the wait: the agent exits
//!   non-zero naming what was not acknowledged. Nothing durable is lost: `state.json` is
//!   only ever replaced atomically, the server keeps what it acknowledged, and the next
//!   start begins a new epoch.
//! - Every blocking hand-off to the network side ([`send_or_stop`]) wakes every 100 ms to
//!   check for that, so a full channel (a server that does not answer) cannot hold the
//!   agent. As a last resort, a process still running 10 s after the second signal (a
//!   read of a hung device, say) exits from the signal thread.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use signal_hook::consts::{SIGINT, SIGTERM};
use tokio::sync::mpsc;

use super::{net::LinkStats, pipeline::Outgoing};

/// How long after a second signal the signal thread exits the process if the agent has
/// not stopped by itself.
const LAST_RESORT: Duration = Duration::from_secs(10);

/// Why the agent gives up waiting for acknowledgements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abandon {
    /// A second SIGINT/SIGTERM.
    SecondSignal,
    /// The drain timeout passed since the first signal.
    DrainTimeout(Duration),
    /// A signal during the initial sync.
    StoppedInSync,
}

impl std::fmt::Display for Abandon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abandon::SecondSignal => f.write_str("a second signal asked to stop at once"),
            Abandon::DrainTimeout(d) => write!(f, "the drain timeout ({} s) passed", d.as_secs()),
            Abandon::StoppedInSync => f.write_str("a signal during the initial sync"),
        }
    }
}

/// A blocking hand-off gave up because the agent is stopping at once.
#[derive(Debug, thiserror::Error)]
#[error("stopping without waiting further: {0}")]
pub struct Abandoned(pub Abandon);

/// The stop state shared by the signal thread and the agent's loops.
#[derive(Debug)]
pub struct Stop {
    signals: AtomicUsize,
    first: OnceLock<Instant>,
    drain: Duration,
}

impl Stop {
    /// Catch SIGINT and SIGTERM from now on (a thread counts them).
    pub fn install(drain: Duration) -> anyhow::Result<Arc<Stop>> {
        let stop = Arc::new(Stop {
            signals: AtomicUsize::new(0),
            first: OnceLock::new(),
            drain,
        });
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let shared = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("ripcord-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                    shared.note_signal(name);
                }
            })?;
        Ok(stop)
    }

    fn note_signal(&self, name: &str) {
        let n = self.signals.fetch_add(1, Ordering::AcqRel) + 1;
        if n == 1 {
            let _ = self.first.set(Instant::now());
            tracing::info!(
                "{name}: stopping; flushing and waiting up to {} s for the process server to \
                 acknowledge (send SIGINT or SIGTERM again to stop at once)",
                self.drain.as_secs()
            );
        } else if n == 2 {
            tracing::warn!("{name} again: stopping at once");
            std::thread::spawn(|| {
                std::thread::sleep(LAST_RESORT);
                eprintln!(
                    "ripcord-agent: still running {} s after the second signal: exiting now \
                     (the next start begins a new epoch)",
                    LAST_RESORT.as_secs()
                );
                std::process::exit(130);
            });
        }
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.signals.load(Ordering::Acquire) > 0
    }

    /// `Some` once the agent must stop waiting: a second signal, or the drain timeout
    /// passed since the first.
    pub fn abandon(&self) -> Option<Abandon> {
        if self.signals.load(Ordering::Acquire) >= 2 {
            return Some(Abandon::SecondSignal);
        }
        let first = self.first.get()?;
        (first.elapsed() >= self.drain).then_some(Abandon::DrainTimeout(self.drain))
    }

    /// Time left of the drain timeout (the full timeout before any signal).
    pub fn drain_left(&self) -> Duration {
        self.first
            .get()
            .map_or(self.drain, |t| self.drain.saturating_sub(t.elapsed()))
    }
}

/// Hand `item` to the network side, waiting while its channel is full, but never past
/// [`Stop::abandon`] (then the error is [`Abandoned`]), nor past the first signal when
/// `in_sync` (a disk is in its initial sync: nothing it sends can become a recovery point
/// before the stop). A batch's bytes count as unacknowledged in `stats` from here until
/// the server acknowledges them.
pub fn send_or_stop(
    rt: &tokio::runtime::Runtime,
    tx: &mpsc::Sender<Outgoing>,
    stats: &LinkStats,
    item: Outgoing,
    stop: &Stop,
    in_sync: bool,
) -> anyhow::Result<()> {
    if let Outgoing::Batch(b, _) = &item {
        stats
            .unacked_bytes
            .fetch_add(b.payload.len() as u64, Ordering::Relaxed);
    }
    let mut item = item;
    loop {
        match tx.try_send(item) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                anyhow::bail!("the network side stopped")
            }
            Err(mpsc::error::TrySendError::Full(back)) => item = back,
        }
        if let Some(why) = stop.abandon() {
            return Err(Abandoned(why).into());
        }
        if in_sync && stop.requested() {
            return Err(Abandoned(Abandon::StoppedInSync).into());
        }
        let permit = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), tx.reserve()).await
        });
        match permit {
            Ok(Ok(permit)) => {
                permit.send(item);
                return Ok(());
            }
            Ok(Err(_)) => anyhow::bail!("the network side stopped"),
            Err(_) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_gives_way_to_a_second_signal() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let stop = Stop {
            signals: AtomicUsize::new(0),
            first: OnceLock::new(),
            drain: Duration::from_secs(3600),
        };
        let cut = || Outgoing::Cut {
            time_ns: 0,
            mono_ns: 0,
            seq: 0,
            app: false,
            group: None,
        };
        send_or_stop(&rt, &tx, &LinkStats::default(), cut(), &stop, false).unwrap();
        assert_eq!(stop.abandon(), None);
        stop.note_signal("SIGINT");
        assert!(stop.requested());
        assert_eq!(stop.abandon(), None, "the drain timeout has not passed");
        stop.signals.fetch_add(1, Ordering::AcqRel); // a second signal, without the watchdog
        let started = Instant::now();
        let e = send_or_stop(&rt, &tx, &LinkStats::default(), cut(), &stop, false).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(e.downcast_ref::<Abandoned>().is_some(), "{e:#}");
    }

    #[test]
    fn the_drain_timeout_abandons_the_wait() {
        let stop = Stop {
            signals: AtomicUsize::new(0),
            first: OnceLock::new(),
            drain: Duration::ZERO,
        };
        assert_eq!(stop.abandon(), None, "no signal yet");
        stop.note_signal("SIGTERM");
        assert_eq!(stop.abandon(), Some(Abandon::DrainTimeout(Duration::ZERO)));
    }
}
