//! Mutual-TLS QUIC endpoints for the data path (ALPN `ripcord/1`).
//!
//! Both sides trust only the deployment CA. The server requires a client certificate
//! issued by that CA; a peer without one fails the TLS handshake, so quinn never hands
//! the application a [`quinn::Connection`] (and hence no stream data) for it. 0-RTT is
//! disabled, so no application data is accepted before the client is authenticated.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use crate::pki::{Identity, MachineId, PkiError, ServerIdentity, machine_id_from_cert};

/// ALPN protocol id of the data path.
pub const DATA_ALPN: &[u8] = b"ripcord/1";

/// Errors from building endpoints, connecting, or identifying peers.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The TLS configuration was rejected by rustls (e.g. key does not match certificate);
    /// check the identity files.
    #[error("TLS configuration error: {0}")]
    Tls(#[from] rustls::Error),
    /// Building the certificate verifier failed (e.g. the CA certificate is unusable).
    #[error("certificate verifier could not be built: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    /// The crypto provider lacks the cipher suite QUIC needs for initial packets.
    #[error("crypto provider unusable for QUIC: {0}")]
    QuicCrypto(#[from] NoInitialCipherSuite),
    /// A transport option is out of range; fix [`TransportOptions`].
    #[error("transport option {option} is out of range")]
    InvalidTransportOption {
        /// Name of the offending field.
        option: &'static str,
    },
    /// Binding the UDP socket failed; check the address and that the port is free.
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        /// Requested bind address.
        addr: SocketAddr,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The connection could not be started (invalid server name, endpoint stopping...).
    #[error("cannot start connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC/TLS handshake failed (unreachable peer, untrusted certificate, timeout...).
    #[error("handshake failed: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    /// The peer presented no certificate (cannot happen on a mutual-TLS server endpoint).
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate carries no valid machine identity.
    #[error("peer certificate identity: {0}")]
    PeerIdentity(#[from] PkiError),
}

/// Transport tuning for bulk block replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// Per-stream receive window in bytes (flow control credit per stream).
    pub stream_receive_window: u64,
    /// Connection-wide receive window in bytes.
    pub receive_window: u64,
    /// Connection-wide send window in bytes.
    pub send_window: u64,
    /// Interval of keep-alive pings; `None` disables them.
    pub keep_alive_interval: Option<Duration>,
    /// Close the connection after this long without traffic.
    pub idle_timeout: Duration,
    /// Maximum concurrent bidirectional streams the peer may open.
    pub max_concurrent_bidi_streams: u32,
    /// Maximum concurrent unidirectional streams the peer may open.
    pub max_concurrent_uni_streams: u32,
    /// The congestion controller of what this endpoint sends.
    pub congestion: Congestion,
}

/// A QUIC congestion controller (quinn's implementations).
///
/// Only the sender's matters: the agent's, for the replication stream. Cubic (the
/// default, as in Linux TCP) backs off on every loss; BBR paces by the measured bandwidth
/// and round-trip time and keeps its rate through random loss that is not congestion (a
/// lossy WAN link, a radio hop), where Cubic collapses. quinn marks its BBR experimental;
/// `cargo xtask bench link` measures both on this machine (decision 0017).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 8312).
    #[default]
    Cubic,
    /// BBR (quinn's, version 1).
    Bbr,
    /// NewReno (RFC 6582).
    NewReno,
}

impl Default for TransportOptions {
    /// 32 MiB per stream, 64 MiB per connection, 1 s keep-alive, 6 s idle timeout: a
    /// replication link notices a dead process server within seconds (a short outage
    /// costs a reconnect, never data: the agent resends from the last durable ack).
    fn default() -> Self {
        Self {
            stream_receive_window: 32 << 20,
            receive_window: 64 << 20,
            send_window: 64 << 20,
            keep_alive_interval: Some(Duration::from_secs(1)),
            idle_timeout: Duration::from_secs(6),
            max_concurrent_bidi_streams: 64,
            max_concurrent_uni_streams: 64,
            congestion: Congestion::Cubic,
        }
    }
}

