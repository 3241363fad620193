//! Encoder and validation: [`Message::encode_frame`], [`Batch::encode_frame`] and the
//! `validate` methods, written by hand against the layout tables in [`super`].
//!
//! Invariants: nothing is written for a message that fails validation; every
//! length-prefixed field is checked against its bound before it is encoded, so the
//! `as u16`/`as u32` length casts below never truncate; the header's body length is
//! the number of body bytes actually written.

use super::{
    BATCH_FIXED_LEN, Batch, EXTENT_LEN, HEADER_LEN, InvalidMessage, KNOWN_FLAGS, MAGIC,
    MAX_AGENT_VERSION_LEN, MAX_ERROR_MESSAGE_LEN, MAX_EXTENTS_PER_BATCH, MAX_MACHINE_ID_LEN,
    MAX_PAYLOAD_LEN, MAX_SECTOR_SIZE, MAX_SERVER_ID_LEN, MAX_WRAPPED_KEY_LEN, MIN_SECTOR_SIZE,
    Message, MessageType, WIRE_VERSION,
};

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Bounds were validated, every string bound fits in u16.
    put_u16(out, s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}

pub(super) fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), InvalidMessage> {
    if len > max {
        Err(InvalidMessage::FieldTooLong {
            field,
            len: len as u64,
            max: max as u64,
        })
    } else {
        Ok(())
    }
}

fn check_members(members: u16) -> Result<(), InvalidMessage> {
    if members == 0 || members > super::MAX_GROUP_MEMBERS {
        return Err(InvalidMessage::GroupMembers { members });
    }
    Ok(())
}

fn check_sector_size(sector_size: u32) -> Result<(), InvalidMessage> {
    if sector_size.is_power_of_two() && (MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&sector_size) {
        Ok(())
    } else {
        Err(InvalidMessage::InvalidSectorSize { sector_size })
    }
}

impl Batch {
    /// Checks bounds and invariants (done by the encoder and decoder too).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        if self.first_seq == 0 || self.first_seq > self.last_seq {
            return Err(InvalidMessage::InvalidSeqRange {
                first: self.first_seq,
                last: self.last_seq,
            });
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(InvalidMessage::UnknownFlags { flags: self.flags });
        }
        check_len("batch.extents", self.extents.len(), MAX_EXTENTS_PER_BATCH)?;
        check_len("batch.payload", self.payload.len(), MAX_PAYLOAD_LEN)
    }

    /// Size of this batch's encoded frame, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + BATCH_FIXED_LEN + self.extents.len() * EXTENT_LEN + self.payload.len()
    }

    /// Appends this batch as a frame to `out`; returns the bytes written.
    pub fn encode_frame(&self, out: &mut Vec<u8>) -> Result<usize, InvalidMessage> {
        self.validate()?;
        let body = BATCH_FIXED_LEN + self.extents.len() * EXTENT_LEN + self.payload.len();
        put_header(out, MessageType::Batch, body);
        self.encode_body(out);
        Ok(HEADER_LEN + body)
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.disk_id.0);
        put_u64(out, self.epoch);
        put_u64(out, self.first_seq);
        put_u64(out, self.last_seq);
        put_u32(out, self.flags);
        put_u32(out, self.extents.len() as u32);
        for e in &self.extents {
            put_u64(out, e.sector);
            put_u32(out, e.sectors);
            out.push(e.kind as u8);
        }
        put_u32(out, self.payload.len() as u32);
        out.extend_from_slice(&self.payload);
    }
}

fn put_header(out: &mut Vec<u8>, ty: MessageType, body_len: usize) {
    out.reserve(HEADER_LEN + body_len);
    out.extend_from_slice(&MAGIC);
    put_u16(out, WIRE_VERSION);
    put_u32(out, body_len as u32);
    put_u16(out, ty as u16);
}

