//! Process-server side of registration: the registration endpoint, and serving one
//! connection: read the request, authenticate it (a bootstrap token for a new machine, the
//! machine's current certificate for an existing one), issue a client certificate from the
//! agent's CSR, record the token use and the machine's new certificate, reply.
//!
//! Invariants:
//! * a bootstrap token never binds a machine id that is already registered: an existing
//!   machine is re-registered or renewed only by a request whose TLS client certificate
//!   is its current one (see [`crate::pki::MachineStore`]); the token is then not needed
//!   and not consumed;
//! * a token use is consumed only once a certificate is ready to be returned, before the
//!   machine is bound to it (so a lost race for the last use never binds a machine);
//! * every refusal is both sent to the agent (as a [`RejectReason`]) and returned to the
//!   caller (as a [`ServeError`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::{Endpoint, RecvStream};
use rustls::pki_types::CertificateDer;

use rustls::server::WebPkiClientVerifier;

use super::codec::{
    FrameError, Granted, RejectReason, decode_request, encode_ok, encode_reject, read_frame,
    write_frame,
};
use super::{REGISTER_ALPN, REGISTER_ALPN_V2, REGISTER_TIMEOUT, registration_transport};
use crate::endpoint::{EndpointError, peer_certificate, provider, roots_with};
use crate::pki::{
    Ca, MachineError, MachineId, MachineIdError, MachineRecord, MachineStore, PkiError,
    ServerIdentity, Token, TokenError, TokenStore, machine_id_from_cert, sha256,
};

/// What serving a registration needs: the deployment's CA and stores, and what the agent
/// is told besides its certificate.
#[derive(Debug)]
pub struct Registrar<'a> {
    /// Issues the client certificates.
    pub ca: &'a Ca,
    /// Bootstrap tokens (new machines).
    pub tokens: &'a TokenStore,
    /// Registered machines and their current certificates.
    pub machines: &'a MachineStore,
    /// The deployment's escrow public key, pinned by the agent at registration.
    pub escrow_key: [u8; 32],
    /// The port of the replication endpoint (0 if unknown).
    pub data_port: u16,
    /// Validity of issued client certificates.
    pub client_validity: Duration,
    /// Where machines replicate, when the configuration role decides it (else: here).
    pub placement: Option<&'a dyn Placement>,
}

/// Where a registering machine replicates, decided by the configuration role (see
/// `ripcord-ps`'s placement).
pub trait Placement: Send + Sync + std::fmt::Debug {
    /// The process server for `machine`. `redirect`: the agent can be told another
    /// server (`ripcord-register/3`); without it, only this server will do. `Err` refuses
    /// the registration with [`RejectReason::NoServerAvailable`]; the message says why.
    fn place(&self, machine: &MachineId, redirect: bool) -> Result<Placed, String>;
    /// Records, before the agent is answered, that `machine` (certificate `cert_sha256`)
    /// replicates to `placed`.
    fn record(
        &self,
        machine: &MachineId,
        cert_sha256: &[u8; 32],
        placed: &Placed,
    ) -> Result<(), String>;
}

/// A placement decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The process server's id.
    pub server_id: String,
    /// Where agents reach its data endpoint (`host:port`); `None`: the server the machine
    /// registers with.
    pub data_server: Option<String>,
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
    /// The machine store refused (machine already registered to another key, renewal not
    /// authenticated by the current certificate) or failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// A renewal request (no token) without a client certificate of the machine.
    #[error("renewal of machine {0} without its current certificate")]
    RenewalUnauthenticated(MachineId),
    /// No process server can take the machine.
    #[error("no process server can take machine {machine}: {why}")]
    NoServerAvailable {
        /// The machine.
        machine: MachineId,
        /// Why, server by server.
        why: String,
    },
    /// The placement could not be recorded.
    #[error("recording where machine {machine} replicates: {why}")]
    Placement {
        /// The machine.
        machine: MachineId,
        /// What failed.
        why: String,
    },
    /// The exchange did not complete within [`REGISTER_TIMEOUT`].
    #[error("registration timed out")]
    Timeout,
}

/// A successful registration, as seen by the server.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The machine id the certificate was issued for.
    pub machine_id: MachineId,
    /// The id (not the secret) of the redeemed token; `None` for a renewal authenticated
    /// by the machine's current certificate.
    pub token_id: Option<String>,
    /// The issued client certificate.
    pub certificate: CertificateDer<'static>,
    /// Remote address of the agent.
    pub remote: SocketAddr,
    /// Where it replicates, when a [`Placement`] decided it.
    pub placed: Option<Placed>,
}