impl TransportOptions {
    /// Builds the quinn transport configuration.
    pub fn to_transport_config(&self) -> Result<TransportConfig, EndpointError> {
        let varint = |v: u64, option| {
            VarInt::from_u64(v).map_err(|_| EndpointError::InvalidTransportOption { option })
        };
        let mut tc = TransportConfig::default();
        tc.stream_receive_window(varint(self.stream_receive_window, "stream_receive_window")?)
            .receive_window(varint(self.receive_window, "receive_window")?)
            .send_window(self.send_window)
            .keep_alive_interval(self.keep_alive_interval)
            .max_idle_timeout(Some(IdleTimeout::try_from(self.idle_timeout).map_err(
                |_| EndpointError::InvalidTransportOption {
                    option: "idle_timeout",
                },
            )?))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_uni_streams));
        match self.congestion {
            Congestion::Cubic => tc
                .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
            Congestion::Bbr => {
                tc.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::NewReno => tc.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
        };
        Ok(tc)
    }
}

/// The process-wide *ring* crypto provider.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

pub(crate) fn roots_with(ca: &CertificateDer<'static>) -> Result<RootCertStore, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(roots)
}

/// Builds the data-path server configuration (mutual TLS, ALPN `ripcord/1`).
pub fn server_config(
    identity: &ServerIdentity,
    options: &TransportOptions,
) -> Result<quinn::ServerConfig, EndpointError> {
    let roots = Arc::new(roots_with(identity.ca_cert())?);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(identity.cert_chain().to_vec(), identity.key().clone_key())?;
    tls.alpn_protocols = vec![DATA_ALPN.to_vec()];
    // max_early_data_size stays 0: no 0-RTT data from not-yet-authenticated clients.
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    cfg.transport_config(Arc::new(options.to_transport_config()?));
    Ok(cfg)
}

/// Builds the data-path client configuration (client certificate, server verified
/// against the deployment CA only, ALPN `ripcord/1`).
pub fn client_config(
    identity: &Identity,
    options: &TransportOptions,
) -> Result<quinn::ClientConfig, EndpointError> {
    let roots = roots_with(identity.ca_cert())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![identity.cert().clone(), identity.ca_cert().clone()],
            identity.key().clone_key(),
        )?;
    tls.alpn_protocols = vec![DATA_ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    cfg.transport_config(Arc::new(options.to_transport_config()?));
    Ok(cfg)
}

/// Binds the mutual-TLS data-path server endpoint on `bind_addr` with default
/// [`TransportOptions`]. Must be called inside a tokio runtime.
pub fn server_endpoint(
    bind_addr: SocketAddr,
    identity: &ServerIdentity,
) -> Result<Endpoint, EndpointError> {
    server_endpoint_with(bind_addr, identity, &TransportOptions::default())
}

/// Like [`server_endpoint`] with explicit transport options.
pub fn server_endpoint_with(
    bind_addr: SocketAddr,
    identity: &ServerIdentity,
    options: &TransportOptions,
) -> Result<Endpoint, EndpointError> {
    let cfg = server_config(identity, options)?;
    let bind = |source| EndpointError::Bind {
        addr: bind_addr,
        source,
    };
    let socket = std::net::UdpSocket::bind(bind_addr).map_err(bind)?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        bind(std::io::Error::other(
            "no async runtime: call inside a tokio runtime",
        ))
    })?;
    Endpoint::new(stateless_reset_config(identity), Some(cfg), socket, runtime).map_err(bind)
}

