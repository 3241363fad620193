//! Deterministic simulation of one agent `Sender` and one server `Receiver`
//! over a lossy, duplicating, reordering network with connection resets and
//! server crashes (losing received-but-unsynced journal entries).
//!
//! * `PROTO_SEED=1234 cargo test --test sim` replays one seed (with a trace
//!   when `PROTO_TRACE=1`).
//! * `PROTO_SEEDS=20000` runs more seeds (default 500).
//!
//! Invariants: the durable journal ends with exactly the pushed batches in
//! order (no gaps, no duplicates, identical payloads) and exactly the pushed
//! cuts, each after its data; no ack ever exceeds what is durable; the sender
//! never sees a resume error.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ripcord_proto::handshake::{PROTOCOL_VERSION, answer_hello, check_hello_ack};
use ripcord_proto::receiver::{BatchAction, CutAction, DurableState, ProtectOutcome, Receiver};
use ripcord_proto::sender::{Sender, SenderConfig, SenderEvent};
use ripcord_proto::wire::*;
use std::time::{Duration, Instant};

const DISK: DiskId = DiskId(*b"sim-disk-0000001");
const EPOCH: u64 = 7;
const MAX_TICKS: u64 = 400_000;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Rec {
    Batch {
        first: u64,
        last: u64,
        payload: Vec<u8>,
    },
    Cut {
        id: u64,
        seq: u64,
    },
}

