//! Process-server-side sans-IO state machine for one disk stream.
//!
//! The driver owns the connection, the durable journal and fsync:
//!
//! 1. On `ProtectDisk` call [`Receiver::handle_protect`] and send the returned
//!    `DiskAccepted` (or an `Error` for [`ProtectOutcome::Reject`]).
//! 2. For each `Batch` call [`Receiver::handle_batch`] and act on the
//!    [`BatchAction`]; for each `Cut` call [`Receiver::handle_cut`].
//! 3. When an fsync completes, call [`Receiver::handle_durable`] with the last
//!    sequence it covers and [`Receiver::handle_cut_durable`] with the last
//!    cut id it covers.
//! 4. Send every `Ack` returned by [`Receiver::poll_ack`].
//!
//! **An `Ack` is never ahead of durability**: it only ever reports what the
//! driver declared durable, and a cut is only acknowledged once both the cut
//! record and every batch up to its position are durable.
//!
//! # Gaps and overlaps
//!
//! Over one ordered QUIC stream a batch can only be out of order because of a
//! bug or a race between an old and a new connection. The receiver never
//! appends such a batch ([`BatchAction::Gap`], [`RejectReason::Overlap`]);
//! the driver should send `Error { code: OutOfOrder }` and close the disk
//! stream. The agent reconnects, learns `resume_from_seq = durable + 1` and
//! resends; nothing is lost because the agent retains every unacknowledged
//! batch.
//!
//! # Crashes
//!
//! Received-but-not-durable state is lost when the server crashes. Rebuild
//! the receiver from the journal with [`Receiver::restore`] (durable sequence
//! and last durable cut). If the driver cannot tell whether un-fsynced appends
//! survived (e.g. fsync failed) it must truncate the journal to the durable
//! point and restore, exactly as after a crash.

use crate::wire::{Ack, Batch, Cut, DiskAccepted, DiskId, ProtectDisk};
use std::collections::VecDeque;
use thiserror::Error;

/// Position of a recorded cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutPos {
    /// Cut id.
    pub id: u64,
    /// Stream position.
    pub seq: u64,
}

/// What survives a crash: recovered from the driver's journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableState {
    /// Current epoch.
    pub epoch: u64,
    /// Highest durable sequence (0 = none).
    pub durable_seq: u64,
    /// Last durable cut record, if any.
    pub last_cut: Option<CutPos>,
}

/// Why a message was refused without changing state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// Routed to the wrong receiver (driver bug).
    WrongDisk {
        /// The message's disk.
        got: DiskId,
    },
    /// Message from an older epoch: send `Error { code: StaleEpoch }`.
    StaleEpoch {
        /// Message's epoch.
        got: u64,
        /// Receiver's epoch.
        current: u64,
    },
    /// A batch or cut of a newer epoch arrived before its `ProtectDisk`.
    FutureEpoch {
        /// Message's epoch.
        got: u64,
        /// Receiver's epoch.
        current: u64,
    },
    /// Batch partially overlaps what was received (send `OutOfOrder`, close).
    Overlap {
        /// Highest received sequence.
        received_seq: u64,
        /// Batch start.
        first_seq: u64,
        /// Batch end.
        last_seq: u64,
    },
    /// Cut at a position not yet received (send `OutOfOrder`, close).
    CutAheadOfData {
        /// Cut position.
        seq: u64,
        /// Highest received sequence.
        received_seq: u64,
    },
    /// Cut id skips ahead: an earlier cut is missing (send `OutOfOrder`, close).
    CutGap {
        /// Next expected cut id.
        expected: u64,
        /// The cut's id.
        got: u64,
    },
    /// Cut position before the previous cut's (send `OutOfOrder`, close).
    CutBeforePrevious {
        /// Cut position.
        seq: u64,
        /// Previous cut position.
        previous_seq: u64,
    },
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            RejectReason::WrongDisk { got } => {
                write!(f, "frame for disk {got} on another disk's stream")
            }
            RejectReason::StaleEpoch { got, current } => write!(
                f,
                "epoch {got} is older than the disk's current epoch {current}: another agent \
                 (or a newer start of this one) protects this disk now"
            ),
            RejectReason::FutureEpoch { got, current } => write!(
                f,
                "epoch {got} arrived before its ProtectDisk (the disk is at epoch {current})"
            ),
            RejectReason::Overlap {
                received_seq,
                first_seq,
                last_seq,
            } => write!(
                f,
                "batch {first_seq}..={last_seq} overlaps what was received (up to {received_seq})"
            ),
            RejectReason::CutAheadOfData { seq, received_seq } => write!(
                f,
                "cut at batch {seq} is ahead of the data received (up to {received_seq})"
            ),
            RejectReason::CutGap { expected, got } => {
                write!(f, "cut {got} skips ahead: cut {expected} is missing")
            }
            RejectReason::CutBeforePrevious { seq, previous_seq } => write!(
                f,
                "cut at batch {seq} is before the previous cut's batch {previous_seq}"
            ),
        }
    }
}

