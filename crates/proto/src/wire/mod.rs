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
//! | 0x0006 | [`Cut`]          | disk_id `[u8; 16]`, epoch u64, seq u64, time_ns u64, mono_ns u64, kind u8, id u64, mac `[u8; 32]` ([`CUT_MAC_LEN`]), then, only for a group cut (protocol 5 on), its stamp: group `[u8; 16]`, instant_ns u64, members u16 (1..=[`MAX_GROUP_MEMBERS`]), offset_ns i64, error_ns u64 ([`GROUP_STAMP_LEN`] bytes) |
//! | 0x0007 | [`Ack`]          | disk_id `[u8; 16]`, epoch u64, durable_seq u64, durable_cut_id u64                                              |
//! | 0x0008 | [`ErrorMessage`] | code u16, has_disk u8 (0 or 1), disk_id `[u8; 16]` (only if has_disk = 1), message str (`<=` [`MAX_ERROR_MESSAGE_LEN`]) |
//! | 0x0009 | [`Ping`]         | nonce u64                                                                                                 |
//! | 0x000A | [`Pong`]         | nonce u64                                                                                                 |
//! | 0x000B | [`StoreStatus`]  | disk_id `[u8; 16]`, epoch u64, committed_cut_id u64, point_age_secs u64, failure str (`<=` [`MAX_ERROR_MESSAGE_LEN`]) |
//! | 0x000C | [`DiskName`]     | disk_id `[u8; 16]`, device str (1..=[`MAX_DEVICE_NAME_LEN`] bytes, printable: no control characters) |
//! | 0x000D | [`ContinueEpoch`] | disk_id `[u8; 16]`, epoch u64                                                                           |
//! | 0x000E | [`EpochContinued`] | disk_id `[u8; 16]`, epoch u64, resume_from_seq u64, next_cut_id u64                                   |
//! | 0x000F | [`TimeProbe`]    | nonce u64                                                                                                 |
//! | 0x0010 | [`TimeReply`]    | nonce u64, received_ns u64, sent_ns u64                                                                   |
//! | 0x0011 | [`GroupSchedule`] | group `[u8; 16]`, interval_ms u64, members u16 (0: no group), max_error_ns u64, coordinator_offset_ns i64, coordinator_error_ns u64, app_every u32 (0: no application-consistent group points) |
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
//!
//! The encoder and its validation live in `wire/encode.rs`, the decoder in
//! `wire/decode.rs`; both are private, their items are methods on the types below
//! or re-exported here.

use thiserror::Error;

mod decode;
mod encode;
mod error_code;

pub use decode::{FrameDecoder, FrameHeader, decode_frame, decode_header};
pub use error_code::ErrorCode;

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"RC";
/// Version of the framing and body layouts implemented by this crate.
///
/// History: 1 = first layout; 2 = [`Cut`] carries the agent's point MAC (issue 12,
/// decision 0012). A peer of another version is refused at its first frame
/// ([`DecodeError::UnsupportedWireVersion`]).
pub const WIRE_VERSION: u16 = 2;
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
/// Maximum byte length of [`DiskName::device`].
pub const MAX_DEVICE_NAME_LEN: usize = 255;

