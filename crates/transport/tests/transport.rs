//! End-to-end tests over real QUIC on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::Endpoint;
use ripcord_transport::pki::{self, Ca, Identity, MachineId, ServerIdentity, Token, TokenStore};
use ripcord_transport::register::{
    self, FrameError, MAX_MESSAGE_SIZE, RegisterError, RejectReason, ServeError,
};
use ripcord_transport::{TokenError, endpoint};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

mod common;

use common::*;

/// What a data-path server task observed.
#[derive(Debug, Default)]
struct Observed {
    handshake_failures: usize,
    connections: usize,
    bytes_received: usize,
    machine_ids: Vec<String>,
}

/// Accepts connections for `window`, echoing the first bidi stream of each.
fn run_data_server(ep: Endpoint, window: Duration) -> tokio::task::JoinHandle<Observed> {
    tokio::spawn(async move {
        let mut obs = Observed::default();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(incoming)) = tokio::time::timeout_at(deadline, ep.accept()).await {
            match incoming.await {
                Err(_) => obs.handshake_failures += 1,
                Ok(conn) => {
                    obs.connections += 1;
                    obs.machine_ids
                        .push(endpoint::peer_machine_id(&conn).unwrap().into_string());
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                        continue;
                    };
                    let data = recv.read_to_end(1 << 20).await.unwrap();
                    obs.bytes_received += data.len();
                    send.write_all(&data).await.unwrap();
                    send.finish().unwrap();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                    return obs;
                }
            }
        }
        obs
    })
}

#[tokio::test]
async fn register_then_mutual_tls_echo() {
    let server = Server::new();
    let token = server.token(1);
    let agent_dir = tempfile::tempdir().unwrap();
    let (agent, served) = attempt(
        &server,
        "localhost",
        &token,
        &server.ca.hash(),
        "host-01.lab",
        agent_dir.path(),
    )
    .await;
    let identity = agent.unwrap();
    let reg = served.unwrap();
    assert_eq!(identity.machine_id().as_str(), "host-01.lab");
    assert_eq!(reg.machine_id.as_str(), "host-01.lab");
    assert_eq!(reg.token_id.as_deref(), Some(token.id()));
    assert_eq!(&reg.certificate, identity.cert());
    assert_eq!(server.uses(&token), Some(1));

    // Stored identity: key 0600, reloadable, identical.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent_dir.path().join(pki::AGENT_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let reloaded = Identity::load(agent_dir.path()).unwrap();
    assert_eq!(reloaded.cert(), identity.cert());
    assert_eq!(reloaded.ca_cert(), server.ca.cert_der());

    // Data path with mutual TLS.
    let data_ep = endpoint::server_endpoint(localhost(), &server.identity).unwrap();
    let data_addr = data_ep.local_addr().unwrap();
    let observed = run_data_server(data_ep, T);
    let client = endpoint::client_endpoint(&reloaded).unwrap();
    let conn = tokio::time::timeout(T, endpoint::connect(&client, data_addr, "localhost"))
        .await
        .unwrap()
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    send.write_all(&payload).await.unwrap();
    send.finish().unwrap();
    let echoed = tokio::time::timeout(T, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, payload);
    conn.close(0u32.into(), b"bye");
    let obs = observed.await.unwrap();
    assert_eq!(obs.connections, 1);
    assert_eq!(obs.machine_ids, vec!["host-01.lab".to_owned()]);
    assert_eq!(obs.bytes_received, payload.len());

    // The token had a usage limit of 1: a second registration is refused.
    let dir2 = tempfile::tempdir().unwrap();
    let (agent, served) = attempt(
        &server,
        "localhost",
        &token,
        &server.ca.hash(),
        "host-02",
        dir2.path(),
    )
    .await;
    assert!(
        matches!(
            agent,
            Err(RegisterError::Rejected(RejectReason::TokenUsedUp))
        ),
        "{agent:?}"
    );
    assert!(matches!(served, Err(ServeError::Token(TokenError::UsedUp))));
    assert_no_identity(dir2.path());
    assert_eq!(server.uses(&token), Some(1));
}

