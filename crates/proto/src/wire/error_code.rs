//! [`ErrorCode`]: why a peer refused or failed, carried by an `ErrorMessage`.

/// Error codes carried by [`super::ErrorMessage`].
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
    /// The server cannot continue the epoch a restarted agent asked to continue (it does
    /// not hold it, or holds a newer one): start a new epoch (full resync).
    CannotContinue = 9,
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
            9 => Self::CannotContinue,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorCode::VersionUnsupported => "protocol version not supported",
            ErrorCode::NotOwner => "not the disk's owner",
            ErrorCode::BadFrame => "malformed frame",
            ErrorCode::Backpressure => "server busy",
            ErrorCode::Internal => "server error",
            ErrorCode::OutOfOrder => "out of order",
            ErrorCode::StaleEpoch => "stale epoch",
            ErrorCode::UnknownDisk => "unknown disk",
            ErrorCode::CannotContinue => "cannot continue the epoch",
        })
    }
}
