//! The process server's side of the link: joining (a token, a CSR; the certificate that
//! comes back is checked before anything is stored) and reporting over one kept
//! connection, reconnected when it breaks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use quinn::{Connection, Endpoint, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;

use super::{
    CONTROL_ALPN, CONTROL_TIMEOUT, ControlError, JoinRequest, Reply, ReportAccepted, ReportRequest,
    Request, read_message, write_message,
};
use crate::endpoint::{provider, roots_with};
use crate::pki::{
    MachineId, ServerIdentity, Token, cert_spki, generate_key, make_csr, parse_ca_hash,
    process_server_id_from_cert, sha256,
};
use crate::register::{RegisterError, connect_pinned};

/// What joining needs.
#[derive(Debug)]
pub struct JoinParams<'a> {
    /// The configuration role's registration endpoint.
    pub config_addr: SocketAddr,
    /// Its name in its certificate (DNS name or IP).
    pub config_name: &'a str,
    /// The pinned deployment CA (`sha256:<hex>`).
    pub ca_hash: &'a str,
    /// A process-server token.
    pub token: &'a Token,
    /// This server's id.
    pub server_id: &'a MachineId,
    /// Names agents use to reach this server (at least one).
    pub names: &'a [String],
    /// This server's version.
    pub version: &'a str,
    /// Where it runs.
    pub fingerprint: &'a str,
    /// Its replication port.
    pub data_port: u16,
}

/// A joined server's identity and what the configuration role told it.
#[derive(Debug)]
pub struct Joined {
    /// Certificate (with the CA) and key; saved in the directory given to [`join`].
    pub identity: ServerIdentity,
    /// The deployment facts the configuration role sent.
    pub deployment: serde_json::Value,
}

/// Joins the deployment: connects with the CA pinned (nothing, in particular not the
/// token, is sent to a server that does not chain to it), sends a CSR for a key generated
/// here, checks the certificate that comes back (pinned CA, our key, our id, verifies as
/// a client certificate of the deployment) and stores the identity in `identity_dir`.
pub async fn join(params: &JoinParams<'_>, identity_dir: &Path) -> Result<Joined, ControlError> {
    let pin = parse_ca_hash(params.ca_hash).map_err(|_| RegisterError::InvalidCaHash)?;
    let fut = async {
        let (endpoint, conn) = connect_pinned(
            params.config_addr,
            params.config_name,
            params.ca_hash,
            None,
            &[CONTROL_ALPN],
        )
        .await?;
        let key = generate_key()?;
        let csr = make_csr(params.server_id, &key)?;
        let reply = exchange(
            &conn,
            &Request::Join(JoinRequest {
                token: params.token.to_string(),
                server_id: params.server_id.as_str().to_owned(),
                version: params.version.to_owned(),
                fingerprint: params.fingerprint.to_owned(),
                names: params.names.to_vec(),
                data_port: params.data_port,
                csr,
            }),
        )
        .await;
        conn.close(VarInt::from_u32(0), b"done");
        endpoint.close(VarInt::from_u32(0), b"done");
        let (certificate, ca, deployment) = match reply? {
            Reply::Joined {
                certificate,
                ca,
                deployment,
            } => (
                CertificateDer::from(certificate),
                CertificateDer::from(ca),
                deployment,
            ),
            Reply::Refused { refusal, message } => {
                return Err(ControlError::Refused { refusal, message });
            }
            Reply::Accepted { .. } => return Err(ControlError::UnexpectedReply("accepted")),
        };
        check_issued(&certificate, &ca, &pin, params.server_id, &key)?;
        let identity = ServerIdentity::issued(
            certificate,
            ca,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        );
        identity.save(identity_dir)?;
        Ok(Joined {
            identity,
            deployment,
        })
    };
    tokio::time::timeout(CONTROL_TIMEOUT, fut)
        .await
        .map_err(|_| ControlError::Timeout)?
}

/// One request and its reply on a new stream of `conn`.
async fn exchange(conn: &Connection, request: &Request) -> Result<Reply, ControlError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_message(&mut send, request).await?;
    read_message(&mut recv).await
}

