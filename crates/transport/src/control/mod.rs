//! The process servers' link to the configuration role (ALPN `ripcord-control/1`, on the
//! configuration role's registration endpoint).
//!
//! Two exchanges, each one request and one reply on a bidirectional stream opened by the
//! process server:
//! - **join**: a new process server, authenticated by a process-server bootstrap token
//!   (never an agent's), sends a CSR for a key generated on it and gets a certificate for
//!   its names with the URI SAN `ripcord://process-server/<id>` (serverAuth, so agents
//!   accept it; clientAuth, so it can report), the CA certificate, and what it needs of
//!   the deployment (opaque JSON here: the escrow public key and parameters, the target).
//! - **report**: a joined server, authenticated by that certificate as its TLS client
//!   certificate, sends its heartbeat, health and disks (opaque JSON here); the reply
//!   accepts it or refuses it with a [`Refusal`].
//!
//! This module owns the wire format, the pinned-CA connection and the checks on what the
//! configuration role returns; what the configuration role decides (versions, clones,
//! removals) is the process server's (`ripcord-ps`), which holds the database.
//!
//! # Wire format and bounds
//! A frame is `u32 BE length (≤ MAX_CONTROL_MESSAGE)` + a JSON body ([`Request`] or
//! [`Reply`]). The length is checked before the body is allocated; JSON that does not
//! match the message types is [`ControlError::Malformed`], never a panic. Nothing is
//! parsed from a report's sender before its certificate was verified by TLS.

mod client;

use serde::{Deserialize, Serialize};

pub use client::{ControlClient, JoinParams, Joined, join};

use crate::register::{FrameError, RegisterError};

/// ALPN protocol id of the link.
pub const CONTROL_ALPN: &[u8] = b"ripcord-control/1";

/// Largest request or reply body, checked before allocating: a report of a server with a
/// few thousand disks fits.
pub const MAX_CONTROL_MESSAGE: usize = 4 << 20;

/// Time limit for one exchange (connection setup included).
pub const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What a process server asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Request {
    /// Join the deployment (no client certificate; a process-server token).
    Join(JoinRequest),
    /// Report (the joined server's certificate is the TLS client certificate).
    Report(ReportRequest),
}

/// A joining process server's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JoinRequest {
    /// A process-server bootstrap token (`id.secret`).
    pub token: String,
    /// The server's id (machine-id syntax: `[A-Za-z0-9._-]{1,64}`).
    pub server_id: String,
    /// Its `ripcord-ps` version: never newer than the configuration role's.
    pub version: String,
    /// Where it runs (see `ripcord-ps`): a copy elsewhere has another fingerprint.
    pub fingerprint: String,
    /// DNS names or IP addresses agents use to reach it.
    pub names: Vec<String>,
    /// Its replication port.
    pub data_port: u16,
    /// The CSR (DER) of the key it generated.
    pub csr: Vec<u8>,
}

/// A joined process server's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReportRequest {
    /// Its `ripcord-ps` version.
    pub version: String,
    /// Where it runs (see [`JoinRequest::fingerprint`]).
    pub fingerprint: String,
    /// Random per process start: two live processes with one identity have two.
    pub instance: String,
    /// The report itself, interpreted by the configuration role.
    pub body: serde_json::Value,
}

/// What the configuration role answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    /// The server joined.
    Joined {
        /// Its certificate (DER).
        certificate: Vec<u8>,
        /// The deployment CA certificate (DER).
        ca: Vec<u8>,
        /// What it needs of the deployment, interpreted by `ripcord-ps`.
        deployment: serde_json::Value,
    },
    /// The report was taken.
    Accepted {
        /// The machines assigned to the server now, with their current certificates: the
        /// only ones its data endpoint accepts.
        #[serde(default)]
        machines: Vec<AssignedMachine>,
        /// The consistency-group schedule of each of those machines in a group (older
        /// configuration roles send none).
        #[serde(default)]
        groups: Vec<MachineGroup>,
        /// The configuration role's wall clock when the report arrived and when this
        /// reply left: the reporter measures its clock against the coordinator's with it.
        #[serde(default)]
        clock: Option<ClockReading>,
        /// The policy of each of those machines that has one (older configuration roles
        /// send none).
        #[serde(default)]
        policies: Vec<MachinePolicy>,
    },
    /// Refused; `message` says what to do.
    Refused {
        /// Why.
        refusal: Refusal,
        /// For the operator.
        message: String,
    },
}

