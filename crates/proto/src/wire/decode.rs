//! Decoder: [`decode_header`], [`decode_frame`] and the buffering [`FrameDecoder`],
//! written by hand against the layout tables in [`super`].
//!
//! Invariants: never panics on any input; the header (magic, wire version, type and the
//! type's body bound) is checked as soon as its 10 bytes are present, before any body byte
//! is buffered or allocated; every length is checked against its bound before the bytes
//! are touched; a decoded message has passed the same validation as the encoder applies,
//! and its body has no trailing bytes.

use super::encode::check_len;
use super::{
    Ack, Batch, ContinueEpoch, Cut, CutKind, DecodeError, DiskAccepted, DiskId, DiskName,
    EXTENT_LEN, EpochContinued, ErrorCode, ErrorMessage, Extent, ExtentKind, GROUP_STAMP_LEN,
    GroupId, GroupSchedule, GroupStamp, HEADER_LEN, Hello, HelloAck, InvalidMessage, MAGIC,
    MAX_AGENT_VERSION_LEN, MAX_DEVICE_NAME_LEN, MAX_ERROR_MESSAGE_LEN, MAX_EXTENTS_PER_BATCH,
    MAX_MACHINE_ID_LEN, MAX_PAYLOAD_LEN, MAX_SERVER_ID_LEN, MAX_WRAPPED_KEY_LEN, Message,
    MessageType, Ping, PolicyUpdate, Pong, ProtectDisk, StoreStatus, TimeProbe, TimeReply,
    WIRE_VERSION,
};

struct Reader<'a> {
    buf: &'a [u8],
    ty: MessageType,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::TruncatedBody {
                msg_type: self.ty,
                field,
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn disk_id(&mut self, field: &'static str) -> Result<DiskId, DecodeError> {
        Ok(DiskId(self.array(field)?))
    }
    /// Length-prefixed byte field; the bound is checked before the bytes are
    /// touched.
    fn bounded(
        &mut self,
        len: usize,
        max: usize,
        field: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        check_len(field, len, max)?;
        self.take(len, field)
    }
    fn string(&mut self, max: usize, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u16(field)? as usize;
        let bytes = self.bounded(len, max, field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { field })
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                msg_type: self.ty,
                extra: self.buf.len(),
            })
        }
    }
}

