//! Agent-side sans-IO state machine for one disk stream.
//!
//! The driver owns the connection and the clock. Typical loop:
//!
//! 1. On connect: send `Hello`/`ProtectDisk`; on `DiskAccepted` call
//!    [`Sender::handle_connected`] with its `resume_from_seq`.
//! 2. Produce sealed batches and [`Sender::push`] them while
//!    [`Sender::can_push`]; add consistency points with [`Sender::push_cut`].
//! 3. Drain [`Sender::poll_transmit`] into the stream; it stops when the
//!    in-flight window is full.
//! 4. Feed every received `Ack` to [`Sender::handle_ack`].
//! 5. Arm a timer at [`Sender::poll_timeout`]; when it fires call
//!    [`Sender::handle_timeout`], then act on [`Sender::poll_event`]
//!    ([`SenderEvent::ReconnectRequired`]: close the connection and reconnect).
//! 6. On connection loss call [`Sender::handle_disconnect`].
//!
//! Every pushed batch and cut is retained until acknowledged durable, so a
//! reconnect resends exactly what the server does not have durably.
//!
//! # Windows
//!
//! * *Buffered* = pushed and not yet acknowledged (sent or not). Bounded by
//!   [`SenderConfig::max_buffered_batches`] / `max_buffered_bytes`;
//!   [`Sender::can_push`] turns false at the bound (back-pressure).
//! * *In flight* = sent on the current connection and not yet acknowledged.
//!   Bounded by [`SenderConfig::max_inflight_batches`] / `max_inflight_bytes`.
//!
//! Byte bounds are soft by one batch: a batch is admitted while the total is
//! *below* the bound, so a single batch larger than the bound cannot deadlock.
//! Batch bytes are counted as encoded frame length.

use crate::wire::{Ack, Batch, CUT_MAC_LEN, Cut, CutKind, DiskId};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

mod error;
#[cfg(test)]
mod tests;

pub use error::{AckError, PushError, ResumeError};

/// Maximum cuts held unacknowledged by a [`Sender`].
pub const MAX_PENDING_CUTS: usize = 1024;

/// Tunables for a [`Sender`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SenderConfig {
    /// Max batches sent but not acknowledged on the current connection.
    pub max_inflight_batches: usize,
    /// Max bytes sent but not acknowledged on the current connection (soft).
    pub max_inflight_bytes: usize,
    /// Max batches held (sent or not) until acknowledged.
    pub max_buffered_batches: usize,
    /// Max bytes held (sent or not) until acknowledged (soft).
    pub max_buffered_bytes: usize,
    /// Without ack progress for this long while something is in flight, the
    /// sender asks the driver to reconnect.
    pub ack_timeout: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            max_inflight_batches: 64,
            max_inflight_bytes: 64 << 20,
            max_buffered_batches: 256,
            max_buffered_bytes: 256 << 20,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// Something the driver must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderEvent {
    /// No ack progress within [`SenderConfig::ack_timeout`]: the sender has
    /// already treated the connection as lost; close it and reconnect.
    ReconnectRequired {
        /// Highest durable sequence known.
        acked_seq: u64,
    },
}

/// What [`Sender::poll_transmit`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// A batch frame.
    Batch {
        /// First sequence.
        first_seq: u64,
        /// Last sequence.
        last_seq: u64,
        /// Frame bytes written.
        len: usize,
    },
    /// A cut frame.
    Cut {
        /// Cut id.
        id: u64,
        /// Cut position.
        seq: u64,
        /// Frame bytes written.
        len: usize,
    },
}

/// Agent-side state machine for one disk stream in one epoch.
#[derive(Debug)]
pub struct Sender {
    disk_id: DiskId,
    epoch: u64,
    config: SenderConfig,
    batches: VecDeque<Batch>,
    cuts: VecDeque<Cut>,
    sent_batches: usize,
    sent_cuts: usize,
    inflight_bytes: usize,
    buffered_bytes: usize,
    last_pushed_seq: u64,
    last_cut_id: u64,
    last_cut_seq: u64,
    acked_seq: u64,
    acked_cut_id: u64,
    connected: bool,
    progress_at: Option<Instant>,
    events: VecDeque<SenderEvent>,
}

