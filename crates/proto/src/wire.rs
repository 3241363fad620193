//! Wire types and the hand-written frame codec.
//!
//! The byte layout below **is** the specification; encoder and decoder are
//! written by hand against it (no serde). All integers are little-endian.
//!
//! # Frame
//!
//! | offset | size | field          | notes                                               |
//! |-------:|-----:|----------------|-----------------------------------------------------|
//! | 0      | 2    | magic          | `b"RC"` (`0x52 0x43`), see [`MAGIC`]                |
//! | 2      | 2    | wire version   | u16, framing/layout version, see [`WIRE_VERSION`]   |
//! | 4      | 4    | body length    | u32, bytes after the header, `<=` per-type bound     |
//! | 8      | 2    | message type   | u16, see [`MessageType`]                            |
//! | 10     | n    | body           | layout per message type below                       |
//!
//! The header is [`HEADER_LEN`] = 10 bytes. The wire version describes this
//! framing and the body layouts; it changes only when a layout changes. The
//! *protocol* version negotiated in [`Hello`]/[`HelloAck`] describes message
//! semantics (see [`crate::handshake`]).
//!
//! Every body has an upper bound ([`MessageType::max_body_len`]); a header
//! announcing more is rejected with [`DecodeError::FrameTooLarge`] as soon as
//! the 10 header bytes are available, before any body byte is buffered or
//! allocated. The largest frame is [`MAX_FRAME_LEN`] (a full [`Batch`]).
//!
//! # Field encodings
//!
//! | type      | encoding                                                            |
//! |-----------|---------------------------------------------------------------------|
//! | `u8..u64` | little-endian, fixed width                                          |
//! | `str`     | u16 byte length, then that many UTF-8 bytes; length `<=` field bound |
//! | `DiskId`  | 16 raw bytes (no length prefix)                                     |
//! | enums     | fixed-width integer; values not listed are rejected                 |
//!
//! # Bodies
//!
//! | type   | message          | body layout (in order)                                                                                    |
//! |-------:|------------------|-----------------------------------------------------------------------------------------------------------|
//! | 0x0001 | [`Hello`]        | protocol_version u16, machine_id str (`<=` [`MAX_MACHINE_ID_LEN`]), agent_version str (`<=` [`MAX_AGENT_VERSION_LEN`]) |
//! | 0x0002 | [`HelloAck`]     | protocol_version u16, server_id str (`<=` [`MAX_SERVER_ID_LEN`]), escrow_key `[u8; 32]`                   |
//! | 0x0003 | [`ProtectDisk`]  | disk_id `[u8; 16]`, size_bytes u64, sector_size u32 (power of two, 512..=65536), epoch u64, wrapped_key u16-len bytes (`<=` [`MAX_WRAPPED_KEY_LEN`]) |
//! | 0x0004 | [`DiskAccepted`] | disk_id `[u8; 16]`, epoch u64, resume_from_seq u64                                                              |
//! | 0x0005 | [`Batch`]        | disk_id `[u8; 16]`, epoch u64, first_seq u64, last_seq u64, flags u32, extent_count u32 (`<=` [`MAX_EXTENTS_PER_BATCH`]), extent_count x { sector u64, sectors u32, kind u8 }, payload_len u32 (`<=` [`MAX_PAYLOAD_LEN`]), payload bytes |
//! | 0x0006 | [`Cut`]          | disk_id `[u8; 16]`, epoch u64, seq u64, time_ns u64, mono_ns u64, kind u8, id u64                               |
//! | 0x0007 | [`Ack`]          | disk_id `[u8; 16]`, epoch u64, durable_seq u64, durable_cut_id u64                                              |
//! | 0x0008 | [`ErrorMessage`] | code u16, has_disk u8 (0 or 1), disk_id `[u8; 16]` (only if has_disk = 1), message str (`<=` [`MAX_ERROR_MESSAGE_LEN`]) |
//! | 0x0009 | [`Ping`]         | nonce u64                                                                                                 |
//! | 0x000A | [`Pong`]         | nonce u64                                                                                                 |
//!
//! Enum values: [`ExtentKind`] Data=0, Zero=1, Discard=2; [`CutKind`]
//! Crash=0, App=1; [`ErrorCode`] see its docs. Batch flags: bit 0
//! [`FLAG_COMPRESSED`], bit 1 [`FLAG_SEALED`]; other bits must be zero.
//! Batches require `1 <= first_seq <= last_seq` (sequence 0 means "nothing").
//!
//! # Disk identity
//!
//! A disk is named by a 16-byte [`DiskId`] (e.g. the GPT partition-table GUID
//! or a hash of the device serial), chosen by the agent and stable across
//! reboots and device renames. A fixed size keeps every per-disk message
//! fixed-layout and needs no bound.
//!
//! # Decoding
//!
//! [`decode_frame`] takes a buffer that may hold a partial frame and returns
//! `Ok(None)` until a whole frame is present, so a stream driver can feed bytes
//! incrementally ([`FrameDecoder`] does that buffering). It never panics and
//! checks every length against its bound before allocating.