/// `text` cut to at most [`MAX_ERROR_MESSAGE_LEN`] bytes at a character boundary, for the
/// message fields of [`ErrorMessage`] and [`StoreStatus`].
pub fn clip_message(text: &str) -> String {
    let mut end = text.len().min(MAX_ERROR_MESSAGE_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
/// Maximum byte length of [`ProtectDisk::wrapped_key`].
pub const MAX_WRAPPED_KEY_LEN: usize = 256;
/// Smallest accepted [`ProtectDisk::sector_size`].
pub const MIN_SECTOR_SIZE: u32 = 512;
/// Largest accepted [`ProtectDisk::sector_size`].
pub const MAX_SECTOR_SIZE: u32 = 65536;

/// Length of [`Cut::mac`].
pub const CUT_MAC_LEN: usize = 32;
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

pub use ripcord_types::{
    CutKind, DiskId, Extent, ExtentKind, GROUP_STAMP_LEN, GroupId, GroupStamp, MAX_GROUP_MEMBERS,
};
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
    /// Server -> agent: how the disk's data is becoming recovery points in the target
    /// store (protocol version 2 on).
    StoreStatus = 0x000B,
    /// Agent -> server: the device path the agent protects a disk as, for people
    /// (protocol version 3 on).
    DiskName = 0x000C,
    /// Agent -> server: the stream's `ProtectDisk` continues an epoch after the agent
    /// restarted (protocol version 4 on).
    ContinueEpoch = 0x000D,
    /// Server -> agent: the epoch continues, from this sequence and cut id (protocol
    /// version 4 on; the reply to a continued stream's `ProtectDisk`).
    EpochContinued = 0x000E,
    /// Agent -> server, control stream (protocol version 5 on): a clock probe.
    TimeProbe = 0x000F,
    /// Server -> agent, control stream (protocol version 5 on): the server's clock at
    /// the probe's arrival and at the reply's departure.
    TimeReply = 0x0010,
    /// Server -> agent, control stream (protocol version 5 on): the consistency group the
    /// machine belongs to (or none), and where the coordinator's clock is.
    GroupSchedule = 0x0011,
    /// Server -> agent, control stream (protocol version 6 on): what the machine's policy
    /// sets for the agent (or that it has none).
    PolicyUpdate = 0x0012,
}

impl std::fmt::Display for MessageType {
    /// The message's name as the protocol documents it (e.g. `ProtectDisk`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// What arrived where a particular message was expected, for an error a person reads:
/// "a DiskAccepted frame", or "the end of the stream".
pub fn describe_received(got: Option<MessageType>) -> String {
    match got {
        Some(t) => format!("a {t} frame"),
        None => "the end of the stream".to_owned(),
    }
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
            0x000B => Self::StoreStatus,
            0x000C => Self::DiskName,
            0x000D => Self::ContinueEpoch,
            0x000E => Self::EpochContinued,
            0x000F => Self::TimeProbe,
            0x0010 => Self::TimeReply,
            0x0011 => Self::GroupSchedule,
            0x0012 => Self::PolicyUpdate,
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
            Self::Cut => DISK_ID_LEN + 8 + 8 + 8 + 8 + 1 + 8 + CUT_MAC_LEN + GROUP_STAMP_LEN,
            Self::Ack => DISK_ID_LEN + 8 + 8 + 8,
            Self::Error => 2 + 1 + DISK_ID_LEN + 2 + MAX_ERROR_MESSAGE_LEN,
            Self::Ping | Self::Pong => 8,
            Self::StoreStatus => DISK_ID_LEN + 8 + 8 + 8 + 2 + MAX_ERROR_MESSAGE_LEN,
            Self::DiskName => DISK_ID_LEN + 2 + MAX_DEVICE_NAME_LEN,
            Self::ContinueEpoch => DISK_ID_LEN + 8,
            Self::EpochContinued => DISK_ID_LEN + 8 + 8 + 8,
            Self::TimeProbe => 8,
            Self::TimeReply => 8 + 8 + 8,
            Self::GroupSchedule => 16 + 8 + 2 + 8 + 8 + 8 + 4,
            Self::PolicyUpdate => 1 + 4,
        }
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
    /// The agent's MAC over every field above and the group stamp
    /// ([`crate::aead::cut_aad`]) under a key derived from the disk's data key: failover
    /// checks it before using the point. The process server and the store carry it
    /// verbatim and cannot forge it.
    pub mac: [u8; CUT_MAC_LEN],
    /// For a member of a group point (protocol version 5 on): the group, its instant and
    /// the cut's clock error. Only crash-consistent cuts carry one.
    pub group: Option<GroupStamp>,
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

/// Server -> agent: the target store side of a disk (sent when it changes, and every few
/// seconds while uploads fail or points lag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// Disk concerned.
    pub disk_id: DiskId,
    /// Epoch of the newest recovery point committed in the target store (0: none).
    pub epoch: u64,
    /// Its cut id (0: none).
    pub committed_cut_id: u64,
    /// Seconds since it was committed, by the server's clock (or since the server
    /// started, if none was).
    pub point_age_secs: u64,
    /// While uploads to the target store fail: why (`<=` [`MAX_ERROR_MESSAGE_LEN`] bytes);
    /// empty when they work.
    pub failure: String,
}

/// Agent -> server, protocol version 3 on: the device path the agent protects a disk as
/// (e.g. `/dev/sdb`), sent on the disk's stream just before its [`ProtectDisk`].
///
/// The agent's claim, for people only (logs, metrics, `points list`): never authenticated
/// and never used to place or restore data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskName {
    /// Disk named; must be the disk of the stream's [`ProtectDisk`].
    pub disk_id: DiskId,
    /// Device path, 1..=[`MAX_DEVICE_NAME_LEN`] bytes of UTF-8 without control
    /// characters (see [`check_device_name`]).
    pub device: String,
}

