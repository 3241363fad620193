//! Agent registration (kubeadm-join style) over QUIC, ALPN `ripcord-register/1`.
//!
//! The agent pins the deployment CA by its hash ([`crate::pki::ca_hash`]); the server
//! authenticates the agent with a bootstrap [`Token`]. The agent's private key is
//! generated locally and never leaves it: only a CSR is sent.
//!
//! # Wire format
//! One bidirectional stream opened by the agent; each direction carries exactly one frame:
//! `u32 BE body length (≤ MAX_MESSAGE_SIZE)` followed by the body. Bodies are a type byte
//! followed by fields, each `u32 BE length` + bytes:
//! - request `0x01`: token (`id.secret`), machine id, CSR (DER);
//! - success `0x02`: client certificate (DER), CA certificate (DER);
//! - refusal `0x03`: one byte [`RejectReason`] code (no fields).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::endpoint::{
    EndpointError, TransportOptions, any_addr_for, bind_client, provider, roots_with,
};
use crate::pki::{
    Ca, Identity, MachineId, MachineIdError, PkiError, ServerIdentity, Token, TokenError,
    TokenStore, cert_spki, generate_key, machine_id_from_cert, make_csr, parse_ca_hash, sha256,
};

/// ALPN protocol id of the registration endpoint.
pub const REGISTER_ALPN: &[u8] = b"ripcord-register/1";
/// Maximum size of a registration message body, checked before allocating.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Overall time limit for one registration exchange (handshake included).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

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
            c => Self::Unrecognized(c),
        }
    }

    fn for_token_error(e: &TokenError) -> Self {
        match e {
            TokenError::Malformed => Self::MalformedToken,
            TokenError::Unknown | TokenError::DuplicateId { .. } => Self::UnknownToken,
            TokenError::Expired => Self::TokenExpired,
            TokenError::UsedUp => Self::TokenUsedUp,
            _ => Self::Internal,
        }
    }

    fn for_pki_error(e: &PkiError) -> Self {
        match e {
            PkiError::InvalidCsr(_) => Self::InvalidCsr,
            PkiError::UnsupportedKeyAlgorithm => Self::UnsupportedKeyAlgorithm,
            PkiError::InvalidMachineId(_) => Self::InvalidMachineId,
            _ => Self::Internal,
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

/// Agent-side registration errors.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The pinned CA hash is not `sha256:<64 hex>`; copy it from the server again.
    #[error("invalid CA hash: expected sha256:<64 hex digits>")]
    InvalidCaHash,
    /// The server's chain contains no CA with the pinned hash: wrong server, wrong hash,
    /// or an attacker. Nothing (in particular not the token) was sent.
    #[error("server is not signed by the pinned CA (hash mismatch); token not sent")]
    CaHashMismatch,
    /// The server chains to the pinned CA but its certificate failed verification
    /// (bad signature, expired, name mismatch). Nothing was sent.
    #[error("server certificate failed verification against the pinned CA: {0}")]
    ServerCertificateInvalid(rustls::Error),
    /// Local endpoint or TLS setup failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The connection could not be started (e.g. invalid server name).
    #[error("cannot start connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// Handshake or connection failure (unreachable server, closed connection...).
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Sending the request or reading the response failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The server refused the registration; see the reason (token problems need a new token).
    #[error("server refused registration: {0}")]
    Rejected(RejectReason),
    /// The server returned a certificate that does not match the request (wrong key,
    /// machine id or CA); the server is misbehaving.
    #[error("server returned an unusable certificate: {what}")]
    BadIssuedCertificate {
        /// What did not match.
        what: &'static str,
    },
    /// Key generation, CSR creation or storing the identity failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The exchange did not complete within [`REGISTER_TIMEOUT`].
    #[error("registration timed out")]
    Timeout,
}

/// Server-side errors while serving one registration connection.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The handshake did not complete (e.g. the agent rejected our certificate because
    /// its pinned CA hash differs). No request was read.
    #[error("registration handshake failed: {0}")]
    Handshake(quinn::ConnectionError),
    /// The connection failed after the handshake.
    #[error("registration connection failed: {0}")]
    Connection(quinn::ConnectionError),
    /// The request frame could not be read or was malformed/oversized.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The bootstrap token was refused (or the token store failed).
    #[error("bootstrap token refused: {0}")]
    Token(#[from] TokenError),
    /// The requested machine id is invalid.
    #[error("invalid machine id: {0}")]
    InvalidMachineId(#[from] MachineIdError),
    /// The CSR was refused or certificate issuance failed.
    #[error("certificate issuance failed: {0}")]
    Pki(#[from] PkiError),
    /// The token store mutex was poisoned by a panic elsewhere; restart the server.
    #[error("token store lock poisoned")]
    TokenStorePoisoned,
    /// The exchange did not complete within [`REGISTER_TIMEOUT`].
    #[error("registration timed out")]
    Timeout,
}

/// A successful registration, as seen by the server.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The machine id the certificate was issued for.
    pub machine_id: MachineId,
    /// The id (not the secret) of the redeemed token.
    pub token_id: String,
    /// The issued client certificate.
    pub certificate: CertificateDer<'static>,
    /// Remote address of the agent.
    pub remote: SocketAddr,
}

// ---------------------------------------------------------------------------------------
// Framing

/// Writes one frame (`u32 BE length` + `body`).
async fn write_frame(send: &mut SendStream, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max: MAX_MESSAGE_SIZE,
        });
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len() as u64,
        max: MAX_MESSAGE_SIZE,
    })?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(body).await?;
    Ok(())
}

