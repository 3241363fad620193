//! A UDP proxy that injects network faults between QUIC peers (issue 17): the agent talks
//! to the proxy instead of the process server's data endpoint, and the proxy drops,
//! duplicates, reorders, delays and corrupts datagrams, partitions the link and flaps it.
//!
//! What it guarantees:
//! - It listens on `127.0.0.1:<ephemeral>` ([`FaultProxy::addr`]; [`FaultProxy::start_on`]
//!   picks another address) and forwards every
//!   datagram of each client (told apart by source address) to the one upstream address
//!   from a socket of that client's own, and the upstream's answers back to the client.
//!   A reconnecting agent (new source port) is a new client.
//! - Faults are decided per datagram and per direction ([`FaultConfig::to_server`],
//!   [`FaultConfig::to_client`]) from one seeded ChaCha8 generator per direction, in this
//!   order: partition or flap (dropped), drop, corrupt (one random bit flipped), duplicate
//!   (sent twice), reorder (held back and sent right after the next datagram of that
//!   direction, or after 100 ms if none comes). Delay is `delay` plus a uniform jitter in
//!   `0..=jitter`; jitter alone never reorders (a datagram never overtakes an earlier one
//!   of its direction): reordering is only what the reorder rate asks for.
//! - Every fault injected is counted ([`FaultCounts`], readable at any time with
//!   [`FaultProxy::counts`]), so a test can assert that the faults really happened.
//! - The configuration can be changed while it runs ([`FaultProxy::set`],
//!   [`FaultProxy::partition`], [`FaultProxy::partition_for`]); it applies to the next
//!   datagram.
//! - Dropping the proxy stops it and joins all its threads (within about 50 ms).
//!   Datagrams still queued are discarded.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rand::{RngExt as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// A reordered datagram waits at most this long for a successor.
const HOLD_MAX: Duration = Duration::from_millis(100);