impl Message {
    /// The message's type code.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Hello(_) => MessageType::Hello,
            Self::HelloAck(_) => MessageType::HelloAck,
            Self::ProtectDisk(_) => MessageType::ProtectDisk,
            Self::DiskAccepted(_) => MessageType::DiskAccepted,
            Self::Batch(_) => MessageType::Batch,
            Self::Cut(_) => MessageType::Cut,
            Self::Ack(_) => MessageType::Ack,
            Self::Error(_) => MessageType::Error,
            Self::Ping(_) => MessageType::Ping,
            Self::Pong(_) => MessageType::Pong,
            Self::StoreStatus(_) => MessageType::StoreStatus,
            Self::DiskName(_) => MessageType::DiskName,
            Self::ContinueEpoch(_) => MessageType::ContinueEpoch,
            Self::EpochContinued(_) => MessageType::EpochContinued,
            Self::TimeProbe(_) => MessageType::TimeProbe,
            Self::TimeReply(_) => MessageType::TimeReply,
            Self::GroupSchedule(_) => MessageType::GroupSchedule,
            Self::PolicyUpdate(_) => MessageType::PolicyUpdate,
        }
    }

    /// Checks every bound and invariant of the wire format.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            Self::Hello(m) => {
                check_len("hello.machine_id", m.machine_id.len(), MAX_MACHINE_ID_LEN)?;
                check_len(
                    "hello.agent_version",
                    m.agent_version.len(),
                    MAX_AGENT_VERSION_LEN,
                )
            }
            Self::HelloAck(m) => {
                check_len("hello_ack.server_id", m.server_id.len(), MAX_SERVER_ID_LEN)
            }
            Self::ProtectDisk(m) => {
                check_sector_size(m.sector_size)?;
                check_len(
                    "protect_disk.wrapped_key",
                    m.wrapped_key.len(),
                    MAX_WRAPPED_KEY_LEN,
                )
            }
            Self::Batch(b) => b.validate(),
            Self::Error(m) => check_len("error.message", m.message.len(), MAX_ERROR_MESSAGE_LEN),
            Self::StoreStatus(m) => check_len(
                "store_status.failure",
                m.failure.len(),
                MAX_ERROR_MESSAGE_LEN,
            ),
            Self::DiskName(m) => super::check_device_name(&m.device),
            Self::Cut(m) => match &m.group {
                None => Ok(()),
                Some(g) => check_members(g.members),
            },
            Self::TimeReply(m) if m.sent_ns < m.received_ns => {
                Err(InvalidMessage::TimeReplyOrder {
                    received_ns: m.received_ns,
                    sent_ns: m.sent_ns,
                })
            }
            Self::GroupSchedule(m) if m.members > 0 => {
                check_members(m.members)?;
                if !(super::MIN_GROUP_INTERVAL_MS..=super::MAX_GROUP_INTERVAL_MS)
                    .contains(&m.interval_ms)
                {
                    return Err(InvalidMessage::GroupInterval {
                        interval_ms: m.interval_ms,
                    });
                }
                Ok(())
            }
            Self::PolicyUpdate(m)
                if m.app_interval_secs > super::MAX_POLICY_APP_INTERVAL_SECS
                    || (m.app_interval_secs != 0
                        && m.app_interval_secs < super::MIN_POLICY_APP_INTERVAL_SECS)
                    || (!m.assigned && m.app_interval_secs != 0) =>
            {
                Err(InvalidMessage::PolicyAppInterval {
                    secs: m.app_interval_secs,
                })
            }
            Self::DiskAccepted(_)
            | Self::PolicyUpdate(_)
            | Self::TimeProbe(_)
            | Self::TimeReply(_)
            | Self::GroupSchedule(_)
            | Self::Ack(_)
            | Self::Ping(_)
            | Self::Pong(_)
            | Self::ContinueEpoch(_)
            | Self::EpochContinued(_) => Ok(()),
        }
    }

    /// Appends the encoded frame (header + body) to `out`; returns the bytes
    /// written. Nothing is written if the message is invalid.
    pub fn encode_frame(&self, out: &mut Vec<u8>) -> Result<usize, InvalidMessage> {
        self.validate()?;
        if let Self::Batch(b) = self {
            return b.encode_frame(out);
        }
        let start = out.len();
        put_header(out, self.message_type(), 0);
        match self {
            Self::Hello(m) => {
                put_u16(out, m.protocol_version);
                put_str(out, &m.machine_id);
                put_str(out, &m.agent_version);
            }
            Self::HelloAck(m) => {
                put_u16(out, m.protocol_version);
                put_str(out, &m.server_id);
                out.extend_from_slice(&m.escrow_key);
            }
            Self::ProtectDisk(m) => {
                out.extend_from_slice(&m.disk_id.0);
                put_u64(out, m.size_bytes);
                put_u32(out, m.sector_size);
                put_u64(out, m.epoch);
                put_u16(out, m.wrapped_key.len() as u16);
                out.extend_from_slice(&m.wrapped_key);
            }
            Self::DiskAccepted(m) => {
                out.extend_from_slice(&m.disk_id.0);
                put_u64(out, m.epoch);
                put_u64(out, m.resume_from_seq);
            }
            Self::Batch(_) => unreachable!("handled above"),
            Self::Cut(m) => {
                out.extend_from_slice(&m.disk_id.0);
                put_u64(out, m.epoch);
                put_u64(out, m.seq);
                put_u64(out, m.time_ns);
                put_u64(out, m.mono_ns);
                out.push(m.kind as u8);
                put_u64(out, m.id);
                out.extend_from_slice(&m.mac);
                if let Some(g) = &m.group {
                    out.extend_from_slice(&g.to_bytes());
                }
            }
            Self::Ack(m) => {
                out.extend_from_slice(&m.disk_id.0);
                put_u64(out, m.epoch);
                put_u64(out, m.durable_seq);
                put_u64(out, m.durable_cut_id);
            }
            Self::Error(m) => {
                put_u16(out, m.code as u16);
                match m.disk_id {
                    Some(d) => {
                        out.push(1);
                        out.extend_from_slice(&d.0);
                    }
                    None => out.push(0),
                }
                put_str(out, &m.message);
            }
            Self::Ping(m) => put_u64(out, m.nonce),
            Self::Pong(m) => put_u64(out, m.nonce),
            Self::TimeProbe(m) => put_u64(out, m.nonce),
            Self::TimeReply(m) => {
                put_u64(out, m.nonce);
                put_u64(out, m.received_ns);
                put_u64(out, m.sent_ns);
            }
            Self::GroupSchedule(m) => {
                out.extend_from_slice(&m.group.0);
                put_u64(out, m.interval_ms);
                put_u16(out, m.members);
                put_u64(out, m.max_error_ns);
                put_u64(out, m.coordinator_offset_ns as u64);
                put_u64(out, m.coordinator_error_ns);
                if m.app_every != 0 {
                    put_u32(out, m.app_every);
                }
            }
            Self::PolicyUpdate(m) => {
                out.push(u8::from(m.assigned));
                put_u32(out, m.app_interval_secs);
            }
            Self::StoreStatus(m) => {
                out.extend_from_slice(&m.disk_id.0);
                put_u64(out, m.epoch);
                put_u64(out, m.committed_cut_id);
                put_u64(out, m.point_age_secs);
                put_str(out, &m.failure);
            }
            Self::DiskName(m) => {
                out.extend_from_slice(&m.disk_id.0);
                put_str(out, &m.device);
            }
            Self::ContinueEpoch(m) => {
                out.extend_from_slice(&m.disk_id.0);
                put_u64(out, m.epoch);
            }
            Self::EpochContinued(m) => {
                out.extend_from_slice(&m.disk_id.0);
                put_u64(out, m.epoch);
                put_u64(out, m.resume_from_seq);
                put_u64(out, m.next_cut_id);
            }
        }
        let total = out.len() - start;
        let body = (total - HEADER_LEN) as u32;
        out[start + 4..start + 8].copy_from_slice(&body.to_le_bytes());
        Ok(total)
    }

    /// Convenience: encodes into a fresh buffer.
    pub fn to_frame(&self) -> Result<Vec<u8>, InvalidMessage> {
        let mut out = Vec::new();
        self.encode_frame(&mut out)?;
        Ok(out)
    }
}