impl std::fmt::Display for BatchAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchAction::Append => f.write_str("append"),
            BatchAction::Duplicate => f.write_str("duplicate"),
            BatchAction::Gap { expected, got } => {
                write!(f, "batch {got} arrived where batch {expected} was expected")
            }
            BatchAction::Reject(r) => r.fmt(f),
        }
    }
}

/// What the driver must do with a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchAction {
    /// New and in order: append it to the journal (then fsync and report
    /// through [`Receiver::handle_durable`]).
    Append,
    /// Already received: drop it; an `Ack` is queued ([`Receiver::poll_ack`]).
    Duplicate,
    /// Out of order: drop it, send `Error { code: OutOfOrder }`, close the stream.
    Gap {
        /// Sequence expected next.
        expected: u64,
        /// The batch's `first_seq`.
        got: u64,
    },
    /// Refused; state unchanged.
    Reject(RejectReason),
}

/// What the driver must do with a cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutAction {
    /// Append the cut record to the journal; report it with
    /// [`Receiver::handle_cut_durable`] once fsynced.
    Record,
    /// Already recorded: drop it; an `Ack` is queued.
    Duplicate,
    /// Refused; state unchanged.
    Reject(RejectReason),
}

/// Result of [`Receiver::handle_protect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtectOutcome {
    /// Same epoch: send this `DiskAccepted`; the agent resumes after the
    /// durable position.
    Resume(DiskAccepted),
    /// Newer epoch: the old stream ended, a full resync starts. Durably record
    /// the new epoch, then send this `DiskAccepted` (resume from 1).
    NewEpoch {
        /// Epoch that ended.
        previous_epoch: u64,
        /// Reply to send.
        accepted: DiskAccepted,
    },
    /// Refuse with an `Error` (`StaleEpoch` / `UnknownDisk`).
    Reject(RejectReason),
}

/// The driver reported durability for something never received (driver bug).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum DurableError {
    /// `handle_durable` beyond the highest received sequence.
    #[error("durable seq {seq} reported beyond received seq {received_seq}")]
    BeyondReceived {
        /// Reported sequence.
        seq: u64,
        /// Highest received sequence.
        received_seq: u64,
    },
    /// `handle_cut_durable` for a cut never recorded.
    #[error("durable cut {id} reported but last recorded cut is {last_recorded}")]
    UnknownCut {
        /// Reported cut id.
        id: u64,
        /// Last recorded cut id (0 = none).
        last_recorded: u64,
    },
}

/// Server-side state machine for one disk stream.
#[derive(Debug)]
pub struct Receiver {
    disk_id: DiskId,
    epoch: u64,
    received_seq: u64,
    durable_seq: u64,
    /// Last recorded cut (durable or not).
    last_cut: Option<CutPos>,
    /// Recorded, not yet reported durable.
    undurable_cuts: VecDeque<CutPos>,
    /// Durable, waiting for their data to be durable before being acked.
    unacked_cuts: VecDeque<CutPos>,
    last_durable_cut: Option<CutPos>,
    acked_cut_id: u64,
    ack_due: bool,
}

