//! Deployment PKI: the CA, server and client certificates, bootstrap tokens.
//!
//! Layout of a deployment directory (server side):
//! - `ca.crt` / `ca.key` — the deployment CA (key mode 0600),
//! - `server.crt` / `server.key` — the process server's chain (leaf + CA) and key,
//! - `tokens` — bootstrap token store (hashes only, mode 0600).
//!
//! Layout of an agent state directory: `agent.key` (0600), `agent.crt`, `ca.crt`.

mod machine_id;
mod token;

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::fsutil;

pub use machine_id::{MACHINE_ID_MAX_LEN, MachineId, MachineIdError};
pub use token::{TOKEN_ID_LEN, TOKEN_SECRET_LEN, TOKEN_STORE_FILE, Token, TokenError, TokenStore};

/// Prefix of the URI SAN carrying the machine id in client certificates.
pub const MACHINE_URI_PREFIX: &str = "ripcord://machine/";
/// CA certificate file name (deployment dir and agent state dir).
pub const CA_CERT_FILE: &str = "ca.crt";
/// CA private key file name (deployment dir).
pub const CA_KEY_FILE: &str = "ca.key";
/// Server certificate chain file name (deployment dir).
pub const SERVER_CERT_FILE: &str = "server.crt";
/// Server private key file name (deployment dir).
pub const SERVER_KEY_FILE: &str = "server.key";
/// Agent certificate file name (agent state dir).
pub const AGENT_CERT_FILE: &str = "agent.crt";
/// Agent private key file name (agent state dir).
pub const AGENT_KEY_FILE: &str = "agent.key";

/// Validity of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of issued server and client certificates.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating of `notBefore` to tolerate clock skew between hosts.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Errors from the PKI layer.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed; check the path and permissions.
    #[error("I/O on {path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Refusing to overwrite existing key material; remove it or use `load`.
    #[error("{path} already exists; refusing to overwrite key material")]
    AlreadyExists {
        /// Existing file.
        path: PathBuf,
    },
    /// A file does not contain the expected PEM object.
    #[error("{path} does not contain a valid PEM {expected}")]
    InvalidPem {
        /// File involved.
        path: PathBuf,
        /// What was expected ("certificate", "private key").
        expected: &'static str,
    },
    /// Key or certificate generation failed in rcgen.
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
    /// The CSR could not be parsed or its self-signature is invalid; the agent must send a
    /// fresh, well-formed CSR.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(#[source] rcgen::Error),
    /// The CSR uses a key algorithm this deployment does not issue for (use ECDSA P-256/P-384 or Ed25519).
    #[error("unsupported key algorithm in CSR; use ECDSA P-256, P-384 or Ed25519")]
    UnsupportedKeyAlgorithm,
    /// A server subject name is neither an IP address nor a valid DNS name.
    #[error("invalid server name {name:?}: not an IP address or DNS name")]
    InvalidServerName {
        /// The rejected name.
        name: String,
    },
    /// At least one server name (DNS name or IP) is required.
    #[error("no server names given")]
    NoServerNames,
    /// The CA name is empty or longer than 64 bytes.
    #[error("CA name must be 1..=64 bytes")]
    InvalidCaName,
    /// The CA hash is not `sha256:<64 hex digits>`.
    #[error("invalid CA hash: expected sha256:<64 hex digits>")]
    InvalidCaHash,
    /// The machine id is invalid.
    #[error(transparent)]
    InvalidMachineId(#[from] MachineIdError),
    /// A certificate is not valid X.509 DER.
    #[error("certificate could not be parsed as X.509")]
    CertificateParse,
    /// The certificate carries no `ripcord://machine/<id>` URI SAN.
    #[error("certificate carries no ripcord machine identity")]
    NoMachineIdentity,
    /// The certificate's machine identity is ambiguous (several URIs, or CN differs from URI).
    #[error("certificate machine identity is ambiguous or inconsistent")]
    InconsistentMachineIdentity,
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Rng,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `"sha256:<hex>"` of a CA certificate's DER encoding — the value agents pin.
pub fn ca_hash(cert_der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha256(cert_der)))
}

/// Parses a `"sha256:<hex>"` CA hash into its 32 raw bytes (hex is case-insensitive).
pub fn parse_ca_hash(s: &str) -> Result<[u8; 32], PkiError> {
    let hex_part = s.strip_prefix("sha256:").ok_or(PkiError::InvalidCaHash)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| PkiError::InvalidCaHash)?;
    Ok(out)
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PkiError::Rng)?;
    b[0] = (b[0] & 0x7f) | 0x40; // positive, no leading zero byte
    Ok(SerialNumber::from_slice(&b))
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + validity;
}