/// Reads one frame, checking the announced length against [`MAX_MESSAGE_SIZE`] before
/// allocating the body buffer.
async fn read_frame(recv: &mut RecvStream) -> Result<Vec<u8>, FrameError> {
    let mut hdr = [0u8; 4];
    recv.read_exact(&mut hdr).await?;
    let len = u32::from_be_bytes(hdr);
    check_len(len)?;
    let mut body = vec![0u8; len as usize];
    recv.read_exact(&mut body).await?;
    Ok(body)
}

fn check_len(len: u32) -> Result<(), FrameError> {
    if len as usize > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_MESSAGE_SIZE,
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

fn encode_request(token: &Token, machine_id: &MachineId, csr_der: &[u8]) -> Vec<u8> {
    let mut out = vec![MSG_REQUEST];
    put_field(&mut out, token.to_string().as_bytes());
    put_field(&mut out, machine_id.as_str().as_bytes());
    put_field(&mut out, csr_der);
    out
}

/// Decoded request: raw (unvalidated) token and machine id strings, and CSR bytes.
struct RawRequest<'a> {
    token: &'a [u8],
    machine_id: &'a [u8],
    csr: &'a [u8],
}

fn decode_request(body: &[u8]) -> Result<RawRequest<'_>, FrameError> {
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

enum Response {
    Ok {
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
    },
    Reject(RejectReason),
}

fn encode_ok(cert: &[u8], ca: &[u8]) -> Vec<u8> {
    let mut out = vec![MSG_OK];
    put_field(&mut out, cert);
    put_field(&mut out, ca);
    out
}