fn decode_body(ty: MessageType, body: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: body, ty };
    let msg = match ty {
        MessageType::Hello => Message::Hello(Hello {
            protocol_version: r.u16("hello.protocol_version")?,
            machine_id: r.string(MAX_MACHINE_ID_LEN, "hello.machine_id")?,
            agent_version: r.string(MAX_AGENT_VERSION_LEN, "hello.agent_version")?,
        }),
        MessageType::HelloAck => Message::HelloAck(HelloAck {
            protocol_version: r.u16("hello_ack.protocol_version")?,
            server_id: r.string(MAX_SERVER_ID_LEN, "hello_ack.server_id")?,
            escrow_key: r.array("hello_ack.escrow_key")?,
        }),
        MessageType::ProtectDisk => Message::ProtectDisk(ProtectDisk {
            disk_id: r.disk_id("protect_disk.disk_id")?,
            size_bytes: r.u64("protect_disk.size_bytes")?,
            sector_size: r.u32("protect_disk.sector_size")?,
            epoch: r.u64("protect_disk.epoch")?,
            wrapped_key: {
                let len = r.u16("protect_disk.wrapped_key")? as usize;
                r.bounded(len, MAX_WRAPPED_KEY_LEN, "protect_disk.wrapped_key")?
                    .to_vec()
            },
        }),
        MessageType::DiskAccepted => Message::DiskAccepted(DiskAccepted {
            disk_id: r.disk_id("disk_accepted.disk_id")?,
            epoch: r.u64("disk_accepted.epoch")?,
            resume_from_seq: r.u64("disk_accepted.resume_from_seq")?,
        }),
        MessageType::Batch => {
            let disk_id = r.disk_id("batch.disk_id")?;
            let epoch = r.u64("batch.epoch")?;
            let first_seq = r.u64("batch.first_seq")?;
            let last_seq = r.u64("batch.last_seq")?;
            let flags = r.u32("batch.flags")?;
            let count = r.u32("batch.extent_count")? as usize;
            // Bound first, then make sure the bytes are really there, then allocate.
            check_len("batch.extents", count, MAX_EXTENTS_PER_BATCH)?;
            let raw = r.take(count * EXTENT_LEN, "batch.extents")?;
            let mut extents = Vec::with_capacity(count);
            for chunk in raw.chunks_exact(EXTENT_LEN) {
                let mut er = Reader { buf: chunk, ty };
                let sector = er.u64("batch.extent.sector")?;
                let sectors = er.u32("batch.extent.sectors")?;
                let kind_raw = er.u8("batch.extent.kind")?;
                let kind = ExtentKind::from_u8(kind_raw).ok_or(DecodeError::InvalidEnum {
                    field: "batch.extent.kind",
                    value: kind_raw.into(),
                })?;
                extents.push(Extent {
                    sector,
                    sectors,
                    kind,
                });
            }
            let payload_len = r.u32("batch.payload_len")? as usize;
            let payload = r
                .bounded(payload_len, MAX_PAYLOAD_LEN, "batch.payload")?
                .to_vec();
            Message::Batch(Batch {
                disk_id,
                epoch,
                first_seq,
                last_seq,
                extents,
                flags,
                payload,
            })
        }
        MessageType::Cut => {
            let disk_id = r.disk_id("cut.disk_id")?;
            let epoch = r.u64("cut.epoch")?;
            let seq = r.u64("cut.seq")?;
            let time_ns = r.u64("cut.time_ns")?;
            let mono_ns = r.u64("cut.mono_ns")?;
            let kind_raw = r.u8("cut.kind")?;
            let kind = CutKind::from_u8(kind_raw).ok_or(DecodeError::InvalidEnum {
                field: "cut.kind",
                value: kind_raw.into(),
            })?;
            let id = r.u64("cut.id")?;
            let mac = r.array("cut.mac")?;
            // A group stamp follows only in a group cut; anything else is trailing bytes.
            let group = if r.buf.is_empty() {
                None
            } else {
                let raw: [u8; GROUP_STAMP_LEN] = r.array("cut.group")?;
                let members = u16::from_le_bytes([raw[24], raw[25]]);
                Some(GroupStamp::from_bytes(&raw).ok_or(DecodeError::Invalid(
                    InvalidMessage::GroupMembers { members },
                ))?)
            };
            Message::Cut(Cut {
                disk_id,
                epoch,
                seq,
                time_ns,
                mono_ns,
                kind,
                id,
                mac,
                group,
            })
        }
        MessageType::Ack => Message::Ack(Ack {
            disk_id: r.disk_id("ack.disk_id")?,
            epoch: r.u64("ack.epoch")?,
            durable_seq: r.u64("ack.durable_seq")?,
            durable_cut_id: r.u64("ack.durable_cut_id")?,
        }),
        MessageType::Error => {
            let code_raw = r.u16("error.code")?;
            let code = ErrorCode::from_u16(code_raw).ok_or(DecodeError::InvalidEnum {
                field: "error.code",
                value: code_raw.into(),
            })?;
            let disk_id = match r.u8("error.has_disk")? {
                0 => None,
                1 => Some(r.disk_id("error.disk_id")?),
                v => {
                    return Err(DecodeError::InvalidEnum {
                        field: "error.has_disk",
                        value: v.into(),
                    });
                }
            };
            let message = r.string(MAX_ERROR_MESSAGE_LEN, "error.message")?;
            Message::Error(ErrorMessage {
                code,
                disk_id,
                message,
            })
        }
        MessageType::Ping => Message::Ping(Ping {
            nonce: r.u64("ping.nonce")?,
        }),
        MessageType::Pong => Message::Pong(Pong {
            nonce: r.u64("pong.nonce")?,
        }),
        MessageType::TimeProbe => Message::TimeProbe(TimeProbe {
            nonce: r.u64("time_probe.nonce")?,
        }),
        MessageType::TimeReply => Message::TimeReply(TimeReply {
            nonce: r.u64("time_reply.nonce")?,
            received_ns: r.u64("time_reply.received_ns")?,
            sent_ns: r.u64("time_reply.sent_ns")?,
        }),
        MessageType::GroupSchedule => Message::GroupSchedule(GroupSchedule {
            group: GroupId(r.array("group_schedule.group")?),
            interval_ms: r.u64("group_schedule.interval_ms")?,
            members: r.u16("group_schedule.members")?,
            max_error_ns: r.u64("group_schedule.max_error_ns")?,
            coordinator_offset_ns: r.u64("group_schedule.coordinator_offset_ns")? as i64,
            coordinator_error_ns: r.u64("group_schedule.coordinator_error_ns")?,
            // Protocol 6's trailing field, present only when not 0 (one encoding per
            // message: an explicit 0 is refused).
            app_every: if r.buf.is_empty() {
                0
            } else {
                match r.u32("group_schedule.app_every")? {
                    0 => {
                        return Err(DecodeError::InvalidEnum {
                            field: "group_schedule.app_every",
                            value: 0,
                        });
                    }
                    n => n,
                }
            },
        }),
        MessageType::PolicyUpdate => {
            let raw = r.u8("policy_update.assigned")?;
            let assigned = match raw {
                0 => false,
                1 => true,
                value => {
                    return Err(DecodeError::InvalidEnum {
                        field: "policy_update.assigned",
                        value: value.into(),
                    });
                }
            };
            Message::PolicyUpdate(PolicyUpdate {
                assigned,
                app_interval_secs: r.u32("policy_update.app_interval_secs")?,
            })
        }
        MessageType::StoreStatus => Message::StoreStatus(StoreStatus {
            disk_id: r.disk_id("store_status.disk_id")?,
            epoch: r.u64("store_status.epoch")?,
            committed_cut_id: r.u64("store_status.committed_cut_id")?,
            point_age_secs: r.u64("store_status.point_age_secs")?,
            failure: r.string(MAX_ERROR_MESSAGE_LEN, "store_status.failure")?,
        }),
        MessageType::DiskName => Message::DiskName(DiskName {
            disk_id: r.disk_id("disk_name.disk_id")?,
            device: r.string(MAX_DEVICE_NAME_LEN, "disk_name.device")?,
        }),
        MessageType::ContinueEpoch => Message::ContinueEpoch(ContinueEpoch {
            disk_id: r.disk_id("continue_epoch.disk_id")?,
            epoch: r.u64("continue_epoch.epoch")?,
        }),
        MessageType::EpochContinued => Message::EpochContinued(EpochContinued {
            disk_id: r.disk_id("epoch_continued.disk_id")?,
            epoch: r.u64("epoch_continued.epoch")?,
            resume_from_seq: r.u64("epoch_continued.resume_from_seq")?,
            next_cut_id: r.u64("epoch_continued.next_cut_id")?,
        }),
    };
    r.finish()?;
    msg.validate()?;
    Ok(msg)
}

/// Validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub msg_type: MessageType,
    /// Body length (already checked against the type's bound).
    pub body_len: usize,
}

/// Parses and checks the header at the start of `buf`. `Ok(None)` if fewer
/// than [`HEADER_LEN`] bytes are present.
pub fn decode_header(buf: &[u8]) -> Result<Option<FrameHeader>, DecodeError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let found = [h[0], h[1]];
    if found != MAGIC {
        return Err(DecodeError::BadMagic { found });
    }
    let version = u16::from_le_bytes([h[2], h[3]]);
    if version != WIRE_VERSION {
        return Err(DecodeError::UnsupportedWireVersion {
            found: version,
            supported: WIRE_VERSION,
        });
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let raw_ty = u16::from_le_bytes([h[8], h[9]]);
    let msg_type = MessageType::from_u16(raw_ty)
        .ok_or(DecodeError::UnknownMessageType { msg_type: raw_ty })?;
    let max = msg_type.max_body_len();
    if len as usize > max {
        return Err(DecodeError::FrameTooLarge { msg_type, len, max });
    }
    Ok(Some(FrameHeader {
        msg_type,
        body_len: len as usize,
    }))
}

/// Decodes one frame from the start of `buf`.
///
/// Returns `Ok(None)` if `buf` holds only part of a frame (feed more bytes and
/// call again), or `Ok(Some((message, consumed)))` where `consumed` is the
/// frame's length. The header is validated (including the body bound) as soon
/// as its 10 bytes are present, so an oversized frame errors without waiting
/// for or allocating its body.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(h) = decode_header(buf)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + h.body_len;
    let Some(body) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    Ok(Some((decode_body(h.msg_type, body)?, total)))
}

/// Incremental stream decoder: push received bytes, pull whole messages.
///
/// After an error the stream cannot be resynchronised: close the connection.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    /// Creates an empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Decodes the next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        match decode_frame(&self.buf[self.start..])? {
            Some((msg, used)) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }
}
