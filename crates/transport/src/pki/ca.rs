//! The deployment CA: creating and loading it, and issuing server certificates and
//! client certificates from CSRs.
//!
//! Invariants: the CA never overwrites an existing `ca.key`/`ca.crt` and writes the key
//! before the certificate; every issued certificate gets a fresh positive random serial,
//! a `notBefore` backdated by the clock-skew allowance, and subject, SANs and extended key
//! usage chosen by the CA, never copied from a CSR (only the CSR's verified public key is
//! used); a server identity's chain is always `[leaf, CA]`.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{
    CA_CERT_FILE, CA_KEY_FILE, CA_VALIDITY, CLOCK_SKEW, LEAF_VALIDITY, MachineId,
    PROCESS_SERVER_URI_PREFIX, PkiError, ServerIdentity, ca_hash, cert_pem, generate_key, io_err,
    read_first_cert, write_public, write_secret,
};
use crate::fsutil;

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PkiError::Rng)?;
    b[0] = (b[0] & 0x7f) | 0x40; // positive, no leading zero byte
    Ok(SerialNumber::from_slice(&b))
}

/// Valid from a little before now (clock skew between hosts: [`CLOCK_SKEW`], but at most a
/// quarter of `validity`, so a short-lived certificate's lifetime is mostly its validity)
/// until `validity` from now.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW.min(validity / 4);
    params.not_after = now + validity;
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
        params.subject_alt_names = server_name_sans(names)?;
        params.distinguished_name.push(DnType::CommonName, *first);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, LEAF_VALIDITY);
        let key = generate_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerIdentity::issued(
            cert.der().clone(),
            self.cert_der.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// Issues a client certificate for `machine_id` from a DER CSR, valid for `validity`
    /// ([`LEAF_VALIDITY`] unless the deployment chose otherwise).
    ///
    /// The CSR's self-signature is verified; only its public key is used. Subject, SANs
    /// and extensions are set by the CA: CN = machine id, URI SAN
    /// `ripcord://machine/<id>`, EKU clientAuth.
    pub fn issue_client(
        &self,
        machine_id: &MachineId,
        csr_der: &[u8],
        validity: Duration,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let uri = SanType::URI(
            machine_id
                .uri()
                .try_into()
                .map_err(|_| PkiError::InconsistentMachineIdentity)?,
        );
        self.issue_from_csr(
            csr_der,
            machine_id,
            vec![uri],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )
    }

    /// Issues the certificate of a process server joining the deployment, from its CSR
    /// (the key never leaves the joining server). CN = `server_id`; SANs: `names` (what
    /// agents use to reach it) and the URI `ripcord://process-server/<id>`, which the
    /// configuration role reads to know who reports; EKU serverAuth (agents connect to
    /// it) and clientAuth (it reports to the configuration role).
    ///
    /// The URI is not a machine identity ([`super::machine_id_from_cert`] refuses this
    /// certificate), so a process server can never pose as a machine on the data path.
    pub fn issue_process_server(
        &self,
        server_id: &MachineId,
        names: &[&str],
        csr_der: &[u8],
        validity: Duration,
    ) -> Result<CertificateDer<'static>, PkiError> {
        if names.is_empty() {
            return Err(PkiError::NoServerNames);
        }
        let mut sans = server_name_sans(names)?;
        sans.push(SanType::URI(
            format!("{PROCESS_SERVER_URI_PREFIX}{}", server_id.as_str())
                .try_into()
                .map_err(|_| PkiError::InconsistentMachineIdentity)?,
        ));
        self.issue_from_csr(
            csr_der,
            server_id,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    /// A leaf for the verified public key of `csr_der` only: CN `id`, SANs `sans`, EKUs
    /// `ekus`, chosen here (nothing else is copied from the CSR), valid for `validity`.
    fn issue_from_csr(
        &self,
        csr_der: &[u8],
        id: &MachineId,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        validity: Duration,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(PkiError::InvalidCsr)?;
        check_key_algorithm(&csr)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, id.as_str());
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, validity);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.der().clone())
    }
}

/// The SANs of a server certificate: each name an IP address or a DNS name.
fn server_name_sans(names: &[&str]) -> Result<Vec<SanType>, PkiError> {
    names
        .iter()
        .map(|name| {
            let invalid = || PkiError::InvalidServerName {
                name: (*name).to_owned(),
            };
            match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) if is_dns_name(name) => {
                    Ok(SanType::DnsName((*name).try_into().map_err(|_| invalid())?))
                }
                Err(_) => Err(invalid()),
            }
        })
        .collect()
}

/// Only the key algorithms this deployment issues for.
fn check_key_algorithm(csr: &CertificateSigningRequestParams) -> Result<(), PkiError> {
    let alg = csr.public_key.algorithm();
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256
        && alg != &rcgen::PKCS_ECDSA_P384_SHA384
        && alg != &rcgen::PKCS_ED25519
    {
        return Err(PkiError::UnsupportedKeyAlgorithm);
    }
    Ok(())
}

fn is_dns_name(name: &str) -> bool {
    rustls::pki_types::DnsName::try_from(name).is_ok()
}
