//! Errors of the [`Sender`](super::Sender): a refused push, an ack that cannot be
//! applied, a resume point that cannot be honoured.
//!
//! Each variant says what the driver must do (retry after acks, fix routing, or start
//! a new epoch); none of them changes the sender's state, except that a
//! [`PushError::BufferFull`] hands the batch back unchanged.

use super::MAX_PENDING_CUTS;
use crate::wire::{Batch, DiskId, InvalidMessage};
use thiserror::Error;

/// A push was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PushError {
    /// Back-pressure: the buffer is full. The batch is handed back; retry after
    /// acks arrive ([`Sender::can_push`](super::Sender::can_push)).
    #[error("send buffer full; retry after acknowledgements arrive")]
    BufferFull(Box<Batch>),
    /// Too many unacknowledged cuts; retry after acknowledgements arrive.
    #[error("too many unacknowledged cuts (max {MAX_PENDING_CUTS}); retry later")]
    CutBufferFull,
    /// A cut placed after a batch not pushed yet, or before the previous cut.
    #[error("cut after batch {seq} is outside [{previous}, {pushed}] (previous cut, last pushed)")]
    CutPosition {
        /// Requested position.
        seq: u64,
        /// Last pushed batch.
        pushed: u64,
        /// Position of the previous cut.
        previous: u64,
    },
    /// The batch belongs to another disk or epoch (driver bug: route correctly,
    /// or create a new `Sender` for a new epoch).
    #[error(
        "batch for disk {got_disk:?} epoch {got_epoch} pushed to sender of disk {disk:?} epoch {epoch}"
    )]
    WrongStream {
        /// This sender's disk.
        disk: DiskId,
        /// This sender's epoch.
        epoch: u64,
        /// Batch's disk.
        got_disk: DiskId,
        /// Batch's epoch.
        got_epoch: u64,
    },
    /// Sequence ranges must be consecutive (caller bug).
    #[error("batch starts at seq {got}, expected {expected}: sequence ranges must be consecutive")]
    NotConsecutive {
        /// Required `first_seq`.
        expected: u64,
        /// Given `first_seq`.
        got: u64,
    },
    /// The batch violates a wire bound (caller bug: split it).
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
}

/// An `Ack` that cannot be applied.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AckError {
    /// Ack for another disk/epoch: ignore it (stale) or fix routing.
    #[error(
        "ack for disk {got_disk:?} epoch {got_epoch} does not match this stream (epoch {epoch})"
    )]
    WrongStream {
        /// This sender's epoch.
        epoch: u64,
        /// Ack's disk.
        got_disk: DiskId,
        /// Ack's epoch.
        got_epoch: u64,
    },
    /// The server acknowledges data or cuts never pushed: its state belongs to
    /// another agent incarnation. Start a new epoch (full resync).
    #[error(
        "server acknowledged seq {durable_seq} / cut {durable_cut_id} beyond pushed seq {last_pushed_seq} / cut {last_cut_id}; start a new epoch"
    )]
    AheadOfPushed {
        /// Acked sequence.
        durable_seq: u64,
        /// Acked cut id.
        durable_cut_id: u64,
        /// Last pushed sequence.
        last_pushed_seq: u64,
        /// Last pushed cut id.
        last_cut_id: u64,
    },
}

/// A `DiskAccepted` resume point that cannot be honoured. The driver should
/// close the connection and start a new epoch (full resync).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ResumeError {
    /// `resume_from_seq` must be at least 1.
    #[error("resume_from_seq 0 is invalid (must be durable_seq + 1 >= 1)")]
    Zero,
    /// The server lost data it had acknowledged as durable.
    #[error(
        "server resumes from {resume_from_seq} but already acknowledged {acked_seq} as durable; start a new epoch"
    )]
    ServerRegressed {
        /// Server's resume point.
        resume_from_seq: u64,
        /// Highest acknowledged sequence.
        acked_seq: u64,
    },
    /// The server claims more than this agent ever pushed.
    #[error(
        "server resumes from {resume_from_seq} beyond last pushed seq {last_pushed_seq}; start a new epoch"
    )]
    ServerAhead {
        /// Server's resume point.
        resume_from_seq: u64,
        /// Last pushed sequence.
        last_pushed_seq: u64,
    },
    /// The resume point falls inside a batch's range.
    #[error(
        "server resumes from {resume_from_seq}, inside batch {first_seq}..={last_seq}; start a new epoch"
    )]
    Misaligned {
        /// Server's resume point.
        resume_from_seq: u64,
        /// Batch start.
        first_seq: u64,
        /// Batch end.
        last_seq: u64,
    },
}
