//! Unit tests of the [`Sender`](super::Sender): windows, back-pressure, resend after
//! reconnect, ack timeout and rejected acks and pushes.

use super::*;
use crate::wire::{Extent, ExtentKind, Message, decode_frame};

const D: DiskId = DiskId([9; 16]);

fn batch(first: u64, last: u64, payload: usize) -> Batch {
    Batch {
        disk_id: D,
        epoch: 1,
        first_seq: first,
        last_seq: last,
        extents: vec![Extent {
            sector: first,
            sectors: 1,
            kind: ExtentKind::Data,
        }],
        flags: 0,
        payload: vec![0xAB; payload],
    }
}

fn drain(s: &mut Sender, now: Instant) -> Vec<Message> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while s.poll_transmit(now, &mut buf).is_some() {}
    let mut rest = &buf[..];
    while let Some((m, n)) = decode_frame(rest).unwrap() {
        out.push(m);
        rest = &rest[n..];
    }
    assert!(rest.is_empty());
    out
}

/// A cut authenticator for tests that do not check MACs.
fn no_mac(_: &Cut) -> [u8; CUT_MAC_LEN] {
    [0; CUT_MAC_LEN]
}

#[test]
fn a_cut_carries_the_mac_its_authenticator_computed_over_the_finished_cut() {
    let mut s = Sender::new(D, 1, SenderConfig::default());
    s.push(batch(1, 1, 1)).unwrap();
    let c = s
        .push_cut(CutKind::App, 5, 6, |c| {
            assert_eq!(
                (c.id, c.seq, c.epoch, c.time_ns, c.mono_ns),
                (1, 1, 1, 5, 6)
            );
            [c.id as u8; CUT_MAC_LEN]
        })
        .unwrap();
    assert_eq!(c.mac, [1; CUT_MAC_LEN]);
    s.handle_connected(Instant::now(), 1).unwrap();
    let sent = drain(&mut s, Instant::now());
    assert!(
        sent.contains(&Message::Cut(c)),
        "the queued cut is sent with its MAC"
    );
}