impl Sender {
    /// New stream for `disk_id` in a new `epoch`: the first batch must start
    /// at sequence 1 and cut ids start at 1. Starts disconnected.
    ///
    /// An agent that lost its sender state (restart, crash) cannot re-seal identical
    /// bytes for the same sequences (see [`crate::aead`]): it starts a new epoch, or
    /// continues this one under a new key from where the server is
    /// ([`Sender::continuing`]). Zero limits in `config` are treated as 1 so the stream
    /// cannot stall.
    pub fn new(disk_id: DiskId, epoch: u64, config: SenderConfig) -> Self {
        Self::continuing(disk_id, epoch, config, 0, 1)
    }

    /// Stream of a continued `epoch` (the server's `EpochContinued`): it holds every
    /// batch through `durable_seq` and the next cut is `next_cut_id`. The caller seals
    /// with a new data key from `durable_seq + 1` on. Starts disconnected.
    pub fn continuing(
        disk_id: DiskId,
        epoch: u64,
        mut config: SenderConfig,
        durable_seq: u64,
        next_cut_id: u64,
    ) -> Self {
        for v in [
            &mut config.max_inflight_batches,
            &mut config.max_inflight_bytes,
            &mut config.max_buffered_batches,
            &mut config.max_buffered_bytes,
        ] {
            *v = (*v).max(1);
        }
        let base = durable_seq;
        let last_cut_id = next_cut_id.saturating_sub(1);
        Self {
            disk_id,
            epoch,
            config,
            batches: VecDeque::new(),
            cuts: VecDeque::new(),
            sent_batches: 0,
            sent_cuts: 0,
            inflight_bytes: 0,
            buffered_bytes: 0,
            last_pushed_seq: base,
            last_cut_id,
            last_cut_seq: base,
            acked_seq: base,
            acked_cut_id: last_cut_id,
            connected: false,
            progress_at: None,
            events: VecDeque::new(),
        }
    }