impl Receiver {
    /// Fresh receiver for a new `epoch` with nothing received.
    pub fn new(disk_id: DiskId, epoch: u64) -> Self {
        Self::restore(
            disk_id,
            DurableState {
                epoch,
                durable_seq: 0,
                last_cut: None,
            },
        )
    }

    /// Receiver rebuilt from durable state (after a restart or crash).
    pub fn restore(disk_id: DiskId, state: DurableState) -> Self {
        let mut r = Self {
            disk_id,
            epoch: state.epoch,
            received_seq: state.durable_seq,
            durable_seq: state.durable_seq,
            last_cut: state.last_cut,
            undurable_cuts: VecDeque::new(),
            unacked_cuts: state.last_cut.into_iter().collect(),
            last_durable_cut: state.last_cut,
            acked_cut_id: 0,
            ack_due: false,
        };
        r.advance_cuts();
        r
    }

    fn reset_epoch(&mut self, epoch: u64) {
        *self = Self::new(self.disk_id, epoch);
    }

    /// Disk of this stream.
    pub fn disk_id(&self) -> DiskId {
        self.disk_id
    }
    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The id the next cut must carry (the newest recorded cut's + 1).
    pub fn next_cut_id(&self) -> u64 {
        self.last_cut.map_or(0, |l| l.id) + 1
    }

    /// Highest sequence appended (possibly not yet durable).
    pub fn received_seq(&self) -> u64 {
        self.received_seq
    }
    /// Highest sequence declared durable by the driver.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }
    /// What the driver's journal must be able to reproduce after a crash.
    pub fn durable_state(&self) -> DurableState {
        DurableState {
            epoch: self.epoch,
            durable_seq: self.durable_seq,
            last_cut: self.last_durable_cut,
        }
    }

    fn accepted(&self) -> DiskAccepted {
        DiskAccepted {
            disk_id: self.disk_id,
            epoch: self.epoch,
            resume_from_seq: self.durable_seq + 1,
        }
    }

    /// Handles `ProtectDisk` on a new connection.
    pub fn handle_protect(&mut self, msg: &ProtectDisk) -> ProtectOutcome {
        if msg.disk_id != self.disk_id {
            return ProtectOutcome::Reject(RejectReason::WrongDisk { got: msg.disk_id });
        }
        if msg.epoch < self.epoch {
            return ProtectOutcome::Reject(RejectReason::StaleEpoch {
                got: msg.epoch,
                current: self.epoch,
            });
        }
        if msg.epoch > self.epoch {
            let previous_epoch = self.epoch;
            self.reset_epoch(msg.epoch);
            return ProtectOutcome::NewEpoch {
                previous_epoch,
                accepted: self.accepted(),
            };
        }
        // Re-announce cut durability on the new connection.
        self.ack_due = self.acked_cut_id > 0;
        ProtectOutcome::Resume(self.accepted())
    }

    /// Classifies a received batch (see [`BatchAction`]).
    pub fn handle_batch(&mut self, b: &Batch) -> BatchAction {
        if b.disk_id != self.disk_id {
            return BatchAction::Reject(RejectReason::WrongDisk { got: b.disk_id });
        }
        if b.epoch < self.epoch {
            return BatchAction::Reject(RejectReason::StaleEpoch {
                got: b.epoch,
                current: self.epoch,
            });
        }
        if b.epoch > self.epoch {
            // An epoch starts only with its ProtectDisk (which the driver journals first):
            // a batch cannot start one, and must not reset what is durable.
            return BatchAction::Reject(RejectReason::FutureEpoch {
                got: b.epoch,
                current: self.epoch,
            });
        }
        let expected = self.received_seq + 1;
        if b.last_seq < expected {
            self.ack_due = true;
            BatchAction::Duplicate
        } else if b.first_seq == expected {
            self.received_seq = b.last_seq;
            BatchAction::Append
        } else if b.first_seq < expected {
            BatchAction::Reject(RejectReason::Overlap {
                received_seq: self.received_seq,
                first_seq: b.first_seq,
                last_seq: b.last_seq,
            })
        } else {
            BatchAction::Gap {
                expected,
                got: b.first_seq,
            }
        }
    }

    /// Classifies a received cut (see [`CutAction`]). Cuts are accepted only at
    /// positions already received, and only with the next consecutive id.
    pub fn handle_cut(&mut self, c: &Cut) -> CutAction {
        if c.disk_id != self.disk_id {
            return CutAction::Reject(RejectReason::WrongDisk { got: c.disk_id });
        }
        if c.epoch != self.epoch {
            let (got, current) = (c.epoch, self.epoch);
            return CutAction::Reject(if c.epoch < self.epoch {
                RejectReason::StaleEpoch { got, current }
            } else {
                RejectReason::FutureEpoch { got, current }
            });
        }
        let last_id = self.last_cut.map_or(0, |l| l.id);
        if c.id <= last_id {
            self.ack_due = true;
            return CutAction::Duplicate;
        }
        if c.id != last_id + 1 {
            return CutAction::Reject(RejectReason::CutGap {
                expected: last_id + 1,
                got: c.id,
            });
        }
        if let Some(last) = self.last_cut
            && c.seq < last.seq
        {
            return CutAction::Reject(RejectReason::CutBeforePrevious {
                seq: c.seq,
                previous_seq: last.seq,
            });
        }
        if c.seq > self.received_seq {
            return CutAction::Reject(RejectReason::CutAheadOfData {
                seq: c.seq,
                received_seq: self.received_seq,
            });
        }
        let pos = CutPos {
            id: c.id,
            seq: c.seq,
        };
        self.last_cut = Some(pos);
        self.undurable_cuts.push_back(pos);
        CutAction::Record
    }

    fn advance_cuts(&mut self) {
        while let Some(c) = self.unacked_cuts.front() {
            if c.seq > self.durable_seq {
                break;
            }
            self.acked_cut_id = c.id;
            self.ack_due = true;
            self.unacked_cuts.pop_front();
        }
    }

    /// The journal is durable through batch sequence `seq` (a batch's
    /// `last_seq`). Lower values than already reported are ignored.
    pub fn handle_durable(&mut self, seq: u64) -> Result<(), DurableError> {
        if seq > self.received_seq {
            return Err(DurableError::BeyondReceived {
                seq,
                received_seq: self.received_seq,
            });
        }
        if seq > self.durable_seq {
            self.durable_seq = seq;
            self.ack_due = true;
            self.advance_cuts();
        }
        Ok(())
    }

    /// The journal is durable through cut record `id`.
    pub fn handle_cut_durable(&mut self, id: u64) -> Result<(), DurableError> {
        let last_recorded = self.last_cut.map_or(0, |c| c.id);
        if id > last_recorded {
            return Err(DurableError::UnknownCut { id, last_recorded });
        }
        while let Some(c) = self.undurable_cuts.front().copied() {
            if c.id > id {
                break;
            }
            self.undurable_cuts.pop_front();
            self.unacked_cuts.push_back(c);
            self.last_durable_cut = Some(c);
        }
        self.advance_cuts();
        Ok(())
    }

    /// The acknowledgement to send, if one is due. Never ahead of durability.
    pub fn poll_ack(&mut self) -> Option<Ack> {
        if !std::mem::take(&mut self.ack_due) {
            return None;
        }
        Some(Ack {
            disk_id: self.disk_id,
            epoch: self.epoch,
            durable_seq: self.durable_seq,
            durable_cut_id: self.acked_cut_id,
        })
    }
}

#[cfg(test)]
mod tests;
