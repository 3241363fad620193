//! Machine takeover over real QUIC: who may bind a machine id to a key. The attacker in
//! each test is named; the stores are the real files, shared with an operator's handle.

use std::time::SystemTime;

use ripcord_transport::MachineError;
use ripcord_transport::pki::{Identity, MachineId, MachineStore, TokenStore};
use ripcord_transport::register::{Credentials, RegisterError, RejectReason, ServeError};

mod common;

use common::*;

fn mid(s: &str) -> MachineId {
    MachineId::new(s).unwrap()
}

/// Attacker: a second host holding the (multi-use) bootstrap token, naming a machine
/// that is already registered. It must get nothing, and the token use is not consumed.
#[tokio::test]
async fn a_second_host_with_the_token_cannot_register_an_existing_machine() {
    let server = Server::new();
    let hash = server.ca.hash();
    let token = server.token(2);
    let (owner_dir, attacker_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (owner, served) =
        attempt(&server, "localhost", &token, &hash, "db1", owner_dir.path()).await;
    let owner = owner.unwrap();
    served.unwrap();

    let (agent, served) = attempt(
        &server,
        "localhost",
        &token,
        &hash,
        "db1",
        attacker_dir.path(),
    )
    .await;
    assert!(
        matches!(
            agent,
            Err(RegisterError::Rejected(
                RejectReason::MachineAlreadyRegistered
            ))
        ),
        "{agent:?}"
    );
    assert!(
        matches!(
            served,
            Err(ServeError::Machine(MachineError::AlreadyRegistered(_)))
        ),
        "{served:?}"
    );
    assert_no_identity(attacker_dir.path());
    assert_eq!(
        server.uses(&token),
        Some(1),
        "a refused request consumes no use"
    );
    server
        .machines
        .check_current(&mid("db1"), owner.cert())
        .expect("the owner's certificate stays current");

    // The attacker also holds a certificate of another machine (its own): presenting it
    // does not prove it is db1.
    let (other, _) = attempt(
        &server,
        "localhost",
        &token,
        &hash,
        "web1",
        attacker_dir.path(),
    )
    .await;
    let other = other.unwrap();
    let stolen_dir = tempfile::tempdir().unwrap();
    let both = Credentials {
        token: Some(&token),
        current: Some(&other),
    };
    let (agent, _) =
        attempt_with(&server, "localhost", both, &hash, "db1", stolen_dir.path()).await;
    assert!(
        matches!(
            agent,
            Err(RegisterError::Rejected(
                RejectReason::MachineAlreadyRegistered
            ))
        ),
        "{agent:?}"
    );
    server
        .machines
        .check_current(&mid("db1"), owner.cert())
        .unwrap();
}

/// The machine itself renews with its current key (no token); its previous certificate
/// is superseded at once. Attacker: whoever kept a copy of that previous certificate and
/// key (an old backup): it can neither renew nor is it current.
#[tokio::test]
async fn the_owner_renews_with_its_key_and_a_copy_of_the_old_certificate_is_worthless() {
    let server = Server::new();
    let hash = server.ca.hash();
    let token = server.token(1);
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = attempt(&server, "localhost", &token, &hash, "db1", dir.path()).await;
    let first = first.unwrap();
    let backup = tempfile::tempdir().unwrap();
    first.save(backup.path()).unwrap();

    let renew = Credentials {
        token: None,
        current: Some(&first),
    };
    let (second, served) =
        attempt_with(&server, "localhost", renew, &hash, "db1", dir.path()).await;
    let second = second.unwrap();
    assert_eq!(served.unwrap().token_id, None, "a renewal needs no token");
    assert_ne!(first.cert(), second.cert());
    assert_eq!(Identity::load(dir.path()).unwrap().cert(), second.cert());
    server
        .machines
        .check_current(&mid("db1"), second.cert())
        .unwrap();
    assert!(matches!(
        server.machines.check_current(&mid("db1"), first.cert()),
        Err(MachineError::Superseded(_))
    ));

    let old = Identity::load(backup.path()).unwrap();
    let replay = Credentials {
        token: None,
        current: Some(&old),
    };
    let stolen_dir = tempfile::tempdir().unwrap();
    let (agent, served) = attempt_with(
        &server,
        "localhost",
        replay,
        &hash,
        "db1",
        stolen_dir.path(),
    )
    .await;
    assert!(
        matches!(
            agent,
            Err(RegisterError::Rejected(RejectReason::RenewalRefused))
        ),
        "{agent:?}"
    );
    assert!(
        matches!(
            served,
            Err(ServeError::Machine(MachineError::Superseded(_)))
        ),
        "{served:?}"
    );
    // A renewal without any certificate is refused too.
    let none = Credentials::default();
    let r = ripcord_transport::register(
        server.reg_addr(),
        "localhost",
        &hash,
        &mid("db1"),
        none,
        stolen_dir.path(),
    )
    .await;
    assert!(matches!(r, Err(RegisterError::NoCredentials)), "{r:?}");
    server
        .machines
        .check_current(&mid("db1"), second.cert())
        .unwrap();
}

/// The operator removes a machine (`ripcord-ps machines remove`, another handle on the
/// same files): its certificate can no longer renew; a fresh token registers the id anew.
#[tokio::test]
async fn a_removed_machine_cannot_renew_and_registers_again_only_with_a_new_token() {
    let server = Server::new();
    let hash = server.ca.hash();
    let dir = tempfile::tempdir().unwrap();
    let (id, _) = attempt(
        &server,
        "localhost",
        &server.token(1),
        &hash,
        "db1",
        dir.path(),
    )
    .await;
    let id = id.unwrap();
    let operator = MachineStore::open(server.tokens.path().parent().unwrap()).unwrap();
    assert!(operator.remove(&mid("db1")).unwrap());

    let renew = Credentials {
        token: None,
        current: Some(&id),
    };
    let (agent, served) = attempt_with(&server, "localhost", renew, &hash, "db1", dir.path()).await;
    assert!(
        matches!(
            agent,
            Err(RegisterError::Rejected(RejectReason::RenewalRefused))
        ),
        "{agent:?}"
    );
    assert!(
        matches!(
            served,
            Err(ServeError::Machine(MachineError::NotRegistered(_)))
        ),
        "{served:?}"
    );
    // The single-use token of the first registration is spent; a new one works.
    let fresh = server.token(1);
    let (again, _) = attempt(&server, "localhost", &fresh, &hash, "db1", dir.path()).await;
    server
        .machines
        .check_current(&mid("db1"), again.unwrap().cert())
        .unwrap();
    let tokens = TokenStore::load(server.tokens.path().parent().unwrap()).unwrap();
    assert!(
        tokens.verify(&fresh, SystemTime::now()).is_err(),
        "single use"
    );
}

/// Attacker: someone holding a copy of a machine's key and an expired certificate (an old
/// backup). The data endpoint refuses it at the handshake and says why; the identity
/// knows it is expired, so an agent never presents it.
#[tokio::test]
async fn an_expired_certificate_is_refused_at_the_handshake() {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let server = Server::new();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let cert = server
        .ca
        .issue_client(&mid("db1"), csr.der(), std::time::Duration::ZERO)
        .unwrap();
    let expired = Identity::new(
        cert,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        server.ca.cert_der().clone(),
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(expired.expired());

    let data = ripcord_transport::endpoint::server_endpoint(localhost(), &server.identity).unwrap();
    let addr = data.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let incoming = data.accept().await.expect("endpoint closed");
        incoming.await.map(|_| ()).map_err(|e| e.to_string())
    });
    let client = ripcord_transport::endpoint::client_endpoint(&expired).unwrap();
    // The client may finish its side of the handshake before the server has checked its
    // certificate: either the connection fails, or the server closes it.
    let agent = async {
        match ripcord_transport::endpoint::connect(&client, addr, "localhost").await {
            Ok(conn) => conn.closed().await.to_string(),
            Err(e) => e.to_string(),
        }
    };
    let agent = tokio::time::timeout(T, agent)
        .await
        .expect("the connection of an expired certificate stayed open");
    assert!(!agent.is_empty());
    let served = tokio::time::timeout(T, accept).await.unwrap().unwrap();
    let err = served.expect_err("the server accepted an expired certificate");
    assert!(
        err.to_lowercase().contains("expired"),
        "server error does not say why: {err}"
    );
}