#[tokio::test]
async fn wrong_ca_hash_refused_before_token_is_sent() {
    let server = Server::new();
    let token = server.token(10);
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::create(other_dir.path(), "other").unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let (agent, served) = attempt(
        &server,
        "localhost",
        &token,
        &other.hash(),
        "m1",
        agent_dir.path(),
    )
    .await;
    assert!(
        matches!(agent, Err(RegisterError::CaHashMismatch)),
        "{agent:?}"
    );
    // The server never got past the handshake: no request was read.
    assert!(
        matches!(served, Err(ServeError::Handshake(_))),
        "{served:?}"
    );
    assert_eq!(server.uses(&token), Some(0));
    assert_no_identity(agent_dir.path());

    // Malformed pin is refused locally.
    let r = register::register(
        server.reg_addr(),
        "localhost",
        "sha256:xyz",
        &MachineId::new("m1").unwrap(),
        by_token(&token),
        agent_dir.path(),
    )
    .await;
    assert!(matches!(r, Err(RegisterError::InvalidCaHash)));
}

#[tokio::test]
async fn pinned_ca_in_chain_but_forged_leaf_is_refused() {
    // An impostor sends the real (public) CA certificate in its chain, with a leaf
    // signed by its own CA. Matching the hash alone must not be enough.
    let real = Server::new();
    let token = real.token(10);
    let evil_dir = tempfile::tempdir().unwrap();
    let evil_ca = Ca::create(evil_dir.path(), "evil").unwrap();
    evil_ca
        .issue_server(&["localhost", "127.0.0.1"])
        .unwrap()
        .save(evil_dir.path())
        .unwrap();
    let evil = ServerIdentity::load(evil_dir.path()).unwrap();
    let chain = [evil.cert_chain()[0].as_ref(), real.ca.cert_der().as_ref()]
        .iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.to_vec())))
        .collect::<String>();
    std::fs::write(evil_dir.path().join(pki::SERVER_CERT_FILE), chain).unwrap();
    let forged = ServerIdentity::load(evil_dir.path()).unwrap();
    assert_eq!(forged.ca_cert(), real.ca.cert_der());
    let forged_ep = register::registration_endpoint(localhost(), &forged).unwrap();
    let addr = forged_ep.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let inc = forged_ep.accept().await.unwrap();
        // Count whether any request bytes ever arrive.
        match inc.await {
            Err(_) => 0usize,
            Ok(conn) => match conn.accept_bi().await {
                Ok((_, mut recv)) => recv.read_to_end(1 << 20).await.map_or(0, |d| d.len()),
                Err(_) => 0,
            },
        }
    });
    let agent_dir = tempfile::tempdir().unwrap();
    let r = tokio::time::timeout(
        T,
        register::register(
            addr,
            "localhost",
            &real.ca.hash(),
            &MachineId::new("m1").unwrap(),
            by_token(&token),
            agent_dir.path(),
        ),
    )
    .await
    .unwrap();
    assert!(
        matches!(r, Err(RegisterError::ServerCertificateInvalid(_))),
        "{r:?}"
    );
    assert_eq!(tokio::time::timeout(T, task).await.unwrap().unwrap(), 0);
    assert_no_identity(agent_dir.path());

    // Server name not in the real server's SANs: chain ok but name check fails.
    let (agent, _) = attempt(
        &real,
        "not-the-server.example",
        &token,
        &real.ca.hash(),
        "m1",
        agent_dir.path(),
    )
    .await;
    assert!(
        matches!(agent, Err(RegisterError::ServerCertificateInvalid(_))),
        "{agent:?}"
    );
    assert_eq!(real.uses(&token), Some(0));
}

