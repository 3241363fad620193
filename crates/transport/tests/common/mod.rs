//! The registration server and agent helpers shared by the transport tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::Endpoint;
use ripcord_transport::pki::{
    self, Ca, Identity, MachineId, MachineStore, ServerIdentity, Token, TokenStore,
};
use ripcord_transport::register::{self, RegisterError, ServeError};
use tempfile::TempDir;

pub const T: Duration = Duration::from_secs(20);

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub struct Server {
    pub _dir: TempDir,
    pub ca: Arc<Ca>,
    pub identity: ServerIdentity,
    pub tokens: TokenStore,
    pub machines: MachineStore,
    pub reg: Endpoint,
}

pub const ESCROW_KEY: [u8; 32] = [0xe5; 32];

impl Server {
    pub fn new() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path(), "ripcord-test").unwrap();
        let identity = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        let tokens = TokenStore::create(dir.path()).unwrap();
        let machines = MachineStore::open(dir.path()).unwrap();
        let reg = register::registration_endpoint(localhost(), &identity).unwrap();
        Server {
            _dir: dir,
            ca: Arc::new(ca),
            identity,
            tokens,
            machines,
            reg,
        }
    }

    pub fn reg_addr(&self) -> SocketAddr {
        self.reg.local_addr().unwrap()
    }

    pub fn token(&self, limit: u32) -> Token {
        self.tokens
            .add(Duration::from_secs(3600), limit, SystemTime::now())
            .unwrap()
    }

    pub fn uses(&self, t: &Token) -> Option<u32> {
        self.tokens.uses(t.id()).unwrap()
    }

    /// Serves exactly one registration connection in the background.
    pub fn serve_one(&self) -> tokio::task::JoinHandle<Result<register::Registration, ServeError>> {
        let (ep, ca) = (self.reg.clone(), self.ca.clone());
        let (tokens, machines) = (self.tokens.clone(), self.machines.clone());
        tokio::spawn(async move {
            let incoming = ep.accept().await.expect("endpoint closed");
            let registrar = register::Registrar {
                ca: &ca,
                tokens: &tokens,
                machines: &machines,
                escrow_key: ESCROW_KEY,
                data_port: 9443,
                client_validity: pki::LEAF_VALIDITY,
                placement: None,
            };
            register::serve_registration(incoming, &registrar).await
        })
    }
}

pub fn by_token(token: &Token) -> register::Credentials<'_> {
    register::Credentials {
        token: Some(token),
        current: None,
    }
}

pub async fn attempt(
    server: &Server,
    server_name: &str,
    token: &Token,
    ca_hash: &str,
    machine: &str,
    state_dir: &Path,
) -> (
    Result<Identity, RegisterError>,
    Result<register::Registration, ServeError>,
) {
    attempt_with(
        server,
        server_name,
        by_token(token),
        ca_hash,
        machine,
        state_dir,
    )
    .await
}

/// One registration with any credentials (token, current identity or both).
pub async fn attempt_with(
    server: &Server,
    server_name: &str,
    credentials: register::Credentials<'_>,
    ca_hash: &str,
    machine: &str,
    state_dir: &Path,
) -> (
    Result<Identity, RegisterError>,
    Result<register::Registration, ServeError>,
) {
    let task = server.serve_one();
    let mid = MachineId::new(machine).unwrap();
    let agent = tokio::time::timeout(
        T,
        register::register(
            server.reg_addr(),
            server_name,
            ca_hash,
            &mid,
            credentials,
            state_dir,
        ),
    )
    .await
    .expect("agent timed out")
    .map(|registered| {
        assert_eq!(registered.escrow_key, ESCROW_KEY);
        assert_eq!(registered.data_port, 9443);
        registered.identity
    });
    let served = tokio::time::timeout(T, task)
        .await
        .expect("server timed out")
        .unwrap();
    (agent, served)
}

pub fn assert_no_identity(dir: &Path) {
    assert!(!dir.join(pki::AGENT_CERT_FILE).exists());
    assert!(!dir.join(pki::AGENT_KEY_FILE).exists());
    assert!(Identity::load(dir).is_err());
}