fn seqs(ms: &[Message]) -> Vec<(u64, u64)> {
    ms.iter()
        .map(|m| match m {
            Message::Batch(b) => (b.first_seq, b.last_seq),
            Message::Cut(c) => (0, c.id),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

fn ack(seq: u64, cut: u64) -> Ack {
    Ack {
        disk_id: D,
        epoch: 1,
        durable_seq: seq,
        durable_cut_id: cut,
    }
}

#[test]
fn window_limits_inflight_and_ack_releases() {
    let now = Instant::now();
    let cfg = SenderConfig {
        max_inflight_batches: 2,
        ..Default::default()
    };
    let mut s = Sender::new(D, 1, cfg);
    assert_eq!(s.poll_transmit(now, &mut Vec::new()), None, "not connected");
    s.handle_connected(now, 1).unwrap();
    for i in 1..=4 {
        s.push(batch(i * 2 - 1, i * 2, 10)).unwrap();
    }
    assert_eq!(seqs(&drain(&mut s, now)), vec![(1, 2), (3, 4)]);
    s.handle_ack(now, &ack(2, 0)).unwrap();
    assert_eq!(seqs(&drain(&mut s, now)), vec![(5, 6)]);
    assert_eq!(s.buffered_batches(), 3);
    s.handle_ack(now, &ack(8, 0)).unwrap();
    assert!(s.is_idle());
    assert_eq!(s.acked_seq(), 8);
}

#[test]
fn buffer_backpressure_hands_batch_back() {
    let cfg = SenderConfig {
        max_buffered_batches: 1,
        ..Default::default()
    };
    let mut s = Sender::new(D, 1, cfg);
    s.push(batch(1, 1, 0)).unwrap();
    assert!(!s.can_push());
    match s.push(batch(2, 2, 0)) {
        Err(PushError::BufferFull(b)) => assert_eq!(b.first_seq, 2),
        other => panic!("{other:?}"),
    }
    let mut s2 = Sender::new(
        D,
        1,
        SenderConfig {
            max_buffered_bytes: 100,
            ..Default::default()
        },
    );
    s2.push(batch(1, 1, 500)).unwrap(); // soft bound: one oversized batch is admitted
    assert!(!s2.can_push());
}

#[test]
fn push_rejects_bad_sequences() {
    let mut s = Sender::new(D, 1, SenderConfig::default());
    assert_eq!(
        s.push(batch(2, 2, 0)),
        Err(PushError::NotConsecutive {
            expected: 1,
            got: 2
        })
    );
    let mut other = batch(1, 1, 0);
    other.epoch = 2;
    assert!(matches!(s.push(other), Err(PushError::WrongStream { .. })));
    assert_eq!(s.push_cut(CutKind::Crash, 0, 0, no_mac).unwrap().id, 1);
    // A late cut may sit behind the last pushed batch, not ahead of it nor behind
    // the previous cut.
    assert!(matches!(
        s.push_cut_at(CutKind::Crash, 0, 0, s.last_pushed_seq + 1, None, no_mac),
        Err(PushError::CutPosition { .. })
    ));
    assert_eq!(s.push_cut(CutKind::App, 0, 0, no_mac).unwrap().id, 2);
}

#[test]
fn reconnect_resends_after_server_durable_position() {
    let now = Instant::now();
    let mut s = Sender::new(D, 1, SenderConfig::default());
    s.handle_connected(now, 1).unwrap();
    s.push(batch(1, 2, 1)).unwrap();
    s.push_cut(CutKind::App, 7, 7, no_mac).unwrap();
    s.push(batch(3, 3, 1)).unwrap();
    s.push(batch(4, 6, 1)).unwrap();
    assert_eq!(
        seqs(&drain(&mut s, now)),
        vec![(1, 2), (0, 1), (3, 3), (4, 6)]
    );
    s.handle_disconnect();
    // Server durably got more than we saw acked, but not the cut.
    s.handle_connected(now, 4).unwrap();
    assert_eq!(s.acked_seq(), 3);
    assert_eq!(seqs(&drain(&mut s, now)), vec![(0, 1), (4, 6)]);
    s.handle_disconnect();
    assert_eq!(
        s.handle_connected(now, 3),
        Err(ResumeError::ServerRegressed {
            resume_from_seq: 3,
            acked_seq: 3
        })
    );
    assert!(matches!(
        s.handle_connected(now, 6),
        Err(ResumeError::Misaligned { .. })
    ));
    assert!(matches!(
        s.handle_connected(now, 8),
        Err(ResumeError::ServerAhead { .. })
    ));
    assert_eq!(s.handle_connected(now, 0), Err(ResumeError::Zero));
    assert!(!s.is_connected());
}

#[test]
fn acks_while_disconnected_are_ignored() {
    let now = Instant::now();
    let mut s = Sender::new(D, 1, SenderConfig::default());
    s.push(batch(1, 1, 0)).unwrap();
    s.push(batch(2, 2, 0)).unwrap();
    s.handle_ack(now, &ack(2, 0)).unwrap();
    assert_eq!(s.acked_seq(), 0);
    // The resume point (older than that ack) is still honoured.
    s.handle_connected(now, 2).unwrap();
    assert_eq!(s.acked_seq(), 1);
    assert_eq!(s.buffered_batches(), 1);
}

#[test]
fn ack_timeout_requests_reconnect() {
    let t0 = Instant::now();
    let cfg = SenderConfig {
        ack_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let mut s = Sender::new(D, 1, cfg);
    s.handle_connected(t0, 1).unwrap();
    assert_eq!(s.poll_timeout(), None, "nothing in flight");
    s.push(batch(1, 1, 1)).unwrap();
    s.push(batch(2, 2, 1)).unwrap();
    assert!(s.poll_transmit(t0, &mut Vec::new()).is_some());
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    // Progress restarts the timer.
    let t1 = t0 + Duration::from_secs(3);
    assert!(s.poll_transmit(t1, &mut Vec::new()).is_some());
    s.handle_ack(t1, &ack(1, 0)).unwrap();
    assert_eq!(s.poll_timeout(), Some(t1 + Duration::from_secs(5)));
    s.handle_timeout(t1 + Duration::from_secs(4));
    assert_eq!(s.poll_event(), None);
    s.handle_timeout(t1 + Duration::from_secs(5));
    assert_eq!(
        s.poll_event(),
        Some(SenderEvent::ReconnectRequired { acked_seq: 1 })
    );
    assert!(!s.is_connected());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn ack_beyond_pushed_is_rejected() {
    let mut s = Sender::new(D, 1, SenderConfig::default());
    s.handle_connected(Instant::now(), 1).unwrap();
    s.push(batch(1, 1, 0)).unwrap();
    assert!(matches!(
        s.handle_ack(Instant::now(), &ack(2, 0)),
        Err(AckError::AheadOfPushed { .. })
    ));
    let mut a = ack(1, 0);
    a.epoch = 9;
    assert!(matches!(
        s.handle_ack(Instant::now(), &a),
        Err(AckError::WrongStream { .. })
    ));
}