use thiserror::Error;

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"RC";
/// Version of the framing and body layouts implemented by this crate.
pub const WIRE_VERSION: u16 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 10;

/// Maximum sealed payload bytes carried by one [`Batch`] (16 MiB).
pub const MAX_PAYLOAD_LEN: usize = 16 * 1024 * 1024;
/// Maximum number of extents in one [`Batch`].
pub const MAX_EXTENTS_PER_BATCH: usize = 16 * 1024;
/// Maximum byte length of [`Hello::machine_id`].
pub const MAX_MACHINE_ID_LEN: usize = 256;
/// Maximum byte length of [`Hello::agent_version`].
pub const MAX_AGENT_VERSION_LEN: usize = 64;
/// Maximum byte length of [`HelloAck::server_id`].
pub const MAX_SERVER_ID_LEN: usize = 256;
/// Maximum byte length of [`ErrorMessage::message`].
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;
/// Maximum byte length of [`ProtectDisk::wrapped_key`].
pub const MAX_WRAPPED_KEY_LEN: usize = 256;
/// Smallest accepted [`ProtectDisk::sector_size`].
pub const MIN_SECTOR_SIZE: u32 = 512;
/// Largest accepted [`ProtectDisk::sector_size`].
pub const MAX_SECTOR_SIZE: u32 = 65536;

/// Encoded size of one [`Extent`].
pub const EXTENT_LEN: usize = 8 + 4 + 1;
const DISK_ID_LEN: usize = 16;
const BATCH_FIXED_LEN: usize = DISK_ID_LEN + 8 + 8 + 8 + 4 + 4 + 4;

/// Largest body of any message (a full [`Batch`]).
pub const MAX_BODY_LEN: usize =
    BATCH_FIXED_LEN + MAX_EXTENTS_PER_BATCH * EXTENT_LEN + MAX_PAYLOAD_LEN;
/// Largest frame (header + body) a conforming peer may send.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_BODY_LEN;
const _: () = assert!(MAX_BODY_LEN <= u32::MAX as usize);

pub use ripcord_types::{CutKind, DiskId, Extent, ExtentKind};
/// Batch flag: the payload was zstd-compressed before sealing.
pub const FLAG_COMPRESSED: u32 = 1 << 0;
/// Batch flag: the payload is AES-256-GCM sealed (see [`crate::aead`]).
pub const FLAG_SEALED: u32 = 1 << 1;
/// All flag bits defined by this wire version.
pub const KNOWN_FLAGS: u32 = FLAG_COMPRESSED | FLAG_SEALED;

