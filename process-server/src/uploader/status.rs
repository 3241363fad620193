//! How a disk's uploads are going, shared by the uploader, the disk's stream and the
//! metrics endpoint: failures (counted, logged without flooding), the newest recovery
//! point, and how current that point is.
//!
//! Invariant: `current_at` moves only while the owner's stream is open on this server and
//! the newest committed point holds every batch this server has made durable (the
//! receiver's last cut is at its durable seq, and that cut is committed). An idle disk's
//! lag then stays near zero, while a disk whose owner is away (its writes unknown here)
//! or whose newest data waits for a point keeps aging.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use ripcord_proto::DurableState;
use ripcord_store::{Committed, DiskId};

/// How a disk's uploads are going (shared with the metrics endpoint).
#[derive(Debug)]
pub struct UploadStatus {
    /// Failed upload attempts since the server started.
    pub errors: u64,
    /// While uploads fail: since when, and the latest failure.
    pub failing: Option<(Instant, String)>,
    /// The innermost cause of the latest failure (object names vary between attempts;
    /// the cause is what tells whether the problem changed).
    failing_cause: String,
    /// When (this server's clock) the newest recovery point was committed, or when this
    /// server started uploading the disk if none was committed since.
    pub newest_point_at: SystemTime,
    /// Whether `newest_point_at` is a committed point (else the start time).
    pub point_seen: bool,
    /// (epoch, cut id) of the newest point committed in the store, as far as this
    /// server knows (from the store at the uploader's start, then from its flushes).
    pub newest_point: Option<(u64, u64)>,
    /// When the stale-point warning was last logged.
    warned_stale: Option<Instant>,
    /// When the failure was last logged.
    logged_failure: Option<Instant>,
    /// Streams of the disk's owner open on this server now ([`UploadStatus::stream_open`]).
    open_streams: u32,
    /// The last time the newest committed point was seen to hold every batch this server
    /// made durable while the owner's stream was open (see the module doc).
    current_at: Option<SystemTime>,
    /// The retention in force (the machine's policy's, else the server's
    /// `retention-secs`); `None` until the policies are known.
    pub retention: Option<std::time::Duration>,
}

impl Default for UploadStatus {
    fn default() -> Self {
        UploadStatus {
            errors: 0,
            failing: None,
            failing_cause: String::new(),
            newest_point_at: SystemTime::now(),
            point_seen: false,
            newest_point: None,
            warned_stale: None,
            logged_failure: None,
            open_streams: 0,
            current_at: None,
            retention: None,
        }
    }
}

/// Held by a disk's stream while it is open (the owner is there: writes it makes reach
/// this server); dropping it ends that.
#[must_use = "the stream counts as open only while this is held"]
pub struct OpenStream(Arc<Mutex<UploadStatus>>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut st = self.0.lock().expect("status lock");
        st.open_streams = st.open_streams.saturating_sub(1);
    }
}

impl UploadStatus {
    /// What the agent of the disk is told (see [`ripcord_proto::StoreStatus`]).
    pub fn for_agent(&self, disk: DiskId) -> ripcord_proto::StoreStatus {
        let (epoch, committed_cut_id) = self.newest_point.unwrap_or_default();
        ripcord_proto::StoreStatus {
            disk_id: disk,
            epoch,
            committed_cut_id,
            point_age_secs: self.point_age().as_secs(),
            failure: self
                .failing
                .as_ref()
                .map(|(_, m)| ripcord_proto::wire::clip_message(m))
                .unwrap_or_default(),
        }
    }

