//! Registration message encoding and decoding, and the size bounds checked on them.
//!
//! One bidirectional stream opened by the agent; each direction carries exactly one
//! frame:
//!
//! ```text
//! frame     u32 BE body length (<= MAX_MESSAGE_SIZE) | body
//! request   0x01 | field token ("id.secret", or empty: renewal) | field machine id | field CSR (DER)
//! success   0x02 | field client certificate (DER) | field CA certificate (DER)
//!                | field escrow public key (32 bytes) | field data port (u16 BE, 0: unknown)
//!                | field data server (ALPN ripcord-register/3 only: `host:port` of the
//!                  process server the machine is placed on; empty: this one)
//! refusal   0x03 | u8 RejectReason code
//! field     u32 BE length | bytes
//! ```
//!
//! Invariants:
//!
//! * a frame's announced length is checked against [`MAX_MESSAGE_SIZE`] before the
//!   body buffer is allocated, and a body over it is never written;
//! * decoding never panics and never reads past the body: a field whose length points
//!   past the end, a missing field, trailing bytes or an unknown type byte is
//!   [`FrameError::Malformed`];
//! * field contents are not interpreted here (the token, machine id and CSR are
//!   validated by the server, the certificates by the agent);
//! * refusal codes are stable on the wire: [`RejectReason`] maps 1..=13 both ways and
//!   carries any other code as [`RejectReason::Unrecognized`].

use quinn::{RecvStream, SendStream};
use rustls::pki_types::CertificateDer;

use crate::pki::{MachineId, Token};

/// Maximum size of a registration message body, checked before allocating.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;

const MSG_REQUEST: u8 = 0x01;
const MSG_OK: u8 = 0x02;
const MSG_REJECT: u8 = 0x03;

/// Why the server refused a registration (sent to the agent as a one-byte code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The request could not be decoded.
    MalformedRequest,
    /// The request exceeded [`MAX_MESSAGE_SIZE`].
    MessageTooLarge,
    /// The token is not in `id.secret` format.
    MalformedToken,
    /// Unknown token id or wrong secret.
    UnknownToken,
    /// The token has expired.
    TokenExpired,
    /// The token reached its usage limit.
    TokenUsedUp,
    /// The machine id is not `[a-zA-Z0-9._-]{1,64}`.
    InvalidMachineId,
    /// The CSR is malformed or its signature is invalid.
    InvalidCsr,
    /// The CSR's key algorithm is not accepted.
    UnsupportedKeyAlgorithm,
    /// The server failed internally (e.g. token store I/O); retry later.
    Internal,
    /// The machine id is registered to another key and the request was not authenticated
    /// by that machine's current certificate.
    MachineAlreadyRegistered,
    /// A renewal (no token) whose client certificate is not the machine's current one, or
    /// for a machine that is not registered (removed by an operator).
    RenewalRefused,
    /// No process server can take a new machine now (all red, silent, or without
    /// headroom); the configuration role's log and `ripcord ps list` say which and why.
    NoServerAvailable,
    /// A code this version does not know.
    Unrecognized(u8),
}

impl RejectReason {
    fn code(self) -> u8 {
        match self {
            Self::MalformedRequest => 1,
            Self::MessageTooLarge => 2,
            Self::MalformedToken => 3,
            Self::UnknownToken => 4,
            Self::TokenExpired => 5,
            Self::TokenUsedUp => 6,
            Self::InvalidMachineId => 7,
            Self::InvalidCsr => 8,
            Self::UnsupportedKeyAlgorithm => 9,
            Self::Internal => 10,
            Self::MachineAlreadyRegistered => 11,
            Self::RenewalRefused => 12,
            Self::NoServerAvailable => 13,
            Self::Unrecognized(c) => c,
        }
    }

