//! Wire protocol between the ripcord agent (protected host) and the process
//! server: a versioned, hand-specified frame format plus sans-IO state
//! machines for both ends of a disk replication stream.
//!
//! * [`wire`]: message types, byte layout (documented as tables) and the
//!   incremental, bound-checked decoder.
//! * [`handshake`]: protocol version negotiation.
//! * [`aead`]: canonical AES-GCM additional data and nonce for sealed batches.
//! * [`sender`]: agent side, one per disk: windowing, back-pressure, resend
//!   after reconnect, ack timeout.
//! * [`receiver`]: server side, one per disk: ordering, duplicate and gap
//!   detection, epochs, acks that never run ahead of durability.
//!
//! Nothing here does I/O or reads a clock: the caller passes `now`, feeds
//! received messages in through `handle_*` and takes output from `poll_*`.
//!
//! # Sequences
//!
//! Within one `(disk, epoch)` every change gets a sequence number starting at
//! 1; a batch covers a contiguous range `first_seq..=last_seq` and consecutive
//! batches have adjacent ranges. Sequence 0 means "nothing". A new epoch (full
//! resync) restarts sequences at 1.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod aead;
pub mod handshake;
pub mod receiver;
pub mod sender;
pub mod wire;

pub use aead::{NonceError, aad, nonce};
pub use handshake::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, VersionError};
pub use receiver::{BatchAction, CutAction, DurableState, ProtectOutcome, Receiver};
pub use sender::{PushError, Sender, SenderConfig, SenderEvent, Transmit};
pub use wire::{
    Ack, Batch, ContinueEpoch, Cut, CutKind, DecodeError, DiskAccepted, DiskId, DiskName,
    EpochContinued, ErrorCode, ErrorMessage, Extent, ExtentKind, FrameDecoder, Hello, HelloAck,
    InvalidMessage, Message, Ping, Pong, ProtectDisk, StoreStatus, decode_frame, describe_received,
};
pub use wire::{FLAG_COMPRESSED, FLAG_SEALED, MAX_EXTENTS_PER_BATCH, MAX_PAYLOAD_LEN};
pub use wire::{
    GroupId, GroupSchedule, GroupStamp, MAX_GROUP_INTERVAL_MS, MAX_GROUP_MEMBERS,
    MAX_POLICY_APP_INTERVAL_SECS, MIN_GROUP_INTERVAL_MS, MIN_POLICY_APP_INTERVAL_SECS,
    PolicyUpdate, TimeProbe, TimeReply, clock_offset,
};