/// Faults of one direction. Rates are probabilities per datagram (0.0..=1.0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    pub drop: f64,
    pub duplicate: f64,
    pub reorder: f64,
    pub corrupt: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter`.
    pub jitter: Duration,
}

/// Alternate between connected (`up`) and partitioned (`down`), starting connected when
/// the configuration is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flap {
    pub up: Duration,
    pub down: Duration,
}

/// What the proxy does; [`FaultConfig::default`] forwards everything untouched.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultConfig {
    /// Client to upstream.
    pub to_server: Faults,
    /// Upstream to client.
    pub to_client: Faults,
    pub flap: Option<Flap>,
}

impl FaultConfig {
    /// The same faults in both directions.
    pub fn both(f: Faults) -> FaultConfig {
        FaultConfig {
            to_server: f,
            to_client: f,
            flap: None,
        }
    }
}

/// Datagrams seen and faults injected so far, both directions together unless named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Datagrams received from clients.
    pub from_clients: u64,
    /// Datagrams received from upstream.
    pub from_server: u64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Datagrams sent later than received (delay or jitter > 0).
    pub delayed: u64,
    pub corrupted: u64,
    /// Dropped because the link was partitioned (by [`FaultProxy::partition`] or a flap).
    pub partitioned: u64,
    /// Distinct client addresses seen.
    pub clients: u64,
    /// Clients moved to a new upstream source address by [`FaultProxy::rebind`].
    pub rebound: u64,
}

/// Where a datagram goes: out of `socket`, to `to` (None: the socket is connected).
#[derive(Clone)]
struct Dest {
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
}

/// Per-direction state: its generator, its queue of `(due, where, datagram)` (FIFO: dues
/// never decrease) and the datagram held back for reordering (with when it was held).
struct Lane {
    rng: ChaCha8Rng,
    last_due: Instant,
    queue: VecDeque<(Instant, Dest, Vec<u8>)>,
    held: Option<(Instant, Dest, Vec<u8>)>,
}

impl Lane {
    /// Queue at `due`, or at the last due time if later (nothing overtakes).
    fn push(&mut self, due: Instant, dest: Dest, bytes: Vec<u8>) {
        self.last_due = self.last_due.max(due);
        self.queue.push_back((self.last_due, dest, bytes));
    }
}

struct State {
    config: FaultConfig,
    flap_since: Instant,
    partitioned: bool,
    partition_until: Option<Instant>,
    lanes: [Lane; 2],
    counts: FaultCounts,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    wake: Condvar,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Bumped by [`FaultProxy::rebind`]: clients of an older generation move to a new
    /// upstream socket at their next datagram.
    generation: std::sync::atomic::AtomicU64,
}

const TO_SERVER: usize = 0;
const TO_CLIENT: usize = 1;

/// The running proxy; stopped and joined on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Start forwarding to `upstream` with `config`, faults drawn from `seed`.
    pub fn start(upstream: SocketAddr, config: FaultConfig, seed: u64) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, upstream, config, seed)
    }

    /// Like [`FaultProxy::start`], listening on `listen` (for clients in another network
    /// namespace: the host side of its veth pair).
    pub fn start_on(
        listen: SocketAddr,
        upstream: SocketAddr,
        config: FaultConfig,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let front = Arc::new(
            UdpSocket::bind(listen).with_context(|| format!("binding the proxy on {listen}"))?,
        );
        front.set_read_timeout(Some(POLL))?;
        let addr = front.local_addr()?;
        let now = Instant::now();
        let lane = |n: u64| Lane {
            rng: ChaCha8Rng::seed_from_u64(seed.wrapping_mul(2).wrapping_add(n)),
            last_due: now,
            queue: VecDeque::new(),
            held: None,
        };
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                config,
                flap_since: now,
                partitioned: false,
                partition_until: None,
                lanes: [lane(0), lane(1)],
                counts: FaultCounts::default(),
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
        // Made first: if a thread cannot start, dropping it stops those that did.
        let proxy = FaultProxy { addr, shared };
        let s = Arc::clone(&proxy.shared);
        let deliver = std::thread::Builder::new()
            .name("netfault-deliver".into())
            .spawn(move || s.deliver())?;
        proxy.shared.threads.lock().expect("threads").push(deliver);
        let s = Arc::clone(&proxy.shared);
        let accept = std::thread::Builder::new()
            .name("netfault-front".into())
            .spawn(move || s.front(&front))?;
        proxy.shared.threads.lock().expect("threads").push(accept);
        Ok(proxy)
    }

    /// The address clients send to (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replace the configuration (a new flap starts connected, now).
    pub fn set(&self, config: FaultConfig) {
        let mut st = self.shared.state();
        if config.flap != st.config.flap {
            st.flap_since = Instant::now();
        }
        st.config = config;
    }

    /// The current configuration.
    pub fn config(&self) -> FaultConfig {
        self.shared.state().config
    }

    /// Partition the link (drop everything both ways) until healed with `partition(false)`.
    pub fn partition(&self, on: bool) {
        let mut st = self.shared.state();
        st.partitioned = on;
        st.partition_until = None;
    }

    /// Partition the link for `d`, then heal by itself.
    pub fn partition_for(&self, d: Duration) {
        let mut st = self.shared.state();
        st.partitioned = false;
        st.partition_until = Some(Instant::now() + d);
    }

    /// The client's address changes, as the upstream sees it: each client's next datagram
    /// leaves from a new source port (a new socket), as after a NAT rebinding or a change of
    /// the client's address. QUIC connections should migrate to the new path; answers still
    /// reach the client. Counted in [`FaultCounts::rebound`].
    pub fn rebind(&self) {
        self.shared.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything counted so far.
    pub fn counts(&self) -> FaultCounts {
        self.shared.state().counts
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        // Client threads are added by the front thread: join until none is left.
        loop {
            let threads = std::mem::take(&mut *self.shared.threads.lock().expect("threads"));
            if threads.is_empty() {
                break;
            }
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("proxy state")
    }

    /// Receives from clients; makes each new client its upstream socket and thread.
    fn front(self: Arc<Self>, front: &Arc<UdpSocket>) {
        let mut clients: HashMap<SocketAddr, (u64, Dest)> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        while !self.stopped() {
            let Ok((n, from)) = front.recv_from(&mut buf) else {
                continue; // timeout (or a transient error): look at the stop flag
            };
            let generation = self.generation.load(Ordering::Relaxed);
            let dest = match clients.entry(from) {
                Entry::Occupied(e) if e.get().0 == generation => e.get().1.clone(),
                entry => {
                    let rebound = matches!(entry, Entry::Occupied(_));
                    match self.client(front, from) {
                        Ok(dest) => {
                            let counts = &mut self.state().counts;
                            if rebound {
                                counts.rebound += 1;
                            } else {
                                counts.clients += 1;
                            }
                            entry.insert_entry((generation, dest)).get().1.clone()
                        }
                        Err(e) => {
                            eprintln!("netfault: cannot serve client {from}: {e:#}");
                            continue;
                        }
                    }
                }
            };
            self.route(TO_SERVER, dest, &buf[..n]);
        }
    }

    /// A socket connected to upstream for client `from`, and the thread relaying answers.
    fn client(self: &Arc<Self>, front: &Arc<UdpSocket>, from: SocketAddr) -> anyhow::Result<Dest> {
        let up = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        up.connect(self.upstream)?;
        up.set_read_timeout(Some(POLL))?;
        let back = Dest {
            socket: Arc::clone(front),
            to: Some(from),
        };
        let (s, sock) = (Arc::clone(self), Arc::clone(&up));
        let t = std::thread::Builder::new()
            .name(format!("netfault-{}", from.port()))
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !s.stopped() {
                    // Timeouts, and ECONNREFUSED while the server is down: keep going.
                    if let Ok(n) = sock.recv(&mut buf) {
                        s.route(TO_CLIENT, back.clone(), &buf[..n]);
                    }
                }
            })?;
        self.threads.lock().expect("threads").push(t);
        Ok(Dest {
            socket: up,
            to: None,
        })
    }

    /// Decide the faults for one datagram of `lane` and queue what is to be sent.
    fn route(&self, lane: usize, dest: Dest, bytes: &[u8]) {
        let now = Instant::now();
        let mut guard = self.state();
        let st = &mut *guard;
        let c = &mut st.counts;
        if lane == TO_SERVER {
            c.from_clients += 1;
        } else {
            c.from_server += 1;
        }
        if st.partition_until.is_some_and(|t| now >= t) {
            st.partition_until = None;
        }
        let flap_down = st.config.flap.is_some_and(|f| {
            let period = (f.up + f.down).as_nanos().max(1);
            (now - st.flap_since).as_nanos() % period >= f.up.as_nanos()
        });
        if st.partitioned || st.partition_until.is_some() || flap_down {
            c.partitioned += 1;
            return;
        }
        let f = if lane == TO_SERVER {
            st.config.to_server
        } else {
            st.config.to_client
        };
        let l = &mut st.lanes[lane];
        let mut hit = |p: f64| l.rng.random_bool(p.clamp(0.0, 1.0));
        if hit(f.drop) {
            c.dropped += 1;
            return;
        }
        let mut bytes = bytes.to_vec();
        if hit(f.corrupt) && !bytes.is_empty() {
            let bit = l.rng.random_range(0..bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            c.corrupted += 1;
        }
        let duplicate = l.rng.random_bool(f.duplicate.clamp(0.0, 1.0));
        c.duplicated += u64::from(duplicate);
        let jitter = f.jitter.as_nanos() as u64;
        let jitter = if jitter > 0 {
            l.rng.random_range(0..=jitter)
        } else {
            0
        };
        let due = now + f.delay + Duration::from_nanos(jitter);
        if due.max(l.last_due) > now {
            c.delayed += 1;
        }
        let held = l.held.take();
        if held.is_none() && l.rng.random_bool(f.reorder.clamp(0.0, 1.0)) {
            // Held back; its duplicate, if any, goes out in order.
            c.reordered += 1;
            if duplicate {
                l.push(due, dest.clone(), bytes.clone());
            }
            l.held = Some((now, dest, bytes));
        } else {
            if duplicate {
                l.push(due, dest.clone(), bytes.clone());
            }
            l.push(due, dest, bytes);
            if let Some((_, d, b)) = held {
                l.push(due, d, b);
            }
        }
        drop(guard);
        self.wake.notify_all();
    }

    /// Sends queued datagrams when due, and held ones that waited [`HOLD_MAX`].
    fn deliver(&self) {
        let mut st = self.state();
        while !self.stopped() {
            let now = Instant::now();
            let mut wait = POLL.min(HOLD_MAX / 4);
            let mut due = Vec::new();
            for l in &mut st.lanes {
                if l.held.as_ref().is_some_and(|h| now - h.0 >= HOLD_MAX) {
                    let (_, d, b) = l.held.take().expect("held");
                    l.push(now, d, b);
                }
                while let Some(q) = l.queue.front() {
                    if q.0 > now {
                        wait = wait.min(q.0 - now);
                        break;
                    }
                    due.extend(l.queue.pop_front());
                }
            }
            if due.is_empty() {
                st = self.wake.wait_timeout(st, wait).expect("proxy state").0;
                continue;
            }
            drop(st);
            let mut sent = 0;
            for (_, dest, bytes) in due {
                // A send error (the server is down: ECONNREFUSED) loses the datagram, as a
                // network would.
                let r = match dest.to {
                    Some(to) => dest.socket.send_to(&bytes, to),
                    None => dest.socket.send(&bytes),
                };
                sent += u64::from(r.is_ok());
            }
            st = self.state();
            st.counts.forwarded += sent;
        }
    }
}