    /// Seconds since the newest recovery point (or since the start, see `point_seen`).
    pub fn point_age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.newest_point_at)
            .unwrap_or_default()
    }

    /// Marks the owner's stream open until the guard is dropped.
    pub fn stream_open(status: &Arc<Mutex<UploadStatus>>) -> OpenStream {
        status.lock().expect("status lock").open_streams += 1;
        OpenStream(Arc::clone(status))
    }

    /// Notes the receiver's durable position: while the owner's stream is open and the
    /// newest committed point holds every durable batch, the point is current now.
    pub fn note_durable(&mut self, durable: &DurableState) {
        let covered = durable.last_cut.is_some_and(|cut| {
            cut.seq >= durable.durable_seq
                && self
                    .newest_point
                    .is_some_and(|(epoch, id)| epoch == durable.epoch && id >= cut.id)
        });
        if covered && self.open_streams > 0 {
            self.current_at = Some(SystemTime::now());
        }
    }

    /// Up to when the newest recovery point is known to hold every write of the disk: the
    /// later of its commit and the last time it was seen current (`None` before this
    /// server committed or saw one). A failover to it loses at most the writes since.
    pub fn current_as_of(&self) -> Option<SystemTime> {
        self.point_seen
            .then_some(self.newest_point_at)
            .max(self.current_at)
    }

    /// Seconds of writes a failover to the newest point could lose: 0 while it is current,
    /// else the time since it last was (or since this server started uploading the disk).
    pub fn lag(&self) -> Duration {
        let since = self.current_as_of().unwrap_or(self.newest_point_at);
        SystemTime::now().duration_since(since).unwrap_or_default()
    }

    /// A failed attempt: counted, and logged when new, when its cause changed, or a
    /// minute after the last log line.
    pub(super) fn failed(
        &mut self,
        disk: &DiskId,
        (owner, device): (&str, &str),
        error: &anyhow::Error,
        retry_in: Duration,
    ) {
        self.errors += 1;
        let message = ripcord_types::report(error.as_ref());
        let cause = error.root_cause().to_string();
        let changed = self.failing.is_none() || self.failing_cause != cause;
        self.failing_cause = cause;
        let since = self.failing.as_ref().map_or_else(Instant::now, |(t, _)| *t);
        let quiet = self
            .logged_failure
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if changed || !quiet {
            if self.failing.is_none() {
                tracing::warn!(
                    disk = %disk, device, machine = owner,
                    "uploading to the target store failed: {message}. No recovery points are \
                     made until this is fixed; the journal keeps every acknowledged write. \
                     Retrying in {} s", retry_in.as_secs()
                );
            } else {
                tracing::warn!(
                    disk = %disk, device, machine = owner,
                    "uploads still failing after {} attempts over {}: {message}",
                    self.errors,
                    humantime::format_duration(Duration::from_secs(since.elapsed().as_secs()))
                );
            }
            self.logged_failure = Some(Instant::now());
        }
        self.failing = Some((since, message));
    }

    /// A successful flush: clears the failure (logging the recovery) and notes a new
    /// recovery point.
    pub(super) fn flushed(
        &mut self,
        disk: &DiskId,
        (owner, device): (&str, &str),
        committed: &Committed,
    ) {
        let new_points = !committed.cuts_committed.is_empty();
        if committed.cuts_through > 0 {
            self.newest_point = Some((committed.epoch, committed.cuts_through));
        }
        if let Some((since, _)) = self.failing.take() {
            tracing::info!(
                disk = %disk, device, machine = owner,
                "uploads work again after failing for {}",
                humantime::format_duration(Duration::from_secs(since.elapsed().as_secs()))
            );
            self.logged_failure = None;
        }
        if new_points {
            self.newest_point_at = SystemTime::now();
            self.point_seen = true;
            self.warned_stale = None;
        }
    }

    /// Warns (at most once per `limit`) when data waits and the newest point is older
    /// than `limit`.
    pub(super) fn check_stale(
        &mut self,
        disk: &DiskId,
        (owner, device): (&str, &str),
        data_waiting: bool,
        limit: Duration,
    ) {
        let age = self.point_age();
        if !data_waiting || age < limit || self.warned_stale.is_some_and(|t| t.elapsed() < limit) {
            return;
        }
        self.warned_stale = Some(Instant::now());
        let age = humantime::format_duration(Duration::from_secs(age.as_secs()));
        let why = self
            .failing
            .as_ref()
            .map_or_else(String::new, |(_, m)| format!(" (uploads fail: {m})"));
        if self.point_seen {
            tracing::warn!(
                disk = %disk, device, machine = owner,
                "the newest recovery point is {age} old while new data waits in the journal{why}"
            );
        } else {
            tracing::warn!(
                disk = %disk, device, machine = owner,
                "no recovery point committed in the {age} since this server started, while \
                 data waits in the journal{why}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use ripcord_proto::receiver::CutPos;

    use super::*;

    fn durable(epoch: u64, durable_seq: u64, cut: Option<(u64, u64)>) -> DurableState {
        DurableState {
            epoch,
            durable_seq,
            last_cut: cut.map(|(id, seq)| CutPos { id, seq }),
        }
    }

    #[test]
    fn a_point_is_current_only_while_it_holds_every_durable_batch_and_the_owner_is_there() {
        let status = Arc::new(Mutex::new(UploadStatus::default()));
        status.lock().unwrap().newest_point = Some((2, 5));
        let covered = durable(2, 40, Some((5, 40)));
        // No stream open: the owner's writes are unknown here.
        status.lock().unwrap().note_durable(&covered);
        assert_eq!(status.lock().unwrap().current_at, None);

        let open = UploadStatus::stream_open(&status);
        for (why, state) in [
            ("a batch after the last cut", durable(2, 41, Some((5, 40)))),
            (
                "the last cut not committed yet",
                durable(2, 40, Some((6, 40))),
            ),
            ("another epoch's point", durable(3, 40, Some((5, 40)))),
            ("no cut at all", durable(2, 40, None)),
        ] {
            status.lock().unwrap().note_durable(&state);
            assert_eq!(status.lock().unwrap().current_at, None, "{why}");
        }
        status.lock().unwrap().note_durable(&covered);
        let st = status.lock().unwrap();
        assert!(st.current_at.is_some());
        assert_eq!(
            st.current_as_of(),
            st.current_at,
            "no point committed by this run"
        );
        assert!(st.lag() < Duration::from_secs(1));
        drop(st);

        // The stream ends: the point stops being current, and the lag grows from there.
        drop(open);
        let before = status.lock().unwrap().current_at;
        std::thread::sleep(Duration::from_millis(20));
        status.lock().unwrap().note_durable(&covered);
        assert_eq!(status.lock().unwrap().current_at, before);
        assert!(status.lock().unwrap().lag() >= Duration::from_millis(20));
    }
}