/// Message type codes (the u16 at header offset 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    /// Agent -> server: opens a session.
    Hello = 0x0001,
    /// Server -> agent: accepts a session.
    HelloAck = 0x0002,
    /// Agent -> server: starts or resumes one disk stream.
    ProtectDisk = 0x0003,
    /// Server -> agent: disk stream accepted, with resume point.
    DiskAccepted = 0x0004,
    /// Agent -> server: changed blocks for a sequence range.
    Batch = 0x0005,
    /// Agent -> server: consistency point.
    Cut = 0x0006,
    /// Server -> agent: cumulative durability acknowledgement.
    Ack = 0x0007,
    /// Either direction: refusal or failure.
    Error = 0x0008,
    /// Either direction: liveness probe.
    Ping = 0x0009,
    /// Either direction: liveness reply.
    Pong = 0x000A,
}

impl MessageType {
    /// Parses a wire code; `None` for codes this version does not define.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0x0001 => Self::Hello,
            0x0002 => Self::HelloAck,
            0x0003 => Self::ProtectDisk,
            0x0004 => Self::DiskAccepted,
            0x0005 => Self::Batch,
            0x0006 => Self::Cut,
            0x0007 => Self::Ack,
            0x0008 => Self::Error,
            0x0009 => Self::Ping,
            0x000A => Self::Pong,
            _ => return None,
        })
    }

    /// Largest body length a valid message of this type can have.
    pub const fn max_body_len(self) -> usize {
        match self {
            Self::Hello => 2 + 2 + MAX_MACHINE_ID_LEN + 2 + MAX_AGENT_VERSION_LEN,
            Self::HelloAck => 2 + 2 + MAX_SERVER_ID_LEN + 32,
            Self::ProtectDisk => DISK_ID_LEN + 8 + 4 + 8 + 2 + MAX_WRAPPED_KEY_LEN,
            Self::DiskAccepted => DISK_ID_LEN + 8 + 8,
            Self::Batch => MAX_BODY_LEN,
            Self::Cut => DISK_ID_LEN + 8 + 8 + 8 + 8 + 1 + 8,
            Self::Ack => DISK_ID_LEN + 8 + 8 + 8,
            Self::Error => 2 + 1 + DISK_ID_LEN + 2 + MAX_ERROR_MESSAGE_LEN,
            Self::Ping | Self::Pong => 8,
        }
    }
}

/// Error codes carried by [`ErrorMessage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer's protocol version is not supported; the message names both.
    VersionUnsupported = 1,
    /// Another agent/session owns this disk; stop replicating it.
    NotOwner = 2,
    /// A frame could not be decoded; the connection is closed.
    BadFrame = 3,
    /// Server is full or overloaded; retry later with backoff.
    Backpressure = 4,
    /// Server-internal failure; retry later.
    Internal = 5,
    /// Batch or cut out of order (gap/overlap); reconnect and resume.
    OutOfOrder = 6,
    /// The agent used an older epoch than the server has; start a new epoch.
    StaleEpoch = 7,
    /// The disk is not known / not protected on this server.
    UnknownDisk = 8,
}

impl ErrorCode {
    /// Parses a wire value.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::VersionUnsupported,
            2 => Self::NotOwner,
            3 => Self::BadFrame,
            4 => Self::Backpressure,
            5 => Self::Internal,
            6 => Self::OutOfOrder,
            7 => Self::StaleEpoch,
            8 => Self::UnknownDisk,
            _ => return None,
        })
    }
}

/// Agent -> server session opening; `protocol_version` is the highest
/// protocol version the agent speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol version the agent speaks.
    pub protocol_version: u16,
    /// Stable identifier of the protected machine (`<=` [`MAX_MACHINE_ID_LEN`] bytes).
    pub machine_id: String,
    /// Free-form agent build version (`<=` [`MAX_AGENT_VERSION_LEN`] bytes).
    pub agent_version: String,
}

