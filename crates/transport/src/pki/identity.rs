//! TLS identities as stored on disk: the process server's ([`ServerIdentity`]) and an
//! agent's ([`Identity`]), and reading the machine id out of a client certificate.
//!
//! Invariants: a [`ServerIdentity`]'s chain is `[leaf, CA]` (at least two certificates
//! when loaded); an [`Identity`] always carries the machine id of its certificate; keys
//! are written mode 0600 and before the certificates, and an agent's `agent.crt` is
//! written last, so its presence marks a complete identity.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::{
    AGENT_CERT_FILE, AGENT_KEY_FILE, CA_CERT_FILE, MACHINE_URI_PREFIX, MachineId,
    PROCESS_SERVER_URI_PREFIX, PkiError, SERVER_CERT_FILE, SERVER_KEY_FILE, cert_pem, io_err,
    read_certs, read_first_cert, read_key, write_public, write_secret,
};
use crate::fsutil;

/// The process server's TLS identity: certificate chain (leaf, then CA) and private key.
#[derive(Debug)]
pub struct ServerIdentity {
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl ServerIdentity {
    /// A freshly issued identity: `leaf` signed by `ca_cert`, with `leaf`'s key.
    pub(crate) fn issued(
        leaf: CertificateDer<'static>,
        ca_cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        Self {
            cert_chain: vec![leaf, ca_cert],
            key,
        }
    }

    /// Leaf certificate followed by the CA certificate.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// The deployment CA certificate (last element of the chain).
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        // Invariant: constructors always produce [leaf, ca].
        &self.cert_chain[self.cert_chain.len() - 1]
    }

    /// The server's private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The DNS names and IP addresses the server certificate was made for, in order.
    pub fn names(&self) -> Vec<String> {
        let Ok((_, cert)) =
            x509_parser::certificate::X509Certificate::from_der(&self.cert_chain[0])
        else {
            return Vec::new();
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return Vec::new();
        };
        san.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                    16 => {
                        Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string())
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// Stores `server.crt` (chain) and `server.key` (0600) in `dir`, crash-safely.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        fsutil::ensure_dir(dir).map_err(io_err(dir))?;
        let key_pem = pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            self.key.secret_der().to_vec(),
        ));
        write_secret(&dir.join(SERVER_KEY_FILE), key_pem.as_bytes())?;
        let chain: String = self.cert_chain.iter().map(|c| cert_pem(c)).collect();
        write_public(&dir.join(SERVER_CERT_FILE), chain.as_bytes())
    }

    /// Loads an identity saved by [`ServerIdentity::save`].
    pub fn load(dir: &Path) -> Result<ServerIdentity, PkiError> {
        let cert_path = dir.join(SERVER_CERT_FILE);
        let cert_chain = read_certs(&cert_path)?;
        if cert_chain.len() < 2 {
            return Err(PkiError::InvalidPem {
                path: cert_path,
                expected: "certificate chain (server, CA)",
            });
        }
        Ok(ServerIdentity {
            cert_chain,
            key: read_key(&dir.join(SERVER_KEY_FILE))?,
        })
    }
}

/// An agent's TLS identity, obtained by [`crate::register::register`].
#[derive(Debug)]
pub struct Identity {
    machine_id: MachineId,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    ca_cert: CertificateDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            machine_id: self.machine_id.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca_cert: self.ca_cert.clone(),
        }
    }
}

impl Identity {
    /// Assembles an identity, checking that `cert` carries a valid machine identity.
    pub fn new(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        ca_cert: CertificateDer<'static>,
    ) -> Result<Identity, PkiError> {
        let machine_id = machine_id_from_cert(&cert)?;
        Ok(Identity {
            machine_id,
            cert,
            key,
            ca_cert,
        })
    }

    /// The machine id carried by the certificate.
    pub fn machine_id(&self) -> &MachineId {
        &self.machine_id
    }

    /// The client certificate (DER).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The client private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The deployment CA certificate.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// The certificate's validity period (not before, not after).
    pub fn validity(&self) -> Result<(SystemTime, SystemTime), PkiError> {
        cert_validity(&self.cert)
    }

    /// Whether the certificate has expired (or does not parse).
    pub fn expired(&self) -> bool {
        self.validity()
            .map_or(true, |(_, not_after)| not_after <= SystemTime::now())
    }