fn check_issued(
    cert: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
    pin: &[u8; 32],
    server_id: &MachineId,
    key: &rcgen::KeyPair,
) -> Result<(), ControlError> {
    use rcgen::PublicKeyData;
    let bad = ControlError::BadIssuedCertificate;
    if &sha256(ca) != pin {
        return Err(bad("CA certificate does not match the pinned hash"));
    }
    if cert_spki(cert).map_err(|_| bad("certificate does not parse"))?
        != key.subject_public_key_info()
    {
        return Err(bad("certificate is not for our key"));
    }
    if &process_server_id_from_cert(cert).map_err(|_| bad("certificate has no server id"))?
        != server_id
    {
        return Err(bad("certificate is for another server id"));
    }
    let roots = roots_with(ca).map_err(|_| bad("CA certificate unusable as trust anchor"))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|_| bad("CA certificate unusable as trust anchor"))?
        .verify_client_cert(cert, &[], UnixTime::now())
        .map_err(|_| bad("certificate does not verify against the CA"))?;
    Ok(())
}

/// A joined server's reporting connection to the configuration role, opened on first use
/// and again after it breaks.
pub struct ControlClient {
    config_addr: SocketAddr,
    config_name: String,
    ca_hash: String,
    identity: ServerIdentity,
    conn: Option<(Endpoint, Connection)>,
}

impl ControlClient {
    /// A client for the configuration role at `config_addr` (certificate valid for
    /// `config_name`), reporting as `identity`, whose CA is pinned.
    pub fn new(config_addr: SocketAddr, config_name: &str, identity: ServerIdentity) -> Self {
        ControlClient {
            config_addr,
            config_name: config_name.to_owned(),
            ca_hash: crate::pki::ca_hash(identity.ca_cert()),
            identity,
            conn: None,
        }
    }

    /// Sends one report and returns the machines assigned to this server
    /// ([`Reply::Refused`] as [`ControlError::Refused`]). A broken connection is dropped,
    /// so the next call reconnects.
    pub async fn report(&mut self, report: ReportRequest) -> Result<ReportAccepted, ControlError> {
        let result = tokio::time::timeout(CONTROL_TIMEOUT, self.report_inner(report))
            .await
            .unwrap_or(Err(ControlError::Timeout));
        if matches!(
            result,
            Err(ControlError::Connection(_)
                | ControlError::Connect(_)
                | ControlError::Frame(_)
                | ControlError::Timeout)
        ) && let Some((endpoint, conn)) = self.conn.take()
        {
            conn.close(VarInt::from_u32(0), b"reconnecting");
            endpoint.close(VarInt::from_u32(0), b"reconnecting");
        }
        result
    }

    async fn report_inner(
        &mut self,
        report: ReportRequest,
    ) -> Result<ReportAccepted, ControlError> {
        if self
            .conn
            .as_ref()
            .is_none_or(|(_, c)| c.close_reason().is_some())
        {
            let client_auth = (
                self.identity.cert_chain().to_vec(),
                self.identity.key().clone_key(),
            );
            self.conn = Some(
                connect_pinned(
                    self.config_addr,
                    &self.config_name,
                    &self.ca_hash,
                    Some(client_auth),
                    &[CONTROL_ALPN],
                )
                .await?,
            );
        }
        let (_, conn) = self.conn.as_ref().expect("connected above");
        let sent = super::unix_now_ns();
        let reply = exchange(conn, &Request::Report(report)).await?;
        let received = super::unix_now_ns();
        match reply {
            Reply::Accepted {
                machines,
                groups,
                clock,
                policies,
            } => Ok(ReportAccepted {
                machines,
                groups,
                policies,
                clock: clock.map(|c| (sent, c, received)),
            }),
            Reply::Refused { refusal, message } => Err(ControlError::Refused { refusal, message }),
            Reply::Joined { .. } => Err(ControlError::UnexpectedReply("joined")),
        }
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        if let Some((endpoint, conn)) = self.conn.take() {
            conn.close(VarInt::from_u32(0), b"stopping");
            endpoint.close(VarInt::from_u32(0), b"stopping");
        }
    }
}