/// The endpoint configuration of a server whose stateless resets survive restarts.
///
/// A server killed with `kill -9` (or a host that rebooted) forgets its connections. With
/// quinn's defaults (a random reset key and a random connection-ID key per process), the
/// restarted server drops the packets of a forgotten connection as foreign, and its peers
/// learn that the connection is gone only when their idle timeout ends (6 s): every
/// restart costs each agent that long without replication. Here both keys come from the
/// server's private key (HKDF-SHA256 under their own labels, so they reveal nothing about
/// it): the restarted server recognises its own connection IDs and answers the first
/// packet of a forgotten connection with a stateless reset the peer can verify (RFC 9000,
/// section 10.3), and the agent reconnects at once. Only the holder of the server's
/// private key can produce those resets, so nobody else can cut a connection this way.
pub fn stateless_reset_config(identity: &ServerIdentity) -> quinn::EndpointConfig {
    use ring::{hkdf, hmac};
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ripcord/1 QUIC endpoint keys")
        .extract(identity.key().secret_der());
    let reset_key = hmac::Key::from(
        prk.expand(&[b"stateless reset"], hmac::HMAC_SHA256)
            .expect("an HMAC-SHA256 key is a valid HKDF output length"),
    );
    let mut cid_key = [0u8; 8];
    prk.expand(&[b"connection id"], CidKeyLen)
        .and_then(|okm| okm.fill(&mut cid_key))
        .expect("8 bytes are a valid HKDF output length");
    let cid_key = u64::from_le_bytes(cid_key);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(reset_key));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// HKDF output length of the connection-ID key.
struct CidKeyLen;

impl ring::hkdf::KeyType for CidKeyLen {
    fn len(&self) -> usize {
        8
    }
}

/// Binds a client endpoint on an ephemeral port of `bind_addr`'s family.
pub(crate) fn bind_client(bind_addr: SocketAddr) -> Result<Endpoint, EndpointError> {
    Endpoint::client(bind_addr).map_err(|source| EndpointError::Bind {
        addr: bind_addr,
        source,
    })
}

/// Unspecified address of the same family as `peer`, port 0.
pub(crate) fn any_addr_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// Creates an agent endpoint bound to `0.0.0.0:0` (IPv4) whose default client
/// configuration presents `identity` and trusts only the deployment CA. Use
/// [`client_endpoint_with`] to bind elsewhere (e.g. `[::]:0` for IPv6 servers).
pub fn client_endpoint(identity: &Identity) -> Result<Endpoint, EndpointError> {
    client_endpoint_with(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        identity,
        &TransportOptions::default(),
    )
}

/// Like [`client_endpoint`] with an explicit bind address and transport options.
pub fn client_endpoint_with(
    bind_addr: SocketAddr,
    identity: &Identity,
    options: &TransportOptions,
) -> Result<Endpoint, EndpointError> {
    let cfg = client_config(identity, options)?;
    let mut ep = bind_client(bind_addr)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connects to the process server at `addr`, verifying its certificate for `server_name`
/// (a DNS name or IP literal in its SANs) against the deployment CA.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Connection, EndpointError> {
    Ok(endpoint.connect(addr, server_name)?.await?)
}

/// Application close code with which the server ends a data connection whose client
/// certificate is no longer its machine's current one (the machine was removed, or the
/// certificate superseded by a renewal or re-registration). The close reason says which.
/// An agent seeing it stops retrying with that certificate.
pub const CLOSE_CERTIFICATE_REFUSED: u32 = 0x7263_0001;

/// The verified machine id of the peer (from its client certificate's
/// `ripcord://machine/<id>` URI SAN). Use it on the server to enforce that a machine only
/// writes its own disks.
pub fn peer_machine_id(conn: &Connection) -> Result<MachineId, EndpointError> {
    Ok(machine_id_from_cert(&peer_certificate(conn)?)?)
}

/// The peer's verified leaf certificate. The server checks it against the machine store
/// (is it the machine's current certificate?) before reading anything from the peer.
pub fn peer_certificate(conn: &Connection) -> Result<CertificateDer<'static>, EndpointError> {
    let identity = conn
        .peer_identity()
        .ok_or(EndpointError::NoPeerCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| EndpointError::NoPeerCertificate)?;
    certs
        .first()
        .cloned()
        .ok_or(EndpointError::NoPeerCertificate)
}
