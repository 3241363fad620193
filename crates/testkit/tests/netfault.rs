//! The fault proxy against a UDP echo server: each fault does what it says and is counted.
//! Unprivileged (loopback UDP only).

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ripcord_testkit::{FaultConfig, FaultProxy, Faults, Flap};

/// A UDP echo server on 127.0.0.1 until dropped.
struct Echo {
    socket: Arc<UdpSocket>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&socket), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        Echo {
            socket,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// An echo server, a proxy in front of it with `config`, and a client socket.
fn setup(config: FaultConfig) -> (Echo, FaultProxy, UdpSocket) {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.socket.local_addr().unwrap(), config, 1).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(proxy.addr()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    (echo, proxy, client)
}

/// Send `n` numbered datagrams of 100 bytes; return what came back, in order.
fn exchange(client: &UdpSocket, n: u32) -> Vec<Vec<u8>> {
    for i in 0..n {
        let mut d = vec![0u8; 100];
        d[..4].copy_from_slice(&i.to_le_bytes());
        client.send(&d).unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(len) = client.recv(&mut buf) {
        got.push(buf[..len].to_vec());
    }
    got
}

fn numbers(got: &[Vec<u8>]) -> Vec<u32> {
    got.iter()
        .map(|d| u32::from_le_bytes(d[..4].try_into().unwrap()))
        .collect()
}

fn to_server(f: Faults) -> FaultConfig {
    FaultConfig {
        to_server: f,
        ..FaultConfig::default()
    }
}

#[test]
fn forwards_both_ways_in_order_and_counts() {
    let (_echo, proxy, client) = setup(FaultConfig::default());
    let got = exchange(&client, 50);
    assert_eq!(numbers(&got), (0..50).collect::<Vec<_>>());
    let c = proxy.counts();
    assert_eq!((c.from_clients, c.from_server, c.forwarded), (50, 50, 100));
    assert_eq!(c.clients, 1);
    assert_eq!(
        c.dropped + c.duplicated + c.reordered + c.corrupted + c.partitioned,
        0
    );
}

#[test]
fn drops_duplicates_and_corrupts() {
    let (_echo, proxy, client) = setup(to_server(Faults {
        drop: 1.0,
        ..Faults::default()
    }));
    assert!(exchange(&client, 20).is_empty());
    assert_eq!(proxy.counts().dropped, 20);

    proxy.set(to_server(Faults {
        duplicate: 1.0,
        ..Faults::default()
    }));
    assert_eq!(exchange(&client, 10).len(), 20);
    assert_eq!(proxy.counts().duplicated, 10);

    proxy.set(FaultConfig::both(Faults {
        corrupt: 1.0,
        ..Faults::default()
    }));
    let mut d = vec![0u8; 100];
    client.send(&d).unwrap();
    let len = client.recv(&mut d).unwrap();
    // One bit flipped each way: two bits differ, or none if the same bit was hit twice.
    let flipped: u32 = d[..len].iter().map(|b| b.count_ones()).sum();
    assert!(flipped == 2 || flipped == 0, "{flipped} bits differ");
    assert_eq!(proxy.counts().corrupted, 2);
}

#[test]
fn reorders_by_holding_one_back() {
    let (_echo, proxy, client) = setup(to_server(Faults {
        reorder: 1.0,
        ..Faults::default()
    }));
    let got = numbers(&exchange(&client, 6));
    assert_eq!(got, [1, 0, 3, 2, 5, 4]);
    assert_eq!(proxy.counts().reordered, 3);
    // A held datagram with no successor goes out by itself.
    assert_eq!(numbers(&exchange(&client, 1)), [0]);
}

#[test]
fn delays_without_reordering() {
    let (_echo, proxy, client) = setup(FaultConfig::both(Faults {
        delay: Duration::from_millis(40),
        jitter: Duration::from_millis(20),
        ..Faults::default()
    }));
    let t = Instant::now();
    let got = exchange(&client, 30);
    assert!(t.elapsed() >= Duration::from_millis(80));
    assert_eq!(numbers(&got), (0..30).collect::<Vec<_>>());
    assert_eq!(proxy.counts().delayed, 60);
}

#[test]
fn partitions_heal_and_flaps_alternate() {
    let (_echo, proxy, client) = setup(FaultConfig::default());
    proxy.partition(true);
    assert!(exchange(&client, 5).is_empty());
    proxy.partition(false);
    assert_eq!(exchange(&client, 5).len(), 5);
    proxy.partition_for(Duration::from_millis(200));
    assert!(exchange(&client, 5).is_empty());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        exchange(&client, 5).len(),
        5,
        "the partition did not heal by itself"
    );
    assert_eq!(proxy.counts().partitioned, 10);

    proxy.set(FaultConfig {
        flap: Some(Flap {
            up: Duration::from_millis(100),
            down: Duration::from_millis(100),
        }),
        ..FaultConfig::default()
    });
    let before = proxy.counts();
    let mut got = 0;
    for _ in 0..20 {
        client.send(&[0u8; 10]).unwrap();
        let mut buf = [0u8; 64];
        client
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        got += usize::from(client.recv(&mut buf).is_ok());
        std::thread::sleep(Duration::from_millis(20));
    }
    let dropped = proxy.counts().partitioned - before.partitioned;
    assert!(
        got > 0 && dropped > 0,
        "flap: {got} answered, {dropped} dropped"
    );
}

#[test]
fn drop_stops_every_thread_promptly() {
    let (_echo, proxy, client) = setup(FaultConfig::default());
    let addr = proxy.addr();
    assert_eq!(exchange(&client, 3).len(), 3);
    let t = Instant::now();
    drop(proxy);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        t.elapsed()
    );
    // The port is free again: nothing holds the socket.
    UdpSocket::bind(addr).unwrap();
}

#[test]
fn rebind_moves_a_client_to_a_new_source_address() {
    // A server that answers each datagram with the address it came from.
    let server = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (Arc::clone(&server), Arc::clone(&stop));
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !st.load(Ordering::Relaxed) {
            if let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(from.to_string().as_bytes(), from);
            }
        }
    });
    let proxy = FaultProxy::start(server.local_addr().unwrap(), FaultConfig::default(), 3).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(proxy.addr()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let seen = |client: &UdpSocket| {
        client.send(b"who am i").unwrap();
        let mut buf = [0u8; 64];
        let n = client.recv(&mut buf).expect("an answer through the proxy");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = seen(&client);
    assert_eq!(seen(&client), first, "the address changed without a rebind");
    proxy.rebind();
    let second = seen(&client);
    assert_ne!(second, first, "the server still sees the old address");
    assert_eq!(seen(&client), second);
    let counts = proxy.counts();
    assert_eq!((counts.clients, counts.rebound), (1, 1), "{counts:?}");
    drop(proxy);
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
}