    fn from_code(c: u8) -> Self {
        match c {
            1 => Self::MalformedRequest,
            2 => Self::MessageTooLarge,
            3 => Self::MalformedToken,
            4 => Self::UnknownToken,
            5 => Self::TokenExpired,
            6 => Self::TokenUsedUp,
            7 => Self::InvalidMachineId,
            8 => Self::InvalidCsr,
            9 => Self::UnsupportedKeyAlgorithm,
            10 => Self::Internal,
            11 => Self::MachineAlreadyRegistered,
            12 => Self::RenewalRefused,
            13 => Self::NoServerAvailable,
            c => Self::Unrecognized(c),
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::MalformedRequest => "malformed request",
            Self::MessageTooLarge => "message too large",
            Self::MalformedToken => "malformed bootstrap token",
            Self::UnknownToken => "unknown bootstrap token or wrong secret",
            Self::TokenExpired => "bootstrap token expired",
            Self::TokenUsedUp => "bootstrap token usage limit reached",
            Self::InvalidMachineId => "invalid machine id",
            Self::InvalidCsr => "invalid certificate signing request",
            Self::UnsupportedKeyAlgorithm => "unsupported key algorithm",
            Self::Internal => "internal server error",
            Self::MachineAlreadyRegistered => {
                "this machine id is already registered to another key; re-register from that \
                 machine (its current certificate proves it), or have the operator remove it \
                 with `ripcord-ps machines remove`"
            }
            Self::RenewalRefused => {
                "renewal refused: the certificate presented is not this machine's current one, \
                 or the machine was removed; register with a new bootstrap token"
            }
            Self::NoServerAvailable => {
                "no process server can take a new machine now (each is red, silent or without \
                 headroom: see `ripcord ps list` on the configuration role); retry later or add \
                 a process server"
            }
            Self::Unrecognized(c) => return write!(f, "unrecognized refusal code {c}"),
        };
        f.write_str(s)
    }
}

/// Errors reading or writing one length-prefixed registration frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced body length exceeds the limit; nothing was allocated or read.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Limit.
        max: usize,
    },
    /// Reading from the stream failed or it ended early.
    #[error("reading message: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Writing to the stream failed.
    #[error("writing message: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already closed when finishing it.
    #[error("stream already closed")]
    Closed(#[from] quinn::ClosedStream),
    /// The body does not follow the wire format.
    #[error("malformed message: {what}")]
    Malformed {
        /// Which part was wrong.
        what: &'static str,
    },
}

/// Writes one frame (`u32 BE length` + `body`).
pub(super) async fn write_frame(send: &mut SendStream, body: &[u8]) -> Result<(), FrameError> {
    write_frame_bounded(send, body, MAX_MESSAGE_SIZE).await
}

/// Reads one frame, checking the announced length against [`MAX_MESSAGE_SIZE`] before
/// allocating the body buffer.
pub(super) async fn read_frame(recv: &mut RecvStream) -> Result<Vec<u8>, FrameError> {
    read_frame_bounded(recv, MAX_MESSAGE_SIZE).await
}

/// Writes one frame of at most `max` bytes (`u32 BE length` + `body`).
pub(crate) async fn write_frame_bounded(
    send: &mut SendStream,
    body: &[u8],
    max: usize,
) -> Result<(), FrameError> {
    let too_large = || FrameError::TooLarge {
        len: body.len() as u64,
        max,
    };
    if body.len() > max {
        return Err(too_large());
    }
    let len = u32::try_from(body.len()).map_err(|_| too_large())?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(body).await?;
    Ok(())
}

/// Reads one frame, checking the announced length against `max` before allocating the
/// body buffer.
pub(crate) async fn read_frame_bounded(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut hdr = [0u8; 4];
    recv.read_exact(&mut hdr).await?;
    let len = u32::from_be_bytes(hdr);
    check_len_bounded(len, max)?;
    let mut body = vec![0u8; len as usize];
    recv.read_exact(&mut body).await?;
    Ok(body)
}

fn check_len(len: u32) -> Result<(), FrameError> {
    check_len_bounded(len, MAX_MESSAGE_SIZE)
}

fn check_len_bounded(len: u32, max: usize) -> Result<(), FrameError> {
    if len as usize > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    Ok(())
}

fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    // Fields are bounded by MAX_MESSAGE_SIZE at write time; saturate defensively.
    let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
}

struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn next(&mut self, what: &'static str) -> Result<&'a [u8], FrameError> {
        let malformed = FrameError::Malformed { what };
        let (hdr, rest) = self.rest.split_first_chunk::<4>().ok_or(malformed)?;
        let len = u32::from_be_bytes(*hdr) as usize;
        if len > rest.len() {
            return Err(FrameError::Malformed { what });
        }
        let (field, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(field)
    }

    fn end(self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed {
                what: "trailing bytes",
            })
        }
    }
}