/// Server -> agent: the protocol version chosen for this session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloAck {
    /// Version both sides will speak.
    pub protocol_version: u16,
    /// Identifier of the process server (`<=` [`MAX_SERVER_ID_LEN`] bytes).
    pub server_id: String,
    /// The deployment's key-escrow public key (X25519): agents wrap each disk's
    /// data key to it, so only the deployment passphrase can unwrap it.
    pub escrow_key: [u8; 32],
}

/// Agent -> server: start (new epoch) or resume (same epoch) a disk stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtectDisk {
    /// Disk being replicated.
    pub disk_id: DiskId,
    /// Disk size in bytes.
    pub size_bytes: u64,
    /// Logical sector size (power of two, 512..=65536).
    pub sector_size: u32,
    /// Replication epoch; a new epoch means a full resync.
    pub epoch: u64,
    /// The disk's data key, sealed to the deployment's escrow key
    /// (`<=` [`MAX_WRAPPED_KEY_LEN`] bytes; opaque to this crate).
    pub wrapped_key: Vec<u8>,
}

/// Server -> agent: stream accepted; the agent (re)sends from `resume_from_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskAccepted {
    /// Disk being replicated.
    pub disk_id: DiskId,
    /// Epoch the server now tracks.
    pub epoch: u64,
    /// Next sequence the server expects: its durable sequence + 1.
    pub resume_from_seq: u64,
}

/// Changed blocks covering sequences `first_seq..=last_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Disk being replicated.
    pub disk_id: DiskId,
    /// Replication epoch.
    pub epoch: u64,
    /// First sequence covered (>= 1).
    pub first_seq: u64,
    /// Last sequence covered (>= `first_seq`).
    pub last_seq: u64,
    /// Extents described by this batch (`<=` [`MAX_EXTENTS_PER_BATCH`]).
    pub extents: Vec<Extent>,
    /// [`FLAG_COMPRESSED`] / [`FLAG_SEALED`].
    pub flags: u32,
    /// Sealed bytes, opaque to this crate (`<=` [`MAX_PAYLOAD_LEN`]).
    pub payload: Vec<u8>,
}

/// A consistency point: all batches with sequences `<= seq` form a
/// crash-consistent (or app-consistent) disk state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Disk being replicated.
    pub disk_id: DiskId,
    /// Replication epoch.
    pub epoch: u64,
    /// Stream position of the cut.
    pub seq: u64,
    /// Wall-clock time of the cut, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The same instant on the protected host's CLOCK_MONOTONIC (the clock of the
    /// capture timestamps), for write-order checks.
    pub mono_ns: u64,
    /// Crash- or application-consistent.
    pub kind: CutKind,
    /// Cut identifier: consecutive per (disk, epoch), starting at 1.
    pub id: u64,
}

/// Cumulative acknowledgement: every batch `<= durable_seq` and every cut
/// `<= durable_cut_id` is durable on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Disk being replicated.
    pub disk_id: DiskId,
    /// Replication epoch.
    pub epoch: u64,
    /// Highest durable sequence (0 = none).
    pub durable_seq: u64,
    /// Highest durable cut id (0 = none).
    pub durable_cut_id: u64,
}

/// Refusal or failure report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMessage {
    /// What went wrong.
    pub code: ErrorCode,
    /// Disk the error concerns, if it is disk-specific.
    pub disk_id: Option<DiskId>,
    /// Human-readable detail (`<=` [`MAX_ERROR_MESSAGE_LEN`] bytes).
    pub message: String,
}

/// Liveness probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    /// Echoed in the [`Pong`].
    pub nonce: u64,
}

/// Liveness reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pong {
    /// Nonce of the [`Ping`] being answered.
    pub nonce: u64,
}

/// Any protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    ProtectDisk(ProtectDisk),
    DiskAccepted(DiskAccepted),
    Batch(Batch),
    Cut(Cut),
    Ack(Ack),
    Error(ErrorMessage),
    Ping(Ping),
    Pong(Pong),
}

