//! Deployment PKI: the CA, server and client certificates, bootstrap tokens.
//!
//! Layout of a deployment directory (server side):
//! - `ca.crt` / `ca.key` — the deployment CA (key mode 0600),
//! - `server.crt` / `server.key` — the process server's chain (leaf + CA) and key,
//! - `tokens` — bootstrap token store (hashes only, mode 0600),
//! - `machines` — each registered machine's current certificate (by hash).
//!
//! Layout of an agent state directory: `agent.key` (0600), `agent.crt`, `ca.crt`.
//!
//! The CA lives in `ca.rs`, the stored identities (and reading a certificate's machine
//! id) in `identity.rs`, bootstrap tokens in `token.rs`, registered machines in `machines.rs`; this file holds the file names,
//! the error type and the PEM and key helpers they share.

mod ca;
mod identity;
mod machine_id;
mod machines;
mod token;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::fsutil;

pub use ca::Ca;
pub(crate) use identity::cert_spki;
pub use identity::{
    Identity, ServerIdentity, cert_validity, machine_id_from_cert, process_server_id_from_cert,
};
pub use machine_id::{MACHINE_ID_MAX_LEN, MachineId, MachineIdError};
pub use machines::{
    MACHINE_STORE_FILE, MachineError, MachineRecord, MachineSnapshot, MachineStore,
};
pub use token::{TOKEN_ID_LEN, TOKEN_SECRET_LEN, TOKEN_STORE_FILE, Token, TokenError, TokenStore};

/// Prefix of the URI SAN carrying the machine id in client certificates.
pub const MACHINE_URI_PREFIX: &str = "ripcord://machine/";
/// Prefix of the URI SAN carrying the server id in a joined process server's certificate.
pub const PROCESS_SERVER_URI_PREFIX: &str = "ripcord://process-server/";
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
    /// The certificate carries no `ripcord://process-server/<id>` URI SAN: it is not a
    /// joined process server's.
    #[error("certificate carries no ripcord process-server identity")]
    NoProcessServerIdentity,
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

/// Stores a deployment CA certificate (no key) as `ca.crt` in `dir`, crash-safely: what a
/// server that joined a deployment keeps of its CA.
pub fn save_ca_cert(dir: &Path, ca: &CertificateDer<'_>) -> Result<(), PkiError> {
    fsutil::ensure_dir(dir).map_err(io_err(dir))?;
    write_public(&dir.join(CA_CERT_FILE), cert_pem(ca).as_bytes())
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

/// SHA-256 of `data`: how certificates are named (machine records, the CA hash).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
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
        let cert = ca.issue_client(&id, &csr, LEAF_VALIDITY).unwrap();
        // CA decides the identity, not the CSR subject.
        assert_eq!(machine_id_from_cert(&cert).unwrap(), id);
        assert_eq!(cert_spki(&cert).unwrap(), key.subject_public_key_info());
        assert!(matches!(
            ca.issue_client(&id, b"garbage", LEAF_VALIDITY),
            Err(PkiError::InvalidCsr(_))
        ));
        let mut tampered = csr.clone();
        let n = tampered.len();
        tampered[n - 1] ^= 1;
        assert!(matches!(
            ca.issue_client(&id, &tampered, LEAF_VALIDITY),
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