impl RejectReason {
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

/// Binds the registration endpoint (ALPN [`REGISTER_ALPN`] for agents, and
/// [`crate::control::CONTROL_ALPN`] for process servers joining and reporting to the
/// configuration role; see [`negotiated_alpn`]) on `bind_addr`, presenting
/// the server chain (leaf + CA) so agents can check their pinned CA hash. A client
/// certificate is optional: a registered machine presents its current one to renew or
/// re-register; if presented, it must chain to the deployment CA. Must be called inside a
/// tokio runtime.
pub fn registration_endpoint(
    bind_addr: SocketAddr,
    identity: &ServerIdentity,
) -> Result<Endpoint, EndpointError> {
    let roots = Arc::new(roots_with(identity.ca_cert())?);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(identity.cert_chain().to_vec(), identity.key().clone_key())?;
    tls.alpn_protocols = vec![
        REGISTER_ALPN.to_vec(),
        REGISTER_ALPN_V2.to_vec(),
        crate::control::CONTROL_ALPN.to_vec(),
    ];
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    cfg.transport_config(Arc::new(registration_transport()?));
    Endpoint::server(cfg, bind_addr).map_err(|source| EndpointError::Bind {
        addr: bind_addr,
        source,
    })
}

/// The ALPN protocol a completed connection negotiated (empty if none).
pub fn negotiated_alpn(conn: &quinn::Connection) -> Vec<u8> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap_or_default()
}

/// Serves one registration connection: completes the handshake, reads one request,
/// authenticates it (see the module doc), issues a client certificate for the requested
/// machine id from the agent's CSR, records the token use and the machine's certificate,
/// and replies.
///
/// Refusals are reported to the agent with a [`RejectReason`] and returned as errors here.
/// Spawn one task per [`quinn::Incoming`] from [`registration_endpoint`].
pub async fn serve_registration(
    incoming: quinn::Incoming,
    registrar: &Registrar<'_>,
) -> Result<Registration, ServeError> {
    match tokio::time::timeout(REGISTER_TIMEOUT, serve_inner(incoming, registrar)).await {
        Ok(r) => r,
        Err(_) => Err(ServeError::Timeout),
    }
}

async fn serve_inner(
    incoming: quinn::Incoming,
    registrar: &Registrar<'_>,
) -> Result<Registration, ServeError> {
    let conn = incoming.await.map_err(ServeError::Handshake)?;
    serve_connection(conn, registrar).await
}

/// Like [`serve_registration`] on a connection whose handshake the caller completed (and
/// whose ALPN it checked is [`REGISTER_ALPN`]): the registration endpoint also carries the
/// process servers' link to the configuration role ([`crate::control::CONTROL_ALPN`]).
pub async fn serve_registration_connection(
    conn: quinn::Connection,
    registrar: &Registrar<'_>,
) -> Result<Registration, ServeError> {
    match tokio::time::timeout(REGISTER_TIMEOUT, serve_connection(conn, registrar)).await {
        Ok(r) => r,
        Err(_) => Err(ServeError::Timeout),
    }
}

async fn serve_connection(
    conn: quinn::Connection,
    registrar: &Registrar<'_>,
) -> Result<Registration, ServeError> {
    let remote = conn.remote_address();
    let v3 = negotiated_alpn(&conn) == REGISTER_ALPN;
    // Optional here: a renewal presents the machine's current certificate.
    let presented = peer_certificate(&conn).ok();
    let (mut send, mut recv) = conn.accept_bi().await.map_err(ServeError::Connection)?;
    let result = handle_request(&mut recv, registrar, presented.as_ref(), remote, v3).await;
    let reply = match &result {
        Ok(issued) => encode_ok(
            &Granted {
                cert: issued.certificate.clone(),
                ca: registrar.ca.cert_der().clone(),
                escrow_key: registrar.escrow_key,
                data_port: registrar.data_port,
                data_server: issued
                    .placed
                    .as_ref()
                    .and_then(|p| p.data_server.clone())
                    .unwrap_or_default(),
            },
            v3,
        ),
        Err(Refusal(reason, _)) => encode_reject(*reason),
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
            tracing::info!(
                machine_id = %registration.machine_id, %remote,
                renewal = registration.token_id.is_none(),
                "machine registered"
            );
            Ok(registration)
        }
        Err(Refusal(reason, err)) => {
            tracing::warn!(%remote, %reason, error = %err, "registration refused");
            Err(err)
        }
    }
}

struct Refusal(RejectReason, ServeError);

impl From<MachineError> for Refusal {
    fn from(e: MachineError) -> Self {
        let reason = match e {
            MachineError::AlreadyRegistered(_) => RejectReason::MachineAlreadyRegistered,
            MachineError::NotRegistered(_) | MachineError::Superseded(_) => {
                RejectReason::RenewalRefused
            }
            _ => RejectReason::Internal,
        };
        Refusal(reason, e.into())
    }
}