/// Encodes a request; `token` is `None` for a renewal authenticated by the current
/// client certificate.
pub(super) fn encode_request(
    token: Option<&Token>,
    machine_id: &MachineId,
    csr_der: &[u8],
) -> Vec<u8> {
    let mut out = vec![MSG_REQUEST];
    put_field(
        &mut out,
        token.map(Token::to_string).unwrap_or_default().as_bytes(),
    );
    put_field(&mut out, machine_id.as_str().as_bytes());
    put_field(&mut out, csr_der);
    out
}

/// Decoded request: raw (unvalidated) token (empty for a renewal) and machine id strings,
/// and CSR bytes.
pub(super) struct RawRequest<'a> {
    pub token: &'a [u8],
    pub machine_id: &'a [u8],
    pub csr: &'a [u8],
}

pub(super) fn decode_request(body: &[u8]) -> Result<RawRequest<'_>, FrameError> {
    let (&kind, rest) = body.split_first().ok_or(FrameError::Malformed {
        what: "empty message",
    })?;
    if kind != MSG_REQUEST {
        return Err(FrameError::Malformed {
            what: "not a registration request",
        });
    }
    let mut f = Fields { rest };
    let req = RawRequest {
        token: f.next("token")?,
        machine_id: f.next("machine id")?,
        csr: f.next("csr")?,
    };
    f.end()?;
    Ok(req)
}

/// What a successful registration returns to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Granted {
    pub cert: CertificateDer<'static>,
    pub ca: CertificateDer<'static>,
    /// The deployment's escrow public key, which the agent pins.
    pub escrow_key: [u8; 32],
    /// The port of the server's replication endpoint (0: not known to the server).
    pub data_port: u16,
    /// Where the machine replicates when placed on another process server (`host:port`);
    /// empty: the server it registered with. Sent only on `ripcord-register/3`.
    pub data_server: String,
}

/// Decoded reply to a request.
pub(super) enum Response {
    Ok(Granted),
    Reject(RejectReason),
}

/// Encodes a success; `v3` (ALPN `ripcord-register/3`) adds the data server.
pub(super) fn encode_ok(granted: &Granted, v3: bool) -> Vec<u8> {
    let mut out = vec![MSG_OK];
    put_field(&mut out, &granted.cert);
    put_field(&mut out, &granted.ca);
    put_field(&mut out, &granted.escrow_key);
    put_field(&mut out, &granted.data_port.to_be_bytes());
    if v3 {
        put_field(&mut out, granted.data_server.as_bytes());
    }
    out
}

/// Encodes a refusal.
pub(super) fn encode_reject(reason: RejectReason) -> Vec<u8> {
    vec![MSG_REJECT, reason.code()]
}

/// Decodes a reply; `v3` as on ALPN `ripcord-register/3` (with the data server).
pub(super) fn decode_response(body: &[u8], v3: bool) -> Result<Response, FrameError> {
    match body {
        [MSG_REJECT, code] => Ok(Response::Reject(RejectReason::from_code(*code))),
        [MSG_OK, rest @ ..] => {
            let mut f = Fields { rest };
            let cert = f.next("certificate")?.to_vec();
            let ca = f.next("CA certificate")?.to_vec();
            let escrow_key =
                f.next("escrow key")?
                    .try_into()
                    .map_err(|_| FrameError::Malformed {
                        what: "escrow key is not 32 bytes",
                    })?;
            let data_port = f
                .next("data port")?
                .try_into()
                .map_err(|_| FrameError::Malformed {
                    what: "data port is not 2 bytes",
                })?;
            let data_server = if v3 {
                let raw = f.next("data server")?;
                if raw.len() > 300 {
                    return Err(FrameError::Malformed {
                        what: "data server longer than 300 bytes",
                    });
                }
                String::from_utf8(raw.to_vec()).map_err(|_| FrameError::Malformed {
                    what: "data server is not UTF-8",
                })?
            } else {
                String::new()
            };
            f.end()?;
            Ok(Response::Ok(Granted {
                cert: cert.into(),
                ca: ca.into(),
                escrow_key,
                data_port: u16::from_be_bytes(data_port),
                data_server,
            }))
        }
        _ => Err(FrameError::Malformed {
            what: "unknown response type",
        }),
    }
}

