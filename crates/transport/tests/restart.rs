//! A process server killed with `kill -9` and started again on the same address: its
//! agents learn at once that their connection is gone (a stateless reset the restarted
//! server can sign because its reset key comes from its private key), instead of waiting
//! for the idle timeout. Real QUIC on 127.0.0.1; the "kill" drops the server's runtime
//! without letting it send a CONNECTION_CLOSE, as a killed process would.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ripcord_transport::endpoint;
use ripcord_transport::pki::{Identity, ServerIdentity};

mod common;

use common::*;

/// A data-path server on its own thread and runtime, holding every connection it accepts
/// until it is killed.
struct RunningServer {
    addr: SocketAddr,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    fn start(identity: &ServerIdentity, addr: SocketAddr) -> RunningServer {
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let identity = identity.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let ep = endpoint::server_endpoint(addr, &identity).unwrap();
                bound_tx.send(ep.local_addr().unwrap()).unwrap();
                tokio::spawn(async move {
                    while let Some(incoming) = ep.accept().await {
                        if let Ok(conn) = incoming.await {
                            tokio::spawn(async move {
                                // Echo one stream, then hold the connection.
                                if let Ok((mut send, mut recv)) = conn.accept_bi().await
                                    && let Ok(data) = recv.read_to_end(1024).await
                                {
                                    let _ = send.write_all(&data).await;
                                    let _ = send.finish();
                                }
                                conn.closed().await
                            });
                        }
                    }
                });
                let _ = killed.await;
            });
            // Dropping the runtime drops every task unpolled: the socket closes and no
            // CONNECTION_CLOSE leaves, as when the process is killed.
            drop(rt);
        });
        RunningServer {
            addr: bound_rx.recv().unwrap(),
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects an agent, kills the server, starts `restarted` on the same address, and
/// returns how the agent's connection ended and after how long.
async fn connection_end_after_restart(
    server: &Server,
    agent: &Identity,
    restarted: &ServerIdentity,
) -> (quinn::ConnectionError, Duration) {
    let mut first = RunningServer::start(&server.identity, localhost());
    let addr = first.addr;
    let client = endpoint::client_endpoint(agent).unwrap();
    let conn = tokio::time::timeout(T, endpoint::connect(&client, addr, "localhost"))
        .await
        .unwrap()
        .unwrap();
    // The connection works before the kill, and a round trip has confirmed the handshake:
    // until the client has the server's HANDSHAKE_DONE it may still probe with long-header
    // (Handshake) packets, which no server can answer with a stateless reset. A replication
    // connection is long past that when a server dies.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    send.finish().unwrap();
    let echo = tokio::time::timeout(T, recv.read_to_end(1024))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echo, b"hello");
    tokio::task::block_in_place(|| first.kill());
    let second = RunningServer::start(restarted, addr);
    assert_eq!(second.addr, addr);
    let killed = Instant::now();
    let end = tokio::time::timeout(T, conn.closed()).await.unwrap();
    let after = killed.elapsed();
    tokio::task::block_in_place(|| drop(second));
    (end, after)
}

async fn registered_agent(server: &Server, dir: &std::path::Path) -> Identity {
    let token = server.token(1);
    let (agent, _) = attempt(
        server,
        "localhost",
        &token,
        &server.ca.hash(),
        "host-01.lab",
        dir,
    )
    .await;
    agent.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resets_its_forgotten_connections_at_once() {
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = registered_agent(&server, dir.path()).await;
    let (end, after) = connection_end_after_restart(&server, &agent, &server.identity).await;
    eprintln!("connection ended after {after:?}: {end}");
    assert!(
        matches!(end, quinn::ConnectionError::Reset),
        "the agent's connection to a restarted server ended with {end:?} after {after:?}, \
         not with a stateless reset"
    );
}

/// The control: a server with another key (same CA, new certificate and key) cannot
/// forge the reset; the agent's connection ends only at its idle timeout. This is also
/// what an attacker on the path without the server's key gets: nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_from_another_key_is_ignored() {
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = registered_agent(&server, dir.path()).await;
    let other = server.ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    let (end, after) = connection_end_after_restart(&server, &agent, &other).await;
    assert!(
        matches!(end, quinn::ConnectionError::TimedOut),
        "a server with another key ended the connection with {end:?} after {after:?}"
    );
}