/// Checks a [`DiskName::device`]: 1..=[`MAX_DEVICE_NAME_LEN`] bytes and no control
/// characters, so it is safe to print in a log line, a metric label or a table.
pub fn check_device_name(device: &str) -> Result<(), InvalidMessage> {
    encode::check_len("disk_name.device", device.len(), MAX_DEVICE_NAME_LEN)?;
    if device.is_empty() || device.chars().any(char::is_control) {
        return Err(InvalidMessage::UnprintableDeviceName);
    }
    Ok(())
}

/// Agent -> server, protocol version 4 on: sent on a disk's stream just before its
/// [`ProtectDisk`] (after any [`DiskName`]), by an agent that restarted and continues
/// `epoch` instead of starting a new one: its `ProtectDisk` carries the same epoch and a
/// fresh data key (a key rotation). The server answers [`EpochContinued`], or refuses
/// with [`ErrorCode::CannotContinue`] if it does not hold the epoch; it never starts the
/// epoch anew for such a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContinueEpoch {
    /// Disk continued; must be the disk of the stream's [`ProtectDisk`].
    pub disk_id: DiskId,
    /// Epoch continued; must be the epoch of the stream's [`ProtectDisk`].
    pub epoch: u64,
}

/// Server -> agent, protocol version 4 on: the reply to a continued stream's
/// [`ProtectDisk`] (in place of [`DiskAccepted`]): the first sequence the new key seals
/// and the id the agent's next cut must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochContinued {
    /// Disk continued.
    pub disk_id: DiskId,
    /// Epoch continued.
    pub epoch: u64,
    /// The server holds every batch before it durably.
    pub resume_from_seq: u64,
    /// The id of the agent's next cut (the server's newest cut id + 1).
    pub next_cut_id: u64,
}

/// Agent -> server, on the control stream (protocol version 5 on): a clock probe, sent
/// every second or so. The agent notes its own clock when sending and when the
/// [`TimeReply`] arrives; with the server's two readings that gives the offset between
/// the clocks and a bound on its error (half the round trip less the server's hold time),
/// as NTP does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeProbe {
    /// Echoed in the reply.
    pub nonce: u64,
}

/// Server -> agent: the answer to a [`TimeProbe`], with the server's wall clock (unix ns)
/// when the probe arrived and when this reply left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeReply {
    /// The probe's nonce.
    pub nonce: u64,
    /// Server clock at the probe's arrival.
    pub received_ns: u64,
    /// Server clock at the reply's departure (`>= received_ns`).
    pub sent_ns: u64,
}

/// The offset of a local clock against a remote one from one round trip, as NTP computes
/// it: the request left at local `sent`, arrived at remote `remote_received`, the answer
/// left at remote `remote_sent` and arrived at local `received` (all ns). Returns the
/// local clock minus the remote one, and the bound on its error: half the round trip less
/// the remote hold time (the one-way delays are unknown but not negative). `None` when the
/// local clock went back during the round trip or the offset does not fit an `i64`.
pub fn clock_offset(
    sent: u64,
    remote_received: u64,
    remote_sent: u64,
    received: u64,
) -> Option<(i64, u64)> {
    let round_trip = received.checked_sub(sent)?;
    let held = remote_sent.saturating_sub(remote_received);
    let error = round_trip.saturating_sub(held) / 2;
    let offset = (i128::from(sent) - i128::from(remote_received) + i128::from(received)
        - i128::from(remote_sent))
        / 2;
    Some((i64::try_from(offset).ok()?, error))
}

/// Server -> agent, on the control stream (protocol version 5 on): the consistency group
/// of this machine, sent after the hello and whenever it changes.
///
/// The coordinator's clock is the configuration role's. A server that is not the
/// configuration role measures its own clock against it and says where it stands
/// (`coordinator_offset_ns`, this server's clock minus the coordinator's, within
/// `coordinator_error_ns`); the agent adds its own measured offset to this server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSchedule {
    /// The group (meaningless when `members` is 0).
    pub group: GroupId,
    /// Group points are due at every multiple of this interval of the coordinator's clock
    /// (1000..=3_600_000 ms unless `members` is 0).
    pub interval_ms: u64,
    /// Disks the group's points span (0: the machine is in no group; else
    /// 1..=[`MAX_GROUP_MEMBERS`]).
    pub members: u16,
    /// A cut whose clock error is more than half this is not stamped (two such cuts could
    /// be `max_error_ns` apart).
    pub max_error_ns: u64,
    /// This server's clock minus the coordinator's (0 on the configuration role itself).
    pub coordinator_offset_ns: i64,
    /// Bound on the error of `coordinator_offset_ns`.
    pub coordinator_error_ns: u64,
    /// Every `app_every`-th instant (those whose number of intervals since the Unix epoch
    /// is a multiple of it) is an application-consistent group point: every member
    /// freezes before the instant and cuts at it while frozen (decision 0028). 0: none.
    /// A trailing field (protocol 6), on the wire only when not 0, so a schedule without
    /// it has protocol 5's layout.
    pub app_every: u32,
}