/// Entry points for the fuzz targets (`crates/fuzz-targets`), not an API: each decodes
/// hostile bytes with the decoder above and re-encodes what it accepted.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// The frame length check [`read_frame`] applies before allocating.
    pub fn check_frame_len(len: u32) -> Result<(), FrameError> {
        check_len(len)
    }

    /// Decodes a request body as the server does (fields, then the token and machine id
    /// it validates); `Ok(Some(bytes))` is the request re-encoded from the typed values,
    /// `Ok(None)` a request the server would refuse for its token or machine id.
    pub fn reencode_request(body: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        let raw = decode_request(body)?;
        let token = if raw.token.is_empty() {
            None
        } else {
            match std::str::from_utf8(raw.token).ok().map(Token::parse) {
                Some(Ok(t)) => Some(t),
                _ => return Ok(None),
            }
        };
        let Some(Ok(machine)) = std::str::from_utf8(raw.machine_id).ok().map(MachineId::new) else {
            return Ok(None);
        };
        Ok(Some(encode_request(token.as_ref(), &machine, raw.csr)))
    }

    /// Decodes a response body as the agent does (on `ripcord-register/3`, else `/2`)
    /// and re-encodes it the same way.
    pub fn reencode_response(body: &[u8]) -> Result<Vec<u8>, FrameError> {
        let (response, v3) = match decode_response(body, true) {
            Ok(r) => (r, true),
            Err(_) => (decode_response(body, false)?, false),
        };
        Ok(match response {
            Response::Ok(granted) => encode_ok(&granted, v3),
            Response::Reject(reason) => encode_reject(reason),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_malformed() {
        let t = Token::parse("abcdef.0123456789abcdef").unwrap();
        let m = MachineId::new("m1").unwrap();
        let body = encode_request(Some(&t), &m, b"csr");
        assert!(
            decode_request(&encode_request(None, &m, b"csr"))
                .unwrap()
                .token
                .is_empty()
        );
        let r = decode_request(&body).unwrap();
        assert_eq!(r.token, t.to_string().as_bytes());
        assert_eq!(r.machine_id, b"m1");
        assert_eq!(r.csr, b"csr");
        // Truncations and trailing garbage are refused, never panic.
        for n in 0..body.len() {
            assert!(decode_request(&body[..n]).is_err(), "prefix {n}");
        }
        let mut extra = body.clone();
        extra.push(0);
        assert!(decode_request(&extra).is_err());
        // A field length pointing past the end is refused.
        let mut lying = vec![MSG_REQUEST];
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_request(&lying),
            Err(FrameError::Malformed { what: "token" })
        ));
    }

    #[test]
    fn response_roundtrip() {
        assert!(matches!(
            decode_response(&[MSG_REJECT, 5], true).unwrap(),
            Response::Reject(RejectReason::TokenExpired)
        ));
        for v3 in [true, false] {
            let granted = Granted {
                cert: b"cert".to_vec().into(),
                ca: b"ca".to_vec().into(),
                escrow_key: [7; 32],
                data_port: 9443,
                data_server: if v3 {
                    "ps2.example:9443".into()
                } else {
                    String::new()
                },
            };
            let ok = encode_ok(&granted, v3);
            match decode_response(&ok, v3).unwrap() {
                Response::Ok(got) => assert_eq!(got, granted),
                Response::Reject(_) => panic!("expected ok"),
            }
            assert!(
                decode_response(&ok, !v3).is_err(),
                "a v{} reply read as the other",
                if v3 { 3 } else { 2 }
            );
            for n in 1..ok.len() {
                assert!(decode_response(&ok[..n], v3).is_err(), "prefix {n}");
            }
        }
        assert!(decode_response(&[], true).is_err());
        assert!(decode_response(&[MSG_REJECT], true).is_err());
        for c in 1..=13 {
            assert_eq!(RejectReason::from_code(c).code(), c);
        }
    }

    #[test]
    fn frame_length_limit() {
        assert!(check_len(MAX_MESSAGE_SIZE as u32).is_ok());
        assert!(matches!(
            check_len(MAX_MESSAGE_SIZE as u32 + 1),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(check_len(u32::MAX).is_err());
    }
}