async fn handle_request(
    recv: &mut RecvStream,
    registrar: &Registrar<'_>,
    presented: Option<&CertificateDer<'static>>,
    remote: SocketAddr,
    v3: bool,
) -> Result<Registration, Refusal> {
    let body = read_frame(recv).await.map_err(|e| {
        let reason = match e {
            FrameError::TooLarge { .. } => RejectReason::MessageTooLarge,
            _ => RejectReason::MalformedRequest,
        };
        Refusal(reason, e.into())
    })?;
    // The stores read and fsync files: off the runtime's workers where it can hand their
    // other tasks over, so a slow or frozen deployment disk stalls this registration only.
    on_blocking_thread(|| decide(&body, registrar, presented, remote, v3))
}

/// Runs `f`, which blocks on the file system, in `block_in_place` on a multi-threaded
/// runtime; inline on a current-thread one (which has no other worker to hand over to).
fn on_blocking_thread<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Authenticates the request in `body` (see the module doc), issues the certificate, and
/// records the token use and the machine's new binding.
fn decide(
    body: &[u8],
    registrar: &Registrar<'_>,
    presented: Option<&CertificateDer<'static>>,
    remote: SocketAddr,
    v3: bool,
) -> Result<Registration, Refusal> {
    let req =
        decode_request(body).map_err(|e| Refusal(RejectReason::MalformedRequest, e.into()))?;
    let token_err = |e: TokenError| Refusal(RejectReason::for_token_error(&e), e.into());
    let token = match req.token {
        [] => None,
        raw => Some(
            std::str::from_utf8(raw)
                .map_err(|_| TokenError::Malformed)
                .and_then(Token::parse)
                .map_err(token_err)?,
        ),
    };
    let machine_id = std::str::from_utf8(req.machine_id)
        .map_err(|_| MachineIdError::InvalidChar {
            ch: char::REPLACEMENT_CHARACTER,
            pos: 0,
        })
        .and_then(MachineId::new)
        .map_err(|e| Refusal(RejectReason::InvalidMachineId, e.into()))?;
    // Which binding this request may replace: none (a new machine, by token), or the
    // machine's current certificate, which the TLS client certificate proves.
    let current = registrar.machines.get(&machine_id)?;
    let previous = match (&current, presented) {
        (Some(record), Some(cert))
            if sha256(cert) == record.cert_sha256
                && machine_id_from_cert(cert).is_ok_and(|id| id == machine_id) =>
        {
            Some(record.cert_sha256)
        }
        (Some(_), _) if token.is_some() => {
            return Err(MachineError::AlreadyRegistered(machine_id).into());
        }
        (Some(_), Some(_)) => return Err(MachineError::Superseded(machine_id).into()),
        (Some(_), None) => {
            return Err(Refusal(
                RejectReason::RenewalRefused,
                ServeError::RenewalUnauthenticated(machine_id),
            ));
        }
        (None, _) if token.is_none() => return Err(MachineError::NotRegistered(machine_id).into()),
        (None, _) => None,
    };
    let now = SystemTime::now();
    let by_token = token.as_ref().filter(|_| previous.is_none());
    if let Some(token) = by_token {
        registrar.tokens.verify(token, now).map_err(token_err)?;
    }
    tracing::debug!(%remote, token_id = by_token.map(Token::id), %machine_id, "request authenticated, issuing");
    let placed = match registrar.placement {
        Some(placement) => Some(placement.place(&machine_id, v3).map_err(|why| {
            Refusal(
                RejectReason::NoServerAvailable,
                ServeError::NoServerAvailable {
                    machine: machine_id.clone(),
                    why,
                },
            )
        })?),
        None => None,
    };
    let cert = registrar
        .ca
        .issue_client(&machine_id, req.csr, registrar.client_validity)
        .map_err(|e| Refusal(RejectReason::for_pki_error(&e), e.into()))?;
    // Consume the use only once a certificate is ready to be returned.
    if let Some(token) = by_token {
        registrar.tokens.redeem(token, now).map_err(token_err)?;
    }
    let token_id = by_token.map(|t| t.id().to_owned());
    if let (Some(placement), Some(placed)) = (registrar.placement, &placed) {
        placement
            .record(&machine_id, &sha256(&cert), placed)
            .map_err(|why| {
                Refusal(
                    RejectReason::Internal,
                    ServeError::Placement {
                        machine: machine_id.clone(),
                        why,
                    },
                )
            })?;
    }
    registrar.machines.replace(
        MachineRecord::new(
            machine_id.clone(),
            &cert,
            now + registrar.client_validity,
            token_id.clone(),
        ),
        previous,
    )?;
    Ok(Registration {
        machine_id,
        token_id,
        certificate: cert,
        remote,
        placed,
    })
}