fn decode_response(body: &[u8]) -> Result<Response, FrameError> {
    match body {
        [MSG_REJECT, code] => Ok(Response::Reject(RejectReason::from_code(*code))),
        [MSG_OK, rest @ ..] => {
            let mut f = Fields { rest };
            let cert = f.next("certificate")?.to_vec();
            let ca = f.next("CA certificate")?.to_vec();
            f.end()?;
            Ok(Response::Ok {
                cert: cert.into(),
                ca: ca.into(),
            })
        }
        _ => Err(FrameError::Malformed {
            what: "unknown response type",
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Server side

fn registration_transport() -> Result<quinn::TransportConfig, EndpointError> {
    TransportOptions {
        stream_receive_window: 2 * MAX_MESSAGE_SIZE as u64,
        receive_window: 4 * MAX_MESSAGE_SIZE as u64,
        send_window: 4 * MAX_MESSAGE_SIZE as u64,
        keep_alive_interval: None,
        idle_timeout: Duration::from_secs(10),
        max_concurrent_bidi_streams: 1,
        max_concurrent_uni_streams: 0,
    }
    .to_transport_config()
}

/// Binds the registration endpoint (ALPN `ripcord-register/1`, no client certificate
/// required) on `bind_addr`, presenting the server chain (leaf + CA) so agents can check
/// their pinned CA hash. Must be called inside a tokio runtime.
pub fn registration_endpoint(
    bind_addr: SocketAddr,
    identity: &ServerIdentity,
) -> Result<Endpoint, EndpointError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain().to_vec(), identity.key().clone_key())?;
    tls.alpn_protocols = vec![REGISTER_ALPN.to_vec()];
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    cfg.transport_config(Arc::new(registration_transport()?));
    Endpoint::server(cfg, bind_addr).map_err(|source| EndpointError::Bind {
        addr: bind_addr,
        source,
    })
}

/// Serves one registration connection: completes the handshake, reads one request,
/// verifies the token, issues a client certificate for the requested machine id from the
/// agent's CSR, records the token use, and replies.
///
/// Refusals are reported to the agent with a [`RejectReason`] and returned as errors here.
/// Spawn one task per [`quinn::Incoming`] from [`registration_endpoint`].
pub async fn serve_registration(
    incoming: quinn::Incoming,
    ca: &Ca,
    tokens: &Mutex<TokenStore>,
) -> Result<Registration, ServeError> {
    match tokio::time::timeout(REGISTER_TIMEOUT, serve_inner(incoming, ca, tokens)).await {
        Ok(r) => r,
        Err(_) => Err(ServeError::Timeout),
    }
}

async fn serve_inner(
    incoming: quinn::Incoming,
    ca: &Ca,
    tokens: &Mutex<TokenStore>,
) -> Result<Registration, ServeError> {
    let remote = incoming.remote_address();
    let conn = incoming.await.map_err(ServeError::Handshake)?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(ServeError::Connection)?;
    let result = handle_request(&mut recv, ca, tokens, remote).await;
    let reply = match &result {
        Ok(issued) => encode_ok(&issued.certificate, ca.cert_der()),
        Err(Refusal(reason, _)) => vec![MSG_REJECT, reason.code()],
    };
    let sent = async {
        write_frame(&mut send, &reply).await?;
        send.finish()?;
        Ok::<_, FrameError>(())
    }
    .await;
    // Let the agent read the reply and close first; bounded.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    match result {
        Ok(registration) => {
            sent?;
            tracing::info!(machine_id = %registration.machine_id, %remote, "agent registered");
            Ok(registration)
        }
        Err(Refusal(reason, err)) => {
            tracing::warn!(%remote, %reason, error = %err, "registration refused");
            Err(err)
        }
    }
}

struct Refusal(RejectReason, ServeError);

async fn handle_request(
    recv: &mut RecvStream,
    ca: &Ca,
    tokens: &Mutex<TokenStore>,
    remote: SocketAddr,
) -> Result<Registration, Refusal> {
    let body = read_frame(recv).await.map_err(|e| {
        let reason = match e {
            FrameError::TooLarge { .. } => RejectReason::MessageTooLarge,
            _ => RejectReason::MalformedRequest,
        };
        Refusal(reason, e.into())
    })?;
    let req =
        decode_request(&body).map_err(|e| Refusal(RejectReason::MalformedRequest, e.into()))?;
    let token_err = |e: TokenError| Refusal(RejectReason::for_token_error(&e), e.into());
    let token = std::str::from_utf8(req.token)
        .map_err(|_| TokenError::Malformed)
        .and_then(Token::parse)
        .map_err(token_err)?;
    let machine_id = std::str::from_utf8(req.machine_id)
        .map_err(|_| MachineIdError::InvalidChar {
            ch: char::REPLACEMENT_CHARACTER,
            pos: 0,
        })
        .and_then(MachineId::new)
        .map_err(|e| Refusal(RejectReason::InvalidMachineId, e.into()))?;
    let now = SystemTime::now();
    let lock = || {
        tokens
            .lock()
            .map_err(|_| Refusal(RejectReason::Internal, ServeError::TokenStorePoisoned))
    };
    lock()?.verify(&token, now).map_err(token_err)?;
    tracing::debug!(%remote, token_id = token.id(), %machine_id, "token accepted, issuing");
    let cert = ca
        .issue_client(&machine_id, req.csr)
        .map_err(|e| Refusal(RejectReason::for_pki_error(&e), e.into()))?;
    // Consume the use only once a certificate is ready to be returned.
    lock()?.redeem(&token, now).map_err(token_err)?;
    Ok(Registration {
        machine_id,
        token_id: token.id().to_owned(),
        certificate: cert,
        remote,
    })
}

// ---------------------------------------------------------------------------------------
// Agent side

const PIN_OK: u8 = 0;
const PIN_NOT_FOUND: u8 = 1;
const PIN_CHAIN_INVALID: u8 = 2;

/// Verifies the server against the CA whose certificate hash is pinned.
///
/// The server must include the CA certificate in its chain; the certificate whose SHA-256
/// equals the pin becomes the sole trust anchor and the full chain (signatures, validity,
/// EKU, server name) is verified by rustls' webpki verifier.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    outcome: Arc<AtomicU8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| sha256(c) == self.pin) else {
            self.outcome.store(PIN_NOT_FOUND, Ordering::SeqCst);
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        };
        let chain_invalid = |e| {
            self.outcome.store(PIN_CHAIN_INVALID, Ordering::SeqCst);
            e
        };
        let roots = roots_with(&ca.clone().into_owned()).map_err(chain_invalid)?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| chain_invalid(rustls::Error::General(e.to_string())))?;
        let verified = verifier
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(chain_invalid)?;
        self.outcome.store(PIN_OK, Ordering::SeqCst);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Opens a registration connection to `server_addr`, verifying the server for
