//! Protocol version negotiation ([`Hello`] / [`HelloAck`]).
//!
//! The agent sends `Hello { protocol_version: PROTOCOL_VERSION }` (the highest
//! version it speaks). The server answers with [`answer_hello`]: a
//! [`HelloAck`] carrying `min(agent, server)` if that is at least the server's
//! [`MIN_PROTOCOL_VERSION`], otherwise an [`ErrorMessage`] with
//! [`ErrorCode::VersionUnsupported`] naming both versions, after which it
//! closes the connection. The agent checks the reply with
//! [`check_hello_ack`].

use crate::wire::{ErrorCode, ErrorMessage, Hello, HelloAck, Message};
use thiserror::Error;

/// Highest protocol version implemented by this crate. Version 2 adds
/// [`crate::wire::StoreStatus`] (server -> agent); a server sends it only on sessions
/// that negotiated 2 or more. Version 3 adds [`crate::wire::DiskName`] (agent -> server,
/// before a disk stream's `ProtectDisk`); an agent sends it only on sessions that
/// negotiated 3 or more, and a server refuses it on older ones. Version 4 adds
/// [`crate::wire::ContinueEpoch`] (agent -> server, before `ProtectDisk`: a restarted
/// agent continues its epoch under a new key) and its reply
/// [`crate::wire::EpochContinued`]; likewise sent only on sessions of 4 or more.
/// Version 5 adds consistency groups: [`crate::wire::TimeProbe`] and
/// [`crate::wire::TimeReply`] (the agent measures its clock against the server's) and
/// [`crate::wire::GroupSchedule`] (server -> agent) on the control stream, and the group
/// stamp of a [`crate::wire::Cut`] (an agent stamps cuts only on a session of 5 or more,
/// the only sessions on which it learns a schedule).
/// Version 6 adds application-consistent group points (the trailing `app_every` of a
/// [`crate::wire::GroupSchedule`], sent only when not 0 and only on sessions of 6 or
/// more) and [`crate::wire::PolicyUpdate`] (server -> agent, control stream): what the
/// machine's policy in the configuration role sets for the agent.
pub const PROTOCOL_VERSION: u16 = 6;
/// Lowest protocol version this crate still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Version negotiation failed; the session cannot proceed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum VersionError {
    /// The peer's version is outside the range this side supports.
    #[error(
        "peer protocol version {peer} is not supported: this side supports versions {min}..={max}; upgrade the older side"
    )]
    Unsupported {
        /// Version offered or chosen by the peer.
        peer: u16,
        /// Lowest version this side supports.
        min: u16,
        /// Highest version this side supports.
        max: u16,
    },
}

impl VersionError {
    /// The [`ErrorMessage`] to send before closing the connection.
    pub fn to_message(&self) -> ErrorMessage {
        ErrorMessage {
            code: ErrorCode::VersionUnsupported,
            disk_id: None,
            message: self.to_string(),
        }
    }
}

/// Server side: picks the session version for an agent's offer.
pub fn negotiate(offered: u16) -> Result<u16, VersionError> {
    if offered < MIN_PROTOCOL_VERSION {
        return Err(VersionError::Unsupported {
            peer: offered,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    Ok(offered.min(PROTOCOL_VERSION))
}

/// Server side: the reply to a [`Hello`]. `Ok(HelloAck)` to proceed, or
/// `Err((error, Message::Error))`: send the message, then close.
// Called once per session; the refusal travels as the message to send, whose size is that
// of the largest message (a group cut).
#[allow(clippy::result_large_err)]
pub fn answer_hello(
    hello: &Hello,
    server_id: &str,
    escrow_key: [u8; 32],
) -> Result<Message, (VersionError, Message)> {
    match negotiate(hello.protocol_version) {
        Ok(v) => Ok(Message::HelloAck(HelloAck {
            protocol_version: v,
            server_id: server_id.to_owned(),
            escrow_key,
        })),
        Err(e) => {
            let m = Message::Error(e.to_message());
            Err((e, m))
        }
    }
}

/// Agent side: checks the server's choice against what was `offered`;
/// returns the session version.
pub fn check_hello_ack(offered: u16, ack: &HelloAck) -> Result<u16, VersionError> {
    let v = ack.protocol_version;
    if v < MIN_PROTOCOL_VERSION || v > offered.min(PROTOCOL_VERSION) {
        return Err(VersionError::Unsupported {
            peer: v,
            min: MIN_PROTOCOL_VERSION,
            max: offered.min(PROTOCOL_VERSION),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(v: u16) -> Hello {
        Hello {
            protocol_version: v,
            machine_id: "m".into(),
            agent_version: "1.0".into(),
        }
    }

    #[test]
    fn current_version_is_accepted() {
        let m = answer_hello(&hello(PROTOCOL_VERSION), "ps1", [7; 32]).unwrap();
        let Message::HelloAck(ack) = m else {
            panic!("expected HelloAck, got {m:?}")
        };
        assert_eq!(ack.protocol_version, PROTOCOL_VERSION);
        assert_eq!(
            check_hello_ack(PROTOCOL_VERSION, &ack),
            Ok(PROTOCOL_VERSION)
        );
    }

    #[test]
    fn newer_agent_is_downgraded() {
        assert_eq!(negotiate(PROTOCOL_VERSION + 5), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn too_old_version_is_refused_with_error_naming_both() {
        let (err, msg) = answer_hello(&hello(0), "ps1", [7; 32]).unwrap_err();
        assert_eq!(
            err,
            VersionError::Unsupported {
                peer: 0,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION
            }
        );
        let Message::Error(e) = msg else {
            panic!("expected Error message")
        };
        assert_eq!(e.code, ErrorCode::VersionUnsupported);
        assert!(e.message.contains("version 0"), "{}", e.message);
        assert!(
            e.message
                .contains(&format!("{MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"))
        );
        // The refusal must itself be encodable.
        assert!(Message::Error(e).to_frame().is_ok());
    }

    #[test]
    fn agent_refuses_server_choice_above_offer() {
        let ack = HelloAck {
            escrow_key: [0; 32],
            protocol_version: PROTOCOL_VERSION + 1,
            server_id: "s".into(),
        };
        assert!(check_hello_ack(PROTOCOL_VERSION, &ack).is_err());
        let ack0 = HelloAck {
            escrow_key: [0; 32],
            protocol_version: 0,
            server_id: "s".into(),
        };
        assert!(check_hello_ack(PROTOCOL_VERSION, &ack0).is_err());
    }
}