fn cert_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PkiError::InvalidPem {
            path: path.to_path_buf(),
            expected: "certificate",
        })?;
    if certs.is_empty() {
        return Err(PkiError::InvalidPem {
            path: path.to_path_buf(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

fn read_first_cert(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let mut certs = read_certs(path)?;
    Ok(certs.swap_remove(0))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| PkiError::InvalidPem {
        path: path.to_path_buf(),
        expected: "private key",
    })
}

fn write_secret(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    fsutil::write_atomic(path, data, fsutil::MODE_SECRET).map_err(io_err(path))
}

fn write_public(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    fsutil::write_atomic(path, data, fsutil::MODE_PUBLIC).map_err(io_err(path))
}

/// Generates a fresh ECDSA P-256 key pair.
pub(crate) fn generate_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// Builds a CSR for `machine_id` signed by `key` (DER).
pub(crate) fn make_csr(machine_id: &MachineId, key: &KeyPair) -> Result<Vec<u8>, PkiError> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, machine_id.as_str());
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// The deployment certificate authority.
pub struct Ca {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("hash", &self.hash())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new CA (ECDSA P-256, self-signed, valid for [`CA_VALIDITY`]) named `name`
    /// and stores it in `dir` as `ca.crt` + `ca.key` (0600), crash-safely.
    ///
    /// Refuses to overwrite an existing CA ([`PkiError::AlreadyExists`]).
    pub fn create(dir: &Path, name: &str) -> Result<Ca, PkiError> {
        if name.is_empty() || name.len() > 64 {
            return Err(PkiError::InvalidCaName);
        }
        fsutil::ensure_dir(dir).map_err(io_err(dir))?;
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        for p in [&key_path, &cert_path] {
            if p.exists() {
                return Err(PkiError::AlreadyExists { path: p.clone() });
            }
        }
        let key = generate_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ripcord");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        // Key first: a crash in between leaves a key without cert, which `create`
        // refuses to overwrite and `load` reports as a missing certificate.
        write_secret(&key_path, key.serialize_pem().as_bytes())?;
        write_public(&cert_path, cert.pem().as_bytes())?;
        Ok(Ca {
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA stored in `dir` by [`Ca::create`].
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let key_pem = fsutil::read_text(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| PkiError::InvalidPem {
            path: key_path.clone(),
            expected: "private key",
        })?;
        let cert_der = read_first_cert(&cert_path)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Ca { cert_der, issuer })
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        cert_pem(&self.cert_der)
    }

    /// [`ca_hash`] of this CA's certificate.
    pub fn hash(&self) -> String {
        ca_hash(&self.cert_der)
    }

    /// Issues a server certificate (new ECDSA P-256 key) for `names`; each name is an IP
    /// address or a DNS name and becomes a SAN. The first name is also the CN.
    pub fn issue_server(&self, names: &[&str]) -> Result<ServerIdentity, PkiError> {
        let first = names.first().ok_or(PkiError::NoServerNames)?;
        let mut params = CertificateParams::default();
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    if !is_dns_name(name) {
                        return Err(PkiError::InvalidServerName {
                            name: (*name).to_owned(),
                        });
                    }
                    SanType::DnsName((*name).try_into().map_err(|_| {
                        PkiError::InvalidServerName {
                            name: (*name).to_owned(),
                        }
                    })?)
                }
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name.push(DnType::CommonName, *first);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, LEAF_VALIDITY);
        let key = generate_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerIdentity {
            cert_chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Issues a client certificate for `machine_id` from a DER CSR.
    ///
    /// The CSR's self-signature is verified; only its public key is used. Subject, SANs
    /// and extensions are set by the CA: CN = machine id, URI SAN
    /// `ripcord://machine/<id>`, EKU clientAuth.
    pub fn issue_client(
        &self,
        machine_id: &MachineId,
        csr_der: &[u8],
    ) -> Result<CertificateDer<'static>, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(PkiError::InvalidCsr)?;
        let alg = csr.public_key.algorithm();
        if alg != &rcgen::PKCS_ECDSA_P256_SHA256
            && alg != &rcgen::PKCS_ECDSA_P384_SHA384
            && alg != &rcgen::PKCS_ED25519
        {
            return Err(PkiError::UnsupportedKeyAlgorithm);
        }
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, machine_id.as_str());
        params.subject_alt_names = vec![SanType::URI(
            machine_id
                .uri()
                .try_into()
                .map_err(|_| PkiError::InconsistentMachineIdentity)?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, LEAF_VALIDITY);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.der().clone())
    }
}

fn is_dns_name(name: &str) -> bool {
    rustls::pki_types::DnsName::try_from(name).is_ok()
}

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

    /// Stores the identity in `state_dir` crash-safely: `agent.key` (0600), `ca.crt`, and
    /// `agent.crt` last (its presence marks a complete identity).
    pub fn save(&self, state_dir: &Path) -> Result<(), PkiError> {
        fsutil::ensure_dir(state_dir).map_err(io_err(state_dir))?;
        let key_pem = pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            self.key.secret_der().to_vec(),
        ));
        write_secret(&state_dir.join(AGENT_KEY_FILE), key_pem.as_bytes())?;
        write_public(
            &state_dir.join(CA_CERT_FILE),
            cert_pem(&self.ca_cert).as_bytes(),
        )?;
        write_public(
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

/// Extracts the machine id from a client certificate's `ripcord://machine/<id>` URI SAN.
///
/// Exactly one such URI must be present, and if the subject has a CN it must equal the id.
/// This does not verify the certificate; call it only on certificates that rustls verified.
pub fn machine_id_from_cert(cert_der: &[u8]) -> Result<MachineId, PkiError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|_| PkiError::CertificateParse)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PkiError::CertificateParse)?
        .ok_or(PkiError::NoMachineIdentity)?;
    let mut found: Option<&str> = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(id) = uri.strip_prefix(MACHINE_URI_PREFIX)
        {
            if found.is_some() {
                return Err(PkiError::InconsistentMachineIdentity);
            }
            found = Some(id);
        }
    }
    let id = MachineId::new(found.ok_or(PkiError::NoMachineIdentity)?)?;
    for cn in cert.subject().iter_common_name() {
        if cn
            .as_str()
            .map_err(|_| PkiError::InconsistentMachineIdentity)?
            != id.as_str()
        {
            return Err(PkiError::InconsistentMachineIdentity);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_create_load_and_hash_stability() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path(), "test-ca").unwrap();
        let h = ca.hash();
        assert!(h.starts_with("sha256:") && h.len() == 7 + 64);
        assert_eq!(h, ca_hash(ca.cert_der()));
        assert_eq!(ca_hash(ca.cert_der()), ca_hash(ca.cert_der()));
        assert_eq!(parse_ca_hash(&h).unwrap(), sha256(ca.cert_der()));
        assert_eq!(
            parse_ca_hash(&h.to_uppercase().replace("SHA256:", "sha256:")).unwrap(),
            sha256(ca.cert_der())
        );
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.hash(), h, "hash must be stable across load");
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            Ca::create(dir.path(), "again"),
            Err(PkiError::AlreadyExists { .. })
        ));
        // Known-answer test: hash of fixed bytes.
        assert_eq!(
            ca_hash(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        for bad in [
            "",
            "sha256:",
            "sha1:00",
            "sha256:zz",
            &format!("sha256:{}", "0".repeat(63)),
        ] {
            assert!(parse_ca_hash(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_cert_carries_machine_id() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path(), "test-ca").unwrap();
        let id = MachineId::new("host-1").unwrap();
        let key = generate_key().unwrap();
        let csr = make_csr(&MachineId::new("other").unwrap(), &key).unwrap();
        let cert = ca.issue_client(&id, &csr).unwrap();
        // CA decides the identity, not the CSR subject.
        assert_eq!(machine_id_from_cert(&cert).unwrap(), id);
        assert_eq!(cert_spki(&cert).unwrap(), key.subject_public_key_info());
        assert!(matches!(
            ca.issue_client(&id, b"garbage"),
            Err(PkiError::InvalidCsr(_))
        ));
        let mut tampered = csr.clone();
        let n = tampered.len();
        tampered[n - 1] ^= 1;
        assert!(matches!(
            ca.issue_client(&id, &tampered),
            Err(PkiError::InvalidCsr(_))
        ));
    }

    #[test]
    fn server_identity_save_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path(), "test-ca").unwrap();
        let sid = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        sid.save(dir.path()).unwrap();
        let loaded = ServerIdentity::load(dir.path()).unwrap();
        assert_eq!(loaded.cert_chain(), sid.cert_chain());
        assert_eq!(loaded.ca_cert(), ca.cert_der());
        assert!(matches!(
            ca.issue_server(&["bad name!"]),
            Err(PkiError::InvalidServerName { .. })
        ));
        assert!(matches!(ca.issue_server(&[]), Err(PkiError::NoServerNames)));
    }
}
