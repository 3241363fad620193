//! Simulated logs and synthetic images, for tests and the self-test.
//!
//! [`simulate`] produces a log with the same invariants as the real workload (events in
//! time order, no two in-flight ops on one block) without touching a device;
//! [`synthesize_image`] builds the image a perfect replica would hold at `T`.

use crate::block::{BLOCK_SIZE, Stamp, fill_block};
use crate::log::{Log, LogHeader, LogWriter, Op, OpKind};
use crate::region::Region;
use crate::rng::Rng;

/// Parameters of a simulated run.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// PRNG seed (also the run id).
    pub seed: u64,
    /// Region written.
    pub region: Region,
    /// Number of ops to submit.
    pub ops: usize,
    /// Queue depth.
    pub qd: usize,
    /// Max blocks per write.
    pub max_blocks: u32,
    /// Percent of ops that are discards.
    pub discard_percent: u8,
    /// A flush every this many writes (0: never).
    pub flush_every: u64,
    /// Stop without completing in-flight ops or writing End (a crashed workload).
    pub crash: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            region: Region { start: 0, len: 256 },
            ops: 2000,
            qd: 8,
            max_blocks: 8,
            discard_percent: 5,
            flush_every: 16,
            crash: false,
        }
    }
}

/// Simulates a workload and returns the encoded log.
pub fn simulate(o: &SimOptions) -> Vec<u8> {
    let mut rng = Rng::new(o.seed);
    let mut t: u64 = 1_000_000;
    let header = LogHeader {
        run_id: o.seed ^ 0xabcd,
        region: o.region,
        start_ns: t,
    };
    let mut w = LogWriter::new(Vec::new(), &header).expect("vec write");
    // (seq, first, count, complete_at, result)
    let mut inflight: Vec<(u64, u64, u64, u64, i32)> = Vec::new();
    let (mut seq, mut submitted, mut since_flush) = (0u64, 0usize, 0u64);
    loop {
        while submitted < o.ops && inflight.len() < o.qd {
            seq += 1;
            submitted += 1;
            t += rng.below(3);
            let dur = rng.range(0, 2000);
            let flush = o.flush_every > 0 && since_flush >= o.flush_every;
            let (kind, count) = if flush {
                (OpKind::Flush, 0)
            } else if rng.percent(o.discard_percent) {
                (OpKind::Discard, rng.range(1, 32).min(o.region.len))
            } else {
                (
                    OpKind::Write,
                    rng.range(1, o.max_blocks as u64).min(o.region.len),
                )
            };
            let saved = since_flush;
            match kind {
                OpKind::Write => since_flush += 1,
                OpKind::Flush => since_flush = 0,
                OpKind::Discard => {}
            }
            let first = if kind == OpKind::Flush {
                0
            } else {
                let mut found = None;
                for _ in 0..16 {
                    let f = o.region.start + rng.below(o.region.len - count + 1);
                    if inflight
                        .iter()
                        .all(|&(_, a, n, _, _)| f + count <= a || a + n <= f)
                    {
                        found = Some(f);
                        break;
                    }
                }
                match found {
                    Some(f) => f,
                    None => {
                        seq -= 1;
                        submitted -= 1;
                        since_flush = saved;
                        break;
                    }
                }
            };
            w.submit(kind, seq, first, count as u32, t)
                .expect("vec write");
            let span = if kind == OpKind::Flush { 0 } else { count };
            let res = if kind == OpKind::Write {
                count as i32 * BLOCK_SIZE as i32
            } else {
                0
            };
            inflight.push((seq, first, span, t + dur, res));
        }
        if inflight.is_empty() {
            break;
        }
        if o.crash && submitted >= o.ops {
            return w.into_inner();
        }
        let (i, _) = inflight
            .iter()
            .enumerate()
            .min_by_key(|(_, x)| x.3)
            .expect("nonempty");
        let (s, _, _, at, res) = inflight.swap_remove(i);
        t = t.max(at);
        w.complete(s, t, res).expect("vec write");
    }
    t += 1;
    w.end(t, seq).expect("vec write");
    w.into_inner()
}

/// The content a correct replica holds in `block` if `op` was the last op applied to it.
pub fn version_of(log: &Log, op: &Op, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    if op.kind == OpKind::Write {
        let stamp = Stamp {
            run_id: log.header.run_id,
            lba: block,
            seq: op.seq,
            index: (block - op.first_block) as u32,
        };
        fill_block(&mut b, &stamp);
    }
    b
}

/// Writes `op`'s version of `block` into `image` (which starts at block 0).
pub fn apply(image: &mut [u8], log: &Log, op: &Op, block: u64) {
    let off = block as usize * BLOCK_SIZE;
    let v = version_of(log, op, block);
    image[off..off + BLOCK_SIZE].copy_from_slice(&v);
}

/// Builds the image (from block 0 to the end of the log's region) that holds, for every
/// block, the last op that completed successfully before `t_ns` (zero if none).
pub fn synthesize_image(log: &Log, t_ns: u64) -> Vec<u8> {
    let mut img = vec![0u8; log.header.region.end() as usize * BLOCK_SIZE];
    for op in &log.ops {
        if op.kind != OpKind::Flush && op.ok() && op.complete_ns.is_some_and(|c| c < t_ns) {
            for b in op.first_block..op.first_block + op.block_count as u64 {
                apply(&mut img, log, op, b);
            }
        }
    }
    img
}