/// Server -> agent, on the control stream (protocol version 6 on): what the policy the
/// configuration role gives this machine (`ripcord policy assign`) sets for the agent,
/// sent after the hello and whenever it changes. It overrides the agent's configuration
/// file while `assigned`; without a policy the file's values apply again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyUpdate {
    /// Whether the machine has a policy (on the wire: 1 or 0).
    pub assigned: bool,
    /// Application-consistent points this often, in seconds (0: none; else
    /// [`MIN_POLICY_APP_INTERVAL_SECS`]..=[`MAX_POLICY_APP_INTERVAL_SECS`]; 0 when not
    /// `assigned`).
    pub app_interval_secs: u32,
}

/// Longest application-consistent interval a [`PolicyUpdate`] may carry (a week).
pub const MAX_POLICY_APP_INTERVAL_SECS: u32 = 7 * 24 * 3600;
/// Shortest non-zero application-consistent interval a [`PolicyUpdate`] may carry (each
/// point freezes the machine's file systems).
pub const MIN_POLICY_APP_INTERVAL_SECS: u32 = 60;

/// Shortest group interval a [`GroupSchedule`] may carry.
pub const MIN_GROUP_INTERVAL_MS: u64 = 1000;
/// Longest group interval a [`GroupSchedule`] may carry.
pub const MAX_GROUP_INTERVAL_MS: u64 = 3_600_000;

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
    StoreStatus(StoreStatus),
    DiskName(DiskName),
    ContinueEpoch(ContinueEpoch),
    EpochContinued(EpochContinued),
    TimeProbe(TimeProbe),
    TimeReply(TimeReply),
    GroupSchedule(GroupSchedule),
    PolicyUpdate(PolicyUpdate),
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
    /// A device name is empty or holds control characters.
    #[error("device name is empty or holds control characters")]
    UnprintableDeviceName,
    /// A group stamp or schedule names a member count outside its bounds.
    #[error("a group of {members} disks: need 1..={MAX_GROUP_MEMBERS}")]
    GroupMembers {
        /// The count carried.
        members: u16,
    },
    /// A group schedule's interval is outside its bounds.
    #[error(
        "a group interval of {interval_ms} ms: need {MIN_GROUP_INTERVAL_MS}..={MAX_GROUP_INTERVAL_MS}"
    )]
    GroupInterval {
        /// The interval carried.
        interval_ms: u64,
    },
    /// A policy update's application-consistent interval is out of bounds, or set
    /// without a policy.
    #[error(
        "a policy's application-consistent interval of {secs} s: need 0 or {MIN_POLICY_APP_INTERVAL_SECS}..={MAX_POLICY_APP_INTERVAL_SECS}, and 0 without a policy"
    )]
    PolicyAppInterval {
        /// The interval carried.
        secs: u32,
    },
    /// A time reply's departure precedes its arrival.
    #[error("a time reply left ({sent_ns}) before its probe arrived ({received_ns})")]
    TimeReplyOrder {
        /// Arrival reading.
        received_ns: u64,
        /// Departure reading.
        sent_ns: u64,
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
    #[error("{msg_type} frame announces a {len}-byte body, over its bound {max}")]
    FrameTooLarge {
        /// Message type.
        msg_type: MessageType,
        /// Announced body length.
        len: u32,
        /// Bound for this type.
        max: usize,
    },
    /// The body ended before all fields were read.
    #[error("{msg_type} body truncated while reading `{field}`")]
    TruncatedBody {
        /// Message type.
        msg_type: MessageType,
        /// Field being read.
        field: &'static str,
    },
    /// The body is longer than the fields it contains.
    #[error("{msg_type} body has {extra} trailing bytes")]
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