/// What a machine's policy in the configuration role sets for its process server and
/// agent (`ripcord policy set | assign`): relayed to a joined server with each report's
/// reply, so a change reaches them without restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachinePolicySettings {
    /// Keep the machine's recovery points this long, seconds.
    pub retention_secs: u64,
    /// Application-consistent points this often, seconds (0: none).
    pub app_interval_secs: u64,
}

/// A machine's policy settings, by machine id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachinePolicy {
    /// The machine id.
    pub machine: String,
    /// Its policy's settings.
    #[serde(flatten)]
    pub settings: MachinePolicySettings,
}

/// A machine assigned to a process server, and the SHA-256 (hex) of its current
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AssignedMachine {
    /// The machine id.
    pub id: String,
    /// SHA-256 of its current certificate, hex.
    pub cert_sha256: String,
}

/// A machine's consistency group, as its process server relays it to the agent (the
/// fields of the wire's `GroupSchedule`, without the clock offset the relaying server adds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineGroup {
    /// The machine id.
    pub machine: String,
    /// The group id, 32 hex digits.
    pub group: String,
    /// Group points are due at every multiple of this of the coordinator's clock.
    pub interval_ms: u64,
    /// Disks the group's points span.
    pub members: u16,
    /// A point whose clock-error bound passes this is not offered.
    pub max_error_ns: u64,
    /// Every this-many-th instant is application-consistent (0: none; older roles send
    /// none).
    #[serde(default)]
    pub app_every: u32,
}

/// Two readings of the configuration role's wall clock (unix ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClockReading {
    /// When the request arrived.
    pub received_ns: u64,
    /// When the reply left (`>= received_ns`).
    pub sent_ns: u64,
}

/// This host's wall clock, unix ns (0 before 1970): the clock of [`ClockReading`], and of
/// the process server's answers to agents' clock probes.
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What an accepted report brought back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportAccepted {
    /// See [`Reply::Accepted`].
    pub machines: Vec<AssignedMachine>,
    /// See [`Reply::Accepted`].
    pub groups: Vec<MachineGroup>,
    /// See [`Reply::Accepted`].
    pub policies: Vec<MachinePolicy>,
    /// The reply's clock readings with the reporter's own, at the request's departure
    /// and the reply's arrival: `(sent_ns, reply, received_ns)`.
    pub clock: Option<(u64, ClockReading, u64)>,
}

/// Why the configuration role refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// The request could not be decoded.
    Malformed,
    /// The token is unknown, expired, used up, or not a process-server token.
    Token,
    /// The server id or names are not valid.
    InvalidRequest,
    /// The CSR is malformed or uses another key algorithm.
    InvalidCsr,
    /// A process server with this id is registered already.
    AlreadyRegistered,
    /// The server is newer than the configuration role: upgrade the role first.
    NewerThanConfigRole,
    /// No such process server (never joined, or removed by an operator).
    NotRegistered,
    /// The certificate is not the server's current one.
    CertificateSuperseded,
    /// The identity runs somewhere it did not join from: a cloned server.
    Cloned,
    /// Another live process reports with the same identity right now.
    SeenTwice,
    /// A report without a process-server certificate.
    NotAuthenticated,
    /// The configuration role failed; retry later.
    Internal,
}