    /// Disk of this stream.
    pub fn disk_id(&self) -> DiskId {
        self.disk_id
    }
    /// Epoch of this stream.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Highest sequence the server acknowledged as durable.
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }
    /// Highest cut id the server acknowledged as durable.
    pub fn acked_cut_id(&self) -> u64 {
        self.acked_cut_id
    }
    /// `last_seq` of the most recently pushed batch.
    pub fn last_pushed_seq(&self) -> u64 {
        self.last_pushed_seq
    }
    /// Whether [`Sender::handle_connected`] was called since the last disconnect.
    pub fn is_connected(&self) -> bool {
        self.connected
    }
    /// Batches held until acknowledged.
    pub fn buffered_batches(&self) -> usize {
        self.batches.len()
    }
    /// Bytes (frame length) held until acknowledged.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }
    /// Batches sent on this connection and not yet acknowledged.
    pub fn inflight_batches(&self) -> usize {
        self.sent_batches
    }
    /// True when everything pushed has been acknowledged durable.
    pub fn is_idle(&self) -> bool {
        self.batches.is_empty() && self.cuts.is_empty()
    }

    /// Whether a new batch would be accepted (back-pressure signal).
    pub fn can_push(&self) -> bool {
        self.batches.len() < self.config.max_buffered_batches
            && self.buffered_bytes < self.config.max_buffered_bytes
    }

    /// Queues a sealed batch. Its range must start right after the previous
    /// batch's `last_seq`.
    pub fn push(&mut self, batch: Batch) -> Result<(), PushError> {
        if batch.disk_id != self.disk_id || batch.epoch != self.epoch {
            return Err(PushError::WrongStream {
                disk: self.disk_id,
                epoch: self.epoch,
                got_disk: batch.disk_id,
                got_epoch: batch.epoch,
            });
        }
        batch.validate()?;
        let expected = self.last_pushed_seq + 1;
        if batch.first_seq != expected {
            return Err(PushError::NotConsecutive {
                expected,
                got: batch.first_seq,
            });
        }
        if !self.can_push() {
            return Err(PushError::BufferFull(Box::new(batch)));
        }
        self.last_pushed_seq = batch.last_seq;
        self.buffered_bytes += batch.frame_len();
        self.batches.push_back(batch);
        Ok(())
    }

    /// Queues a consistency point at the current stream position (after the
    /// last pushed batch) and returns it. Cut ids are assigned consecutively
    /// from 1 so the receiver can detect a missing cut. `authenticate` gives the cut's
    /// MAC ([`Cut::mac`]) over the finished cut (every field but the MAC); this crate
    /// holds no key, so the driver computes it (`ripcord_seal::point_mac` over
    /// [`crate::aead::cut_message`]).
    pub fn push_cut(
        &mut self,
        kind: CutKind,
        time_ns: u64,
        mono_ns: u64,
        authenticate: impl FnOnce(&Cut) -> [u8; CUT_MAC_LEN],
    ) -> Result<Cut, PushError> {
        self.push_cut_at(
            kind,
            time_ns,
            mono_ns,
            self.last_pushed_seq,
            None,
            authenticate,
        )
    }

    /// Queues a consistency point after batch `seq`, which may be behind the last pushed
    /// batch (a cut decided late) but not behind the previous cut; `authenticate` as in
    /// [`Sender::push_cut`].
    pub fn push_cut_at(
        &mut self,
        kind: CutKind,
        time_ns: u64,
        mono_ns: u64,
        seq: u64,
        group: Option<crate::wire::GroupStamp>,
        authenticate: impl FnOnce(&Cut) -> [u8; CUT_MAC_LEN],
    ) -> Result<Cut, PushError> {
        let id = self.last_cut_id + 1;
        if self.cuts.len() >= MAX_PENDING_CUTS {
            return Err(PushError::CutBufferFull);
        }
        if seq > self.last_pushed_seq || seq < self.last_cut_seq {
            return Err(PushError::CutPosition {
                seq,
                pushed: self.last_pushed_seq,
                previous: self.last_cut_seq,
            });
        }
        let mut cut = Cut {
            disk_id: self.disk_id,
            epoch: self.epoch,
            seq,
            time_ns,
            mono_ns,
            kind,
            id,
            mac: [0; CUT_MAC_LEN],
            group,
        };
        cut.mac = authenticate(&cut);
        self.last_cut_id = id;
        self.last_cut_seq = seq;
        self.cuts.push_back(cut.clone());
        Ok(cut)
    }

    fn awaiting_ack(&self) -> bool {
        self.sent_batches > 0 || self.sent_cuts > 0
    }

    /// Appends the next frame to send to `buf`, if the connection is up and
    /// the window allows. Call repeatedly until `None`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        if !self.connected {
            return None;
        }
        let next_batch = self.batches.get(self.sent_batches);
        let cut_first = match (self.cuts.get(self.sent_cuts), next_batch) {
            (Some(c), Some(b)) => c.seq < b.first_seq,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let was_awaiting = self.awaiting_ack();
        let t = if cut_first {
            let cut = &self.cuts[self.sent_cuts];
            let len = crate::wire::Message::Cut(cut.clone())
                .encode_frame(buf)
                .expect("cuts have no bounded fields");
            self.sent_cuts += 1;
            Transmit::Cut {
                id: cut.id,
                seq: cut.seq,
                len,
            }
        } else {
            let b = next_batch?;
            if self.sent_batches >= self.config.max_inflight_batches
                || self.inflight_bytes >= self.config.max_inflight_bytes
            {
                return None;
            }
            let len = b.encode_frame(buf).expect("batches are validated by push");
            self.sent_batches += 1;
            self.inflight_bytes += len;
            Transmit::Batch {
                first_seq: b.first_seq,
                last_seq: b.last_seq,
                len,
            }
        };
        if !was_awaiting {
            self.progress_at = Some(now);
        }
        Some(t)
    }

    /// Releases everything acknowledged; returns whether anything was released.
    fn release(&mut self, durable_seq: u64, durable_cut_id: u64) -> bool {
        let mut progressed = false;
        while let Some(b) = self.batches.front() {
            if b.last_seq > durable_seq {
                break;
            }
            let len = b.frame_len();
            self.buffered_bytes -= len;
            if self.sent_batches > 0 {
                self.sent_batches -= 1;
                self.inflight_bytes -= len;
            }
            self.batches.pop_front();
            progressed = true;
        }
        while let Some(c) = self.cuts.front() {
            if c.id > durable_cut_id {
                break;
            }
            if self.sent_cuts > 0 {
                self.sent_cuts -= 1;
            }
            self.cuts.pop_front();
            progressed = true;
        }
        if durable_seq > self.acked_seq {
            self.acked_seq = durable_seq;
            progressed = true;
        }
        if durable_cut_id > self.acked_cut_id {
            self.acked_cut_id = durable_cut_id;
            progressed = true;
        }
        progressed
    }

    /// Applies a cumulative acknowledgement. Older (reordered) acks are
    /// harmless no-ops. Acks arriving while disconnected (i.e. before the
    /// `DiskAccepted` of a new connection) are ignored: they may be newer
    /// than the coming `resume_from_seq` and would make an honest resume look
    /// like a server regression; the resume point carries the same
    /// information.
    pub fn handle_ack(&mut self, now: Instant, ack: &Ack) -> Result<(), AckError> {
        if !self.connected {
            return Ok(());
        }
        if ack.disk_id != self.disk_id || ack.epoch != self.epoch {
            return Err(AckError::WrongStream {
                epoch: self.epoch,
                got_disk: ack.disk_id,
                got_epoch: ack.epoch,
            });
        }
        if ack.durable_seq > self.last_pushed_seq || ack.durable_cut_id > self.last_cut_id {
            return Err(AckError::AheadOfPushed {
                durable_seq: ack.durable_seq,
                durable_cut_id: ack.durable_cut_id,
                last_pushed_seq: self.last_pushed_seq,
                last_cut_id: self.last_cut_id,
            });
        }
        if self.release(ack.durable_seq, ack.durable_cut_id) {
            self.progress_at = self.awaiting_ack().then_some(now);
        }
        Ok(())
    }

    /// The connection is gone; nothing is in flight any more.
    pub fn handle_disconnect(&mut self) {
        self.connected = false;
        self.sent_batches = 0;
        self.sent_cuts = 0;
        self.inflight_bytes = 0;
        self.progress_at = None;
    }

    /// A (re)connection was accepted with the server's `resume_from_seq`
    /// (its durable sequence + 1). Everything up to it is released; all
    /// retained batches and cuts after it are sent again. On error the sender
    /// stays disconnected.
    pub fn handle_connected(
        &mut self,
        now: Instant,
        resume_from_seq: u64,
    ) -> Result<(), ResumeError> {
        let _ = now;
        self.handle_disconnect();
        let durable = resume_from_seq.checked_sub(1).ok_or(ResumeError::Zero)?;
        if durable < self.acked_seq {
            return Err(ResumeError::ServerRegressed {
                resume_from_seq,
                acked_seq: self.acked_seq,
            });
        }
        if durable > self.last_pushed_seq {
            return Err(ResumeError::ServerAhead {
                resume_from_seq,
                last_pushed_seq: self.last_pushed_seq,
            });
        }
        if let Some(b) = self
            .batches
            .iter()
            .find(|b| b.first_seq <= durable && durable < b.last_seq)
        {
            return Err(ResumeError::Misaligned {
                resume_from_seq,
                first_seq: b.first_seq,
                last_seq: b.last_seq,
            });
        }
        self.release(durable, self.acked_cut_id);
        self.connected = true;
        Ok(())
    }

    /// Next time [`Sender::handle_timeout`] must be called, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        self.progress_at.map(|t| t + self.config.ack_timeout)
    }

    /// Advances timers. If the ack timeout expired the sender disconnects
    /// itself and queues [`SenderEvent::ReconnectRequired`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            self.handle_disconnect();
            self.events.push_back(SenderEvent::ReconnectRequired {
                acked_seq: self.acked_seq,
            });
        }
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }
}