/// `server_name` against the CA pinned by `ca_hash`. Nothing is sent yet.
///
/// Returns the client endpoint (keep it alive while using the connection) and the
/// connection. [`register`] is built on this; it is public for tooling and tests.
pub async fn connect_registration(
    server_addr: SocketAddr,
    server_name: &str,
    ca_hash: &str,
) -> Result<(Endpoint, Connection), RegisterError> {
    let pin = parse_ca_hash(ca_hash).map_err(|_| RegisterError::InvalidCaHash)?;
    let outcome = Arc::new(AtomicU8::new(PIN_OK));
    let verifier = PinnedCaVerifier {
        pin,
        outcome: outcome.clone(),
        provider: provider(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(EndpointError::from)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![REGISTER_ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).map_err(EndpointError::from)?,
    ));
    cfg.transport_config(Arc::new(registration_transport()?));
    let endpoint = bind_client(any_addr_for(server_addr))?;
    let connecting = endpoint.connect_with(cfg, server_addr, server_name)?;
    match connecting.await {
        Ok(conn) => Ok((endpoint, conn)),
        Err(e) => Err(match outcome.load(Ordering::SeqCst) {
            PIN_NOT_FOUND => RegisterError::CaHashMismatch,
            PIN_CHAIN_INVALID => RegisterError::ServerCertificateInvalid(match e {
                quinn::ConnectionError::TransportError(t) => rustls::Error::General(t.reason),
                other => rustls::Error::General(other.to_string()),
            }),
            _ => RegisterError::Connection(e),
        }),
    }
}

