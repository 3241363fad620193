//! How an epoch of `protect` ends, and what the agent says about it.
//!
//! After the main loop: a last round places the final cut (unless a disk is still in its
//! initial sync, or the stop was abandoned), the capture is detached, and the agent waits
//! for the network side to have everything acknowledged, bounded as `stop` describes and
//! saying every 5 s what it waits for. Then it says what really happened, per disk:
//!
//! - everything durable on the server, with the last acknowledged sequence and cut (or
//!   that no recovery point was acknowledged);
//! - stopped during the initial sync at N %: no recovery point of this epoch exists, and
//!   the next start continues the sync, sending what the server has not acknowledged (exit
//!   status 0: the stop was asked for and nothing that existed was lost); stopped during a
//!   continued epoch's sync: the points from before the restart stand;
//! - abandoned (second signal, drain timeout): what was not acknowledged, and an error
//!   (non-zero exit status).

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    net::LinkStats,
    pipeline::{DiskProducer, Outgoing, RoundConfig, round},
    protect::Ended,
    status::human_bytes,
    stop::{Abandon, Abandoned, Stop, send_or_stop},
};
use crate::capture::Capture;

/// Everything the end of an epoch needs from `run_epoch`.
pub(crate) struct EpochEnd<'a> {
    pub rt: tokio::runtime::Runtime,
    pub net: &'a mut JoinHandle<anyhow::Result<()>>,
    /// The data endpoint, for messages.
    pub server: &'a str,
    pub stop: &'a Stop,
    pub capture: &'a mut Capture,
    pub producers: &'a mut [DiskProducer],
    pub round_cfg: &'a RoundConfig,
    pub senders: Vec<mpsc::Sender<Outgoing>>,
    pub links: &'a [Arc<LinkStats>],
    /// The main loop ended because the network side failed (its round's error).
    pub net_failed: Option<anyhow::Error>,
    /// A hand-off to the network side was abandoned (see `stop`).
    pub abandoned: bool,
    /// A device changed size.
    pub resize: Option<String>,
}

/// Longest wait for acknowledgements when no stop was asked for (a resize).
const UNASKED_WAIT: Duration = Duration::from_secs(120);
/// How often the wait says what it waits for.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Finish the epoch: see the module doc.
pub(crate) fn finish(e: EpochEnd<'_>) -> anyhow::Result<Ended> {
    let EpochEnd {
        rt,
        net,
        server,
        stop,
        capture,
        producers,
        round_cfg,
        senders,
        links,
        net_failed,
        abandoned,
        resize,
    } = e;
    let syncing = producers.iter().filter(|p| p.syncing()).count();
    // A last round places the final cut if the previous one was rate-limited.
    if net_failed.is_none() && !abandoned && !net.is_finished() && resize.is_none() && syncing == 0
    {
        let mut send = |slot: usize, item: Outgoing| -> anyhow::Result<()> {
            send_or_stop(&rt, &senders[slot], &links[slot], item, stop, false)
        };
        std::thread::sleep(round_cfg.cut_interval);
        // Until everything read has a cut after it (writes still arriving are bounded by
        // the deadline).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match round(capture, producers, round_cfg, &mut send) {
                Ok(_) => {}
                // The wait below sees the same abandonment and says what was left.
                Err(e) if e.downcast_ref::<Abandoned>().is_some() => break,
                Err(e) => return Err(e),
            }
            if !producers.iter().any(DiskProducer::has_pending_changes)
                || Instant::now() >= deadline
                || stop.abandon().is_some()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    capture.detach()?;
    drop(senders);
    let stopped_in_sync = stop.requested() && syncing == producers.len();
    if stopped_in_sync && net_failed.is_none() && resize.is_none() {
        // Nothing this epoch sent can become a recovery point: do not wait for it.
        rt.shutdown_background();
        flush_maps(producers);
        report_stopped(producers, links, server);
        return Ok(Ended::Stopped);
    }
    let waited = wait_for_acks(&rt, net, server, stop, producers, links);
    flush_maps(producers);
    let result = match waited {
        Ok(result) => result,
        Err(why) => {
            rt.shutdown_background();
            bail!(
                "stopped before the process server at {server} acknowledged everything ({why}): \
                 {}. What it acknowledged stays durable and the recovery points up to the last \
                 acknowledged cut stand; the next start continues the epoch, sending what the \
                 server has not acknowledged",
                unacknowledged(producers, links)
            );
        }
    };
    if let Some(e) = net_failed {
        return Err(e.context(result.err().map(|e| format!("{e:#}")).unwrap_or_default()));
    }
    result?;
    if let Some(why) = resize {
        return Ok(Ended::Resized(why));
    }
    report_stopped(producers, links, server);
    Ok(Ended::Stopped)
}