/// A message whose contents violate a bound or invariant of the wire format.
/// Returned by the encoder (fix the message before sending) and, wrapped in
/// [`DecodeError::Invalid`], by the decoder (the peer is broken: close).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum InvalidMessage {
    /// A length-prefixed field exceeds its bound.
    #[error("field `{field}` has length {len}, over its bound {max}")]
    FieldTooLong {
        /// Field name, `message.field`.
        field: &'static str,
        /// Announced or actual length.
        len: u64,
        /// Bound (a public `MAX_*` constant).
        max: u64,
    },
    /// Batch sequence range is empty or starts at 0.
    #[error("invalid batch sequence range {first}..={last}: need 1 <= first <= last")]
    InvalidSeqRange {
        /// `first_seq`.
        first: u64,
        /// `last_seq`.
        last: u64,
    },
    /// Batch flags contain bits this wire version does not define.
    #[error("batch flags {flags:#x} contain unknown bits (known: {KNOWN_FLAGS:#x})")]
    UnknownFlags {
        /// The flags value.
        flags: u32,
    },
    /// Sector size is not a power of two in 512..=65536.
    #[error("sector size {sector_size} is not a power of two in 512..=65536")]
    InvalidSectorSize {
        /// The sector size.
        sector_size: u32,
    },
}

/// Why a frame could not be decoded. Every variant means the byte stream is
/// unusable: send an [`ErrorCode::BadFrame`] (or [`ErrorCode::VersionUnsupported`])
/// error if possible and close the connection; incomplete input is *not* an
/// error (`Ok(None)`).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The stream does not start with [`MAGIC`]: the peer is not speaking ripcord.
    #[error(
        "bad frame magic {found:02x?} (expected {MAGIC:02x?}): peer does not speak the ripcord protocol"
    )]
    BadMagic {
        /// The two bytes found.
        found: [u8; 2],
    },
    /// The frame uses a wire layout version this build cannot read.
    #[error(
        "unsupported wire version {found}: this build supports wire version {supported}; upgrade the older side"
    )]
    UnsupportedWireVersion {
        /// Version in the frame header.
        found: u16,
        /// Version this build implements ([`WIRE_VERSION`]).
        supported: u16,
    },
    /// The message type code is not defined by this wire version.
    #[error("unknown message type {msg_type:#06x}")]
    UnknownMessageType {
        /// The type code.
        msg_type: u16,
    },
    /// The header announces a body longer than this message type allows.
    #[error("{msg_type:?} frame announces a {len}-byte body, over its bound {max}")]
    FrameTooLarge {
        /// Message type.
        msg_type: MessageType,
        /// Announced body length.
        len: u32,
        /// Bound for this type.
        max: usize,
    },
    /// The body ended before all fields were read.
    #[error("{msg_type:?} body truncated while reading `{field}`")]
    TruncatedBody {
        /// Message type.
        msg_type: MessageType,
        /// Field being read.
        field: &'static str,
    },
    /// The body is longer than the fields it contains.
    #[error("{msg_type:?} body has {extra} trailing bytes")]
    TrailingBytes {
        /// Message type.
        msg_type: MessageType,
        /// Unread bytes.
        extra: usize,
    },
    /// An enum-coded field holds a value this version does not define.
    #[error("field `{field}` has invalid value {value}")]
    InvalidEnum {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// A string field is not valid UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    InvalidUtf8 {
        /// Field name.
        field: &'static str,
    },
    /// A field violates a bound or invariant.
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
}

// ---------------------------------------------------------------- encoding --

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

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), InvalidMessage> {
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
            Self::DiskAccepted(_) | Self::Cut(_) | Self::Ack(_) | Self::Ping(_) | Self::Pong(_) => {
                Ok(())
            }
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

// ---------------------------------------------------------------- decoding --

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
            Message::Cut(Cut {
                disk_id,
                epoch,
                seq,
                time_ns,
                mono_ns,
                kind,
                id,
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