#[tokio::test]
async fn bad_tokens_refused_with_specific_errors() {
    let server = Server::new();
    let hash = server.ca.hash();
    let dir = tempfile::tempdir().unwrap();

    // Unknown token.
    let unknown = Token::generate().unwrap();
    let (agent, served) = attempt(&server, "localhost", &unknown, &hash, "m1", dir.path()).await;
    assert!(
        matches!(
            agent,
            Err(RegisterError::Rejected(RejectReason::UnknownToken))
        ),
        "{agent:?}"
    );
    assert!(matches!(
        served,
        Err(ServeError::Token(TokenError::Unknown))
    ));
    assert_no_identity(dir.path());

    // Known id, wrong secret.
    let good = server.token(10);
    let wrong = Token::parse(&format!("{}.{}", good.id(), "zzzzzzzzzzzzzzzz")).unwrap();
    let (agent, served) = attempt(&server, "localhost", &wrong, &hash, "m1", dir.path()).await;
    assert!(matches!(
        agent,
        Err(RegisterError::Rejected(RejectReason::UnknownToken))
    ));
    assert!(matches!(
        served,
        Err(ServeError::Token(TokenError::Unknown))
    ));
    assert_eq!(server.uses(&good), Some(0));
    assert_no_identity(dir.path());

    // Expired token.
    let expired = Token::generate().unwrap();
    server
        .tokens
        .insert(&expired, SystemTime::now() - Duration::from_secs(1), 10)
        .unwrap();
    let (agent, served) = attempt(&server, "localhost", &expired, &hash, "m1", dir.path()).await;
    assert!(
        matches!(
            agent,
            Err(RegisterError::Rejected(RejectReason::TokenExpired))
        ),
        "{agent:?}"
    );
    assert!(matches!(
        served,
        Err(ServeError::Token(TokenError::Expired))
    ));
    assert_eq!(server.uses(&expired), Some(0));
    assert_no_identity(dir.path());

    // Used-up token.
    let used = server.token(1);
    server.tokens.redeem(&used, SystemTime::now()).unwrap();
    let (agent, served) = attempt(&server, "localhost", &used, &hash, "m1", dir.path()).await;
    assert!(matches!(
        agent,
        Err(RegisterError::Rejected(RejectReason::TokenUsedUp))
    ));
    assert!(matches!(served, Err(ServeError::Token(TokenError::UsedUp))));
    assert_no_identity(dir.path());

    // Token state survives a reload of the store.
    let reloaded = TokenStore::load(server.tokens.path().parent().unwrap()).unwrap();
    assert_eq!(reloaded.uses(good.id()).unwrap(), Some(0));
}

/// Sends a raw registration body (or just a header) and returns the raw response bytes.
async fn raw_exchange(server: &Server, bytes: Vec<u8>, finish: bool) -> Vec<u8> {
    let (_ep, conn) =
        register::connect_registration(server.reg_addr(), "localhost", &server.ca.hash(), None)
            .await
            .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let resp = tokio::time::timeout(T, recv.read_to_end(MAX_MESSAGE_SIZE + 4))
        .await
        .unwrap()
        .unwrap();
    conn.close(0u32.into(), b"");
    resp
}

fn raw_request(token: &str, machine: &[u8], csr: &[u8]) -> Vec<u8> {
    let mut body = vec![0x01];
    for f in [token.as_bytes(), machine, csr] {
        body.extend_from_slice(&(f.len() as u32).to_be_bytes());
        body.extend_from_slice(f);
    }
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

fn csr_der() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

#[tokio::test]
async fn invalid_machine_ids_rejected() {
    for bad in ["", "a/b", "../../etc", "with space", &"x".repeat(65), "é"] {
        assert!(MachineId::new(bad).is_err(), "{bad:?}");
    }
    // A hand-crafted request with an invalid id is refused by the server, token untouched.
    let server = Server::new();
    let token = server.token(10);
    for bad in [&b"../etc"[..], b"", &[b'a'; 65][..], b"\xff\xfe"] {
        let task = server.serve_one();
        let resp = raw_exchange(
            &server,
            raw_request(&token.to_string(), bad, &csr_der()),
            true,
        )
        .await;
        assert_eq!(resp, [0, 0, 0, 2, 0x03, 7], "reply for {bad:?}");
        let served = tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert!(
            matches!(served, Err(ServeError::InvalidMachineId(_))),
            "{served:?}"
        );
    }
    // A garbage CSR is refused too, and consumes no token use.
    let task = server.serve_one();
    let resp = raw_exchange(
        &server,
        raw_request(&token.to_string(), b"ok-id", b"not a csr"),
        true,
    )
    .await;
    assert_eq!(resp, [0, 0, 0, 2, 0x03, 8]);
    let served = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert!(matches!(served, Err(ServeError::Pki(_))), "{served:?}");
    assert_eq!(server.uses(&token), Some(0));
}

#[tokio::test]
async fn oversize_registration_message_rejected_before_allocation() {
    let server = Server::new();
    let token = server.token(10);
    // Announce a 1 GiB body but send only the 4-byte header and keep the stream open: the
    // server must refuse from the header alone (it cannot have waited for/allocated a body).
    let task = server.serve_one();
    let resp = raw_exchange(&server, (1u32 << 30).to_be_bytes().to_vec(), false).await;
    assert_eq!(resp, [0, 0, 0, 2, 0x03, 2]);
    let served = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert!(
        matches!(
            served,
            Err(ServeError::Frame(FrameError::TooLarge { len, .. })) if len == 1 << 30
        ),
        "{served:?}"
    );
    // One byte over the limit is refused as well.
    let task = server.serve_one();
    let resp = raw_exchange(
        &server,
        ((MAX_MESSAGE_SIZE + 1) as u32).to_be_bytes().to_vec(),
        false,
    )
    .await;
    assert_eq!(resp, [0, 0, 0, 2, 0x03, 2]);
    assert!(matches!(
        tokio::time::timeout(T, task).await.unwrap().unwrap(),
        Err(ServeError::Frame(FrameError::TooLarge { .. }))
    ));
    // A truncated body is a malformed request.
    let task = server.serve_one();
    let mut frame = raw_request(&token.to_string(), b"m1", &csr_der());
    frame.truncate(frame.len() - 3);
    let resp = raw_exchange(&server, frame, true).await;
    assert_eq!(resp, [0, 0, 0, 2, 0x03, 1]);
    assert!(matches!(
        tokio::time::timeout(T, task).await.unwrap().unwrap(),
        Err(ServeError::Frame(FrameError::Read(_)))
    ));
    assert_eq!(server.uses(&token), Some(0));
}

/// Tries to talk to the data endpoint with `tls`; returns whether the client saw failure.
async fn try_unauthenticated(tls: rustls::ClientConfig, addr: SocketAddr) -> bool {
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = Endpoint::client(localhost()).unwrap();
    let conn = match ep.connect_with(cfg, addr, "localhost").unwrap().await {
        Err(_) => return true,
        Ok(c) => c,
    };
    // TLS 1.3: the client may think it is connected before the server checks its cert.
    let r = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"unauthenticated payload").await?;
        send.finish()?;
        recv.read_to_end(1024).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    tokio::time::timeout(T, r).await.unwrap().is_err()
}