/// Wait for the network side to finish (everything acknowledged): `Ok(its result)`, or
/// `Err` when the stop abandons the wait.
fn wait_for_acks(
    rt: &tokio::runtime::Runtime,
    net: &mut JoinHandle<anyhow::Result<()>>,
    server: &str,
    stop: &Stop,
    producers: &[DiskProducer],
    links: &[Arc<LinkStats>],
) -> Result<anyhow::Result<()>, Abandon> {
    let started = Instant::now();
    let mut last_report: Option<Instant> = None;
    rt.block_on(async {
        loop {
            tokio::select! {
                joined = &mut *net => {
                    return Ok(joined.map_err(anyhow::Error::from).and_then(|r| r));
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if let Some(why) = stop.abandon() {
                return Err(why);
            }
            if !stop.requested() && started.elapsed() > UNASKED_WAIT {
                return Ok(Err(anyhow::anyhow!(
                    "the process server at {server} did not acknowledge everything within {} s",
                    UNASKED_WAIT.as_secs()
                )));
            }
            if last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
                last_report = Some(Instant::now());
                let bytes: u64 = links
                    .iter()
                    .map(|l| l.unacked_bytes.load(Ordering::Relaxed))
                    .sum();
                let what = if bytes > 0 {
                    human_bytes(bytes)
                } else {
                    "the last cut".to_owned()
                };
                tracing::info!(
                    "waiting for {what} to be acknowledged by {server} ({}); {}",
                    per_disk_seqs(producers, links),
                    if stop.requested() {
                        format!(
                            "up to {} s more, signal again to stop at once",
                            stop.drain_left().as_secs()
                        )
                    } else {
                        "a device changed size".to_owned()
                    }
                );
            }
        }
    })
}

fn last_produced(p: &DiskProducer) -> u64 {
    p.builder.next_seq().saturating_sub(1)
}

fn per_disk_seqs(producers: &[DiskProducer], links: &[Arc<LinkStats>]) -> String {
    producers
        .iter()
        .zip(links)
        .map(|(p, l)| {
            format!(
                "{}: seq {} of {} acknowledged",
                p.dev.path.display(),
                l.acked_seq.load(Ordering::Relaxed),
                last_produced(p)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What was not acknowledged, per disk.
fn unacknowledged(producers: &[DiskProducer], links: &[Arc<LinkStats>]) -> String {
    producers
        .iter()
        .zip(links)
        .map(|(p, l)| {
            let acked = l.acked_seq.load(Ordering::Relaxed);
            let cut = match l.acked_cuts.load(Ordering::Relaxed) {
                0 => "no cut acknowledged".to_owned(),
                c => format!("last acknowledged cut {c}"),
            };
            let sync = if p.syncing() {
                format!(", initial sync stopped at {}%", sync_percent(p))
            } else {
                String::new()
            };
            format!(
                "{}: {} not acknowledged (seq {} to {}; {cut}{sync})",
                p.dev.path.display(),
                human_bytes(l.unacked_bytes.load(Ordering::Relaxed)),
                acked + 1,
                last_produced(p).max(acked),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every acknowledged-digest map written and made durable, so the next start sends only
/// what changes after this. A failure only makes that start send more: it is logged.
fn flush_maps(producers: &[DiskProducer]) {
    for p in producers {
        if let Some(m) = p.builder.acked_map()
            && let Err(e) = m.lock().expect("acked map lock").flush()
        {
            tracing::warn!(
                device = %p.dev.path.display(),
                "{e:#}: the next start may send more of this disk than changed"
            );
        }
    }
}

fn sync_percent(p: &DiskProducer) -> u64 {
    p.synced_sectors() * 100 / p.dev.sectors.max(1)
}

/// Say, per disk, what a stop left behind.
fn report_stopped(producers: &[DiskProducer], links: &[Arc<LinkStats>], server: &str) {
    for (p, l) in producers.iter().zip(links) {
        if p.syncing() && p.delta.is_some() {
            tracing::warn!(
                "stopped during the sync of {} at {}% after a restart: the epoch's points \
                 from before the restart stand, none after it exists yet; the next start \
                 continues, sending what the server has not acknowledged",
                p.dev.path.display(),
                sync_percent(p)
            );
            continue;
        }
        if p.syncing() {
            tracing::warn!(
                "stopped during the initial sync of {} at {}%: no recovery point of this \
                 epoch exists yet (points of earlier epochs, if any, stand); the next start \
                 continues the sync, sending what the server has not acknowledged",
                p.dev.path.display(),
                sync_percent(p)
            );
            continue;
        }
        let point = match l.acked_cuts.load(Ordering::Relaxed) {
            0 => "no recovery point was acknowledged".to_owned(),
            c => format!("latest recovery point: cut {c}"),
        };
        tracing::info!(
            "stopped: everything read from {} is durable on the process server at {server} \
             (up to seq {}; {point})",
            p.dev.path.display(),
            l.acked_seq.load(Ordering::Relaxed)
        );
    }
}
