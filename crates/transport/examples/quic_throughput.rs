//! Measures single-stream throughput of the mutual-TLS data path on loopback.
//!
//! Run: `cargo run --release --example quic_throughput [-- <MiB>]` (default 1024 MiB).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ripcord_transport::pki::{self, Ca, MachineId, MachineStore, TokenStore};
use ripcord_transport::{endpoint, register};

const CHUNK: usize = 1 << 20;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1024);
    let total = mib * (1 << 20);
    let dir = tempfile::tempdir()?;
    let agent_dir = tempfile::tempdir()?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;

    // Deployment + registration, exactly as in production.
    let ca = Arc::new(Ca::create(dir.path(), "bench")?);
    let server_id = ca.issue_server(&["localhost", "127.0.0.1"])?;
    let tokens = TokenStore::create(dir.path())?;
    let token = tokens.add(Duration::from_secs(60), 1, SystemTime::now())?;
    let machines = MachineStore::open(dir.path())?;
    let reg_ep = register::registration_endpoint(loopback, &server_id)?;
    let reg_addr = reg_ep.local_addr()?;
    let ca2 = ca.clone();
    let reg_task = tokio::spawn(async move {
        let inc = reg_ep
            .accept()
            .await
            .ok_or("registration endpoint closed")?;
        let registrar = register::Registrar {
            ca: &ca2,
            tokens: &tokens,
            machines: &machines,
            escrow_key: [0; 32],
            data_port: 0,
            client_validity: pki::LEAF_VALIDITY,
            placement: None,
        };
        register::serve_registration(inc, &registrar)
            .await
            .map_err(|e| e.to_string())
    });
    let identity = register::register(
        reg_addr,
        "localhost",
        &ca.hash(),
        &MachineId::new("bench-agent")?,
        register::Credentials {
            token: Some(&token),
            current: None,
        },
        agent_dir.path(),
    )
    .await?
    .identity;
    reg_task.await??;

    // Data path: server counts bytes on one uni stream.
    let server = endpoint::server_endpoint(loopback, &server_id)?;
    let addr = server.local_addr()?;
    let sink = tokio::spawn(async move {
        let conn = server.accept().await.ok_or("closed")?.await?;
        let who = endpoint::peer_machine_id(&conn)?;
        let mut recv = conn.accept_uni().await?;
        let mut n: u64 = 0;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            n += chunk.bytes.len() as u64;
        }
        conn.close(0u32.into(), b"done");
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((who, n))
    });

    let client = endpoint::client_endpoint(&identity)?;
    let conn = endpoint::connect(&client, addr, "localhost").await?;
    let mut send = conn.open_uni().await?;
    let buf = bytes_pattern();
    let start = Instant::now();
    let mut sent: u64 = 0;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        send.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    send.finish()?;
    let (who, received) = sink.await?.map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    client.wait_idle().await;
    assert_eq!(received, total);
    println!(
        "sent {} MiB over one mTLS QUIC stream (peer {who}) in {secs:.2} s: {:.0} MB/s ({:.0} MiB/s)",
        mib,
        total as f64 / secs / 1e6,
        total as f64 / secs / (1 << 20) as f64
    );
    Ok(())
}

fn bytes_pattern() -> Vec<u8> {
    (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect()
}