impl Refusal {
    /// Whether retrying the same request can ever succeed: a server refused this way at
    /// start does not serve (a clone, a removed server, a version too new).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Refusal::NewerThanConfigRole
                | Refusal::NotRegistered
                | Refusal::CertificateSuperseded
                | Refusal::Cloned
                | Refusal::AlreadyRegistered
                | Refusal::Token
                | Refusal::InvalidRequest
                | Refusal::InvalidCsr
        )
    }
}

/// Errors of the link.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting failed (pinned CA mismatch, nothing answering, TLS).
    #[error(transparent)]
    Connect(#[from] RegisterError),
    /// The connection failed.
    #[error("connection to the configuration role failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A frame could not be read or written, or was too large.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The body is not a message of this protocol.
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The configuration role refused.
    #[error("the configuration role refused ({refusal:?}): {message}")]
    Refused {
        /// Why.
        refusal: Refusal,
        /// What it said.
        message: String,
    },
    /// The reply does not answer the request.
    #[error("the configuration role answered {0} to this request")]
    UnexpectedReply(&'static str),
    /// The issued certificate does not match the request.
    #[error("the configuration role returned an unusable certificate: {0}")]
    BadIssuedCertificate(&'static str),
    /// Key, CSR or identity storage failed.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The exchange did not complete within [`CONTROL_TIMEOUT`].
    #[error("the configuration role did not answer within {}s", CONTROL_TIMEOUT.as_secs())]
    Timeout,
}

/// Reads one request or reply from `recv` (bounded by [`MAX_CONTROL_MESSAGE`]).
pub async fn read_message<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, ControlError> {
    let body = crate::register::read_frame_bounded(recv, MAX_CONTROL_MESSAGE).await?;
    decode(&body)
}

/// Writes one request or reply to `send` and finishes the stream.
pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
) -> Result<(), ControlError> {
    let body = serde_json::to_vec(message)?;
    crate::register::write_frame_bounded(send, &body, MAX_CONTROL_MESSAGE).await?;
    send.finish().map_err(FrameError::from)?;
    Ok(())
}

/// Decodes a body as the configuration role does (for the fuzz target).
#[doc(hidden)]
pub fn decode_request(body: &[u8]) -> Result<Request, ControlError> {
    decode(body)
}

/// Decodes a body as a joining or reporting server does (for the fuzz target).
#[doc(hidden)]
pub fn decode_reply(body: &[u8]) -> Result<Reply, ControlError> {
    decode(body)
}

/// A message from `body`, its size checked against [`MAX_CONTROL_MESSAGE`] first.
fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    if body.len() > MAX_CONTROL_MESSAGE {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max: MAX_CONTROL_MESSAGE,
        }
        .into());
    }
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let req = Request::Report(ReportRequest {
            version: "0.1.0".into(),
            fingerprint: "f".into(),
            instance: "i".into(),
            body: serde_json::json!({"health": "green"}),
        });
        let bytes = serde_json::to_vec(&req).unwrap();
        assert!(matches!(decode_request(&bytes).unwrap(), Request::Report(r) if r.instance == "i"));
        for n in 0..bytes.len() {
            assert!(decode_request(&bytes[..n]).is_err(), "prefix {n}");
        }
        assert!(decode_request(br#"{"type":"join"}"#).is_err());
        assert!(decode_request(&vec![b' '; MAX_CONTROL_MESSAGE + 1]).is_err());
        let accepted: Reply = serde_json::from_slice(br#"{"type":"accepted"}"#).unwrap();
        assert!(matches!(accepted, Reply::Accepted { machines, .. } if machines.is_empty()));
        let reply = Reply::Refused {
            refusal: Refusal::Cloned,
            message: "m".into(),
        };
        let back: Reply = serde_json::from_slice(&serde_json::to_vec(&reply).unwrap()).unwrap();
        assert!(matches!(
            back,
            Reply::Refused {
                refusal: Refusal::Cloned,
                ..
            }
        ));
    }
}