/// Registers this machine with the process server (kubeadm-join style).
///
/// 1. Connects to `server_addr` and accepts the server only if its certificate (valid for
///    `server_name`) chains to the CA whose hash is `ca_hash`; otherwise fails with
///    [`RegisterError::CaHashMismatch`] before anything — in particular the token — is sent.
/// 2. Generates an ECDSA P-256 key locally and sends `{token, machine_id, CSR}`.
/// 3. Checks the returned certificate (chains to the pinned CA, carries our key and
///    machine id) and stores `agent.key` (0600), `ca.crt`, `agent.crt` in `state_dir`
///    crash-safely.
pub async fn register(
    server_addr: SocketAddr,
    server_name: &str,
    token: &Token,
    ca_hash: &str,
    machine_id: &MachineId,
    state_dir: &Path,
) -> Result<Identity, RegisterError> {
    let pin = parse_ca_hash(ca_hash).map_err(|_| RegisterError::InvalidCaHash)?;
    let fut = async {
        let (endpoint, conn) = connect_registration(server_addr, server_name, ca_hash).await?;
        let key = generate_key()?;
        let csr = make_csr(machine_id, &key)?;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &encode_request(token, machine_id, &csr)).await?;
        send.finish().map_err(FrameError::from)?;
        let body = read_frame(&mut recv).await?;
        conn.close(VarInt::from_u32(0), b"done");
        endpoint.close(VarInt::from_u32(0), b"done");
        let (cert, ca) = match decode_response(&body)? {
            Response::Reject(reason) => return Err(RegisterError::Rejected(reason)),
            Response::Ok { cert, ca } => (cert, ca),
        };
        check_issued(&cert, &ca, &pin, machine_id, &key)?;
        let identity = Identity::new(
            cert,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ca,
        )?;
        identity.save(state_dir)?;
        Ok(identity)
    };
    tokio::time::timeout(REGISTER_TIMEOUT, fut)
        .await
        .map_err(|_| RegisterError::Timeout)?
}

fn check_issued(
    cert: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
    pin: &[u8; 32],
    machine_id: &MachineId,
    key: &rcgen::KeyPair,
) -> Result<(), RegisterError> {
    use rcgen::PublicKeyData;
    let bad = |what| RegisterError::BadIssuedCertificate { what };
    if &sha256(ca) != pin {
        return Err(bad("CA certificate does not match the pinned hash"));
    }
    if cert_spki(cert).map_err(|_| bad("certificate does not parse"))?
        != key.subject_public_key_info()
    {
        return Err(bad("certificate is not for our key"));
    }
    if &machine_id_from_cert(cert).map_err(|_| bad("certificate has no machine id"))? != machine_id
    {
        return Err(bad("certificate is for another machine id"));
    }
    // Verify exactly as the data-path server will.
    let roots = roots_with(ca).map_err(|_| bad("CA certificate unusable as trust anchor"))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|_| bad("CA certificate unusable as trust anchor"))?;
    verifier
        .verify_client_cert(cert, &[], UnixTime::now())
        .map_err(|_| bad("certificate does not verify against the CA"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_malformed() {
        let t = Token::parse("abcdef.0123456789abcdef").unwrap();
        let m = MachineId::new("m1").unwrap();
        let body = encode_request(&t, &m, b"csr");
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
            decode_response(&[MSG_REJECT, 5]).unwrap(),
            Response::Reject(RejectReason::TokenExpired)
        ));
        let ok = encode_ok(b"cert", b"ca");
        match decode_response(&ok).unwrap() {
            Response::Ok { cert, ca } => {
                assert_eq!(cert.as_ref(), b"cert");
                assert_eq!(ca.as_ref(), b"ca");
            }
            Response::Reject(_) => panic!("expected ok"),
        }
        assert!(decode_response(&[]).is_err());
        assert!(decode_response(&[MSG_REJECT]).is_err());
        for c in 1..=10 {
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