struct Packet {
    at: u64,
    order: u64,
    conn: u64,
    bytes: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum AgentConn {
    Down { reconnect_at: u64 },
    Handshaking { since: u64, hello_ok: bool },
    Up,
}

struct Params {
    loss: f64,
    dup: f64,
    reorder: f64,
    reset: f64,
    crash: f64,
    fsync_start: f64,
}

struct Sim {
    rng: ChaCha8Rng,
    t: u64,
    base: Instant,
    p: Params,
    trace: bool,
    order: u64,
    conn: u64,
    to_server: Vec<Packet>,
    to_agent: Vec<Packet>,
    // agent
    sender: Sender,
    agent: AgentConn,
    n_batches: usize,
    pushed: Vec<Rec>,
    pushed_batches: usize,
    // server
    receiver: Receiver,
    server_hello: bool,
    journal: Vec<Rec>,
    durable_len: usize,
    fsync: Option<(u64, usize)>,
    // stats
    resets: u64,
    crashes: u64,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let p = Params {
            loss: rng.random_range(0.0..0.05),
            dup: rng.random_range(0.0..0.05),
            reorder: rng.random_range(0.0..0.05),
            reset: rng.random_range(0.0..0.003),
            crash: rng.random_range(0.0..0.5),
            fsync_start: rng.random_range(0.05..0.6),
        };
        let config = SenderConfig {
            max_inflight_batches: rng.random_range(1..10),
            max_inflight_bytes: rng.random_range(100..3000),
            max_buffered_batches: rng.random_range(2..40),
            max_buffered_bytes: rng.random_range(200..6000),
            ack_timeout: Duration::from_millis(rng.random_range(20..120)),
        };
        let n_batches = rng.random_range(20..120);
        Self {
            rng,
            t: 0,
            base: Instant::now(),
            p,
            trace: std::env::var_os("PROTO_TRACE").is_some(),
            order: 0,
            conn: 0,
            to_server: Vec::new(),
            to_agent: Vec::new(),
            sender: Sender::new(DISK, EPOCH, config),
            agent: AgentConn::Down { reconnect_at: 0 },
            n_batches,
            pushed: Vec::new(),
            pushed_batches: 0,
            receiver: Receiver::new(DISK, EPOCH),
            server_hello: false,
            journal: Vec::new(),
            durable_len: 0,
            fsync: None,
            resets: 0,
            crashes: 0,
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.t)
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[t={:>6} conn={}] {}", self.t, self.conn, what());
        }
    }

    /// Puts a frame on the wire of the current connection, with loss,
    /// duplication and reordering.
    fn send(&mut self, to_server: bool, bytes: Vec<u8>) {
        let copies = if self.rng.random_bool(self.p.loss) {
            0
        } else if self.rng.random_bool(self.p.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = self.rng.random_range(1..4);
            if self.rng.random_bool(self.p.reorder) {
                delay += self.rng.random_range(1..30);
            }
            self.order += 1;
            let pkt = Packet {
                at: self.t + delay,
                order: self.order,
                conn: self.conn,
                bytes: bytes.clone(),
            };
            if to_server {
                self.to_server.push(pkt);
            } else {
                self.to_agent.push(pkt);
            }
        }
    }

    fn send_msg(&mut self, to_server: bool, m: &Message) {
        let bytes = m.to_frame().expect("valid message");
        self.send(to_server, bytes);
    }

    /// Connection reset: both ends see it; in-flight packets die with it.
    /// Optionally the server crashes and loses un-fsynced journal entries.
    fn reset(&mut self, why: &str) {
        self.resets += 1;
        self.conn += 1;
        self.to_server.clear();
        self.to_agent.clear();
        self.sender.handle_disconnect();
        self.server_hello = false;
        let delay = self.rng.random_range(1..30);
        self.agent = AgentConn::Down {
            reconnect_at: self.t + delay,
        };
        let crash = self.rng.random_bool(self.p.crash);
        self.log(|| format!("reset ({why}), server crash: {crash}"));
        if crash {
            self.crashes += 1;
            assert_eq!(
                self.receiver.durable_state(),
                self.model_durable_state(),
                "receiver durable state disagrees with journal"
            );
            self.journal.truncate(self.durable_len);
            self.fsync = None;
            self.receiver = Receiver::restore(DISK, self.model_durable_state());
        }
    }

    fn model_durable_state(&self) -> DurableState {
        let durable = &self.journal[..self.durable_len];
        DurableState {
            epoch: EPOCH,
            durable_seq: durable
                .iter()
                .rev()
                .find_map(|r| match r {
                    Rec::Batch { last, .. } => Some(*last),
                    Rec::Cut { .. } => None,
                })
                .unwrap_or(0),
            last_cut: durable.iter().rev().find_map(|r| match r {
                Rec::Cut { id, seq } => {
                    Some(ripcord_proto::receiver::CutPos { id: *id, seq: *seq })
                }
                Rec::Batch { .. } => None,
            }),
        }
    }

    fn check_and_send_acks(&mut self) {
        while let Some(ack) = self.receiver.poll_ack() {
            let d = self.model_durable_state();
            assert!(
                ack.durable_seq <= d.durable_seq,
                "ack {ack:?} ahead of durable seq {}",
                d.durable_seq
            );
            if ack.durable_cut_id > 0 {
                let cut = self.journal[..self.durable_len]
                    .iter()
                    .find_map(|r| match r {
                        Rec::Cut { id, seq } if *id == ack.durable_cut_id => Some(*seq),
                        _ => None,
                    })
                    .unwrap_or_else(|| panic!("ack {ack:?} names a cut that is not durable"));
                assert!(
                    cut <= d.durable_seq,
                    "acked cut {ack:?} whose data is not durable"
                );
            }
            self.log(|| {
                format!(
                    "server -> Ack {} cut {}",
                    ack.durable_seq, ack.durable_cut_id
                )
            });
            self.send_msg(false, &Message::Ack(ack));
        }
    }

    // ------------------------------------------------------------- server --

    fn server_recv(&mut self, m: Message) {
        match m {
            Message::Hello(h) => match answer_hello(&h, "ps-sim", [1; 32]) {
                Ok(reply) => {
                    self.server_hello = true;
                    self.send_msg(false, &reply);
                }
                Err((e, _)) => panic!("version refused: {e}"),
            },
            Message::ProtectDisk(p) => {
                if !self.server_hello {
                    return; // Hello was lost: the agent's handshake times out.
                }
                match self.receiver.handle_protect(&p) {
                    ProtectOutcome::Resume(acc) => {
                        self.log(|| {
                            format!("server -> DiskAccepted resume {}", acc.resume_from_seq)
                        });
                        self.send_msg(false, &Message::DiskAccepted(acc));
                    }
                    other => panic!("unexpected protect outcome {other:?}"),
                }
            }
            Message::Batch(b) => {
                let action = self.receiver.handle_batch(&b);
                self.log(|| {
                    format!(
                        "server <- Batch {}..={} => {action:?}",
                        b.first_seq, b.last_seq
                    )
                });
                match action {
                    BatchAction::Append => self.journal.push(Rec::Batch {
                        first: b.first_seq,
                        last: b.last_seq,
                        payload: b.payload,
                    }),
                    BatchAction::Duplicate => {}
                    BatchAction::Gap { .. } | BatchAction::Reject(_) => {
                        let err = ErrorMessage {
                            code: ErrorCode::OutOfOrder,
                            disk_id: Some(DISK),
                            message: format!("{action:?}"),
                        };
                        self.send_msg(false, &Message::Error(err));
                        self.reset("server: out of order batch");
                        return;
                    }
                }
            }
            Message::Cut(c) => {
                let action = self.receiver.handle_cut(&c);
                self.log(|| format!("server <- Cut {} @{} => {action:?}", c.id, c.seq));
                match action {
                    CutAction::Record => self.journal.push(Rec::Cut {
                        id: c.id,
                        seq: c.seq,
                    }),
                    CutAction::Duplicate => {}
                    CutAction::Reject(_) => {
                        self.reset("server: out of order cut");
                        return;
                    }
                }
            }
            Message::Ping(p) => self.send_msg(false, &Message::Pong(Pong { nonce: p.nonce })),
            other => panic!("server got unexpected {other:?}"),
        }
        self.check_and_send_acks();
    }

    fn server_tick(&mut self) {
        if let Some((done_at, upto)) = self.fsync
            && self.t >= done_at
        {
            self.fsync = None;
            self.durable_len = self.durable_len.max(upto);
            let d = self.model_durable_state();
            self.receiver
                .handle_durable(d.durable_seq)
                .expect("durable <= received");
            if let Some(c) = d.last_cut {
                self.receiver
                    .handle_cut_durable(c.id)
                    .expect("cut recorded");
            }
            self.log(|| {
                format!(
                    "fsync done: durable seq {} cut {:?}",
                    d.durable_seq, d.last_cut
                )
            });
            self.check_and_send_acks();
        }
        if self.fsync.is_none()
            && self.journal.len() > self.durable_len
            && self.rng.random_bool(self.p.fsync_start)
        {
            let latency = self.rng.random_range(1..12);
            self.fsync = Some((self.t + latency, self.journal.len()));
        }
    }

    // -------------------------------------------------------------- agent --

    fn agent_recv(&mut self, m: Message) {
        match m {
            Message::HelloAck(a) => {
                check_hello_ack(PROTOCOL_VERSION, &a).expect("version");
                if let AgentConn::Handshaking { hello_ok, .. } = &mut self.agent {
                    *hello_ok = true;
                }
            }
            Message::DiskAccepted(acc) => {
                if !matches!(self.agent, AgentConn::Handshaking { hello_ok: true, .. }) {
                    return;
                }
                let now = self.now();
                self.sender
                    .handle_connected(now, acc.resume_from_seq)
                    .expect("resume point must always be valid");
                self.agent = AgentConn::Up;
            }
            Message::Ack(a) => {
                let now = self.now();
                self.sender
                    .handle_ack(now, &a)
                    .expect("ack must match pushed data");
            }
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::OutOfOrder, "{e:?}");
            }
            Message::Pong(_) => {}
            other => panic!("agent got unexpected {other:?}"),
        }
    }

    fn agent_tick(&mut self) {
        let now = self.now();
        // Produce data.
        for _ in 0..self.rng.random_range(0..3) {
            if self.pushed_batches >= self.n_batches || !self.sender.can_push() {
                break;
            }
            let first = self.sender.last_pushed_seq() + 1;
            let last = first + self.rng.random_range(0..4);
            let len = self.rng.random_range(0..64);
            let payload: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
            let batch = Batch {
                disk_id: DISK,
                epoch: EPOCH,
                first_seq: first,
                last_seq: last,
                extents: vec![Extent {
                    sector: first * 8,
                    sectors: 8,
                    kind: ExtentKind::Data,
                }],
                flags: FLAG_COMPRESSED | FLAG_SEALED,
                payload: payload.clone(),
            };
            self.sender.push(batch).expect("push");
            self.pushed.push(Rec::Batch {
                first,
                last,
                payload,
            });
            self.pushed_batches += 1;
            if self.rng.random_bool(0.15) {
                let kind = if self.rng.random_bool(0.5) {
                    CutKind::App
                } else {
                    CutKind::Crash
                };
                let cut = self
                    .sender
                    .push_cut(kind, self.t * 1_000_000, self.t, |_| [0; 32])
                    .expect("cut");
                self.pushed.push(Rec::Cut {
                    id: cut.id,
                    seq: cut.seq,
                });
            }
        }
        // Connection management.
        match self.agent {
            AgentConn::Down { reconnect_at } if self.t >= reconnect_at => {
                self.conn += 1;
                self.agent = AgentConn::Handshaking {
                    since: self.t,
                    hello_ok: false,
                };
                self.send_msg(
                    true,
                    &Message::Hello(Hello {
                        protocol_version: PROTOCOL_VERSION,
                        machine_id: "sim-machine".into(),
                        agent_version: "0.0.0-sim".into(),
                    }),
                );
                self.send_msg(
                    true,
                    &Message::ProtectDisk(ProtectDisk {
                        wrapped_key: vec![],
                        disk_id: DISK,
                        size_bytes: 1 << 30,
                        sector_size: 512,
                        epoch: EPOCH,
                    }),
                );
            }
            AgentConn::Handshaking { since, .. } if self.t - since > 60 => {
                self.reset("agent: handshake timeout");
            }
            _ => {}
        }
        // Timers.
        if self.sender.poll_timeout().is_some_and(|d| now >= d) {
            self.sender.handle_timeout(now);
        }
        while let Some(ev) = self.sender.poll_event() {
            let SenderEvent::ReconnectRequired { acked_seq } = ev;
            self.log(|| format!("agent: ack timeout at acked {acked_seq}"));
            self.reset("agent: ack timeout");
        }
        // Transmit.
        loop {
            let mut buf = Vec::new();
            let Some(t) = self.sender.poll_transmit(now, &mut buf) else {
                break;
            };
            self.log(|| format!("agent -> {t:?}"));
            self.send(true, buf);
        }
    }

    // ------------------------------------------------------------ network --

    fn deliver(&mut self, to_server: bool) {
        let q = if to_server {
            &mut self.to_server
        } else {
            &mut self.to_agent
        };
        let t = self.t;
        let mut due: Vec<Packet> = Vec::new();
        let mut i = 0;
        while i < q.len() {
            if q[i].at <= t {
                due.push(q.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|p| (p.at, p.order));
        for p in due {
            if p.conn != self.conn {
                continue; // the connection died meanwhile
            }
            // Feed the bytes in random chunks through the stream decoder.
            let mut dec = FrameDecoder::new();
            let mut msgs = Vec::new();
            let mut rest = &p.bytes[..];
            while !rest.is_empty() {
                let n = self.rng.random_range(1..=rest.len());
                dec.push(&rest[..n]);
                rest = &rest[n..];
                while let Some(m) = dec.next_message().expect("valid frame") {
                    msgs.push(m);
                }
            }
            assert_eq!(msgs.len(), 1);
            let m = msgs.pop().unwrap();
            if to_server {
                self.server_recv(m);
            } else {
                self.agent_recv(m);
            }
        }
    }

    fn done(&self) -> bool {
        self.pushed_batches >= self.n_batches && self.sender.is_idle()
    }

    fn run(&mut self) {
        while !self.done() {
            assert!(
                self.t < MAX_TICKS,
                "did not converge within {MAX_TICKS} ticks"
            );
            self.deliver(true);
            self.deliver(false);
            self.server_tick();
            self.agent_tick();
            if self.rng.random_bool(self.p.reset) {
                self.reset("network");
            }
            self.t += 1;
        }
        self.check_final();
    }

    fn check_final(&self) {
        assert_eq!(self.sender.acked_seq(), self.sender.last_pushed_seq());
        // Everything acked is durable, so the durable journal must hold it all.
        let durable = &self.journal[..self.durable_len];
        let batches = |v: &[Rec]| -> Vec<Rec> {
            v.iter()
                .filter(|r| matches!(r, Rec::Batch { .. }))
                .cloned()
                .collect()
        };
        let cuts = |v: &[Rec]| -> Vec<Rec> {
            v.iter()
                .filter(|r| matches!(r, Rec::Cut { .. }))
                .cloned()
                .collect()
        };
        assert_eq!(
            batches(durable),
            batches(&self.pushed),
            "batch stream differs"
        );
        assert_eq!(cuts(durable), cuts(&self.pushed), "cut stream differs");
        // Contiguity and each cut after its data.
        let mut next = 1;
        for r in durable {
            match r {
                Rec::Batch { first, last, .. } => {
                    assert_eq!(*first, next, "gap or duplicate at {first}");
                    next = last + 1;
                }
                Rec::Cut { seq, .. } => assert!(*seq < next, "cut at {seq} before its data"),
            }
        }
    }
}

fn run_seed(seed: u64) -> (u64, u64, u64) {
    let mut sim = Sim::new(seed);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    if let Err(e) = r {
        eprintln!(
            "\n*** simulation failed for seed {seed}; replay with: PROTO_SEED={seed} PROTO_TRACE=1 cargo test --test sim\n"
        );
        std::panic::resume_unwind(e);
    }
    (sim.t, sim.resets, sim.crashes)
}

#[test]
fn simulated_network_delivers_exact_stream() {
    if let Ok(s) = std::env::var("PROTO_SEED") {
        let seed: u64 = s.parse().expect("PROTO_SEED must be a u64");
        let (ticks, resets, crashes) = run_seed(seed);
        eprintln!("seed {seed}: ok in {ticks} ticks, {resets} resets, {crashes} crashes");
        return;
    }
    let n: u64 = std::env::var("PROTO_SEEDS")
        .ok()
        .map(|s| s.parse().expect("PROTO_SEEDS must be a u64"))
        .unwrap_or(500);
    let (mut resets, mut crashes) = (0, 0);
    for seed in 0..n {
        let (_, r, c) = run_seed(seed);
        resets += r;
        crashes += c;
    }
    // The faults must actually have been exercised.
    assert!(resets > n / 2, "too few resets ({resets}) for {n} seeds");
    assert!(crashes > 0 || n < 50, "no server crash in {n} seeds");
    eprintln!("{n} seeds ok: {resets} resets, {crashes} server crashes");
}