fn base_client_tls(
    ca: &CertificateDer<'static>,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
}

#[tokio::test]
async fn data_endpoint_refuses_client_without_certificate() {
    let server = Server::new();
    let ep = endpoint::server_endpoint(localhost(), &server.identity).unwrap();
    let addr = ep.local_addr().unwrap();
    let observed = run_data_server(ep, Duration::from_secs(4));
    let mut tls = base_client_tls(server.ca.cert_der()).with_no_client_auth();
    tls.alpn_protocols = vec![endpoint::DATA_ALPN.to_vec()];
    assert!(
        try_unauthenticated(tls, addr).await,
        "client must see a failure"
    );
    let obs = observed.await.unwrap();
    assert_eq!(obs.handshake_failures, 1, "{obs:?}");
    assert_eq!(obs.connections, 0, "{obs:?}");
    assert_eq!(obs.bytes_received, 0);
}

#[tokio::test]
async fn data_endpoint_refuses_client_cert_from_other_ca() {
    let server = Server::new();
    let ep = endpoint::server_endpoint(localhost(), &server.identity).unwrap();
    let addr = ep.local_addr().unwrap();
    let observed = run_data_server(ep, Duration::from_secs(4));

    // A self-made CA issues a perfectly formed client cert for a real-looking machine id.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::create(other_dir.path(), "self-made").unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let cert = other
        .issue_client(
            &MachineId::new("victim").unwrap(),
            csr.der(),
            ripcord_transport::pki::LEAF_VALIDITY,
        )
        .unwrap();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Trust the real CA for the server so only the client side is wrong.
    let forged = Identity::new(
        cert.clone(),
        key_der.clone_key(),
        server.ca.cert_der().clone(),
    )
    .unwrap();
    let client = endpoint::client_endpoint(&forged).unwrap();
    let r = tokio::time::timeout(T, async {
        let conn = endpoint::connect(&client, addr, "localhost").await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(endpoint::EndpointError::Handshake)?;
        let _ = send.write_all(b"forged write").await;
        let _ = send.finish();
        recv.read_to_end(1024)
            .await
            .map_err(|_| endpoint::EndpointError::NoPeerCertificate)?;
        Ok::<_, endpoint::EndpointError>(())
    })
    .await
    .unwrap();
    assert!(r.is_err(), "client with foreign cert must fail");

    // Also a raw rustls config presenting the foreign chain.
    let mut tls = base_client_tls(server.ca.cert_der())
        .with_client_auth_cert(vec![cert, other.cert_der().clone()], key_der)
        .unwrap();
    tls.alpn_protocols = vec![endpoint::DATA_ALPN.to_vec()];
    assert!(try_unauthenticated(tls, addr).await);

    let obs = observed.await.unwrap();
    assert_eq!(obs.handshake_failures, 2, "{obs:?}");
    assert_eq!(obs.connections, 0, "{obs:?}");
    assert_eq!(obs.bytes_received, 0);
}
