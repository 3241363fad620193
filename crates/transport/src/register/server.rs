//! Process-server side of registration: the registration endpoint, and serving one
//! connection: read the request, verify the bootstrap token, issue a client certificate
//! from the agent's CSR, record the token use, reply.
//!
//! A token use is consumed only once a certificate is ready to be returned, and every
//! refusal is both sent to the agent (as a [`RejectReason`]) and returned to the caller
//! (as a [`ServeError`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use quinn::{Endpoint, RecvStream};
use rustls::pki_types::CertificateDer;

use super::codec::{
    FrameError, RejectReason, decode_request, encode_ok, encode_reject, read_frame, write_frame,
};
use super::{REGISTER_ALPN, REGISTER_TIMEOUT, registration_transport};
use crate::endpoint::{EndpointError, provider};
use crate::pki::{
    Ca, MachineId, MachineIdError, PkiError, ServerIdentity, Token, TokenError, TokenStore,
};

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
