//! Agent side of registration: connect with the deployment CA pinned by its hash, send
//! the request, check what comes back, store the identity.
//!
//! Nothing — in particular not the token — is sent before the server has proved it
//! chains to the pinned CA, and the returned certificate is checked (pinned CA, our key,
//! our machine id, verifies as the data-path server will verify it) before anything is
//! stored.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, VarInt};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::codec::{
    FrameError, Granted, RejectReason, Response, decode_response, encode_request, read_frame,
    write_frame,
};
use super::{
    REGISTER_ALPN, REGISTER_ALPN_V2, REGISTER_IDLE_TIMEOUT, REGISTER_TIMEOUT,
    registration_transport,
};
use crate::endpoint::{EndpointError, any_addr_for, bind_client, provider, roots_with};
use crate::pki::{
    Identity, MachineId, PkiError, Token, cert_spki, generate_key, machine_id_from_cert, make_csr,
    parse_ca_hash, sha256,
};

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
    /// Nothing answered the handshake at `addr` (no server listens on that port, or a
    /// firewall drops the packets): check the address and port.
    #[error(
        "no ripcord process server answered at {addr} within {}s; check the address and port \
         (`ripcord-ps serve` logs the registration address it listens on as `register=`)",
        after.as_secs()
    )]
    NoAnswer {
        /// The address tried.
        addr: SocketAddr,
        /// How long the handshake waited.
        after: std::time::Duration,
    },
    /// Handshake or connection failure (closed connection, refused handshake...).
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
    /// Neither a bootstrap token nor a current certificate was given.
    #[error("registration needs a bootstrap token or the machine's current certificate")]
    NoCredentials,
}

/// How a registration request is authenticated: a bootstrap token registers a new
/// machine; the machine's current identity (presented as the TLS client certificate)
/// renews or re-registers an existing one without a token. Give both when unsure: the
/// server consumes the token only if the identity does not suffice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// A bootstrap token from `ripcord-ps token`.
    pub token: Option<&'a Token>,
    /// The machine's current identity.
    pub current: Option<&'a Identity>,
}

/// A successful registration, as the agent keeps it.
#[derive(Debug)]
pub struct Registered {
    /// The new identity, already stored in the state directory.
    pub identity: Identity,
    /// The deployment's escrow public key: the agent pins it and never wraps a data key
    /// to another.
    pub escrow_key: [u8; 32],
    /// The port of the server's replication endpoint (0: the server did not say).
    pub data_port: u16,
    /// The process server the configuration role placed the machine on (`host:port`),
    /// when it is not the one it registered with.
    pub data_server: Option<String>,
}
const PIN_OK: u8 = 0;
const PIN_NOT_FOUND: u8 = 1;
const PIN_CHAIN_INVALID: u8 = 2;
/// The server's certificate never arrived (nothing answered, or no TLS server did).
const PIN_UNSEEN: u8 = 3;

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
/// `server_name` against the CA pinned by `ca_hash`, presenting `current` as the client
/// certificate if given. Nothing is sent yet.
///
/// Returns the client endpoint (keep it alive while using the connection) and the
/// connection. [`register`] is built on this; it is public for tooling and tests.
pub async fn connect_registration(
    server_addr: SocketAddr,
    server_name: &str,
    ca_hash: &str,
    current: Option<&Identity>,
) -> Result<(Endpoint, Connection), RegisterError> {
    let client_auth = current.map(|id| (vec![id.cert().clone()], id.key().clone_key()));
    connect_pinned(
        server_addr,
        server_name,
        ca_hash,
        client_auth,
        &[REGISTER_ALPN, REGISTER_ALPN_V2],
    )
    .await
}

/// Opens a connection with ALPN `alpn` to `server_addr`, accepting the server only if its
/// certificate (valid for `server_name`) chains to the CA pinned by `ca_hash`, presenting
/// `client_auth` (chain and key) if given. Nothing is sent yet. Shared by registration
/// and the process servers' link to the configuration role.
pub(crate) async fn connect_pinned(
    server_addr: SocketAddr,
    server_name: &str,
    ca_hash: &str,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpns: &[&[u8]],
) -> Result<(Endpoint, Connection), RegisterError> {
    let pin = parse_ca_hash(ca_hash).map_err(|_| RegisterError::InvalidCaHash)?;
    let outcome = Arc::new(AtomicU8::new(PIN_UNSEEN));
    let verifier = PinnedCaVerifier {
        pin,
        outcome: outcome.clone(),
        provider: provider(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(EndpointError::from)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut tls = match client_auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(EndpointError::from)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
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
            PIN_UNSEEN if e == quinn::ConnectionError::TimedOut => RegisterError::NoAnswer {
                addr: server_addr,
                after: REGISTER_IDLE_TIMEOUT,
            },
            _ => RegisterError::Connection(e),
        }),
    }
}

/// Registers this machine with the process server (kubeadm-join style), or renews its
/// certificate.
///
/// 1. Connects to `server_addr` and accepts the server only if its certificate (valid for
///    `server_name`) chains to the CA whose hash is `ca_hash`; otherwise fails with
///    [`RegisterError::CaHashMismatch`] before anything — in particular the token — is sent.
///    The current identity, if given, is the TLS client certificate.
/// 2. Generates an ECDSA P-256 key locally and sends `{token, machine_id, CSR}`.
/// 3. Checks the returned certificate (chains to the pinned CA, carries our key and
///    machine id) and stores `agent.key` (0600), `ca.crt`, `agent.crt` in `state_dir`
///    crash-safely.
pub async fn register(
    server_addr: SocketAddr,
    server_name: &str,
    ca_hash: &str,
    machine_id: &MachineId,
    credentials: Credentials<'_>,
    state_dir: &Path,
) -> Result<Registered, RegisterError> {
    let pin = parse_ca_hash(ca_hash).map_err(|_| RegisterError::InvalidCaHash)?;
    if credentials.token.is_none() && credentials.current.is_none() {
        return Err(RegisterError::NoCredentials);
    }
    let fut = async {
        let (endpoint, conn) =
            connect_registration(server_addr, server_name, ca_hash, credentials.current).await?;
        let key = generate_key()?;
        let csr = make_csr(machine_id, &key)?;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(
            &mut send,
            &encode_request(credentials.token, machine_id, &csr),
        )
        .await?;
        send.finish().map_err(FrameError::from)?;
        let body = read_frame(&mut recv).await?;
        let v3 = super::negotiated_alpn(&conn) == REGISTER_ALPN;
        conn.close(VarInt::from_u32(0), b"done");
        endpoint.close(VarInt::from_u32(0), b"done");
        let Granted {
            cert,
            ca,
            escrow_key,
            data_port,
            data_server,
        } = match decode_response(&body, v3)? {
            Response::Reject(reason) => return Err(RegisterError::Rejected(reason)),
            Response::Ok(granted) => granted,
        };
        check_issued(&cert, &ca, &pin, machine_id, &key)?;
        let identity = Identity::new(
            cert,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ca,
        )?;
        identity.save(state_dir)?;
        Ok(Registered {
            identity,
            escrow_key,
            data_port,
            data_server: Some(data_server).filter(|s| !s.is_empty()),
        })
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