    /// Stores the identity in `state_dir` crash-safely: `agent.key`, `ca.crt`, and
    /// `agent.crt` last (its presence marks a complete identity), all mode 0600 (only the
    /// agent reads them).
    pub fn save(&self, state_dir: &Path) -> Result<(), PkiError> {
        fsutil::ensure_dir(state_dir).map_err(io_err(state_dir))?;
        let key_pem = pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            self.key.secret_der().to_vec(),
        ));
        write_secret(&state_dir.join(AGENT_KEY_FILE), key_pem.as_bytes())?;
        write_secret(
            &state_dir.join(CA_CERT_FILE),
            cert_pem(&self.ca_cert).as_bytes(),
        )?;
        write_secret(
            &state_dir.join(AGENT_CERT_FILE),
            cert_pem(&self.cert).as_bytes(),
        )
    }

    /// Loads an identity saved by [`Identity::save`].
    pub fn load(state_dir: &Path) -> Result<Identity, PkiError> {
        let cert = read_first_cert(&state_dir.join(AGENT_CERT_FILE))?;
        let ca_cert = read_first_cert(&state_dir.join(CA_CERT_FILE))?;
        let key = read_key(&state_dir.join(AGENT_KEY_FILE))?;
        Identity::new(cert, key, ca_cert)
    }
}

/// A certificate's validity period (not before, not after).
pub fn cert_validity(cert_der: &[u8]) -> Result<(SystemTime, SystemTime), PkiError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|_| PkiError::CertificateParse)?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    let validity = cert.validity();
    Ok((at(validity.not_before), at(validity.not_after)))
}

/// Extracts the machine id from a client certificate's `ripcord://machine/<id>` URI SAN.
///
/// Exactly one such URI must be present, and if the subject has a CN it must equal the id.
/// This does not verify the certificate; call it only on certificates that rustls verified.
pub fn machine_id_from_cert(cert_der: &[u8]) -> Result<MachineId, PkiError> {
    uri_identity(cert_der, MACHINE_URI_PREFIX).map_err(|e| match e {
        UriIdentity::Missing => PkiError::NoMachineIdentity,
        UriIdentity::Pki(e) => e,
    })
}

/// Extracts a joined process server's id from its certificate's
/// `ripcord://process-server/<id>` URI SAN (same rules as [`machine_id_from_cert`]; ids
/// follow the machine-id syntax). Call it only on certificates that rustls verified.
pub fn process_server_id_from_cert(cert_der: &[u8]) -> Result<MachineId, PkiError> {
    uri_identity(cert_der, PROCESS_SERVER_URI_PREFIX).map_err(|e| match e {
        UriIdentity::Missing => PkiError::NoProcessServerIdentity,
        UriIdentity::Pki(e) => e,
    })
}

enum UriIdentity {
    Missing,
    Pki(PkiError),
}

impl From<PkiError> for UriIdentity {
    fn from(e: PkiError) -> Self {
        UriIdentity::Pki(e)
    }
}

/// The one id under `prefix` in the certificate's URI SANs, equal to its CN if it has one.
fn uri_identity(cert_der: &[u8], prefix: &str) -> Result<MachineId, UriIdentity> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|_| PkiError::CertificateParse)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PkiError::CertificateParse)?
        .ok_or(UriIdentity::Missing)?;
    let mut found: Option<&str> = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(id) = uri.strip_prefix(prefix)
        {
            if found.is_some() {
                return Err(PkiError::InconsistentMachineIdentity.into());
            }
            found = Some(id);
        }
    }
    let id = MachineId::new(found.ok_or(UriIdentity::Missing)?).map_err(PkiError::from)?;
    for cn in cert.subject().iter_common_name() {
        if cn
            .as_str()
            .map_err(|_| PkiError::InconsistentMachineIdentity)?
            != id.as_str()
        {
            return Err(PkiError::InconsistentMachineIdentity.into());
        }
    }
    Ok(id)
}

/// Public key (SubjectPublicKeyInfo DER) of a certificate.
pub(crate) fn cert_spki(cert_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|_| PkiError::CertificateParse)?;
    Ok(cert.public_key().raw.to_vec())
}
